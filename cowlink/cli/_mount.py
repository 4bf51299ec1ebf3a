"""`cowlink mount` and `cowlink umount`: options in, daemon started or stopped."""

from __future__ import annotations

import os

import click

from .._errors import UsageError
from .._home import Home
from .._mounting import MountRequest, mount_background, mount_foreground, unmount


@click.command()
@click.argument("args", nargs=-1, metavar="[ROOT] MOUNTPOINT")
@click.option("--guest", metavar="NAME", help="Mount the guest NAME of the home (no ROOT).")
@click.option("--foreground", "-f", is_flag=True, help="Serve in this process until unmounted.")
@click.option(
    "--writeback/--no-writeback",
    default=True,
    show_default=True,
    help="Let the kernel cache writes (the fast path).",
)
@click.option("-v", "--verbose", count=True, help="Log each copy-on-write break (-vv: more).")
@click.pass_obj
def mount(
    home: Home,
    args: tuple[str, ...],
    guest: str | None,
    foreground: bool,
    writeback: bool,
    verbose: int,
) -> None:
    """Mount a guest root copy-on-write on MOUNTPOINT; return once the mount is ready.

    A write, truncate, chmod, chown, utime, xattr change or link to a file shared with
    the store first gives the guest a private copy. The daemon logs to HOME/log.
    """
    if guest is not None:
        if len(args) != 1:
            raise UsageError("with --guest, give only the MOUNTPOINT")
        root, name = str(home.guest_root(guest)), guest
        mountpoint = args[0]
    else:
        if len(args) != 2:
            raise UsageError("give ROOT and MOUNTPOINT, or --guest NAME and MOUNTPOINT")
        root, mountpoint = args
        name = home.guest_of_root(root) or os.path.basename(os.path.realpath(root)) or "root"
    request = MountRequest(
        root=os.path.abspath(root),
        mountpoint=os.path.abspath(mountpoint),
        name=name,
        verbose=verbose,
        writeback=writeback,
    )
    if foreground:
        mount_foreground(home, request)
    else:
        pid = mount_background(home, request)
        if verbose:
            click.echo(
                f"mounted {request.root} on {request.mountpoint} (daemon pid {pid})", err=True
            )


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.pass_obj
def umount(home: Home, mountpoint: str) -> None:
    """Unmount MOUNTPOINT (clearing it even if its daemon died) and wait for the daemon."""
    unmount(home, os.path.abspath(mountpoint))
