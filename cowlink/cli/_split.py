"""`cowlink split`: options in, private copies made, summary out."""

from __future__ import annotations

import json
import sys

import click

from .._home import Home
from .._split import SplitOptions, run_split
from ._output import Console


@click.command()
@click.argument("root", type=click.Path(file_okay=False, exists=True))
@click.argument("paths", nargs=-1)
@click.option("--dry-run", "-n", is_flag=True, help="Only count what would be split.")
@click.option("--wait", is_flag=True, help="Wait for another command to finish instead of exit 75.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results.")
@click.option("-v", "--verbose", count=True, help="List each file split.")
@click.option("-q", "--quiet", is_flag=True, help="Print only problems.")
@click.pass_obj
def split(
    home: Home,
    root: str,
    paths: tuple[str, ...],
    dry_run: bool,
    wait: bool,
    as_json: bool,
    verbose: int,
    quiet: bool,
) -> None:
    """Give the guest tree ROOT private copies of the files it shares with the store.

    With PATHs (as the guest sees them, e.g. /usr/bin), only files at or below them are
    split. Names that are one file to the guest (its own hardlinks) get one copy together.
    Each copy keeps content, holes, mode, owner, xattrs, atime and mtime, and is on disk
    before it replaces a name. Nothing changes
    when the filesystem lacks the space all the copies need. Exit status: 0 done, 1 done
    with per-file problems, 2 fatal error, 75 another command holds the lock.
    """
    console = Console(verbose=0 if quiet else verbose, quiet=quiet or as_json)
    options = SplitOptions(root=root, paths=list(paths), dry_run=dry_run, wait=wait)
    report = run_split(home, options, console)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        console.summary(report.summary_lines())
    sys.exit(report.exit_code)
