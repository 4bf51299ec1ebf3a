"""`cowlink unify`: options in, engine run, summary out."""

from __future__ import annotations

import json
import sys

import click

from .._home import Home
from .._unify import UnifyOptions, run_unify
from ._output import Console


@click.command()
@click.argument("roots", nargs=-1, type=click.Path(file_okay=False))
@click.option("--dry-run", "-n", is_flag=True, help="Change neither guest trees nor the store.")
@click.option(
    "--min-size",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Smallest file, in bytes, worth linking.",
)
@click.option("--ignore-mtime", is_flag=True, help="Link files whose mtimes differ.")
@click.option(
    "--max-links",
    type=click.IntRange(min=2),
    default=None,
    help="Most links one store object may have (default: the filesystem's limit).",
)
@click.option(
    "--exclude",
    "excludes",
    multiple=True,
    metavar="PATTERN",
    help="An exclude rule ('+' includes, '-' excludes, '~' skips); repeatable.",
)
@click.option(
    "--exclude-from",
    "exclude_files",
    multiple=True,
    metavar="FILE",
    type=click.Path(dir_okay=False, exists=True),
    help="Read exclude rules from FILE.",
)
@click.option(
    "--no-default-excludes",
    is_flag=True,
    help="Do not apply the built-in list (VServer's vunify-exclude).",
)
@click.option(
    "--allow-mutable",
    is_flag=True,
    help="Link even where the filesystem cannot make store objects immutable.",
)
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=0),
    default=0,
    help="Processes that link in parallel (default 0: one per CPU, at most 8).",
)
@click.option("--wait", is_flag=True, help="Wait for another run to finish instead of exit 75.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results.")
@click.option(
    "--metrics",
    "metrics_file",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="After the run, write Prometheus metrics to FILE (node_exporter textfile).",
)
@click.option("-v", "--verbose", count=True, help="List each action with its reason.")
@click.option("-q", "--quiet", is_flag=True, help="Print only problems.")
@click.pass_obj
def unify(
    home: Home,
    roots: tuple[str, ...],
    dry_run: bool,
    min_size: int,
    ignore_mtime: bool,
    max_links: int | None,
    excludes: tuple[str, ...],
    exclude_files: tuple[str, ...],
    no_default_excludes: bool,
    allow_mutable: bool,
    jobs: int,
    wait: bool,
    as_json: bool,
    metrics_file: str | None,
    verbose: int,
    quiet: bool,
) -> None:
    """Hardlink identical files across guest roots to immutable objects in the store.

    With no ROOTS, every guest in the home is unified. Exit status: 0 done, 1 done with
    per-file problems (each listed), 2 usage or fatal error, 75 another run holds the lock.
    """
    console = Console(verbose=0 if quiet else verbose, quiet=quiet or as_json)
    options = UnifyOptions(
        roots=list(roots),
        dry_run=dry_run,
        min_size=min_size,
        ignore_mtime=ignore_mtime,
        max_links=max_links,
        excludes=list(excludes),
        exclude_files=list(exclude_files),
        default_excludes=not no_default_excludes,
        allow_mutable=allow_mutable,
        jobs=jobs,
        wait=wait,
        metrics_file=metrics_file,
    )
    report = run_unify(home, options, console)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        console.summary(report.summary_lines())
    sys.exit(report.exit_code)
