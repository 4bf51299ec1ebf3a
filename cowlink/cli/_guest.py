"""`cowlink guest ...`: build, start, stop, restart, enter, exec, status and list guests."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .._errors import EXIT_NOT_RUNNING, UsageError
from .._home import Home

# The library modules are imported inside each command: a guest start is timed against
# bwrap, and python's imports are most of what a command costs.
_START_TIMEOUT = 60.0


@click.group("guest")
def guest() -> None:
    """Boot, stop, enter and limit guests in their own security context.

    A guest is HOME/guests/NAME/root, configured by HOME/guests/NAME/guest.toml (init
    style, stop signal and timeout, limits, network, bind mounts); its console is logged
    to HOME/log/NAME.console and its run state kept in HOME/run/NAME/.
    """


@guest.command("build")
@click.argument("name")
@click.option("--debootstrap", "suite", metavar="SUITE", help="Bootstrap Debian SUITE.")
@click.option("--mirror", metavar="URL", help="debootstrap mirror.")
@click.option("--variant", metavar="V", help="debootstrap variant (minbase, buildd, ...).")
@click.option("--include", metavar="PKGS", help="Extra packages, comma-separated.")
@click.option(
    "--from",
    "source",
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Copy this tree instead of bootstrapping.",
)
@click.pass_obj
def build(
    home: Home,
    name: str,
    suite: str | None,
    mirror: str | None,
    variant: str | None,
    include: str | None,
    source: Path | None,
) -> None:
    """Create guests/NAME/root and a guest.toml with defaults."""
    from .. import _guestbuild

    if (suite is None) == (source is None):
        raise UsageError("give exactly one of --debootstrap SUITE and --from DIR")
    if source is not None:
        if mirror or variant or include:
            raise UsageError("--mirror, --variant and --include go with --debootstrap")
        root = _guestbuild.build_from(home, name, source)
    else:
        assert suite is not None
        root = _guestbuild.build_debootstrap(
            home, name, suite, mirror=mirror, variant=variant, include=include
        )
    click.echo(f"built guest {name} in {root}")


@guest.command("start")
@click.argument("name")
@click.option(
    "--timeout",
    type=float,
    default=_START_TIMEOUT,
    show_default=True,
    help="Seconds to wait for the guest to come up.",
)
@click.pass_obj
def start(home: Home, name: str, timeout: float) -> None:
    """Boot a guest; returns once its init reports it is up."""
    from .. import _guests

    state = _guests.start(home, name, timeout=timeout)
    click.echo(f"started {name} (init pid {state.init_pid})")


@guest.command("stop")
@click.argument("name")
@click.option("--timeout", type=float, help="Seconds between halt and kill (default: guest.toml).")
@click.pass_obj
def stop(home: Home, name: str, timeout: float | None) -> None:
    """Halt a guest, kill what remains, and undo every trace of it."""
    from .. import _guests

    _guests.stop(home, name, timeout=timeout)
    click.echo(f"stopped {name}")


@guest.command("restart")
@click.argument("name")
@click.option("--timeout", type=float, help="Seconds between halt and kill (default: guest.toml).")
@click.pass_obj
def restart(home: Home, name: str, timeout: float | None) -> None:
    """Stop (if running), then start a guest."""
    from .. import _guests

    state = _guests.restart(home, name, timeout=timeout)
    click.echo(f"restarted {name} (init pid {state.init_pid})")


@guest.command("enter")
@click.argument("name")
@click.pass_context
def enter(ctx: click.Context, name: str) -> None:
    """Open a login shell inside a guest on a new pty."""
    from .._guestexec import run_in_guest

    ctx.exit(run_in_guest(ctx.obj, name, [], pty=True))


@guest.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_(ctx: click.Context, name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside a guest; its exit status and stdio pass through."""
    from .._guestexec import run_in_guest

    ctx.exit(run_in_guest(ctx.obj, name, list(command)))


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    text = f"{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 86400}d {text}" if s >= 86400 else text


@guest.command("status")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def status(home: Home, name: str, as_json: bool) -> None:
    """Show whether a guest runs, its processes, memory, CPU time and uptime (exit 3: stopped)."""
    from .. import _guests

    st = _guests.status(home, name)
    if as_json:
        data = st.as_dict()
        data["process_list"] = [{"pid": p, "command": c} for p, c in st.processes]
        click.echo(json.dumps(data, indent=1))
    elif st.running:
        click.echo(f"{name}: running, init pid {st.init_pid}, up {_duration(st.uptime)}")
        cpu = "-" if st.cpu_seconds is None else f"{st.cpu_seconds:.2f} s"
        click.echo(f"memory {_size(st.memory_bytes)}, cpu {cpu}, {len(st.processes)} processes")
        if not st.monitor_alive:
            click.echo("warning: its monitor is gone; `guest stop` will clean up")
        for pid, command in st.processes:
            click.echo(f"{pid:>8}  {command}")
    else:
        click.echo(f"{name}: stopped" + (" (stale state left by a crash)" if st.stale else ""))
    if not st.running:
        raise click.exceptions.Exit(EXIT_NOT_RUNNING)


@guest.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_(home: Home, as_json: bool) -> None:
    """List guests with their state."""
    from .. import _guests

    guests = _guests.list_guests(home)
    if as_json:
        click.echo(json.dumps([g.as_dict() for g in guests], indent=1))
        return
    click.echo(f"{'NAME':<20} {'STATE':<8} {'PID':>8} {'PROCS':>5} {'MEMORY':>10} {'UPTIME':>12}")
    for g in guests:
        state = "running" if g.running else ("stale" if g.stale else "stopped")
        if g.running and not g.monitor_alive:
            state = "orphan"
        pid = "-" if g.init_pid is None else str(g.init_pid)
        click.echo(
            f"{g.name:<20} {state:<8} {pid:>8} {len(g.processes):>5} "
            f"{_size(g.memory_bytes):>10} {_duration(g.uptime):>12}"
        )
