"""A walk of an untrusted guest tree through directory file descriptors.

Guests control their trees and may change them while cowlink runs. So every directory
is opened relative to its parent with O_NOFOLLOW and checked against the (dev, ino) the
walk recorded; a directory swapped for a symlink or another directory is refused, never
followed. Mount points (another st_dev, or a mount on the same filesystem) are not
crossed, symlinks are never followed, and special files are never opened.
"""

from __future__ import annotations

import errno
import os
import stat
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from . import _linux
from ._excludes import Rules, Verdict

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


class DirChanged(OSError):
    """A directory is no longer the one the walk saw (swapped, moved or removed)."""


class Dir(NamedTuple):
    parent: int  # index into Tree.dirs; -1 for the root
    name: str
    ino: int
    path: str  # relative to the root, with a leading '/'; the root itself is ''


class FileRec(NamedTuple):
    """A regular file as the walk saw it; `lstat` fields compare against a re-lstat."""

    dir: int
    name: str
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    uid: int
    gid: int
    nlink: int
    blocks: int


def same_stat(rec: FileRec, st: os.stat_result) -> bool:
    """True when `st` shows the file unchanged since the walk."""
    return (
        st.st_ino == rec.ino
        and st.st_size == rec.size
        and st.st_mtime_ns == rec.mtime_ns
        and st.st_ctime_ns == rec.ctime_ns
        and st.st_mode == rec.mode
        and st.st_uid == rec.uid
        and st.st_gid == rec.gid
    )


class FileTable:
    """Regular files as the walk saw them, kept column by column.

    A FileRec per file costs ~400 bytes in Python; these columns cost ~70 plus the name,
    which is what lets one run hold millions of files. `rec(i)` makes a FileRec on demand.
    """

    def __init__(self) -> None:
        self.dir = array("I")
        self.ino = array("Q")
        self.size = array("Q")
        self.mtime_ns = array("q")
        self.ctime_ns = array("q")
        self.mode = array("I")
        self.uid = array("I")
        self.gid = array("I")
        self.nlink = array("I")
        self.blocks = array("Q")
        self._names = bytearray()
        self._name_ends = array("Q")

    def __len__(self) -> int:
        return len(self.ino)

    def append(self, dir_index: int, name: str, st: os.stat_result) -> None:
        self.dir.append(dir_index)
        self.ino.append(st.st_ino)
        self.size.append(st.st_size)
        self.mtime_ns.append(st.st_mtime_ns)
        self.ctime_ns.append(st.st_ctime_ns)
        self.mode.append(st.st_mode)
        self.uid.append(st.st_uid)
        self.gid.append(st.st_gid)
        self.nlink.append(st.st_nlink)
        self.blocks.append(st.st_blocks)
        self._names += os.fsencode(name)
        self._name_ends.append(len(self._names))

    def name(self, i: int) -> str:
        start = self._name_ends[i - 1] if i else 0
        return os.fsdecode(bytes(self._names[start : self._name_ends[i]]))

    def rec(self, i: int) -> FileRec:
        return FileRec(
            self.dir[i],
            self.name(i),
            self.ino[i],
            self.size[i],
            self.mtime_ns[i],
            self.ctime_ns[i],
            self.mode[i],
            self.uid[i],
            self.gid[i],
            self.nlink[i],
            self.blocks[i],
        )


@dataclass
class Tree:
    """What one walk found in one root."""

    root: str
    dev: int
    dirs: list[Dir] = field(default_factory=list)
    #: Candidates: regular files, included, large enough, not yet store objects.
    files: FileTable = field(default_factory=FileTable)
    #: Names whose inode is a store object.
    linked: FileTable = field(default_factory=FileTable)
    #: cowlink's own temporary names left by an interrupted run: (dir, name, ino).
    leftovers: list[tuple[int, str, int]] = field(default_factory=list)
    regular_files: int = 0

    def path_of(self, dir_index: int, name: str) -> str:
        return f"{self.dirs[dir_index].path}/{name}"


class Observer:
    """What the walk reports as it goes; the engine passes its own."""

    def skipped(self, path: str, reason: str) -> None:
        pass

    def problem(self, path: str, error: str) -> None:
        pass

    def progress(self) -> None:
        pass


def _mount_points_below(root: str) -> set[str]:
    prefix = root.rstrip("/") + "/"
    return {"/" + mp[len(prefix) :] for mp in _linux.mount_points() if mp.startswith(prefix)}


