"""The monitor: the host-side process that creates a guest, watches its init and cleans up.

One monitor per running guest. It stays in the host's namespaces and outside the guest's
cgroups (so it can always act, even when the guest's pids.max is exhausted), holds the
guest's lock, copies the console into a size-capped log, and when init ends it undoes
every step of the start in reverse: kill what is left, network, cgroups, root mount,
state. A start that fails half-way goes through the very same unwinding.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import NoReturn

from . import _context, _guestnet, _linux
from ._cgroups import GuestCgroups
from ._guestconf import GuestConfig
from ._guestroot import mount_guest_root
from ._gueststate import GuestState, release_lock, remove_state_dir, state_dir, write_state
from ._home import Home

CONSOLE_LOG_CAP = 1 << 20  # bytes per file; one older file is kept beside it
STOPPING = "stopping"  # in the state dir: `guest stop` is ending the guest, so no reboot


class ConsoleLog:
    """HOME/log/NAME.console, rotated to NAME.console.1 when it reaches the cap."""

    def __init__(self, path: Path, cap: int = CONSOLE_LOG_CAP) -> None:
        self.path = path
        self.cap = cap
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "ab")  # noqa: SIM115 - lives as long as the guest

    def write(self, data: bytes) -> None:
        if self.f.tell() + len(data) > self.cap:
            self.f.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self.f = open(self.path, "ab")  # noqa: SIM115
            data = data[-self.cap :]
        self.f.write(data)
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def console_log_path(home: Home, name: str) -> Path:
    return home.log_dir / f"{name}.console"


def _read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 4096):
        out += chunk
    return out


class _Monitor:
    def __init__(self, home: Home, name: str, config: GuestConfig, status_fd: int) -> None:
        self.home = home
        self.name = name
        self.config = config
        self.status_fd: int | None = status_fd
        self.pidfd: int | None = None
        self.init_pid = 0
        self.log: ConsoleLog | None = None

    def report(self, message: str) -> None:
        """Tell the waiting `guest start` how it went (once)."""
        if self.status_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.status_fd, message.encode(errors="replace"))
        os.close(self.status_fd)
        self.status_fd = None

    def note(self, message: str) -> None:
        if self.log is not None and not self.log.f.closed:
            self.log.write(f"\r\ncowlink: {message}\r\n".encode(errors="replace"))

    def on_term(self, signum: int, frame: object) -> None:
        # Asked to stop (by `guest start` giving up, or by an operator): end the guest;
        # the main loop then unwinds as for any end of init.
        if self.pidfd is None:
            raise SystemExit(1)
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def kill_init(self) -> None:
        if self.pidfd is None:
            return
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.init_pid, 0)

    def forget_init(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def run(self) -> bool:
        """One boot of the guest, from set-up to clean-up. True when it asked to reboot:
        its init was killed by SIGHUP, which is what reboot(2) does in a pid namespace,
        and no `guest stop` is under way."""
        home, name, config = self.home, self.name, self.config
        self.pidfd = None
        reboot = False
        _linux.set_process_name(f"cowlink-mon {name}")
        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGINT, self.on_term)
        _linux.prctl(_linux.PR_SET_CHILD_SUBREAPER, 1)
        with ExitStack() as stack:
            self.log = ConsoleLog(console_log_path(home, name))
            stack.callback(self.log.close)
            stack.callback(self.note, f"{name} stopped")
            self.note(f"starting {name}")
            sdir = state_dir(home, name)
            sdir.mkdir(parents=True, exist_ok=True)
            stack.callback(remove_state_dir, home, name)
            state = GuestState(
                name=name,
                monitor_pid=os.getpid(),
                monitor_start=_linux.process_start_time(os.getpid()) or 0,
                network=config.network.mode,
            )
            rootfs = sdir / "root"
            stack.callback(mount_guest_root(home.guest_root(name), rootfs))
            state.rootfs = os.fspath(rootfs)
            write_state(home, state)  # from here on, a dead monitor leaves a findable trace

            groups = GuestCgroups.create(name, config.limits)
            stack.callback(groups.remove)
            stack.callback(groups.kill_all)
            state.cgroups = groups.paths

            master, slave = os.openpty()
            stack.callback(os.close, master)
            stack.callback(os.close, slave)  # kept open so the master never reads EIO
            keep = _context.capabilities(
                own_netns=config.network.mode != "host", devices_cgroup=groups.has_devices
            )
            state.keep = sorted(keep)
            sync_r, sync_w = os.pipe()
            report_r, report_w = os.pipe()
            ready_r, ready_w = os.pipe()
            pid_r, pid_w = os.pipe()
            spec = _context.ContextSpec(
                name=name,
                config=config,
                rootfs=os.fspath(rootfs),
                console=os.ttyname(slave),
                keep=keep,
                sync_fd=sync_r,
                report_fd=report_w,
                ready_fd=ready_w,
            )
            forker = os.fork()
            if forker == 0:  # joins the cgroups, then forks init into a new pid namespace
                try:
                    for fd in (master, sync_w, report_r, ready_r, pid_r):
                        os.close(fd)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    groups.join()
                    _linux.unshare(_linux.CLONE_NEWPID)
                    init = os.fork()
                    if init == 0:
                        os.close(pid_w)  # else our reader would wait for init's end
                        _context.run_init(spec)
                    os.write(pid_w, f"{init}\n".encode())
                finally:
                    os._exit(0)
            for fd in (sync_r, report_w, ready_w, pid_w):
                os.close(fd)
            stack.callback(os.close, sync_w)
            os.waitpid(forker, 0)
            pid_text = _read_all(pid_r).decode()
            os.close(pid_r)
            if not pid_text.strip():
                raise RuntimeError("could not create the guest's pid namespace")
            # The forker has exited, so init is now our child (we are a subreaper).
            self.init_pid = int(pid_text)
            self.pidfd = os.pidfd_open(self.init_pid)
            stack.callback(self.forget_init)
            stack.callback(self.kill_init)
            state.init_pid = self.init_pid
            state.init_start = _linux.process_start_time(self.init_pid) or 0
            state.pidns = _linux.namespace_inode(self.init_pid, "pid") or 0

            if os.read(report_r, 1) != b"u":
                os.close(report_r)
                raise RuntimeError(_read_all(ready_r).decode(errors="replace") or "init died")
            os.close(report_r)
            stack.callback(_guestnet.set_up(name, self.init_pid, config.network))
            if config.network.mode == "veth":
                state.veth = _guestnet.host_veth_name(name)
            write_state(home, state)
            os.write(sync_w, b"g")

            status = self.serve(master, ready_r)
            if status is not None:
                self.note(f"init ended: {_describe(status)}")
                reboot = (
                    os.WIFSIGNALED(status)
                    and os.WTERMSIG(status) == signal.SIGHUP
                    and not (sdir / STOPPING).exists()
                )
        return reboot

    def serve(self, master: int, ready_r: int) -> int | None:
        """Copy the console until init ends; settle readiness on the way. Init's wait status."""
        assert self.log is not None
        assert self.pidfd is not None
        ready_fd: int | None = ready_r
        ready_buf = b""
        status: int | None = None
        while status is None:
            watched = [master, self.pidfd] + ([ready_fd] if ready_fd is not None else [])
            readable, _, _ = select.select(watched, [], [])
            if master in readable:
                with contextlib.suppress(OSError):
                    self.log.write(os.read(master, 65536))
            if ready_fd is not None and ready_fd in readable:
                chunk = os.read(ready_fd, 4096)
                if chunk:
                    ready_buf += chunk
                else:
                    os.close(ready_fd)
                    ready_fd = None
                    if ready_buf in (b"", b"ok"):
                        self.report("ok")
                    else:
                        self.note(ready_buf.decode(errors="replace"))
                        self.report(ready_buf.decode(errors="replace"))
                        self.kill_init()
            if self.pidfd in readable:
                with contextlib.suppress(ChildProcessError):
                    _, status = os.waitpid(self.init_pid, 0)
                if status is None:
                    status = 0
        # Drain what init and the last processes wrote before the end.
        os.set_blocking(master, False)
        with contextlib.suppress(OSError):
            while data := os.read(master, 65536):
                self.log.write(data)
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                ready_buf += _read_all(ready_fd)
            os.close(ready_fd)
            message = ready_buf.decode(errors="replace").strip()
            self.report(message or f"init ended before the guest was up ({_describe(status)})")
        return status


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def spawn(home: Home, name: str, config: GuestConfig, lock_fd: int) -> tuple[int, int]:
    """Start a detached monitor that owns `lock_fd`; returns (monitor pid, status read fd).

    The caller reads "ok" or an error message from the status fd (EOF means the monitor
    died before telling).
    """
    status_r, status_w = os.pipe()
    pid_r, pid_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        # Double fork: the monitor must not stay a child of whoever called start (a
        # long-running caller would never reap it).
        try:
            os.setsid()
            monitor = os.fork()
            if monitor == 0:
                _monitor_main(home, name, config, lock_fd, status_w, (status_r, pid_r, pid_w))
            os.write(pid_w, str(monitor).encode())
        finally:
            os._exit(0)
    os.close(status_w)
    os.close(pid_w)
    os.waitpid(middle, 0)
    pid = int(_read_all(pid_r) or b"0")
    os.close(pid_r)
    return pid, status_r


