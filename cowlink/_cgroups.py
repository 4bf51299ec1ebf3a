"""A guest's control groups: limits, membership, accounting, kill-all and removal.

cgroup v2 is used when the host mounts a full unified hierarchy at /sys/fs/cgroup; else
the v1 controllers cpu, cpuacct, memory, pids, freezer and devices, each where it is
mounted. With v1, a guest's groups sit below the creating process's own group, in
`<own>/cowlink/NAME`, so a launcher confined to a subtree stays inside it; v2 puts them
at `/sys/fs/cgroup/cowlink/NAME` (see `create`; untested here: these machines run v1). The paths are
recorded in the guest's state, and every later command works from that record.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterable, Iterator

from ._errors import CgroupError
from ._guestconf import Limits

V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer", "devices")
_CGROUP_ROOT = "/sys/fs/cgroup"
# What a guest may open or mknod when a devices cgroup exists (<linux/major.h>).
DEVICE_ALLOW = (
    "c 1:3 rwm",  # null
    "c 1:5 rwm",  # zero
    "c 1:7 rwm",  # full
    "c 1:8 rwm",  # random
    "c 1:9 rwm",  # urandom
    "c 5:0 rwm",  # tty
    # Not 5:1: a node made for it would open the host's console. The guest's
    # /dev/console is a pty slave (136:N), and a pts node made outside a devpts
    # mount cannot be opened (EIO), so 136:* reaches only the guest's own ptys.
    "c 5:2 rwm",  # ptmx
    "c 136:* rwm",  # pty slaves
)


def _mountinfo() -> list[tuple[str, str, list[str]]]:
    """(mount point, fstype, super options) of every mount."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            out.append((fields[4], rfields[0], rfields[2].split(",") if len(rfields) > 2 else []))
    return out


def unified_only() -> bool:
    """True when /sys/fs/cgroup itself is a cgroup2 mount (no v1 controllers)."""
    return any(mp == _CGROUP_ROOT and fs == "cgroup2" for mp, fs, _ in _mountinfo())


def _own_v1_paths() -> dict[str, str]:
    """Controller -> this process's group path, for every v1 hierarchy."""
    out: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(","):
                if c:
                    out[c] = path
    return out


