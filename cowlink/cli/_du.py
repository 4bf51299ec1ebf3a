"""`cowlink du`: what each guest costs on disk, what it shares, and what unification saved."""

from __future__ import annotations

import sys

import click

from .._errors import EXIT_OK, EXIT_PROBLEMS, UsageError
from .._home import Home
from ._output import printable


@click.command()
@click.argument("roots", nargs=-1, type=click.Path(file_okay=False, exists=True))
@click.option(
    "--top",
    "top",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="List the N shared files whose links save the most.",
)
@click.option(
    "--depth",
    "depth",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Break usage down per directory, N levels below each root.",
)
@click.option("--bytes", "exact", is_flag=True, help="Exact byte counts instead of KiB/MiB/GiB.")
@click.option("--json", "fmt", flag_value="json", help="Print one JSON document (docs/du.md).")
@click.option("--csv", "fmt", flag_value="csv", help="Print CSV: guest, total, top and dir rows.")
@click.option(
    "--html",
    "html_file",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Also write a self-contained HTML report to FILE.",
)
@click.option(
    "--metrics",
    "metrics_file",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Also write Prometheus metrics to FILE (atomically), for node_exporter.",
)
@click.pass_obj
def du(
    home: Home,
    roots: tuple[str, ...],
    top: int,
    depth: int | None,
    exact: bool,
    fmt: str | None,
    html_file: str | None,
    metrics_file: str | None,
) -> None:
    """Show what each guest costs on disk and what unification saved.

    With no ROOTS, every guest in the home is measured. Inodes count once however many
    paths link them; totals equal `du -sx --total` over the same roots. Exit status: 0,
    1 when some paths could not be read (each listed on stderr), 2 on a usage error.
    """
    # Imported here so that other commands do not pay for them at start-up.
    from .._du import measure_home
    from .._du_render import as_csv, as_html, as_json, table
    from .._metrics import read_last_unify, write_atomically, write_metrics

    report = measure_home(home, list(roots) or None, top=top, depth=depth)
    last_unify = read_last_unify(home)
    for problem in report.problems:
        click.echo(f"cowlink: {printable(problem.path)}: {problem.error}", err=True)
    if fmt == "json":
        click.echo(as_json(report, last_unify), nl=False)
    elif fmt == "csv":
        click.echo(as_csv(report), nl=False)
    else:
        click.echo(table(report, exact=exact, last_unify=last_unify), nl=False)
    target = ""
    try:
        if html_file:
            target = html_file
            write_atomically(html_file, as_html(report, last_unify))
        if metrics_file:
            target = metrics_file
            write_metrics(home, metrics_file, report=report, last_unify=last_unify)
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc.strerror}") from None
    sys.exit(EXIT_PROBLEMS if report.problems else EXIT_OK)
