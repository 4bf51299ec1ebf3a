"""The `cowlink` command line: global options, the command list, and exit-code mapping.

Commands live one per module (`_unify`, ...). They parse options, call the library and
render its result; no logic of their own. Every CowlinkError becomes its message on
stderr and its exit code, here and nowhere else.
"""

from __future__ import annotations

import sys

import click

from .. import __version__
from .._errors import CowlinkError
from .._home import Home


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except CowlinkError as exc:
            click.echo(f"cowlink: {exc.message}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cowlink")
@click.option(
    "--home",
    "home_path",
    metavar="DIR",
    help="cowlink's home (default: $COWLINK_HOME, else /var/lib/cowlink).",
)
@click.pass_context
def main(ctx: click.Context, home_path: str | None) -> None:
    """Unify guest trees into an immutable store, mount them copy-on-write, run guests."""
    ctx.obj = Home.resolve(home_path)


def _register() -> None:
    # One import per command module; each module defines one click command or group.
    from ._unify import unify

    main.add_command(unify)


_register()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
