"""`cowlink remove`: delete a guest tree, names of shared immutable inodes included."""

from __future__ import annotations

import json
import sys

import click

from .._home import Home
from .._remove import run_remove
from ._output import Console


@click.command()
@click.argument("root", type=click.Path(file_okay=False, exists=True))
@click.option("--wait", is_flag=True, help="Wait for another command to finish instead of exit 75.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results.")
@click.option("-v", "--verbose", count=True, help="List each name of a shared inode removed.")
@click.pass_obj
def remove(home: Home, root: str, wait: bool, as_json: bool, verbose: int) -> None:
    """Delete the guest tree ROOT, including names of immutable store objects.

    Only the guest's own names go: the store and every other guest keep their links, and
    shared inodes stay immutable. For a guest of the home (HOME/guests/NAME/root), the
    whole HOME/guests/NAME/ goes; a running guest is refused. Any other ROOT must be one
    that `cowlink unify ROOT` has linked. Exit status: 0 removed,
    1 some names could not be removed (each listed), 2 refused, 75 lock held.
    """
    console = Console(verbose=verbose, quiet=as_json)
    report = run_remove(home, root, console, wait=wait)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        console.summary(
            [
                f"removed {report.root}: {report.files_removed} files "
                f"({report.shared_names_removed} names of shared inodes), "
                f"{report.dirs_removed} directories"
                + (f"; {len(report.errors)} problems" if report.errors else "")
            ]
        )
    sys.exit(report.exit_code)
