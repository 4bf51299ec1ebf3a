"""`remove`: delete a guest tree, including its names of immutable shared inodes.

`rm -rf` stops at the first name of an immutable inode. Here each such name is unlinked
inside `thawed` (the flag is cleared under a read lease and set again at once), so the
store and every other guest keep their links to an inode that stays immutable. The tree
is taken apart through directory file descriptors with O_NOFOLLOW: symlinks are removed,
never followed, and a tree with a mount inside is refused before anything is removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from . import _linux
from ._catalogue import Catalogue
from ._errors import GuestRunning, Problem, ReportsProblems, UsageError
from ._gueststate import read_state, release_lock, try_lock
from ._home import Home
from ._linker import Reporter
from ._store import thawed

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class RemoveReport(ReportsProblems):
    root: str = ""
    guest: str | None = None
    files_removed: int = 0
    shared_names_removed: int = 0
    dirs_removed: int = 0
    errors: list[Problem] = field(default_factory=list)
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "guest": self.guest,
            "files_removed": self.files_removed,
            "shared_names_removed": self.shared_names_removed,
            "dirs_removed": self.dirs_removed,
            "errors": [p.as_dict() for p in self.errors],
            "duration_s": round(self.duration_s, 3),
        }


def running_pid(home: Home, guest: str) -> int | None:
    """The pid of a running guest (its init, else its monitor), from the launcher's record.

    Takes no lock, so it suits `status`; `remove` holds the guest's own lock instead.
    """
    state = read_state(home, guest)
    if state is None or not state.monitor_alive():
        return None
    return state.init_pid if state.init_alive() else state.monitor_pid


def running(pid: int) -> bool:
    """True when a process `pid` exists (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return pid > 0


def run_remove(home: Home, root: str, reporter: Reporter, *, wait: bool = False) -> RemoveReport:
    """Delete the tree `root`; for a guest of the home, the whole HOME/guests/NAME/.

    `root` must be a guest of the home or a root whose names the catalogue records (one
    given to `unify ROOT`), so a slip of the keyboard cannot remove an arbitrary tree.

    Raises:
        UsageError: `root` is not a directory, not a known root, holds the home, or has a
            mount inside.
        GuestRunning: the guest is running.
        LockHeld: another command holds the home's lock.
    """
    started = time.monotonic()
    real = os.path.realpath(root)
    if not os.path.isdir(real) or os.path.islink(root.rstrip("/") or "/"):
        raise UsageError(f"{root}: not a directory")
    home_real = os.path.realpath(home.path)
    guest = home.guest_of_root(real)
    if real == "/" or home_real == real or home_real.startswith(real + "/"):
        raise UsageError(f"{root}: holds the cowlink home {home_real}; refusing to remove it")
    if real.startswith(home_real + "/") and guest is None:
        raise UsageError(f"{root}: part of the cowlink home but no guest's root; not removed")
    mounts = [mp for mp in _linux.mount_points() if mp == real or mp.startswith(real + "/")]
    if mounts:
        raise UsageError(f"{root}: {mounts[0]} is mounted inside; unmount it first")
    report = RemoveReport(root=real, guest=guest)
    with home.lock("remove", wait=wait), ExitStack() as stack:
        if guest is None and real not in _known_roots(home):
            raise UsageError(
                f"{root}: neither a guest of {home.path} nor a root it has unified; not removed"
            )
        if guest is not None:
            # The launcher's monitor holds the guest's lock for the guest's whole life;
            # holding it here also keeps the guest from starting while its tree goes.
            guest_lock = try_lock(home, guest)
            if guest_lock is None:
                pid = running_pid(home, guest)
                raise GuestRunning(
                    f"guest {guest} is running{f' (pid {pid})' if pid else ''}; stop it first"
                )
            stack.callback(release_lock, home, guest, guest_lock)
        _linux.ignore_lease_breaks()
        dev = os.lstat(real).st_dev
        with Catalogue.open(home.catalogue_path) as catalogue:
            # A kill inside a thaw leaves an object without its immutable flag: until the
            # removal ends, the next run rechecks the store's flags.
            catalogue.set_meta("dirty", "1")
            _Remover(report, reporter, dev).remove_tree(real)
            if not report.errors and guest is not None:
                # What is left of the guest is its own configuration: no shared inodes.
                shutil.rmtree(home.guest_dir(guest), ignore_errors=True)
            with catalogue.transaction():
                catalogue.drop_names(real, list(catalogue.names(real)))
                catalogue.set_meta("dirty", None)
    report.duration_s = time.monotonic() - started
    return report


def _known_roots(home: Home) -> set[str]:
    if not home.catalogue_path.exists():
        return set()
    with Catalogue.open(home.catalogue_path) as catalogue:
        return set(catalogue.roots())


class _Remover:
    def __init__(self, report: RemoveReport, reporter: Reporter, dev: int) -> None:
        self.report = report
        self.reporter = reporter
        self.dev = dev

    def problem(self, path: str, error: str) -> None:
        self.report.errors.append(Problem(path, error))
        self.reporter.problem(path, error)

    def remove_tree(self, root: str) -> None:
        parent, name = os.path.split(root)
        parent_fd = os.open(parent, _DIR_FLAGS)
        try:
            self._remove_dir(parent_fd, name, root)
        except OSError as exc:
            self.problem(root, exc.strerror or str(exc))
        finally:
            os.close(parent_fd)

    def _remove_dir(self, parent_fd: int, name: str, path: str) -> None:
        """Empty the directory `name` of `parent_fd`, depth first, then remove it."""
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            if os.fstat(fd).st_dev != self.dev:
                self.problem(path, "another filesystem is mounted here; not removed")
                return
            _clear_dir_flags(fd)
            for entry in list(os.scandir(fd)):
                child = f"{path}/{entry.name}"
                try:
                    if entry.is_dir(follow_symlinks=False):
                        self._remove_dir(fd, entry.name, child)
                    else:
                        self._remove_file(fd, entry.name, child)
                except OSError as exc:
                    self.problem(child, exc.strerror or str(exc))
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent_fd)
        self.report.dirs_removed += 1

    def _remove_file(self, dir_fd: int, name: str, path: str) -> None:
        try:
            os.unlink(name, dir_fd=dir_fd)
            self.report.files_removed += 1
            return
        except PermissionError:
            pass
        # An immutable (or append-only) inode: most likely a store object this guest links.
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd
        )
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EPERM, "special file with flags set")
            with thawed(fd):
                os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(fd)
        self.report.files_removed += 1
        if st.st_nlink > 1:
            self.report.shared_names_removed += 1
        self.reporter.action(path, "remove", "name of an immutable inode", level=2)


def _clear_dir_flags(fd: int) -> None:
    """A directory with an immutable or append-only flag refuses unlinks inside it."""
    try:
        flags = _linux.get_flags(fd)
        if flags & _linux.FS_HAND_SET_FLAGS:
            _linux.set_flags(fd, flags & ~_linux.FS_HAND_SET_FLAGS)
    except OSError as exc:
        if not _linux.flags_unsupported(exc):
            raise
