"""Linking verified duplicates to store objects: adoption, comparison, atomic replacement.

The rules this module keeps:
- a store object is opened read-only and held under a read lease; its immutable flag is
  cleared only inside `thawed`, for the moments names are added to it;
- a new object is a guest inode adopted in place (no copy): leased, linked into the
  store, flagged immutable, then re-hashed, since a write could have slipped in between
  the digest and the lease;
- a file is linked only after its bytes compare equal to the object's, and each of its
  names is re-lstat'ed just before a fresh link is renamed over it;
- a name's link group is on record before the name changes when the group has more than
  one name, so a crash can never split a guest's own hardlinks.
"""

from __future__ import annotations

import enum
import errno
import os
import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import _linux
from ._catalogue import Batch, ObjectRow
from ._copy import remove_temp_name
from ._errors import Problem
from ._hashing import full_digest, same_content
from ._store import LinkKey, TempNames, object_name, read_key, thawed
from ._storeindex import OPEN_FLAGS, StoreIndex
from ._walk import DirChanged, DirOpener, FileRec, Tree, same_stat

#: Files verified against one object before its flag is cleared to link them all.
_BATCH = 64


class Reporter(Protocol):
    """Where the engine tells what it does; the CLI's Console is one."""

    #: Actions of a higher level than this are not shown, so a caller in a hot loop
    #: need not make them.
    verbose: int

    def action(self, path: bytes | str, what: str, reason: str, level: int = 1) -> None: ...
    def problem(self, path: bytes | str, error: str) -> None: ...
    def warning(self, message: str) -> None: ...
    def progress(self, text: str) -> None: ...


@dataclass
class Counters:
    files_linked: int = 0
    objects_created: int = 0
    bytes_saved: int = 0
    errors: list[Problem] = field(default_factory=list)


@dataclass(slots=True)
class Candidate:
    """One inode that may be linked, with every name the walk saw for it."""

    rec: FileRec
    names: list[tuple[int, FileRec]]  # (tree index, the record of that name)
    head: bytes | None = None
    full: bytes | None = None
    key: LinkKey | None = None

    def has_own_hardlinks(self) -> bool:
        """True when some tree sees this inode under several names (a guest hardlink)."""
        return len(self.names) > 1 and max(Counter(t for t, _ in self.names).values()) > 1


class Changed(Exception):
    """The file is no longer what the walk saw."""


class _Outcome(enum.Enum):
    LINKED = "linked"
    SKIPPED = "skipped"
    FULL = "full"


class _Object:
    """An open store object held under a read lease."""

    def __init__(self, fd: int, row: ObjectRow, nlink: int) -> None:
        self.fd = fd
        self.row = row
        self.nlink = nlink

    def close(self) -> None:
        os.close(self.fd)  # which releases the lease: no F_UNLCK round of its own


class TreeFiles:
    """The walked trees' files: open one safely, name it, report what went wrong with it."""

    def __init__(
        self, trees: list[Tree], openers: list[DirOpener], reporter: Reporter, counters: Counters
    ) -> None:
        self.trees = trees
        self.openers = openers
        self.reporter = reporter
        self.counters = counters

    def display(self, tree_index: int, rec: FileRec) -> str:
        tree = self.trees[tree_index]
        return tree.root + tree.path_of(rec.dir, rec.name)

    def problem(self, path: str, error: str) -> None:
        self.counters.errors.append(Problem(path, error))
        self.reporter.problem(path, error)

    def open(self, tree_index: int, rec: FileRec) -> int:
        """Open a candidate read-only through its verified directory; check it is unchanged.

        Raises:
            Changed, DirChanged, OSError
        """
        dir_fd = self.openers[tree_index].open(rec.dir)
        fd = os.open(rec.name, OPEN_FLAGS, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if st.st_dev != self.trees[tree_index].dev or not same_stat(rec, st):
                raise Changed()
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_first(self, node: Candidate) -> int | None:
        """`open` the candidate through its first name; None (and reported) if it changed."""
        tree_index, rec = node.names[0]
        try:
            return self.open(tree_index, rec)
        except (OSError, Changed) as exc:
            self.skip(tree_index, rec, exc)
            return None

    def skip(self, tree_index: int, rec: FileRec, exc: BaseException) -> None:
        """Report a file passed over: a guest's change is a skip, anything else a problem."""
        path = self.display(tree_index, rec)
        if isinstance(exc, Changed | DirChanged) or (
            isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ELOOP)
        ):
            self.reporter.action(path, "skip", "changed during the run")
        elif isinstance(exc, OSError):
            self.problem(path, exc.strerror or str(exc))
        else:
            self.reporter.action(path, "skip", str(exc))