def _v1_mounts() -> dict[str, str]:
    out: dict[str, str] = {}
    for mp, fs, opts in _mountinfo():
        if fs == "cgroup":
            for c in V1_CONTROLLERS:
                if c in opts and c not in out:
                    out[c] = mp
    return out


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class GuestCgroups:
    """The groups of one guest: controller name -> directory ("unified" for v2)."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = dict(paths)

    @property
    def unified(self) -> bool:
        return "unified" in self.paths

    @property
    def has_devices(self) -> bool:
        return "devices" in self.paths

    @classmethod
    def create(cls, name: str, limits: Limits) -> GuestCgroups:
        """Create and limit the guest's groups; on failure nothing is left behind.

        Raises:
            CgroupError: a group could not be created or a limit could not be set.
        """
        paths: dict[str, str] = {}
        if unified_only():
            # v2 forbids processes in a group whose controllers are delegated to children
            # ("no internal processes"), and our own group has processes; the root group
            # is exempt, so guests live at the top: /sys/fs/cgroup/cowlink/NAME.
            paths["unified"] = os.path.join(_CGROUP_ROOT, "cowlink", name)
        else:
            own_paths = _own_v1_paths()
            for ctl, mp in _v1_mounts().items():
                own = own_paths.get(ctl, "/")
                paths[ctl] = os.path.join(mp, own.lstrip("/"), "cowlink", name)
        groups = cls(paths)
        try:
            for ctl, path in paths.items():
                if ctl == "unified":
                    _enable_v2_controllers(os.path.dirname(path))
                try:
                    os.makedirs(path)
                except FileExistsError:
                    groups._empty_stale(path)
            groups._apply(limits)
        except OSError as exc:
            groups.remove()
            raise CgroupError(f"cannot set up control groups for {name}: {exc}") from None
        except BaseException:
            groups.remove()
            raise
        return groups

    def _empty_stale(self, path: str) -> None:
        # A leftover group from a guest that died with its monitor: reuse it only if empty.
        if _read(os.path.join(path, "cgroup.procs")).split():
            raise OSError(errno.EBUSY, f"{path} still has processes")

    def _apply(self, limits: Limits) -> None:
        p = self.paths
        if self.unified:
            u = p["unified"]
            if limits.memory_max is not None:
                _write(f"{u}/memory.max", str(limits.memory_max))
                with contextlib.suppress(FileNotFoundError):
                    _write(f"{u}/memory.swap.max", "0")
            if limits.cpu_quota is not None:
                _write(f"{u}/cpu.max", f"{round(limits.cpu_quota * 1000)} 100000")
            if limits.cpu_shares is not None:
                # v1 shares 2..262144 map onto v2 weights 1..10000 (as systemd does).
                _write(f"{u}/cpu.weight", str(max(1, min(10000, limits.cpu_shares * 100 // 1024))))
            if limits.pids_max is not None:
                _write(f"{u}/pids.max", str(limits.pids_max))
            return
        if limits.memory_max is not None:
            _write(f"{p['memory']}/memory.limit_in_bytes", str(limits.memory_max))
            # Without this the guest would page out to swap instead of meeting its limit.
            with contextlib.suppress(FileNotFoundError, PermissionError):
                _write(f"{p['memory']}/memory.memsw.limit_in_bytes", str(limits.memory_max))
        if limits.cpu_quota is not None:
            _write(f"{p['cpu']}/cpu.cfs_period_us", "100000")
            _write(f"{p['cpu']}/cpu.cfs_quota_us", str(round(limits.cpu_quota * 1000)))
        if limits.cpu_shares is not None:
            _write(f"{p['cpu']}/cpu.shares", str(limits.cpu_shares))
        if limits.pids_max is not None:
            _write(f"{p['pids']}/pids.max", str(limits.pids_max))
        if "devices" in p:
            _write(f"{p['devices']}/devices.deny", "a")
            for rule in DEVICE_ALLOW:
                _write(f"{p['devices']}/devices.allow", rule)

    def join(self, pid: int = 0) -> None:
        """Move `pid` (0: the calling process, which must be single-threaded, as a freshly
        forked child is) into every group of the guest.

        v1 moves a whole process through cgroup.procs under a global lock whose writer
        waits for an RCU grace period (about 17 ms here, on every start); moving just the
        calling thread through `tasks` skips that lock, and for a single-threaded process
        it is the same move.
        """
        for ctl, path in self.paths.items():
            leaf = "tasks" if pid == 0 and ctl != "unified" else "cgroup.procs"
            _write(os.path.join(path, leaf), str(pid))

    def procs(self) -> set[int]:
        """Every process in any of the guest's groups, as host pids."""
        out: set[int] = set()
        for path in self.paths.values():
            try:
                out.update(int(x) for x in _read(os.path.join(path, "cgroup.procs")).split())
            except FileNotFoundError:
                pass
        return out

    def memory_bytes(self) -> int | None:
        name = "unified" if self.unified else "memory"
        leaf = "memory.current" if self.unified else "memory.usage_in_bytes"
        try:
            return int(_read(os.path.join(self.paths[name], leaf)))
        except (KeyError, OSError, ValueError):
            return None

    def cpu_seconds(self) -> float | None:
        try:
            if self.unified:
                for line in _read(os.path.join(self.paths["unified"], "cpu.stat")).splitlines():
                    key, value = line.split()
                    if key == "usage_usec":
                        return int(value) / 1e6
                return None
            return int(_read(os.path.join(self.paths["cpuacct"], "cpuacct.usage"))) / 1e9
        except (KeyError, OSError, ValueError):
            return None

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process of the guest, including ones that fork while we kill.

        v1 has no cgroup.kill, so the freezer holds them still: FROZEN, kill each pid,
        THAWED (a frozen task dies only once thawed).
        """
        deadline = time.monotonic() + timeout
        while self.procs():
            if time.monotonic() > deadline:
                raise CgroupError(f"processes survive SIGKILL: {sorted(self.procs())}")
            if self.unified and os.path.exists(os.path.join(self.paths["unified"], "cgroup.kill")):
                _write(os.path.join(self.paths["unified"], "cgroup.kill"), "1")
            else:
                with self._frozen():
                    _kill(self.procs())
            time.sleep(0.01)

    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        if self.unified:
            state, on, off = os.path.join(self.paths["unified"], "cgroup.freeze"), "1", "0"
        elif "freezer" in self.paths:
            state, on, off = (
                os.path.join(self.paths["freezer"], "freezer.state"),
                "FROZEN",
                "THAWED",
            )
        else:
            yield
            return
        try:
            _write(state, on)
            for _ in range(200):
                current = _read(state).strip()
                if current in (on, "FROZEN") or not self.procs():
                    break
                time.sleep(0.005)
            yield
        finally:
            with contextlib.suppress(OSError):
                _write(state, off)

    def remove(self) -> None:
        """Remove every group (and the shared `cowlink` parent once empty); idempotent."""
        for path in self.paths.values():
            for _ in range(100):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    time.sleep(0.01)  # the last exiting task has not left yet
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(path))

    def exists(self) -> bool:
        return any(os.path.isdir(p) for p in self.paths.values())


def _kill(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _enable_v2_controllers(parent: str) -> None:
    """Enable cpu, memory and pids in each ancestor's subtree_control, down to `parent`."""
    os.makedirs(parent, exist_ok=True)
    rel = os.path.relpath(parent, _CGROUP_ROOT)
    path = _CGROUP_ROOT
    for part in [""] + ([] if rel == "." else rel.split(os.sep)):
        path = os.path.join(path, part) if part else path
        available = set(_read(os.path.join(path, "cgroup.controllers")).split())
        for ctl in ("cpu", "memory", "pids"):
            if ctl in available:
                with contextlib.suppress(OSError):
                    _write(os.path.join(path, "cgroup.subtree_control"), f"+{ctl}")
