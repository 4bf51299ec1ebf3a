"""The unification engine: find identical files across guest roots and link them to the store.

A run, under the home's lock:

1. checks every root is on the store's filesystem and mount (else nothing changes);
2. recovers from an interrupted run (objects left without their immutable flag);
3. walks each root (see _walk) and removes cowlink's own leftover temporary names;
4. groups candidate inodes by size, then head digest, then full digest (cached in the
   catalogue while an inode's stat is unchanged), then by link key;
5. links each group to one store object: an existing one, or a member adopted as a new
   object. Adopting takes a read lease (no one may hold the file open for writing),
   links the inode into the store, sets the immutable flag, then re-hashes it. Linking a
   file compares its bytes with the object's, re-lstats the name, then links the object
   to a MAC-named temporary name beside the file and renames it over the file.

At every moment each guest path is either its original inode or a verified identical
link; the object is only mutable while its flag is cleared to add links, and then under
a read lease, so nobody can open it for writing meanwhile.
"""

from __future__ import annotations

import enum
import errno
import os
import signal
import stat
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import _linux
from ._catalogue import Catalogue, ObjectRow
from ._errors import (
    EXIT_OK,
    EXIT_PROBLEMS,
    FlagsNotPermitted,
    Interrupted,
    NotSameFilesystem,
    Problem,
    UsageError,
)
from ._excludes import Rules
from ._hashing import HEAD_SIZE, full_digest, head_digest, same_content
from ._home import Home
from ._store import (
    LinkKey,
    TempNames,
    is_object_name,
    object_name,
    parse_object_name,
    read_key,
    thawed,
)
from ._walk import FILE_FLAGS, DirChanged, DirOpener, FileRec, Observer, Tree, same_stat, walk

#: Timestamps newer than this before a digest was taken are not trusted by later runs:
#: the file may change again within the same timestamp tick.
_RACY_NS = 2_000_000_000
_OPEN_FLAGS = FILE_FLAGS | os.O_NOATIME


class Reporter(Protocol):
    """Where the engine tells what it does; the CLI's Console is one."""

    def action(self, path: bytes | str, what: str, reason: str, level: int = 1) -> None: ...
    def problem(self, path: bytes | str, error: str) -> None: ...
    def warning(self, message: str) -> None: ...
    def progress(self, text: str) -> None: ...


@dataclass
class UnifyOptions:
    roots: list[str] = field(default_factory=list)
    dry_run: bool = False
    min_size: int = 1
    ignore_mtime: bool = False
    max_links: int | None = None
    excludes: list[str] = field(default_factory=list)
    exclude_files: list[str] = field(default_factory=list)
    default_excludes: bool = True
    allow_mutable: bool = False
    wait: bool = False
    metrics_file: str | None = None


@dataclass
class UnifyReport:
    files_scanned: int = 0
    files_hashed: int = 0
    files_linked: int = 0
    already_linked: int = 0
    objects_created: int = 0
    bytes_saved: int = 0
    errors: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    dry_run: bool = False
    roots: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_PROBLEMS if self.errors else EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "files_scanned": self.files_scanned,
            "files_hashed": self.files_hashed,
            "files_linked": self.files_linked,
            "already_linked": self.already_linked,
            "objects_created": self.objects_created,
            "bytes_saved": self.bytes_saved,
            "errors": [p.as_dict() for p in self.errors],
            "warnings": self.warnings,
            "duration_s": round(self.duration_s, 3),
            "dry_run": self.dry_run,
            "roots": self.roots,
        }

    def summary_lines(self) -> list[str]:
        would = "would be " if self.dry_run else ""
        return [
            f"scanned {self.files_scanned} files in {len(self.roots)} roots, "
            f"hashed {self.files_hashed}",
            f"{self.files_linked} files {would}linked to the store, "
            f"{self.already_linked} already linked, {self.objects_created} new objects",
            f"{_human(self.bytes_saved)} {would}saved"
            + (f"; {len(self.errors)} problems" if self.errors else "")
            + f" ({self.duration_s:.1f} s)",
        ]


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass
class _Root:
    path: str
    guest: str | None
    rules: Rules


