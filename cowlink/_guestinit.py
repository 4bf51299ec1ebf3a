"""cowlink's own pid 1 for the sysv, services and rescue init styles: start, reap, halt.

It runs inside the guest, after pivot_root, in the python process that built the context;
it therefore imports nothing lazily. Signals are blocked and taken with sigtimedwait, so
no handler ever interrupts a half-done step:

- SIGCHLD: reap every exited child (pid 1 adopts every orphan of the guest);
- SIGTERM, SIGINT, SIGPWR, SIGUSR1, SIGUSR2 (what `halt`/`poweroff` send): halt;
- SIGHUP: also halt; the monitor treats init's exit the same way.

Halt runs the stop commands in reverse order, then SIGTERM to everything left, a short
grace period, SIGKILL, and exits 0.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import time
from collections.abc import Sequence

from ._guestconf import InitConfig

_HALT = frozenset(
    {signal.SIGTERM, signal.SIGINT, signal.SIGPWR, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP}
)
_WATCHED = _HALT | {signal.SIGCHLD}
_STEP_TIMEOUT = 60.0
_GRACE = 2.0


def sysv_scripts(root: str, runlevel: int) -> list[str]:
    """The /etc/rc<N>.d/S* links of a runlevel, in the order rc runs them."""
    scripts = sorted(glob.glob(os.path.join(root, f"etc/rc{runlevel}.d/S*")))
    return [s for s in scripts if os.access(s, os.X_OK)]


def _commands(init: InitConfig) -> tuple[list[list[str]], list[list[str]]]:
    if init.style == "sysv":
        scripts = list(sysv_scripts("/", init.runlevel))
        return [[s, "start"] for s in scripts], [[s, "stop"] for s in reversed(scripts)]
    if init.style == "services":
        starts = [["/bin/sh", "-c", s.start] for s in init.services]
        stops = [["/bin/sh", "-c", s.stop] for s in reversed(init.services) if s.stop]
        return starts, stops
    return [list(init.command)], []  # rescue


class _Init:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.halting = False
        self.exited: dict[int, int] = {}

    def spawn(self, argv: Sequence[str]) -> int | None:
        try:
            pid = os.fork()
        except OSError:
            return None
        if pid == 0:
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                os.setsid()
                os.execve(argv[0], list(argv), self.env)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.write(2, f"cowlink-init: {argv[0]}: {exc}\n".encode(errors="replace"))
            os._exit(127)
        return pid

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.exited[pid] = status

    def wait_signal(self, timeout: float) -> None:
        info = signal.sigtimedwait(_WATCHED, max(timeout, 0.0))
        if info is not None and info.si_signo in _HALT:
            self.halting = True
        self.reap()

    def run(self, argv: Sequence[str], *, until_halt: bool = False) -> int | None:
        """Run one command to its end (or until a halt is asked for); its wait status."""
        pid = self.spawn(argv)
        if pid is None:
            return None
        deadline = time.monotonic() + (float("inf") if until_halt else _STEP_TIMEOUT)
        self.reap()
        while pid not in self.exited:
            if self.halting and until_halt:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None  # a hung script must not hold up the boot forever
            self.wait_signal(min(remaining, 1.0))
        return self.exited.pop(pid)

    def kill_rest(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGTERM)
        deadline = time.monotonic() + _GRACE
        while time.monotonic() < deadline:
            self.reap()
            try:
                os.kill(-1, 0)
            except ProcessLookupError:
                return
            signal.sigtimedwait(_WATCHED, 0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        self.reap()


def main(init: InitConfig, env: dict[str, str], ready_fd: int) -> None:
    """Start the guest's services, report ready on `ready_fd`, serve until halt, exit."""
    if os.getpid() != 1:
        # Halting ends with kill(-1): outside its own pid namespace that would signal
        # every process of the host.
        raise RuntimeError("cowlink's init must be pid 1 of a new pid namespace")
    signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
    me = _Init(env)
    starts, stops = _commands(init)
    status = 0
    if init.style == "rescue":
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
        result = me.run(starts[0], until_halt=True)
        if result is not None:
            status = os.waitstatus_to_exitcode(result)
            status = status if status >= 0 else 128 - status
    else:
        for argv in starts:
            if me.halting:
                break
            me.run(argv)
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
        while not me.halting:
            me.wait_signal(3600)
        for argv in stops:
            me.run(argv)
    me.kill_rest()
    os._exit(status)
