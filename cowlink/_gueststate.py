"""A running guest's record in HOME/run/NAME/ and the per-guest lock its monitor holds.

The lock (HOME/run/NAME.lock, flock) is held by the monitor for the guest's whole life,
so "running" never depends on a pid that could have been reused. The state names each
process by pid + start time (+ pid-namespace inode for init), so that a stale record
is recognised as such.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import _linux
from ._guestnet import host_veth_name
from ._home import Home


@dataclass
class GuestState:
    name: str
    monitor_pid: int
    monitor_start: int
    init_pid: int = 0
    init_start: int = 0
    pidns: int = 0
    started_at: float = field(default_factory=time.time)
    cgroups: dict[str, str] = field(default_factory=dict)
    veth: str | None = None
    rootfs: str = ""
    keep: list[int] = field(default_factory=list)
    network: str = "host"

    def init_alive(self) -> bool:
        return (
            self.init_pid > 0
            and _linux.process_start_time(self.init_pid) == self.init_start
            and _linux.namespace_inode(self.init_pid, "pid") == self.pidns
        )

    def monitor_alive(self) -> bool:
        return _linux.process_start_time(self.monitor_pid) == self.monitor_start

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuestState:
        return cls(**data)


def state_dir(home: Home, name: str) -> Path:
    return home.run_dir / name


def state_path(home: Home, name: str) -> Path:
    return state_dir(home, name) / "state.json"


def lock_path(home: Home, name: str) -> Path:
    return home.run_dir / f"{name}.lock"


def read_state(home: Home, name: str) -> GuestState | None:
    """The recorded state, or None when there is none, it cannot be parsed, or it names
    places that are not this guest's.

    Stop and clean-up kill every process in the recorded cgroups and unmount the
    recorded root: a record pointing anywhere else (a root cgroup, say) is not acted on.
    """
    try:
        state = GuestState.from_dict(json.loads(state_path(home, name).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    own_groups = all(
        Path(p).name == name and Path(p).parent.name == "cowlink" for p in state.cgroups.values()
    )
    own_root = state.rootfs in ("", os.fspath(state_dir(home, name) / "root"))
    own_veth = state.veth in (None, host_veth_name(name))
    if state.name != name or not own_groups or not own_root or not own_veth:
        return None
    return state


def write_state(home: Home, state: GuestState) -> None:
    path = state_path(home, state.name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.as_json())
    os.replace(tmp, path)


def remove_state_dir(home: Home, name: str) -> None:
    """Remove the state directory file by file; never recursively, as the guest's root may
    still be mounted inside it (an rmdir of a mount point fails instead of emptying it)."""
    d = state_dir(home, name)
    for leaf in ("state.json", "state.tmp", "stopping"):
        with contextlib.suppress(FileNotFoundError):
            (d / leaf).unlink()
    for sub in (d / "root", d):
        with contextlib.suppress(FileNotFoundError, OSError):
            sub.rmdir()


def try_lock(home: Home, name: str) -> int | None:
    """Take the guest's lock without waiting: its fd, or None when a monitor holds it."""
    home.run_dir.mkdir(parents=True, exist_ok=True)
    path = lock_path(home, name)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # The previous holder unlinks the file before releasing it; a lock on an unlinked
        # inode would not exclude anyone, so try again on the current file.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def release_lock(home: Home, name: str, fd: int) -> None:
    """Unlink, then release: the next taker finds a fresh file (see try_lock)."""
    with contextlib.suppress(FileNotFoundError):
        lock_path(home, name).unlink()
    os.close(fd)


def is_locked(home: Home, name: str) -> bool:
    fd = try_lock(home, name)
    if fd is None:
        return True
    release_lock(home, name, fd)
    return False


def wait_unlocked(home: Home, name: str, timeout: float) -> bool:
    """Wait until no monitor holds the guest's lock; False on timeout."""
    deadline = time.monotonic() + timeout
    while is_locked(home, name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