@dataclass
class _Inode:
    """One candidate inode and every name the walk saw for it."""

    rec: FileRec
    names: list[tuple[int, FileRec]]  # (tree index, record of that name)
    head: bytes | None = None
    full: bytes | None = None


class _Stop(Exception):
    pass


def run_unify(home: Home, options: UnifyOptions, reporter: Reporter) -> UnifyReport:
    """Unify the given roots (or every guest of the home) and report what was done.

    Raises:
        UsageError, NotSameFilesystem, FlagsNotPermitted: nothing was changed.
        LockHeld: another command holds the home's lock.
        Interrupted: SIGINT or SIGTERM stopped the run at a safe point.
    """
    started = time.monotonic()
    started_ns = time.time_ns()
    roots = _resolve_roots(home, options)
    _check_same_filesystem(home, roots)
    report = UnifyReport(dry_run=options.dry_run, roots=[r.path for r in roots])
    with home.lock("unify", wait=options.wait):
        if not options.dry_run:
            home.ensure()
        catalogue = Catalogue.open(home.catalogue_path)
        try:
            if catalogue.rebuilt_from is not None:
                reporter.warning(
                    f"the catalogue was corrupt; moved to {catalogue.rebuilt_from} and rebuilt"
                )
            engine = _Engine(home, options, reporter, catalogue, report)
            interrupted: int | None = None
            with engine.signals():
                try:
                    engine.run(roots)
                except _Stop:
                    interrupted = engine.stop_signal
            report.duration_s = time.monotonic() - started
            if not options.dry_run:
                catalogue.record_run(
                    "unify",
                    started_ns,
                    report.duration_s,
                    128 + interrupted if interrupted else report.exit_code,
                    report.as_dict(),
                )
            if interrupted:
                raise Interrupted(interrupted)
        finally:
            catalogue.close()
    return report


def _resolve_roots(home: Home, options: UnifyOptions) -> list[_Root]:
    def rules_for(guest: str | None) -> Rules:
        return Rules.build(
            command_line=options.excludes,
            files=options.exclude_files,
            guest_file=home.guest_dir(guest) / "exclude" if guest else None,
            defaults=options.default_excludes,
        )

    if not options.roots:
        names = home.guest_names()
        if not names:
            raise UsageError(f"no guests in {home.guests_dir} and no ROOT given")
        return [_Root(os.path.realpath(home.guest_root(n)), n, rules_for(n)) for n in names]
    roots: list[_Root] = []
    seen: set[str] = set()
    for given in options.roots:
        path = os.path.realpath(given)
        if not os.path.isdir(path):
            raise UsageError(f"{given}: not a directory")
        if path in seen:
            continue
        for other in seen:
            if path.startswith(other.rstrip("/") + "/") or other.startswith(path + "/"):
                raise UsageError(f"{given}: roots must not contain one another ({other})")
        seen.add(path)
        guest = home.guest_of_root(path)
        roots.append(_Root(path, guest, rules_for(guest)))
    return roots


def _check_same_filesystem(home: Home, roots: list[_Root]) -> None:
    anchor = home.store_dir if home.store_dir.exists() else home.path
    while not anchor.exists():
        anchor = anchor.parent
    store_dev = os.stat(anchor).st_dev
    store_mount = _linux.mount_point_of(str(anchor))
    for root in roots:
        if (
            os.stat(root.path).st_dev != store_dev
            or _linux.mount_point_of(root.path) != store_mount
        ):
            raise NotSameFilesystem(
                f"{root.path} is on another filesystem or mount than the store "
                f"{home.store_dir}; the store can only link files on its own mount"
            )


class _WalkObserver(Observer):
    def __init__(self, engine: _Engine) -> None:
        self._engine = engine

    def skipped(self, path: str, reason: str) -> None:
        self._engine.reporter.action(path, "skip", reason, level=2)

    def problem(self, path: str, error: str) -> None:
        self._engine.problem(path, error)

    def progress(self) -> None:
        self._engine.show_progress()


