"""Guest lifecycle commands: start, stop, restart, status and list.

`start` hands the work to a monitor process (see _monitor) and waits until it reports the
guest up or failed; `stop` asks init to halt, kills on timeout, and waits for the monitor
to finish its clean-up, doing that clean-up itself when the monitor is gone.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import _guestconf, _guestnet, _linux, _monitor
from ._cgroups import GuestCgroups
from ._context import INIT_NAME, resolve_in_root
from ._errors import GuestNotRunning, GuestRunning, GuestStartFailed, UsageError
from ._guestconf import GuestConfig
from ._guestexec import run_in_guest
from ._gueststate import (
    GuestState,
    is_locked,
    read_state,
    release_lock,
    remove_state_dir,
    state_dir,
    try_lock,
    wait_unlocked,
)
from ._home import Home

DEFAULT_START_TIMEOUT = 60.0
_CLEANUP_TIMEOUT = 15.0


def config_path(home: Home, name: str) -> Path:
    return home.guest_dir(name) / "guest.toml"


def load_config(home: Home, name: str) -> GuestConfig:
    """The guest's configuration.

    Raises:
        UsageError: there is no such guest, or its guest.toml is invalid.
    """
    root = home.guest_root(name)
    if not root.is_dir():
        raise UsageError(f"no guest {name!r}: {root} does not exist")
    return _guestconf.load(config_path(home, name), name, root)


def _refuse_systemd(root: Path, config: GuestConfig) -> None:
    """systemd as pid 1 needs CAP_SYS_ADMIN (and cgroup writes) that the context drops:
    refuse before doing anything rather than half-start it."""
    if config.init.style != "plain":
        return
    binary = resolve_in_root(os.fspath(root), config.init.command[0])
    if os.path.basename(binary) == "systemd" or "/systemd/" in binary:
        raise UsageError(
            f"{config.init.command[0]} is systemd, which needs capabilities a cowlink guest "
            "does not get (CAP_SYS_ADMIN); use init style 'sysv' (runs /etc/rc<N>.d) or "
            "'services' in guest.toml"
        )


def cleanup_leftovers(home: Home, name: str, state: GuestState | None) -> None:
    """Undo what a guest whose monitor died left behind; idempotent."""
    if state is not None:
        groups = GuestCgroups(state.cgroups)
        if state.init_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.init_pid, signal.SIGKILL)
        groups.kill_all()
        groups.remove()
        if state.veth:
            _guestnet.delete_veth(state.veth)
        if state.rootfs:
            with contextlib.suppress(OSError):
                _linux.umount2(state.rootfs, _linux.MNT_DETACH)
    remove_state_dir(home, name)


def start(home: Home, name: str, *, timeout: float = DEFAULT_START_TIMEOUT) -> GuestState:
    """Boot the guest and return once it is up (its init reported ready).

    Raises:
        UsageError: no such guest, a bad guest.toml, or systemd as init.
        GuestRunning: the guest is already running.
        GuestStartFailed: the guest did not come up; everything was undone.
    """
    config = load_config(home, name)
    _refuse_systemd(home.guest_root(name), config)
    lock_fd = try_lock(home, name)
    if lock_fd is None:
        raise GuestRunning(f"guest {name} is already running")
    try:
        stale = read_state(home, name)
        if stale is not None and stale.init_alive():
            raise GuestRunning(
                f"guest {name} is running without its monitor (init pid {stale.init_pid}); "
                "`cowlink guest stop` it first"
            )
        if stale is not None or state_dir(home, name).exists():
            cleanup_leftovers(home, name, stale)
        monitor, status_fd = _monitor.spawn(home, name, config, lock_fd)
    finally:
        os.close(lock_fd)  # the monitor holds its own copy of the lock now
    try:
        report = _monitor.wait_for_report(status_fd, timeout)
    except BaseException:
        # Interrupted while the guest was coming up: take it down again before saying so.
        with contextlib.suppress(ProcessLookupError):
            os.kill(monitor, signal.SIGTERM)
        wait_unlocked(home, name, _CLEANUP_TIMEOUT)
        raise
    if report == "ok":
        state = read_state(home, name)
        if state is not None:
            return state
        report = "the guest stopped right after starting"
    if report is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(monitor, signal.SIGTERM)
        wait_unlocked(home, name, _CLEANUP_TIMEOUT)
        raise GuestStartFailed(f"guest {name} was not up after {timeout:g} s; stopped it again")
    wait_unlocked(home, name, _CLEANUP_TIMEOUT)
    detail = report.removeprefix("error: ").strip() or "its monitor died"
    raise GuestStartFailed(f"guest {name} failed to start: {detail}")


def _wait_pidfd(pidfd: int, timeout: float) -> bool:
    readable, _, _ = select.select([pidfd], [], [], max(timeout, 0))
    return bool(readable)


def stop(home: Home, name: str, *, timeout: float | None = None) -> None:
    """Halt the guest: stop signal or command, wait, kill signal; then all clean-up.

    Raises:
        GuestNotRunning: the guest is not running (leftovers of a crash are cleaned up).
    """
    config = load_config(home, name)
    wait = config.stop.timeout if timeout is None else timeout
    state = read_state(home, name)
    if state is None or not state.init_alive():
        running = is_locked(home, name)
        if running and state is None:
            # Still starting: the state is written before init exists. Wait briefly.
            time.sleep(0.5)
            state = read_state(home, name)
        if state is None or not state.init_alive():
            if not running:
                if state is not None or state_dir(home, name).exists():
                    cleanup_leftovers(home, name, state)
                raise GuestNotRunning(f"guest {name} is not running")
            # Monitor alive but init already gone: it is cleaning up.
            wait_unlocked(home, name, _CLEANUP_TIMEOUT)
            return
    try:
        pidfd = os.pidfd_open(state.init_pid)
    except ProcessLookupError:
        pidfd = None
    if pidfd is not None:
        try:
            # The halt signal may make the guest's own init call reboot(2); the marker
            # tells the monitor that this end is a stop, not a reboot.
            with contextlib.suppress(OSError):
                (state_dir(home, name) / _monitor.STOPPING).touch()
            if not state.init_alive():  # the pid was reused between the check and the open
                raise GuestNotRunning(f"guest {name} is not running")
            if config.stop.command:
                with contextlib.suppress(Exception):
                    run_in_guest(home, name, list(config.stop.command), timeout=wait)
            else:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, config.stop.signal)
            if not _wait_pidfd(pidfd, wait):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, config.stop.kill_signal)
                if not _wait_pidfd(pidfd, 5.0):
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            os.close(pidfd)
    # Init is gone; the monitor kills the rest and frees the lock when all is undone.
    # Without a monitor (or after it failed), we undo what is left ourselves.
    if state.monitor_alive():
        wait_unlocked(home, name, _CLEANUP_TIMEOUT)
    lock_fd = try_lock(home, name)
    if lock_fd is None:
        raise GuestRunning(f"guest {name}: its monitor (pid {state.monitor_pid}) is stuck")
    try:
        if read_state(home, name) is not None or state_dir(home, name).exists():
            cleanup_leftovers(home, name, state)
    finally:
        release_lock(home, name, lock_fd)


def restart(home: Home, name: str, *, timeout: float | None = None) -> GuestState:
    with contextlib.suppress(GuestNotRunning):
        stop(home, name, timeout=timeout)
    return start(home, name)


@dataclass
class GuestStatus:
    name: str
    running: bool
    init_pid: int | None = None
    uptime: float | None = None
    memory_bytes: int | None = None
    cpu_seconds: float | None = None
    processes: list[tuple[int, str]] = field(default_factory=list)
    monitor_alive: bool = False
    network: str | None = None
    stale: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "running": self.running,
            "init_pid": self.init_pid,
            "uptime": None if self.uptime is None else round(self.uptime, 1),
            "memory_bytes": self.memory_bytes,
            "cpu_seconds": None if self.cpu_seconds is None else round(self.cpu_seconds, 3),
            "processes": len(self.processes),
            "monitor_alive": self.monitor_alive,
            "network": self.network,
            "stale": self.stale,
        }


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() == INIT_NAME:
                return INIT_NAME  # its command line is the host's python starting it
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        text = b" ".join(a for a in argv if a).decode(errors="replace")
        if text:
            return text
        with open(f"/proc/{pid}/comm") as f:
            return f"[{f.read().strip()}]"
    except OSError:
        return "?"


def status(home: Home, name: str) -> GuestStatus:
    home.guest_dir(name)  # validates the name
    state = read_state(home, name)
    if state is None or not state.init_alive():
        stale = state is not None and not is_locked(home, name)
        return GuestStatus(name, running=False, stale=stale)
    groups = GuestCgroups(state.cgroups)
    pids = sorted(groups.procs())
    return GuestStatus(
        name,
        running=True,
        init_pid=state.init_pid,
        uptime=time.time() - state.started_at,
        memory_bytes=groups.memory_bytes(),
        cpu_seconds=groups.cpu_seconds(),
        processes=[(pid, _comm(pid)) for pid in pids],
        monitor_alive=state.monitor_alive(),
        network=state.network,
    )


def list_guests(home: Home) -> list[GuestStatus]:
    names = set(home.guest_names())
    with contextlib.suppress(FileNotFoundError):
        names.update(p.name for p in home.run_dir.iterdir() if p.is_dir())
    return [status(home, name) for name in sorted(names)]