def _monitor_main(
    home: Home, name: str, config: GuestConfig, lock_fd: int, status_w: int, unused: tuple[int, ...]
) -> NoReturn:
    code = 0
    monitor = _Monitor(home, name, config, status_w)
    try:
        for fd in unused:
            os.close(fd)
        # Keep nothing of the caller's: an inherited stdout pipe would make a caller that
        # captures our output wait for the guest to stop.
        devnull = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(devnull, target)
        os.close(devnull)
        os.closerange(3, min(lock_fd, status_w))
        os.closerange(min(lock_fd, status_w) + 1, max(lock_fd, status_w))
        os.closerange(max(lock_fd, status_w) + 1, _linux.MAX_FD)
        quick_reboots = 0
        while True:
            began = time.monotonic()
            if not monitor.run():
                break
            # A guest that reboots right after every boot would spin; give up on it.
            quick_reboots = quick_reboots + 1 if time.monotonic() - began < 5 else 0
            if quick_reboots >= 3:
                monitor.note("rebooting too often; leaving it stopped")
                break
    except BaseException as exc:
        code = 1
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, SystemExit) else "stopped"
        monitor.note(message)
        monitor.report(f"error: {message}")
    finally:
        monitor.report("error: the guest ended during its start")
        release_lock(home, name, lock_fd)
        sys.stdout.flush()
        os._exit(code)


def wait_for_report(status_fd: int, timeout: float) -> str | None:
    """The monitor's report, or None when `timeout` passes first."""
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([status_fd], [], [], remaining)
            if readable:
                chunk = os.read(status_fd, 4096)
                if not chunk:
                    return buf.decode(errors="replace")
                buf += chunk
    finally:
        os.close(status_fd)
