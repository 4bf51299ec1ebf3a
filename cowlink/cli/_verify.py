"""`cowlink verify`: reread every store object; list each problem with who links it."""

from __future__ import annotations

import json
import sys

import click

from .._home import Home
from .._verify import run_verify
from ._output import Console


@click.command()
@click.option("--quick", is_flag=True, help="Check stat data and flags only; read no content.")
@click.option("--wait", is_flag=True, help="Wait for another command to finish instead of exit 75.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results.")
@click.pass_obj
def verify(home: Home, quick: bool, wait: bool, as_json: bool) -> None:
    """Check every store object: content digest, immutable flag, mode, owner and xattrs.

    Exit status: 0 no problem, 1 problems found (each listed with the guests' paths that
    link the object), 75 another command holds the lock.
    """
    console = Console(quiet=True)
    report = run_verify(home, console, quick=quick, wait=wait)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for line in report.summary_lines():
            click.echo(line)
    sys.exit(report.exit_code)
