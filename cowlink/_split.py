"""`split`: give one guest private copies of the store objects it links (all, or some paths).

A run, under the home's lock:

1. walks the root (see _walk) and finds its names that lead to store objects, and
   cowlink's own temporary names that an interrupted run left behind (removed first);
2. groups the names by their link group (the catalogue's `names`), so names that were one
   file to the guest become one private copy, and separate files separate copies; a group
   an interrupted split left half-moved is finished with the copy it already has;
3. checks the filesystem has room for every copy, before it changes anything;
4. copies a batch of files to temporary names beside them (see _copy), makes the batch
   durable with one syncfs, then renames each copy over its names, and drops the names'
   catalogue rows.

A later `unify` links the copies back; nothing is lost either way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import time
from collections import defaultdict
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any

from . import _linux
from ._catalogue import Catalogue
from ._copy import (
    OPEN_FLAGS,
    NameRef,
    copy_to_temp,
    ensure_space,
    move_names,
    remove_temp_name,
    space_needed,
)
from ._errors import (
    Interrupted,
    NoSpace,
    Problem,
    ReadOnly,
    ReportsProblems,
    UsageError,
    storage_faults,
)
from ._excludes import Rules
from ._hashing import same_content
from ._home import Home
from ._linker import Reporter
from ._signals import StopRequest
from ._store import InUseForWriting, TempNames, read_xattrs
from ._storeindex import StoreIndex
from ._walk import DirChanged, DirOpener, FdCache, Observer, Tree, walk

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: Copies made before one syncfs makes them durable and they replace their names.
_BATCH_FILES = 100  # each holds up to three fds (object, copy, directory) until renamed
_BATCH_BYTES = 64 << 20


@dataclass
class SplitOptions:
    root: str
    paths: list[str] = field(default_factory=list)
    dry_run: bool = False
    wait: bool = False


@dataclass
class SplitReport(ReportsProblems):
    root: str = ""
    files_split: int = 0
    names_split: int = 0
    bytes_added: int = 0
    errors: list[Problem] = field(default_factory=list)
    duration_s: float = 0.0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "files_split": self.files_split,
            "names_split": self.names_split,
            "bytes_added": self.bytes_added,
            "errors": [p.as_dict() for p in self.errors],
            "duration_s": round(self.duration_s, 3),
            "dry_run": self.dry_run,
        }

    def summary_lines(self) -> list[str]:
        would = "would be " if self.dry_run else ""
        return [
            f"{self.files_split} files ({self.names_split} names) {would}split in {self.root}, "
            f"{self.bytes_added} bytes {would}added"
            + (f"; {len(self.errors)} problems" if self.errors else "")
            + f" ({self.duration_s:.1f} s)"
        ]


@dataclass
class _Group:
    """Names that are one file to the guest, and lead to one store object (`ino`)."""

    ino: int
    names: list[tuple[int, str]]  # (dir index, name)
    #: Names of the same link group that an interrupted split already moved to a copy.
    moved: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class _Prepared:
    """A group ready to move: the object open, and its copy open (under `temp` if new)."""

    group: _Group
    refs: list[NameRef]
    src_fd: int
    dir_fds: list[int] = field(default_factory=list)  # ours: dups of the opener's
    copy_fd: int | None = None
    temp: NameRef | None = None

    def close(self) -> None:
        if self.temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.temp.name, dir_fd=self.temp.dir_fd)
            self.temp = None
        for fd in (self.src_fd, self.copy_fd, *self.dir_fds):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.copy_fd = None
        self.src_fd = -1
        self.dir_fds = []


def _same_file(src_fd: int, copy_fd: int) -> bool:
    """True when the copy shows the guest exactly what the object does."""
    src, copy = os.fstat(src_fd), os.fstat(copy_fd)
    return (
        (copy.st_size, copy.st_mode, copy.st_uid, copy.st_gid, copy.st_mtime_ns)
        == (src.st_size, src.st_mode, src.st_uid, src.st_gid, src.st_mtime_ns)
        and read_xattrs(copy_fd) == read_xattrs(src_fd)
        and same_content(src_fd, copy_fd, src.st_size)
    )


class _Quiet(Observer):
    def __init__(self, report: SplitReport, reporter: Reporter, root: str) -> None:
        self._report = report
        self._reporter = reporter
        self._root = root

    def problem(self, path: str, error: str) -> None:
        self._report.errors.append(Problem(self._root + path, error))
        self._reporter.problem(self._root + path, error)


def run_split(home: Home, options: SplitOptions, reporter: Reporter) -> SplitReport:
    """Split the root's shared files (or those at or below `options.paths`).

    Raises:
        UsageError: the root or a path does not exist; nothing was changed.
        NoSpace: too little room for the copies (checked before any change), or the
            filesystem filled up meanwhile (every name is still whole).
        ReadOnly: the filesystem is or became read-only.
        LockHeld: another command holds the home's lock.
        Interrupted: SIGINT or SIGTERM stopped the run between two files.
    """
    with storage_faults(options.root):
        return _run_split(home, options, reporter)


def _run_split(home: Home, options: SplitOptions, reporter: Reporter) -> SplitReport:
    started, started_ns = time.monotonic(), time.time_ns()
    root = os.path.realpath(options.root)
    if not os.path.isdir(root):
        raise UsageError(f"{options.root}: not a directory")
    paths = [_guest_path(root, p) for p in options.paths]
    report = SplitReport(root=root, dry_run=options.dry_run)
    with home.lock("split", wait=options.wait), Catalogue.open(home.catalogue_path) as catalogue:
        split = _Split(home, options, reporter, catalogue, report, root)
        try:
            with split.signals():
                split.run(paths)
        finally:
            report.duration_s = time.monotonic() - started
            if not options.dry_run:
                with contextlib.suppress(sqlite3.Error):  # a full or read-only disk
                    catalogue.record_run(
                        "split",
                        started_ns,
                        report.duration_s,
                        128 + split.stop_signal if split.stop_signal else report.exit_code,
                        report.as_dict(),
                    )
        if split.stop_signal:
            raise Interrupted(split.stop_signal)
    return report


def _guest_path(root: str, given: str) -> bytes:
    """A PATH argument as the guest sees it ('/usr/bin'); a host path inside ROOT is accepted."""
    path = os.path.normpath("/" + given.lstrip("/"))
    if path.startswith(root + "/"):
        path = path[len(root) :]
    elif path == root:
        path = "/"
    if not os.path.lexists(root + path):
        raise UsageError(f"{given}: no such path in {root}")
    return os.fsencode(path.rstrip("/"))


class _Split:
    def __init__(
        self,
        home: Home,
        options: SplitOptions,
        reporter: Reporter,
        catalogue: Catalogue,
        report: SplitReport,
        root: str,
    ) -> None:
        self.home = home
        self.options = options
        self.reporter = reporter
        self.catalogue = catalogue
        self.report = report
        self.root = root
        self.batch = catalogue.batch()
        self.index = StoreIndex(home.store_dir, catalogue)
        self.temp_names = TempNames(home.secret())
        self.stop = StopRequest()

    @property
    def stop_signal(self) -> int:
        return self.stop.signum

    def signals(self) -> AbstractContextManager[None]:
        return self.stop.catching()

    def problem(self, path: str, error: str) -> None:
        self.report.errors.append(Problem(path, error))
        self.reporter.problem(path, error)

    def run(self, paths: list[bytes]) -> None:
        dry = self.options.dry_run
        self.index.load(recover=not dry, problem=self.problem)
        if not dry:
            # Until the run ends cleanly, the next run rechecks the store's flags: a kill
            # inside a thaw leaves an object without its immutable flag.
            self.catalogue.set_meta("dirty", "1")
            self._run(paths, dry)
            self.catalogue.set_meta("dirty", None)
        else:
            self._run(paths, dry)

    def _run(self, paths: list[bytes], dry: bool) -> None:
        with ExitStack() as stack:
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            stack.callback(os.close, root_fd)
            # Every regular file is reported as "linked" (or as a leftover when it has one
            # of our temporary names): a half-made copy is no store object, and the walk
            # only recognises temporary names among objects.
            tree = walk(
                root_fd,
                self.root,
                rules=Rules(()),
                min_size=1 << 62,
                is_object=lambda dev, ino: True,
                is_temp_name=self.temp_names.is_ours,
                observer=_Quiet(self.report, self.reporter, self.root),
            )
            cache = FdCache()
            stack.callback(cache.close)
            opener = DirOpener(tree, root_fd, cache)
            stack.callback(self._flush)
            groups = self._groups(tree, paths)
            if dry:
                for group in groups:
                    self._count(tree, group, self._object_stat(tree, group).st_blocks * 512)
                    self.reporter.action(self._display(tree, group), "would split", "shared")
                return
            self._remove_leftovers(tree, opener)
            # A half-split group only needs links to the copy it already has.
            fresh = [g for g in groups if not g.moved]
            need = sum(space_needed(self._object_stat(tree, g)) for g in fresh)
            ensure_space(root_fd, need, len(fresh))
            start = 0
            while start < len(groups) and not self.stop_signal:
                end = start + 1
                size = self._object_stat(tree, groups[start]).st_size
                while end < len(groups) and end - start < _BATCH_FILES and size < _BATCH_BYTES:
                    size += self._object_stat(tree, groups[end]).st_size
                    end += 1
                self._split_batch(tree, opener, root_fd, groups[start:end])
                start = end
                self._flush()

    def _object_stat(self, tree: Tree, group: _Group) -> os.stat_result:
        return os.stat(self.home.store_dir / self.index.by_inode[(tree.dev, group.ino)].name)

    def _flush(self) -> None:
        try:
            self.batch.flush()
        except sqlite3.Error as exc:
            # Stale rows are harmless: the next unify drops rows of names no longer linked.
            self.reporter.warning(f"catalogue not updated: {exc}")

    def _remove_leftovers(self, tree: Tree, opener: DirOpener) -> None:
        for dir_index, name, ino in tree.leftovers:
            path = self.root + tree.path_of(dir_index, name)
            try:
                if remove_temp_name(opener.open(dir_index), name, ino):
                    self.reporter.action(path, "remove", "leftover temporary name")
            except (OSError, DirChanged) as exc:
                self._fatal_if_filesystem(exc)
                self.problem(path, f"cannot remove leftover temporary name: {exc}")

    def _groups(self, tree: Tree, paths: list[bytes]) -> list[_Group]:
        recorded = self.catalogue.names(self.root)
        by_path: dict[bytes, tuple[int, str, int]] = {}
        groups: dict[tuple[int, int | bytes], _Group] = {}
        members: dict[int, list[bytes]] = defaultdict(list)
        for path_grp in recorded.items():
            members[path_grp[1]].append(path_grp[0])
        linked = tree.linked
        for i in range(len(linked)):
            dir_index, name, ino = linked.dir[i], linked.name(i), linked.ino[i]
            path = os.fsencode(tree.path_of(dir_index, name))
            by_path[path] = (dir_index, name, ino)
        for path, (dir_index, name, ino) in by_path.items():
            if not self.index.is_object(tree.dev, ino):
                continue
            grp = recorded.get(path)
            key: tuple[int, int | bytes] = (ino, grp if grp is not None else path)
            group = groups.setdefault(key, _Group(ino, []))
            group.names.append((dir_index, name))
            if grp is not None and len(group.names) == 1:
                group.moved = self._moved_names(tree, members[grp], by_path, ino)
        chosen = [
            g
            for g in groups.values()
            if not paths
            or any(_below(os.fsencode(tree.path_of(d, n)), p) for d, n in g.names for p in paths)
        ]
        return sorted(chosen, key=lambda g: tree.path_of(*g.names[0]))

    def _moved_names(
        self,
        tree: Tree,
        names: list[bytes],
        by_path: dict[bytes, tuple[int, str, int]],
        ino: int,
    ) -> list[tuple[int, str]]:
        """Names of a link group that already lead to one private copy (a split was cut short)."""
        others = [by_path[p] for p in names if p in by_path and by_path[p][2] != ino]
        inodes = {o[2] for o in others}
        if len(inodes) != 1 or self.index.is_object(tree.dev, next(iter(inodes))):
            return []
        return [(d, n) for d, n, _ in others]

    def _display(self, tree: Tree, group: _Group) -> str:
        return self.root + tree.path_of(*group.names[0])

    def _split_batch(
        self, tree: Tree, opener: DirOpener, root_fd: int, groups: list[_Group]
    ) -> None:
        """Copy a batch of files, make the copies durable with one syncfs, then rename.

        A name is only replaced by a copy whose data is on disk: a power cut or a disk
        gone read-only must not leave a name leading to a copy the kernel never wrote.
        """
        ready: list[_Prepared] = []
        try:
            for group in groups:
                prepared = self._prepare(tree, opener, group)
                if prepared is not None:
                    ready.append(prepared)
            _linux.syncfs(root_fd)
            for prepared in ready:
                self._finish(tree, prepared)
        finally:
            for prepared in ready:
                prepared.close()

    def _prepare(self, tree: Tree, opener: DirOpener, group: _Group) -> _Prepared | None:
        """Open the object and make (or, for a half-split group, find) its private copy."""
        display = self._display(tree, group)
        prepared: _Prepared | None = None
        try:
            # The opener's fds belong to its cache, which may close them at its next open;
            # a batch holds its directories until the renames, so it keeps its own.
            dirs: dict[int, int] = {}
            try:
                for d, _ in group.names:
                    if d not in dirs:
                        dirs[d] = os.dup(opener.open(d))
                refs = [NameRef(dirs[d], os.fsencode(n)) for d, n in group.names]
                src_fd = os.open(refs[0].name, OPEN_FLAGS, dir_fd=refs[0].dir_fd)
            except BaseException:
                for fd in dirs.values():
                    os.close(fd)
                raise
            prepared = _Prepared(group, refs, src_fd, dir_fds=list(dirs.values()))
            st = os.fstat(src_fd)
            if st.st_ino != group.ino:
                raise DirChanged(errno.ESTALE, "changed during the run")
            if group.moved:
                d, n = group.moved[0]
                prepared.copy_fd = os.open(n, OPEN_FLAGS, dir_fd=opener.open(d))
                if _same_file(src_fd, prepared.copy_fd):
                    return prepared
                # The guest changed its copy meanwhile: these names get their own.
                os.close(prepared.copy_fd)
                prepared.copy_fd = None
                group.moved = []
            temp = self.temp_names.make()
            prepared.copy_fd = copy_to_temp(src_fd, st, refs[0].dir_fd, temp)
            prepared.temp = NameRef(refs[0].dir_fd, temp)
            return prepared
        except (OSError, DirChanged) as exc:
            if prepared is not None:
                prepared.close()
            self._fatal_if_filesystem(exc)
            self.problem(display, exc.strerror or str(exc))
            return None

    def _finish(self, tree: Tree, prepared: _Prepared) -> None:
        group = prepared.group
        assert prepared.copy_fd is not None
        try:
            done = move_names(
                prepared.src_fd,
                prepared.copy_fd,
                prepared.refs,
                make_temp=self.temp_names.make,
                first_temp=prepared.temp,
            )
        except OSError as exc:
            self._fatal_if_filesystem(exc)
            if isinstance(exc, InUseForWriting):
                self.problem(self._display(tree, group), "open for writing; not split")
            else:
                self.problem(self._display(tree, group), exc.strerror or str(exc))
            return
        finally:
            prepared.temp = None  # move_names used it or removed it
        moved = {(r.dir_fd, r.name) for r in done.replaced}
        paths = [
            os.fsencode(tree.path_of(d, n))
            for (d, n), ref in zip(group.names, prepared.refs, strict=True)
            if (ref.dir_fd, ref.name) in moved
        ]
        self.batch.drop_names(self.root, paths)
        if paths:
            self.report.files_split += 1
            self.report.names_split += len(paths)
            self.report.bytes_added += 0 if group.moved else done.bytes_added
        self.reporter.action(self._display(tree, group), "split", "private copy")

    def _count(self, tree: Tree, group: _Group, blocks: int) -> None:
        self.report.files_split += 1
        self.report.names_split += len(group.names)
        self.report.bytes_added += blocks

    def _fatal_if_filesystem(self, exc: BaseException) -> None:
        """A full or read-only filesystem ends the run: no later file would fare better."""
        if not isinstance(exc, OSError):
            return
        if exc.errno in _NO_SPACE:
            raise NoSpace(
                f"the filesystem of {self.root} is full; split stopped "
                f"({self.report.files_split} files split, every other name unchanged)"
            ) from exc
        if exc.errno == errno.EROFS:
            raise ReadOnly(
                f"the filesystem of {self.root} is read-only; split stopped "
                f"({self.report.files_split} files split, every other name unchanged)"
            ) from exc


def _below(path: bytes, top: bytes) -> bool:
    return top == b"" or path == top or path.startswith(top + b"/")