def walk(
    root_fd: int,
    root: str,
    *,
    rules: Rules,
    min_size: int,
    is_object: Callable[[int, int], bool],
    is_temp_name: Callable[[bytes], bool],
    observer: Observer,
) -> Tree:
    """Walk the tree open as `root_fd` (whose path is `root`) and classify what it holds."""
    root_st = os.fstat(root_fd)
    tree = Tree(root=root, dev=root_st.st_dev)
    tree.dirs.append(Dir(-1, "", root_st.st_ino, ""))
    mounts = _mount_points_below(os.path.realpath(root))
    # Depth-first with one open fd per level: a stack frame is (dir index, fd, entries).
    stack: list[tuple[int, int, Iterator[os.DirEntry[str]]]] = []

    def enter(index: int, fd: int) -> None:
        try:
            entries = list(os.scandir(fd))
        except OSError as exc:
            observer.problem(tree.dirs[index].path or "/", exc.strerror or str(exc))
            entries = []
        stack.append((index, fd, iter(entries)))

    enter(0, root_fd)
    while stack:
        index, fd, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            if fd != root_fd:
                os.close(fd)
            continue
        name = entry.name
        path = f"{tree.dirs[index].path}/{name}"
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                observer.problem(path, exc.strerror or str(exc))
            continue
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            if st.st_dev != tree.dev or path in mounts:
                observer.skipped(path, "mount point")
                continue
            verdict = rules.verdict(path)
            if verdict is not Verdict.INCLUDE:
                observer.skipped(path, "excluded" if verdict is Verdict.EXCLUDE else "skipped")
                continue
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    observer.problem(path, exc.strerror or str(exc))
                continue
            cst = os.fstat(child)
            if (cst.st_dev, cst.st_ino) != (st.st_dev, st.st_ino):
                os.close(child)
                observer.problem(path, "directory changed during the walk; not entered")
                continue
            tree.dirs.append(Dir(index, name, st.st_ino, path))
            enter(len(tree.dirs) - 1, child)
            continue
        if not stat.S_ISREG(mode):
            continue
        tree.regular_files += 1
        if tree.regular_files % 1024 == 0:
            observer.progress()
        if is_temp_name(os.fsencode(name)):
            # cowlink's own (its MAC says so): a link to an object, or a copy an
            # interrupted run left; removed, never linked as a guest file.
            tree.leftovers.append((index, name, st.st_ino))
            continue
        if is_object(st.st_dev, st.st_ino):
            tree.linked.append(index, name, st)
            continue
        if st.st_size < min_size:
            continue
        verdict = rules.verdict(path)
        if verdict is not Verdict.INCLUDE:
            observer.skipped(path, "excluded" if verdict is Verdict.EXCLUDE else "skipped")
            continue
        tree.files.append(index, name, st)
    return tree


class FdCache:
    """Directory fds kept open for reuse, least recently used first out.

    One cache serves every tree of a run, so a run over hundreds of guests stays far below
    the open-file limit however many directories it reopens.
    """

    def __init__(self, capacity: int = 256) -> None:
        self._fds: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._capacity = capacity

    def get(self, key: tuple[int, int]) -> int | None:
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
        return fd

    def put(self, key: tuple[int, int], fd: int) -> None:
        self._fds[key] = fd
        while len(self._fds) > self._capacity:
            _, old = self._fds.popitem(last=False)
            os.close(old)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class DirOpener:
    """Reopens the walk's directories by their recorded chain, verifying each step.

    An fd it returns belongs to its cache: use it at once, before the next open() call
    (which may close it), and never close it yourself.
    """

    def __init__(self, tree: Tree, root_fd: int, cache: FdCache) -> None:
        self._tree = tree
        self._root_fd = root_fd
        self._cache = cache
        self._id = id(self)

    def open(self, index: int) -> int:
        """An fd for directory `index`.

        Raises:
            DirChanged: some directory on the chain is no longer the one the walk saw.
        """
        if index == 0:
            return self._root_fd
        fd = self._cache.get((self._id, index))
        if fd is not None:
            return fd
        entry = self._tree.dirs[index]
        parent_fd = self.open(entry.parent)
        try:
            fd = os.open(entry.name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            raise DirChanged(exc.errno, f"{entry.path}: {exc.strerror}") from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (self._tree.dev, entry.ino):
            os.close(fd)
            raise DirChanged(errno.ESTALE, f"{entry.path}: directory was replaced")
        self._cache.put((self._id, index), fd)
        return fd
