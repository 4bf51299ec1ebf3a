"""`guest exec` and `guest enter`: run a process inside a running guest's context.

The helper that joins the guest is made non-dumpable and loses its bounding set before
the first setns, so the guest can neither ptrace it nor reach the host's python through
/proc/PID/exe (CVE-2016-8649 and relatives). It joins the mount namespace before the pid
namespace, forks (only the child is in the guest's pid namespace), and locks the child
down exactly like init: seccomp, then capabilities. `enter` gives the shell a fresh pty
and relays it; the guest never receives the operator's terminal (TIOCSTI).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import stat
import struct
import sys
import termios
import time
import tty
from collections.abc import Iterator

from . import _context, _linux
from ._cgroups import GuestCgroups
from ._errors import GuestNotRunning
from ._gueststate import GuestState, read_state
from ._home import Home

# setns order: cgroup first (it changes how cgroup paths look), mnt before pid.
_NAMESPACES = (
    ("cgroup", _linux.CLONE_NEWCGROUP),
    ("ipc", _linux.CLONE_NEWIPC),
    ("uts", _linux.CLONE_NEWUTS),
    ("net", _linux.CLONE_NEWNET),
    ("mnt", _linux.CLONE_NEWNS),
    ("pid", _linux.CLONE_NEWPID),
)
_SHELLS = ("/bin/bash", "/bin/sh")
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_TIOCSPTLCK = 0x40045431
_TIOCGPTPEER = 0x5441


def _running_state(home: Home, name: str) -> GuestState:
    home.guest_dir(name)
    state = read_state(home, name)
    if state is None or not state.init_alive():
        raise GuestNotRunning(f"guest {name} is not running")
    return state


def _open_namespaces(state: GuestState) -> list[tuple[int, int]]:
    fds: list[tuple[int, int]] = []
    try:
        for kind, flag in _NAMESPACES:
            fds.append((os.open(f"/proc/{state.init_pid}/ns/{kind}", os.O_RDONLY), flag))
    except FileNotFoundError:
        for fd, _ in fds:
            os.close(fd)
        raise GuestNotRunning(f"guest {state.name} is not running") from None
    # Checked after opening: the fds now name init's namespaces even if its pid is reused.
    if not state.init_alive():
        for fd, _ in fds:
            os.close(fd)
        raise GuestNotRunning(f"guest {state.name} is not running")
    return fds


def _exec_in_guest(argv: list[str], env: dict[str, str]) -> None:
    os.chdir("/")
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    if not argv:
        for shell in _SHELLS:
            if os.access(shell, os.X_OK):
                argv = [shell, "-l"]
                break
        else:
            raise FileNotFoundError(errno.ENOENT, "no shell in the guest", _SHELLS[-1])
    os.execvpe(argv[0], argv, env)


def _join(state: GuestState, ns_fds: list[tuple[int, int]], keep: frozenset[int]) -> None:
    """In the helper child: enter the guest's cgroups and namespaces, then lock down."""
    GuestCgroups(state.cgroups).join()
    _linux.prctl(_linux.PR_SET_DUMPABLE, 0)
    _linux.drop_bounding_set(keep)
    for fd, flag in ns_fds:
        _linux.setns(fd, flag)
        os.close(fd)
    _context.lock_down(keep)