class _Engine:
    def __init__(
        self,
        home: Home,
        options: UnifyOptions,
        reporter: Reporter,
        catalogue: Catalogue,
        report: UnifyReport,
    ) -> None:
        self.home = home
        self.options = options
        self.reporter = reporter
        self.catalogue = catalogue
        self.report = report
        self.dry_run = options.dry_run
        self.temp_names = TempNames(home.secret()) if not self.dry_run else None
        self.stop_signal = 0
        self.objects: dict[tuple[int, int], ObjectRow] = {}
        self.objects_by_size: dict[int, list[ObjectRow]] = defaultdict(list)
        self.full_objects: set[str] = set()
        self.trees: list[Tree] = []
        self.roots: list[_Root] = []
        self.openers: list[DirOpener] = []
        self.flags_ok = True
        self.store_fd = -1
        self.link_max = options.max_links or 65000
        self._bytes_hashed = 0

    # -- plumbing -----------------------------------------------------------------------

    @contextmanager
    def signals(self) -> Iterator[None]:
        def handler(signum: int, frame: object) -> None:
            self.stop_signal = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        _linux.ignore_lease_breaks()
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def checkpoint(self) -> None:
        """Stop here if a signal asked us to; only called where every path is whole."""
        if self.stop_signal:
            raise _Stop()

    def problem(self, path: str | bytes, error: str) -> None:
        text = os.fsdecode(path) if isinstance(path, bytes) else path
        self.report.errors.append(Problem(text, error))
        self.reporter.problem(text, error)

    def show_progress(self) -> None:
        r = self.report
        self.reporter.progress(
            f"scanned {sum(t.regular_files for t in self.trees) + r.files_scanned} files, "
            f"hashed {r.files_hashed} ({self._bytes_hashed >> 20} MiB), "
            f"linked {r.files_linked}"
        )

    def display(self, tree_index: int, rec: FileRec) -> str:
        tree = self.trees[tree_index]
        return tree.root + tree.path_of(rec.dir, rec.name)

    # -- the run ------------------------------------------------------------------------

    def run(self, roots: list[_Root]) -> None:
        with ExitStack() as stack:
            if not self.dry_run:
                self.store_fd = os.open(self.home.store_dir, os.O_RDONLY | os.O_DIRECTORY)
                stack.callback(os.close, self.store_fd)
                self.link_max = min(
                    self.options.max_links or 65000,
                    os.fpathconf(self.store_fd, "PC_LINK_MAX"),
                )
                self._probe_flags()
            self._load_objects()
            if not self.dry_run:
                self.catalogue.set_meta("dirty", "1")
            for root in roots:
                fd = os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                stack.callback(os.close, fd)
                self.checkpoint()
                tree = walk(
                    fd,
                    root.path,
                    rules=root.rules,
                    min_size=max(self.options.min_size, 1),
                    is_object=self._is_object,
                    is_temp_name=self._is_temp_name,
                    observer=_WalkObserver(self),
                )
                self.trees.append(tree)
                self.roots.append(root)
                opener = DirOpener(tree, fd)
                stack.callback(opener.close)
                self.openers.append(opener)
            self.report.files_scanned = sum(t.regular_files for t in self.trees)
            self.report.already_linked = sum(len(t.linked) for t in self.trees)
            if not self.dry_run:
                self._remove_leftovers()
                self._reconcile_names()
            if self.flags_ok or self.options.allow_mutable:
                self._unify_candidates()
            if not self.dry_run:
                self.catalogue.set_meta("dirty", None)

    def _probe_flags(self) -> None:
        probe = f".probe-{os.getpid()}"
        fd = os.open(probe, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=self.store_fd)
        try:
            _linux.set_immutable(fd, True)
            _linux.set_immutable(fd, False)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                raise FlagsNotPermitted(
                    "cannot set the immutable flag: unify needs root (CAP_LINUX_IMMUTABLE)"
                ) from None
            if not _linux.flags_unsupported(exc):
                raise
            self.flags_ok = False
            message = (
                f"the filesystem of {self.home.store_dir} does not support the immutable flag, "
                "so store objects could be changed through any guest's name"
            )
            if self.options.allow_mutable:
                self.reporter.warning(message + "; linking anyway (--allow-mutable)")
                self.report.warnings.append(message)
            else:
                self.reporter.warning(message + "; nothing is linked (see --allow-mutable)")
                self.problem(str(self.home.store_dir), "immutable flag not supported; not linked")
        finally:
            os.close(fd)
            os.unlink(probe, dir_fd=self.store_fd)

    # -- the store index ----------------------------------------------------------------

    def _load_objects(self) -> None:
        needs_scan = (
            self.catalogue.get_meta("dirty") is not None
            or self.catalogue.get_meta("store_indexed") is None
        ) and self.home.store_dir.is_dir()
        if needs_scan:
            self._scan_store(recover=not self.dry_run)
        for row in self.catalogue.objects():
            self._index_object(row)

    def _index_object(self, row: ObjectRow) -> None:
        self.objects[(row.dev, row.ino)] = row
        self.objects_by_size[row.size].append(row)

    def _is_object(self, dev: int, ino: int) -> bool:
        return (dev, ino) in self.objects

    def _is_temp_name(self, name: bytes) -> bool:
        return self.temp_names is not None and self.temp_names.is_ours(name)

    def _scan_store(self, *, recover: bool) -> None:
        """Rebuild the store index from the store itself, re-flagging interrupted objects."""
        known = {row.name: row for row in self.catalogue.objects()}
        seen: set[str] = set()
        store = self.home.store_dir
        for name in _store_object_names(store):
            seen.add(name)
            try:
                fd = os.open(store / name, _OPEN_FLAGS)
            except OSError as exc:
                self.problem(str(store / name), exc.strerror or str(exc))
                continue
            try:
                st = os.fstat(fd)
                row = known.get(name)
                flagged = True
                try:
                    flagged = _linux.is_immutable(fd)
                except OSError:
                    pass
                if row is None or row.ino != st.st_ino or not flagged:
                    row = self._verify_object(fd, st, name, recover=recover)
                    if row is None:
                        continue
                    self.catalogue.put_object(row)
            finally:
                os.close(fd)
        for name in set(known) - seen:
            self.catalogue.drop_object(name)
        self.catalogue.set_meta("store_indexed", "1")

    def _verify_object(
        self, fd: int, st: os.stat_result, name: str, *, recover: bool
    ) -> ObjectRow | None:
        """Check an object against its name; re-flag it, or drop it from the store if wrong."""
        digest, key_hex, _ = parse_object_name(name)
        key = read_key(fd, st, ignore_mtime=False)
        key_nomtime = read_key(fd, st, ignore_mtime=True)
        chosen = next((k for k in (key, key_nomtime) if k.digest() == key_hex), None)
        try:
            actual = full_digest(fd, st.st_size)
        except (OSError, ValueError) as exc:
            self.problem(str(self.home.store_dir / name), f"cannot verify object: {exc}")
            return None
        if actual != digest or chosen is None:
            self.problem(
                str(self.home.store_dir / name),
                "object does not match its name; removed from the store (guest names kept)",
            )
            if recover:
                try:
                    _linux.set_immutable(fd, False)
                    os.unlink(self.home.store_dir / name)
                except OSError as exc:
                    self.problem(str(self.home.store_dir / name), exc.strerror or str(exc))
            return None
        if recover:
            try:
                _linux.set_immutable(fd, True)
            except OSError as exc:
                if not _linux.flags_unsupported(exc):
                    raise
        return ObjectRow(
            name,
            st.st_dev,
            st.st_ino,
            st.st_size,
            head_digest(fd, st.st_size),
            actual,
            chosen.packed(),
        )

    # -- names and leftovers ------------------------------------------------------------

    def _remove_leftovers(self) -> None:
        """Remove temporary names an interrupted run left (links to objects, never data)."""
        for tree_index, tree in enumerate(self.trees):
            opener = self.openers[tree_index]
            for dir_index, name, ino in tree.leftovers:
                row = self.objects.get((tree.dev, ino))
                path = tree.root + tree.path_of(dir_index, name)
                if row is None:
                    continue
                try:
                    dir_fd = opener.open(dir_index)
                    with self._open_object(row) as obj_fd, self._unflagged(obj_fd):
                        os.unlink(name, dir_fd=dir_fd)
                    self.reporter.action(path, "remove", "leftover temporary name")
                except (OSError, _ObjectGone) as exc:
                    self.problem(path, f"cannot remove leftover temporary name: {exc}")

    def _reconcile_names(self) -> None:
        """Bring the link-group records in line with the names linked to objects now."""
        with self.catalogue.transaction():
            for tree in self.trees:
                recorded = self.catalogue.names(tree.root)
                current = {os.fsencode(tree.path_of(d, name)) for d, name, _ in tree.linked}
                self.catalogue.drop_names(tree.root, set(recorded) - current)
                missing = current - set(recorded)
                # A name with no record lost its group (catalogue rebuilt, or made outside
                # cowlink): it is safest treated as a file of its own.
                self.catalogue.put_names(
                    tree.root, ((path, self.catalogue.new_group()) for path in sorted(missing))
                )

    # -- candidates ---------------------------------------------------------------------

    def _unify_candidates(self) -> None:
        inodes: dict[tuple[int, int], _Inode] = {}
        for tree_index, tree in enumerate(self.trees):
            for rec in tree.files:
                key = (tree.dev, rec.ino)
                node = inodes.get(key)
                if node is None:
                    inodes[key] = _Inode(rec, [(tree_index, rec)])
                else:
                    node.names.append((tree_index, rec))
        by_size: dict[int, list[_Inode]] = defaultdict(list)
        for node in inodes.values():
            by_size[node.rec.size].append(node)
        del inodes
        sizes = sorted(
            (s for s, nodes in by_size.items() if len(nodes) + len(self.objects_by_size[s]) > 1),
            reverse=True,
        )
        digest_rows: list[tuple[int, int, int, int, int, bytes, bytes | None]] = []
        for size in sizes:
            self.checkpoint()
            nodes = by_size.pop(size)
            groups = self._content_groups(size, nodes, digest_rows)
            for full, members in groups:
                self._link_group(size, full, members)
                self.checkpoint()
            if len(digest_rows) > 2000:
                self._flush_digests(digest_rows)
        self._flush_digests(digest_rows)

    def _flush_digests(
        self, rows: list[tuple[int, int, int, int, int, bytes, bytes | None]]
    ) -> None:
        if rows:
            with self.catalogue.transaction():
                self.catalogue.put_digests(rows)
            rows.clear()

    def _open_rec(self, tree_index: int, rec: FileRec) -> int:
        """Open a candidate read-only through its verified directory; check it is unchanged."""
        dir_fd = self.openers[tree_index].open(rec.dir)
        fd = os.open(rec.name, _OPEN_FLAGS, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not same_stat(rec, st):
                raise _Changed()
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _content_groups(
        self,
        size: int,
        nodes: list[_Inode],
        digest_rows: list[tuple[int, int, int, int, int, bytes, bytes | None]],
    ) -> list[tuple[bytes, list[_Inode]]]:
        """Split one size class into groups whose full digests are equal."""
        objects = self.objects_by_size.get(size, [])
        for node in nodes:
            tree = self.trees[node.names[0][0]]
            rec = node.rec
            cached = self.catalogue.cached_digests(
                tree.dev, rec.ino, rec.size, rec.mtime_ns, rec.ctime_ns
            )
            if cached is not None:
                node.head, node.full = cached
        # Heads first: most same-sized files differ in their first 4 KiB.
        self._fill(nodes, digest_rows, full=False)
        by_head: dict[bytes, list[_Inode]] = defaultdict(list)
        for node in nodes:
            if node.head is not None:
                by_head[node.head].append(node)
        object_heads = {row.head for row in objects}
        need_full = [
            node
            for head, group in by_head.items()
            if len(group) > 1 or head in object_heads
            for node in group
        ]
        self._fill(need_full, digest_rows, full=True)
        by_full: dict[bytes, list[_Inode]] = defaultdict(list)
        for node in need_full:
            if node.full is not None:
                by_full[node.full].append(node)
        object_fulls = {row.full for row in objects}
        return [
            (full, group)
            for full, group in by_full.items()
            if len(group) > 1 or full in object_fulls
        ]

    def _fill(
        self,
        nodes: list[_Inode],
        digest_rows: list[tuple[int, int, int, int, int, bytes, bytes | None]],
        *,
        full: bool,
    ) -> None:
        for node in nodes:
            if (node.full if full else node.head) is not None:
                continue
            if full and node.rec.size <= HEAD_SIZE:
                node.full = node.head
                continue
            tree_index, rec = node.names[0]
            tree = self.trees[tree_index]
            began = time.time_ns()
            try:
                fd = self._open_rec(tree_index, rec)
            except (OSError, _Changed) as exc:
                self._skip_changed(tree_index, rec, exc)
                continue
            try:
                if full:
                    node.full = full_digest(fd, rec.size)
                    self._bytes_hashed += rec.size
                else:
                    node.head = head_digest(fd, rec.size)
                    if rec.size <= HEAD_SIZE:
                        node.full = node.head
                    self._bytes_hashed += min(rec.size, HEAD_SIZE)
                self.report.files_hashed += 1 if full or rec.size <= HEAD_SIZE else 0
            except (OSError, ValueError) as exc:
                self._skip_changed(tree_index, rec, exc)
                continue
            finally:
                os.close(fd)
            self.show_progress()
            if max(rec.mtime_ns, rec.ctime_ns) < began - _RACY_NS and node.head is not None:
                digest_rows.append(
                    (tree.dev, rec.ino, rec.size, rec.mtime_ns, rec.ctime_ns, node.head, node.full)
                )

    def _skip_changed(self, tree_index: int, rec: FileRec, exc: BaseException) -> None:
        path = self.display(tree_index, rec)
        if isinstance(exc, _Changed | DirChanged) or (
            isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ELOOP)
        ):
            self.reporter.action(path, "skip", "changed during the run", level=1)
        elif isinstance(exc, OSError):
            self.problem(path, exc.strerror or str(exc))
        else:
            self.reporter.action(path, "skip", str(exc), level=1)

    # -- linking ------------------------------------------------------------------------

    def _link_group(self, size: int, full: bytes, members: list[_Inode]) -> None:
        """Link every member whose link key matches to one object per key."""
        by_key: dict[bytes, list[tuple[_Inode, LinkKey]]] = defaultdict(list)
        for node in members:
            tree_index, rec = node.names[0]
            try:
                fd = self._open_rec(tree_index, rec)
            except (OSError, _Changed) as exc:
                self._skip_changed(tree_index, rec, exc)
                continue
            try:
                key = read_key(fd, os.fstat(fd), ignore_mtime=self.options.ignore_mtime)
            except OSError as exc:
                self.problem(self.display(tree_index, rec), exc.strerror or str(exc))
                continue
            finally:
                os.close(fd)
            by_key[key.packed()].append((node, key))
        for packed, group in by_key.items():
            existing = [
                row
                for row in self.objects_by_size.get(size, [])
                if row.full == full and row.key == packed and row.name not in self.full_objects
            ]
            if len(group) < 2 and not existing:
                continue
            # Most-linked first: adopting it as the object leaves the fewest names to rename.
            group.sort(key=lambda item: -item[0].rec.nlink)
            if self.dry_run:
                self._plan_group(group, bool(existing))
            else:
                self._apply_group(size, full, group, existing)

    def _plan_group(self, group: list[tuple[_Inode, LinkKey]], has_object: bool) -> None:
        first = 0 if has_object else 1
        if not has_object:
            self.report.objects_created += 1
        for node, _ in group[first:]:
            self.report.files_linked += len(node.names)
            if len(node.names) >= node.rec.nlink:
                self.report.bytes_saved += node.rec.blocks * 512
            for tree_index, rec in node.names:
                self.reporter.action(self.display(tree_index, rec), "would link", "same content")

    def _apply_group(
        self,
        size: int,
        full: bytes,
        group: list[tuple[_Inode, LinkKey]],
        existing: list[ObjectRow],
    ) -> None:
        handle: _ObjectHandle | None = None
        candidates = list(existing)
        try:
            while candidates and handle is None:
                row = candidates.pop(0)
                try:
                    handle = self._open_existing(row, check_key=True)
                except (OSError, _ObjectGone) as exc:
                    self.reporter.action(str(self.home.store_dir / row.name), "skip", str(exc))
            for node, key in group:
                self.checkpoint()
                if handle is None or handle.nlink + len(node.names) > self.link_max:
                    if handle is not None:
                        self.full_objects.add(handle.row.name)
                        handle.close()
                        handle = None
                    handle = self._adopt(node, key, full)
                    continue
                linked = self._link_node(node, handle)
                if linked is _LinkResult.FULL:
                    self.full_objects.add(handle.row.name)
                    handle.close()
                    handle = self._adopt(node, key, full)
        finally:
            if handle is not None:
                handle.close()

    def _open_existing(self, row: ObjectRow, *, check_key: bool) -> _ObjectHandle:
        """Open a store object under a read lease, checking it is still what the index says."""
        fd = os.open(self.home.store_dir / row.name, _OPEN_FLAGS)
        try:
            st = os.fstat(fd)
            if st.st_ino != row.ino or st.st_size != row.size:
                raise _ObjectGone(f"store object {row.name} changed; run cowlink verify")
            if check_key:
                key = read_key(fd, st, ignore_mtime=self.options.ignore_mtime)
                if key.packed() != row.key:
                    raise _ObjectGone(f"store object {row.name} metadata changed")
            _linux.take_read_lease(fd)
            if self.flags_ok and not _linux.is_immutable(fd):
                _linux.set_immutable(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return _ObjectHandle(fd, row, st.st_nlink)

    def _adopt(self, node: _Inode, key: LinkKey, full: bytes) -> _ObjectHandle | None:
        """Make this inode a new store object, in place: no data is copied."""
        tree_index, rec = node.names[0]
        path = self.display(tree_index, rec)
        try:
            fd = self._open_rec(tree_index, rec)
        except (OSError, _Changed) as exc:
            self._skip_changed(tree_index, rec, exc)
            return None
        name = ""
        linked = False
        try:
            if self._hand_flagged(fd, path):
                os.close(fd)
                return None
            try:
                _linux.take_read_lease(fd)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    self.reporter.action(path, "skip", "open for writing by another process")
                    os.close(fd)
                    return None
                raise
            slot = 0
            while True:
                name = object_name(full, key, slot)
                parent = self.home.store_dir / os.path.dirname(name)
                parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    _linux.link_fd(fd, dir_fd, os.fsencode(os.path.basename(name)))
                    break
                except FileExistsError:
                    slot += 1
                finally:
                    os.close(dir_fd)
            linked = True
            if self.flags_ok:
                _linux.set_immutable(fd, True)
            # Under the lease nobody can write now; re-hash in case a write slipped in
            # between the digest and the lease.
            if full_digest(fd, rec.size) != full:
                raise _Changed()
            row = ObjectRow(
                name,
                self.trees[tree_index].dev,
                rec.ino,
                rec.size,
                node.head or full,
                full,
                key.packed(),
            )
            groups = self._groups_for(node)
            with self.catalogue.transaction():
                self.catalogue.put_object(row)
                self._record_names(node, groups)
            self._index_object(row)
            self.report.objects_created += 1
            self.reporter.action(path, "adopt", f"new store object {name}")
            return _ObjectHandle(fd, row, os.fstat(fd).st_nlink)
        except (OSError, _Changed, ValueError) as exc:
            if linked:
                try:
                    if self.flags_ok:
                        _linux.set_immutable(fd, False)
                    os.unlink(self.home.store_dir / name)
                except OSError as undo:
                    self.problem(str(self.home.store_dir / name), f"cannot undo: {undo}")
            os.close(fd)
            if isinstance(exc, OSError) and exc.errno not in (errno.ENOENT,):
                self.problem(path, exc.strerror or str(exc))
            else:
                self.reporter.action(path, "skip", "changed during the run")
            return None

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

    def _groups_for(self, node: _Inode) -> dict[int, int]:
        """One new link group per tree the inode has names in."""
        return {tree_index: self.catalogue.new_group() for tree_index, _ in node.names}

    def _record_names(self, node: _Inode, groups: dict[int, int]) -> None:
        for tree_index, rec in node.names:
            tree = self.trees[tree_index]
            self.catalogue.put_names(
                tree.root, [(os.fsencode(tree.path_of(rec.dir, rec.name)), groups[tree_index])]
            )

    def _link_node(self, node: _Inode, obj: _ObjectHandle) -> _LinkResult:
        """Replace every name of `node` by a link to `obj`, after comparing the bytes."""
        tree_index, rec = node.names[0]
        path = self.display(tree_index, rec)
        try:
            fd = self._open_rec(tree_index, rec)
        except (OSError, _Changed) as exc:
            self._skip_changed(tree_index, rec, exc)
            return _LinkResult.SKIPPED
        try:
            if self._hand_flagged(fd, path):
                return _LinkResult.SKIPPED
            if not same_content(obj.fd, fd, rec.size):
                self.reporter.action(path, "skip", "content differs from the store object")
                return _LinkResult.SKIPPED
        except OSError as exc:
            self.problem(path, exc.strerror or str(exc))
            return _LinkResult.SKIPPED
        finally:
            os.close(fd)
        assert self.temp_names is not None
        with self.catalogue.transaction():
            self._record_names(node, self._groups_for(node))
        replaced = 0
        failed: dict[int, list[bytes]] = defaultdict(list)
        result = _LinkResult.LINKED
        with self._unflagged(obj.fd):
            for tree_index, name_rec in node.names:
                tree = self.trees[tree_index]
                name_path = tree.root + tree.path_of(name_rec.dir, name_rec.name)
                rel = os.fsencode(tree.path_of(name_rec.dir, name_rec.name))
                try:
                    dir_fd = self.openers[tree_index].open(name_rec.dir)
                    outcome = self._replace_name(obj, dir_fd, tree.dev, name_rec)
                except DirChanged:
                    outcome = "changed"
                except OSError as exc:
                    if exc.errno == errno.EMLINK:
                        result = _LinkResult.FULL
                        failed[tree_index].append(rel)
                        break
                    self.problem(name_path, exc.strerror or str(exc))
                    failed[tree_index].append(rel)
                    continue
                if outcome == "changed":
                    self.reporter.action(name_path, "skip", "changed during the run")
                    failed[tree_index].append(rel)
                    continue
                replaced += 1
                obj.nlink += 1
                self.reporter.action(name_path, "link", f"same as {obj.row.name}")
        if failed:
            with self.catalogue.transaction():
                for failed_tree, paths in failed.items():
                    self.catalogue.drop_names(self.trees[failed_tree].root, paths)
        self.report.files_linked += replaced
        if replaced and replaced >= rec.nlink:
            self.report.bytes_saved += rec.blocks * 512
        if replaced:
            with self.catalogue.transaction():
                self.catalogue.forget_digests([(self.trees[node.names[0][0]].dev, rec.ino)])
        return result

    def _replace_name(self, obj: _ObjectHandle, dir_fd: int, dev: int, rec: FileRec) -> str:
        assert self.temp_names is not None
        temp = self.temp_names.make()
        _linux.link_fd(obj.fd, dir_fd, temp)
        try:
            st = os.lstat(rec.name, dir_fd=dir_fd)
            if st.st_dev != dev or not same_stat(rec, st):
                os.unlink(temp, dir_fd=dir_fd)
                return "changed"
            os.rename(temp, rec.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(temp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
        return "linked"

    @contextmanager
    def _unflagged(self, fd: int) -> Iterator[None]:
        """Clear the object's immutable flag for the moments new names are added."""
        if not self.flags_ok:
            yield
            return
        with thawed(fd, lease=False):
            yield

    @contextmanager
    def _open_object(self, row: ObjectRow) -> Iterator[int]:
        handle = self._open_existing(row, check_key=False)
        try:
            yield handle.fd
        finally:
            handle.close()


class _Changed(Exception):
    pass


class _ObjectGone(Exception):
    pass


class _LinkResult(enum.Enum):
    LINKED = "linked"
    SKIPPED = "skipped"
    FULL = "full"


class _ObjectHandle:
    """An open store object held under a read lease."""

    def __init__(self, fd: int, row: ObjectRow, nlink: int) -> None:
        self.fd = fd
        self.row = row
        self.nlink = nlink

    def close(self) -> None:
        _linux.release_lease(self.fd)
        os.close(self.fd)


def _store_object_names(store: Path) -> Iterator[str]:
    for first in sorted(os.listdir(store)):
        if len(first) != 2 or not (store / first).is_dir():
            continue
        for second in sorted(os.listdir(store / first)):
            sub = store / first / second
            if len(second) != 2 or not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                name = f"{first}/{second}/{entry.name}"
                if entry.is_file(follow_symlinks=False) and is_object_name(name):
                    yield name
