"""Start and stop mount daemons: the library behind `cowlink mount` and `cowlink umount`.

The daemon is `python -m cowlink_fuse` in a process of its own (cowlink never imports
cowlink_fuse). It writes "ready" to a pipe once the kernel has the mount; a daemon that
dies first closes the pipe, and its log tells why. Its pid is kept in HOME/run so that
`cowlink umount` can wait for it to finish.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import _linux
from ._errors import MountFailed, UsageError
from ._home import Home

_READY_TIMEOUT_S = 30.0
_EXIT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class MountRequest:
    root: str
    mountpoint: str
    name: str  # for the log file: the guest's name, else the root's basename
    verbose: int = 0
    writeback: bool = True


def _pid_file(home: Home, mountpoint: str) -> Path:
    tag = hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:16]
    return home.run_dir / f"mount-{tag}.pid"


def is_mounted(mountpoint: str) -> bool:
    """True while anything is mounted there, even a dead FUSE mount that stat cannot reach."""
    return os.path.realpath(mountpoint) in _linux.mount_points()


def daemon_command(home: Home, request: MountRequest, ready_fd: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "cowlink_fuse", "--home", str(home.path)]
    if ready_fd is not None:
        cmd += ["--ready-fd", str(ready_fd)]
    if not request.writeback:
        cmd.append("--no-writeback")
    cmd += ["-v"] * request.verbose
    return [*cmd, "--", request.root, request.mountpoint]


def _check(request: MountRequest) -> None:
    if not os.path.isdir(request.root):
        raise UsageError(f"{request.root}: not a directory")
    if not os.path.isdir(request.mountpoint):
        raise UsageError(f"{request.mountpoint}: mount point is not a directory")
    if is_mounted(request.mountpoint):
        raise UsageError(f"{request.mountpoint}: something is mounted there already")


def mount_foreground(home: Home, request: MountRequest) -> None:
    """Become the daemon: serve until unmounted, logging to stderr."""
    _check(request)
    cmd = daemon_command(home, request, None)
    os.execv(cmd[0], cmd)


def mount_background(home: Home, request: MountRequest) -> int:
    """Start the daemon and return its pid once the mount is ready.

    Raises:
        MountFailed: the daemon exited (or hung) before mounting; the log tail says why.
    """
    _check(request)
    home.log_dir.mkdir(parents=True, exist_ok=True)
    home.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = home.log_dir / f"mount-{request.name}.log"
    read_end, write_end = os.pipe()
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                daemon_command(home, request, write_end),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(write_end,),
                start_new_session=True,
            )
        os.close(write_end)
        write_end = -1
        ready = _read_ready(read_end)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if not ready:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        raise MountFailed(
            f"mounting {request.root} on {request.mountpoint} failed:\n" + _tail(log_path).rstrip()
        )
    _pid_file(home, request.mountpoint).write_text(f"{proc.pid}\n")
    return proc.pid


def _read_ready(fd: int) -> bool:
    import select

    deadline = time.monotonic() + _READY_TIMEOUT_S
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 64)
        if not chunk:
            break
        data += chunk
        if b"ready" in data:
            return True
    return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def unmount(home: Home, mountpoint: str) -> None:
    """Unmount, lazily if the daemon is dead or the mount busy; wait for the daemon to exit.

    Raises:
        MountFailed: nothing is mounted there, or it could not be unmounted.
    """
    if not is_mounted(mountpoint):
        raise MountFailed(f"{mountpoint}: not mounted")
    attempts = [["fusermount3", "-u"], ["fusermount3", "-u", "-z"], ["umount", "-l"]]
    for cmd in attempts:
        if shutil.which(cmd[0]) is None:
            continue
        done = subprocess.run(
            [*cmd, mountpoint], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
        )
        if done.returncode == 0:
            break
    else:
        raise MountFailed(f"{mountpoint}: could not unmount")
    pid_file = _pid_file(home, mountpoint)
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    deadline = time.monotonic() + _EXIT_TIMEOUT_S
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.02)
    with contextlib.suppress(OSError):
        pid_file.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
