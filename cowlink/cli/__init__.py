"""The `cowlink` command line: global options, the command list, and exit-code mapping.

Commands live one per module (`_unify`, ...). They parse options, call the library and
render its result; no logic of their own. Every CowlinkError becomes its message on
stderr and its exit code, here and nowhere else.
"""

from __future__ import annotations

import importlib
import signal
import sys

import click

from .. import __version__
from .._errors import CowlinkError, Interrupted
from .._home import Home

#: Each command lives in its own module, imported only when that command runs, so that a
#: quick command (`cowlink du` from a monitoring job) does not pay for the others.
_COMMANDS = {
    "du": "._du:du",
    "guest": "._guest:guest",
    "mount": "._mount:mount",
    "umount": "._mount:umount",
    "unify": "._unify:unify",
}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        spec = _COMMANDS.get(name)
        if spec is None:
            return None
        module, _, attr = spec.partition(":")
        command = getattr(importlib.import_module(module, __package__), attr)
        assert isinstance(command, click.Command)
        return command

    def invoke(self, ctx: click.Context) -> object:
        # Until a command installs its own handlers, SIGTERM stops as SIGINT does.
        signal.signal(signal.SIGTERM, _terminate)
        try:
            return super().invoke(ctx)
        except CowlinkError as exc:
            click.echo(f"cowlink: {exc.message}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("cowlink: interrupted before anything was changed", err=True)
            ctx.exit(128 + signal.SIGINT)


def _terminate(signum: int, frame: object) -> None:
    raise Interrupted(signum)


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
