"""`cowlink gc`: remove store objects nothing links any more; print what was freed."""

from __future__ import annotations

import json
import sys

import click

from .._gc import run_gc
from .._home import Home
from ._output import Console


@click.command()
@click.option("--dry-run", "-n", is_flag=True, help="Only list what would be removed.")
@click.option("--wait", is_flag=True, help="Wait for another command to finish instead of exit 75.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results.")
@click.option("-v", "--verbose", count=True, help="List each object removed.")
@click.pass_obj
def gc(home: Home, dry_run: bool, wait: bool, as_json: bool, verbose: int) -> None:
    """Remove store objects that only the store links, and catalogue rows of gone inodes.

    An object's link count decides, not the catalogue: an object linked by any path,
    even outside every guest, is kept.
    """
    console = Console(verbose=verbose, quiet=as_json)
    report = run_gc(home, console, dry_run=dry_run, wait=wait)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        console.summary(report.summary_lines())
    sys.exit(report.exit_code)