def run_in_guest(
    home: Home,
    name: str,
    argv: list[str],
    *,
    pty: bool = False,
    timeout: float | None = None,
) -> int:
    """Run `argv` (empty: a login shell) inside the guest; its exit status (128+N if killed).

    With `pty`, the process gets a new pty (of the guest's devpts) relayed to our stdin
    and stdout; otherwise it inherits our stdin, stdout and stderr, but in a session of
    its own: our terminal is never its controlling tty, so /dev/tty in the guest does not
    reach it. SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to us are passed on to it.

    Raises:
        GuestNotRunning: the guest is not running.
    """
    state = _running_state(home, name)
    ns_fds = _open_namespaces(state)
    keep = frozenset(state.keep)
    env = dict(_context.GUEST_ENV)
    if "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    parent_sock, helper_sock = socket.socketpair() if pty else (None, None)
    helper = os.fork()
    if helper == 0:
        code = 126
        try:
            # Out of our process group, so the terminal's ^C reaches the guest's process
            # once (we pass it on), not twice.
            os.setpgid(0, 0)
            slave = -1
            _join(state, ns_fds, keep)
            if helper_sock is not None:
                master, slave = _guest_pty()
                socket.send_fds(helper_sock, [b"m"], [master])
                os.close(master)
            child = os.fork()
            if child == 0:
                try:
                    os.setsid()
                    if slave >= 0:
                        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
                        for target in (0, 1, 2):
                            os.dup2(slave, target)
                    os.closerange(3, _linux.MAX_FD)
                    _exec_in_guest(argv, env)
                except BaseException as exc:
                    with contextlib.suppress(OSError):
                        os.write(2, f"cowlink: {exc}\n".encode(errors="replace"))
                    os._exit(127 if isinstance(exc, FileNotFoundError) else 126)
            if slave >= 0:
                os.close(slave)
            for sig in _FORWARDED:
                signal.signal(sig, lambda signum, _frame: _pass_on(child, signum))
            _, wstatus = os.waitpid(child, 0)
            code = _exit_code(wstatus)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(2, f"cowlink: cannot enter guest {name}: {exc}\n".encode())
        finally:
            os._exit(code)
    for fd, _ in ns_fds:
        os.close(fd)
    if parent_sock is not None and helper_sock is not None:
        helper_sock.close()
        try:
            _, fds, _, _ = socket.recv_fds(parent_sock, 16, 1)
        finally:
            parent_sock.close()
        if fds:
            _copy_window_size(fds[0])
            try:
                _relay(fds[0])
            finally:
                os.close(fds[0])
    return _wait_helper(helper, timeout)


def _guest_pty() -> tuple[int, int]:
    """A pty pair from the guest's own devpts, so that the guest's ttyname() knows it.

    Opened by path inside the guest's mount namespace, checked to be a ptmx node, and the
    slave is taken from the master (TIOCGPTPEER) rather than looked up by name.
    """
    master = os.open("/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(master)
    if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (5, 2):
        os.close(master)
        raise OSError(errno.EPERM, "the guest's /dev/pts/ptmx is not a pty multiplexer")
    fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
    slave = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    return master, slave


def _exit_code(wstatus: int) -> int:
    code = os.waitstatus_to_exitcode(wstatus)
    return code if code >= 0 else 128 - code


def _pass_on(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _wait_helper(helper: int, timeout: float | None) -> int:
    with _forwarding_signals(helper):
        if timeout is None:
            _, wstatus = os.waitpid(helper, 0)
            return _exit_code(wstatus)
        deadline = time.monotonic() + timeout
        while True:
            pid, wstatus = os.waitpid(helper, os.WNOHANG)
            if pid:
                return _exit_code(wstatus)
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(helper, signal.SIGKILL)
                os.waitpid(helper, 0)
                return 124
            time.sleep(0.02)


@contextlib.contextmanager
def _forwarding_signals(helper: int) -> Iterator[None]:
    """Pass what the operator sends us on to the guest's process (via the helper), and
    report its exit status rather than dying first."""
    old = {sig: signal.signal(sig, lambda s, _f: _pass_on(helper, s)) for sig in _FORWARDED}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _copy_window_size(master: int) -> None:
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(sys.stdin.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)


def _relay(master: int) -> None:
    """Copy our stdin to the pty and the pty to our stdout until the guest side hangs up."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    saved = None
    if os.isatty(stdin):
        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin)
    old_winch = signal.signal(signal.SIGWINCH, lambda *_: _copy_window_size(master))
    try:
        inputs = [master, stdin]
        while True:
            readable, _, _ = select.select(inputs, [], [], 0.5)
            if master in readable:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    data = b""  # EIO: every slave fd is closed
                if not data:
                    return
                os.write(stdout, data)
            if stdin in readable:
                data = os.read(stdin, 65536)
                if data:
                    os.write(master, data)
                else:
                    inputs.remove(stdin)
                    os.write(master, b"\x04")  # end of input, as the terminal would say
    finally:
        signal.signal(signal.SIGWINCH, old_winch)
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
