"""`cowlink status`: guests, store, catalogue and the last unify run, at a glance."""

from __future__ import annotations

import json

import click

from .._home import Home
from .._status import read_status


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def status(home: Home, as_json: bool) -> None:
    """Show the home's guests, store objects and bytes, links, and the last unify run."""
    result = read_status(home)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        for line in result.summary_lines():
            click.echo(line)