class Linker:
    """Links groups of identical candidates; one per run."""

    def __init__(
        self,
        *,
        store: Path,
        files: TreeFiles,
        index: StoreIndex,
        batch: Batch,
        temp_names: TempNames,
        flags_ok: bool,
        link_max: int,
        counters: Counters,
        checkpoint: Callable[[], None],
    ) -> None:
        self.store = store
        self.files = files
        self.trees = files.trees
        self.openers = files.openers
        self.index = index
        self.batch = batch
        self.temp_names = temp_names
        self.flags_ok = flags_ok
        self.link_max = link_max
        self.counters = counters
        self.reporter = files.reporter
        self.problem = files.problem
        self.checkpoint = checkpoint
        # At most 256 fan-out directories: each stays open for the run, sparing a path
        # lookup per adopted object.
        self._store_dirs: dict[str, int] = {}
        self._closer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cowlink-close")
        self._closing = threading.BoundedSemaphore(2 * _BATCH)

    def _close_one(self, fd: int) -> None:
        try:
            os.close(fd)
        finally:
            self._closing.release()

    def close(self) -> None:
        """Wait until every replaced file has been let go of; close the store's directories."""
        self._closer.shutdown(wait=True)
        for fd in self._store_dirs.values():
            os.close(fd)
        self._store_dirs.clear()

    # -- helpers ------------------------------------------------------------------------

    def _hand_flagged(self, fd: int, path: str) -> bool:
        try:
            flags = _linux.get_flags(fd)
        except OSError as exc:
            if _linux.flags_unsupported(exc):
                return False
            raise
        if flags & _linux.FS_HAND_SET_FLAGS:
            self.reporter.action(path, "skip", "immutable or append-only flag set by hand")
            return True
        return False

    def _record_names(self, node: Candidate) -> list[tuple[int, bytes]]:
        """Queue the link-group rows of every name of `node`: one new group per tree."""
        groups: dict[int, int] = {}
        recorded = []
        for tree_index, rec in node.names:
            if tree_index not in groups:
                groups[tree_index] = self.batch.new_group()
            tree = self.trees[tree_index]
            path = os.fsencode(tree.path_of(rec.dir, rec.name))
            self.batch.put_names(tree.root, [(path, groups[tree_index])])
            recorded.append((tree_index, path))
        return recorded

    def _drop_names(self, names: list[tuple[int, bytes]]) -> None:
        for tree_index, path in names:
            self.batch.drop_names(self.trees[tree_index].root, [path])

    # -- objects ------------------------------------------------------------------------

    def _open_object(self, row: ObjectRow, *, key: LinkKey | None) -> _Object:
        """Open a store object under a read lease, checking it is what the index says."""
        fd = os.open(self.store / row.name, OPEN_FLAGS)
        try:
            st = os.fstat(fd)
            if st.st_ino != row.ino or st.st_size != row.size:
                raise Changed(f"store object {row.name} was replaced; run cowlink verify")
            if key is not None and read_key(fd, st, ignore_mtime=key.mtime_ns is None) != key:
                raise Changed(f"store object {row.name} metadata changed")
            _linux.take_read_lease(fd)
            if self.flags_ok and not _linux.is_immutable(fd):
                _linux.set_immutable(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return _Object(fd, row, st.st_nlink)

    def _first_usable(self, rows: deque[ObjectRow], key: LinkKey) -> _Object | None:
        while rows:
            row = rows.popleft()
            try:
                return self._open_object(row, key=key)
            except (OSError, Changed) as exc:
                self.reporter.action(str(self.store / row.name), "skip", str(exc))
        return None

    def _store_dir(self, name: str) -> int:
        parent = os.path.dirname(name)
        fd = self._store_dirs.get(parent)
        if fd is None:
            try:
                os.mkdir(self.store / parent, 0o700)
            except FileExistsError:
                pass
            fd = os.open(self.store / parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._store_dirs[parent] = fd
        return fd

    def _adopt(self, node: Candidate, key: LinkKey, full: bytes) -> _Object | None:
        """Make this inode a new store object in place: no data is copied."""
        tree_index, rec = node.names[0]
        path = self.files.display(tree_index, rec)
        fd = self.files.open_first(node)
        if fd is None:
            return None
        name = ""
        recorded: list[tuple[int, bytes]] = []
        in_store = False
        try:
            if self._hand_flagged(fd, path):
                os.close(fd)
                return None
            try:
                _linux.take_read_lease(fd)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise
                self.reporter.action(path, "skip", "open for writing by another process")
                os.close(fd)
                return None
            recorded = self._record_names(node)
            if node.has_own_hardlinks():
                self.batch.flush()
            slot = 0
            while True:
                name = object_name(full, key, slot)
                dir_fd = self._store_dir(name)
                try:
                    _linux.link_fd(fd, dir_fd, os.fsencode(os.path.basename(name)))
                    break
                except FileExistsError:
                    slot += 1
            in_store = True
            if self.flags_ok:
                _linux.set_immutable(fd, True)
            if full_digest(fd, rec.size) != full:
                raise Changed()
        except (OSError, Changed, ValueError) as exc:
            self._drop_names(recorded)
            if in_store:
                try:
                    if self.flags_ok:
                        _linux.set_immutable(fd, False)  # still ours alone: not yet shared
                    os.unlink(self.store / name)
                except OSError as undo:
                    self.problem(str(self.store / name), f"cannot undo adoption: {undo}")
            _linux.release_lease(fd)
            os.close(fd)
            self.files.skip(tree_index, rec, exc)
            return None
        row = ObjectRow(
            name,
            self.trees[tree_index].dev,
            rec.ino,
            rec.size,
            node.head or full,
            full,
            key.packed(),
        )
        self.batch.put_object(row)
        self.index.add(row)
        self.counters.objects_created += 1
        if self.reporter.verbose:
            self.reporter.action(path, "adopt", f"new store object {name}")
        return _Object(fd, row, os.fstat(fd).st_nlink)

    # -- linking ------------------------------------------------------------------------

    def link_group(self, size: int, full: bytes, group: list[tuple[Candidate, LinkKey]]) -> None:
        """Link every candidate of one (content, link key) group to one object per slot."""
        key = group[0][1]
        existing = deque(self.index.matching(size, full, key.packed()))
        if len(group) < 2 and not existing:
            return
        # Most-linked first: adopting it as the object leaves the fewest names to rename.
        queue = deque(sorted((node for node, _ in group), key=lambda n: -n.rec.nlink))
        obj: _Object | None = None
        try:
            while queue:
                self.checkpoint()
                if obj is None:
                    obj = self._first_usable(existing, key)
                    if obj is None:
                        obj = self._adopt(queue.popleft(), key, full)
                        continue
                leftover = self._link_some(obj, queue)
                if leftover or (queue and obj.nlink + len(queue[0].names) > self.link_max):
                    self.index.full.add(obj.row.name)
                    obj.close()
                    obj = None
                    queue.extendleft(reversed(leftover))
        finally:
            if obj is not None:
                obj.close()

    def _link_some(self, obj: _Object, queue: deque[Candidate]) -> list[Candidate]:
        """Verify up to _BATCH candidates, then link them in one thaw of the object.

        Returns the candidates that were not linked because the object became full.
        """
        verified: list[tuple[Candidate, int]] = []
        links = obj.nlink
        try:
            while queue and len(verified) < _BATCH:
                node = queue[0]
                if links + len(node.names) > self.link_max:
                    break
                queue.popleft()
                fd = self._verify(node, obj)
                if fd is not None:
                    verified.append((node, fd))
                    links += len(node.names)
            if not verified:
                return []
            for node, _ in verified:
                self._record_names(node)
            if any(node.has_own_hardlinks() for node, _ in verified):
                self.batch.flush()
            with thawed(obj.fd, lease=False) if self.flags_ok else nullcontext():
                for i, (node, fd) in enumerate(verified):
                    if self._replace_names(node, obj, fd) is _Outcome.FULL:
                        return [n for n, _ in verified[i + 1 :]]
            return []
        finally:
            for _, fd in verified:
                # Closing the last reference to a replaced file frees it, which can wait on
                # the journal for a millisecond; a helper thread does it meanwhile. The
                # semaphore bounds how many such fds wait, well below the open-file limit.
                self._closing.acquire()
                self._closer.submit(self._close_one, fd)

    def _verify(self, node: Candidate, obj: _Object) -> int | None:
        """Open the candidate and compare its bytes with the object's; its fd if equal."""
        tree_index, rec = node.names[0]
        path = self.files.display(tree_index, rec)
        fd = self.files.open_first(node)
        if fd is None:
            return None
        try:
            if not self._hand_flagged(fd, path):
                # A writer's data would go to the inode we are about to replace, and be
                # lost with it: only a file nobody has open for writing is replaced, and
                # the lease makes new writers wait until its names lead to the object.
                _linux.take_read_lease(fd)
                if same_content(obj.fd, fd, rec.size):
                    return fd
                self.reporter.action(path, "skip", "content differs from the store object")
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.reporter.action(path, "skip", "open for writing by another process")
            else:
                self.problem(path, exc.strerror or str(exc))
        os.close(fd)
        return None

    def _replace_names(self, node: Candidate, obj: _Object, fd: int) -> _Outcome:
        rec = node.rec
        # Each of our renames changes the inode's ctime; any other change is the guest's.
        ctime_ns = rec.ctime_ns
        replaced = 0
        outcome = _Outcome.LINKED
        failed: list[tuple[int, bytes]] = []
        for tree_index, name_rec in node.names:
            tree = self.trees[tree_index]
            rel = tree.path_of(name_rec.dir, name_rec.name)
            try:
                dir_fd = self.openers[tree_index].open(name_rec.dir)
                done = self._replace_name(
                    obj, dir_fd, tree.dev, name_rec._replace(ctime_ns=ctime_ns)
                )
            except DirChanged:
                done = False
            except OSError as exc:
                failed.append((tree_index, os.fsencode(rel)))
                if exc.errno == errno.EMLINK:
                    outcome = _Outcome.FULL
                    break
                self.problem(tree.root + rel, exc.strerror or str(exc))
                continue
            if not done:
                self.reporter.action(tree.root + rel, "skip", "changed during the run")
                failed.append((tree_index, os.fsencode(rel)))
                continue
            replaced += 1
            obj.nlink += 1
            ctime_ns = os.fstat(fd).st_ctime_ns
            if self.reporter.verbose:
                self.reporter.action(tree.root + rel, "link", f"same as {obj.row.name}")
        self._drop_names(failed)
        self.counters.files_linked += replaced
        if replaced and replaced >= rec.nlink:
            self.counters.bytes_saved += rec.blocks * 512
        if replaced:
            self.batch.forget_digests([(self.trees[node.names[0][0]].dev, rec.ino)])
        return outcome

    def _replace_name(self, obj: _Object, dir_fd: int, dev: int, rec: FileRec) -> bool:
        """Rename a fresh link to `obj` over the name, unless the name changed; True if done."""
        temp = self.temp_names.make()
        _linux.link_fd(obj.fd, dir_fd, temp)
        try:
            st = os.lstat(rec.name, dir_fd=dir_fd)
            if st.st_dev != dev or not same_stat(rec, st):
                os.unlink(temp, dir_fd=dir_fd)
                return False
            os.rename(temp, rec.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(temp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
        return True

    def remove_leftover(self, tree_index: int, dir_index: int, name: str, ino: int) -> None:
        """Remove a temporary name an interrupted run left (see _copy.remove_temp_name)."""
        tree = self.trees[tree_index]
        path = tree.root + tree.path_of(dir_index, name)
        try:
            dir_fd = self.openers[tree_index].open(dir_index)
            if remove_temp_name(dir_fd, name, ino):
                self.reporter.action(path, "remove", "leftover temporary name")
        except (OSError, DirChanged) as exc:
            self.problem(path, f"cannot remove leftover temporary name: {exc}")
