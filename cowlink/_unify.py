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
   to a MAC-named temporary name beside the file and renames it over the file. Size
   classes are linked in parallel lanes (forked processes, see _lanes).

At every moment each guest path is either its original inode or a verified identical
link; the object is only mutable while its flag is cleared to add links, and then under
a read lease, so nobody can open it for writing meanwhile.
"""

from __future__ import annotations

import errno
import functools
import os
import resource
import signal
import stat
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any

from . import _linux
from ._catalogue import Catalogue
from ._errors import (
    EXIT_FATAL,
    EXIT_LOCKED,
    CowlinkError,
    FlagsNotPermitted,
    Interrupted,
    LaneFailed,
    NotSameFilesystem,
    Problem,
    ReportsProblems,
    UsageError,
    storage_faults,
)
from ._excludes import Rules
from ._hashing import HEAD_SIZE, WHOLE_SIZE, full_digest, head_and_full, head_digest
from ._home import Home
from ._lanes import Channel, Event, LaneResult, can_fork, default_lanes, run_lanes
from ._linker import Candidate, Counters, Linker, Reporter, TreeFiles
from ._signals import StopRequest
from ._store import LinkKey, TempNames, read_xattrs
from ._storeindex import StoreIndex
from ._walk import DirOpener, FdCache, FileRec, Observer, Tree, walk

#: Timestamps newer than this before a digest was taken are not trusted by later runs:
#: the file may change again within the same timestamp tick.
_RACY_NS = 2_000_000_000
#: Catalogue rows gathered before they are committed in one transaction.
_BATCH_ROWS = 5000
#: The page cache of a lane's catalogue connection: lanes mostly write.
_LANE_CACHE_KIB = 256
#: Bounds on the directories kept open for reuse (see _dir_fds_to_keep).
_DIR_FDS_MIN = 64
_DIR_FDS_MAX = 8192
#: Candidates of a size class are kept as tree index << _TREE_SHIFT | file index.
_TREE_SHIFT = 40
_FILE_MASK = (1 << _TREE_SHIFT) - 1


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
    jobs: int = 0  # processes that link in parallel; 0: one per CPU (see _lanes)


@dataclass
class UnifyReport(ReportsProblems):
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


class _Stop(Exception):
    pass


def run_unify(home: Home, options: UnifyOptions, reporter: Reporter) -> UnifyReport:
    """Unify the given roots (or every guest of the home) and report what was done.

    With `options.metrics_file`, the Prometheus metrics are written after the run, also
    after one that failed, so that monitoring sees the failure.

    Raises:
        UsageError, NotSameFilesystem, FlagsNotPermitted: nothing was changed.
        LockHeld: another command holds the home's lock.
        Interrupted: SIGINT or SIGTERM stopped the run at a safe point.
        NoSpace, ReadOnly: the filesystem filled up or turned read-only; the run stopped.
    """
    started = time.monotonic()
    report: UnifyReport | None = None
    exit_code = EXIT_FATAL
    try:
        report = _run_unify(home, options, reporter, started)
        exit_code = report.exit_code
        return report
    except CowlinkError as exc:
        exit_code = exc.exit_code
        raise
    finally:
        if options.metrics_file and not options.dry_run and exit_code != EXIT_LOCKED:
            _write_metrics(home, options.metrics_file, started, report, exit_code, reporter)


def _write_metrics(
    home: Home,
    path: str,
    started: float,
    report: UnifyReport | None,
    exit_code: int,
    reporter: Reporter,
) -> None:
    from ._metrics import LastUnify, write_metrics

    duration = time.monotonic() - started
    last = LastUnify(
        timestamp_s=time.time(),
        duration_s=report.duration_s if report else duration,
        errors=len(report.errors) if report else 1,
        exit_code=exit_code,
    )
    try:
        write_metrics(home, path, last_unify=last)
    except OSError as exc:
        reporter.warning(f"cannot write metrics to {path}: {exc.strerror or exc}")


def _run_unify(
    home: Home, options: UnifyOptions, reporter: Reporter, started: float
) -> UnifyReport:
    started_ns = time.time_ns()
    roots = _resolve_roots(home, options)
    _check_same_filesystem(home, roots)
    report = UnifyReport(dry_run=options.dry_run, roots=[r.path for r in roots])
    with storage_faults(str(home.path)), home.lock("unify", wait=options.wait):
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


def _raise_open_file_limit() -> int:
    """Each root stays open for the whole run: hundreds of guests outgrow cron's 1024.
    Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def _dir_fds_to_keep(open_file_limit: int) -> int:
    """How many directories may stay open for reuse: size classes visit files all over
    the trees, and each directory reopened costs an open and an fstat per level."""
    if open_file_limit == resource.RLIM_INFINITY:
        return _DIR_FDS_MAX
    return max(_DIR_FDS_MIN, min(_DIR_FDS_MAX, open_file_limit // 4))


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


class _LaneReporter:
    """A forked lane's reporter: everything goes to the parent, which reports it."""

    def __init__(self, channel: Channel, verbose: int) -> None:
        self._channel = channel
        self.verbose = verbose

    def action(self, path: bytes | str, what: str, reason: str, level: int = 1) -> None:
        self._channel.send(("action", path, what, reason, level))

    def problem(self, path: bytes | str, error: str) -> None:
        self._channel.send(("problem", path, error))

    def warning(self, message: str) -> None:
        self._channel.send(("warning", message))

    def progress(self, text: str) -> None:
        pass  # show_progress sends the lane's counts instead


class _WalkObserver(Observer):
    def __init__(self, engine: _Engine) -> None:
        self._engine = engine

    def skipped(self, path: str, reason: str) -> None:
        if self._engine.reporter.verbose >= 2:
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
        #: Devices with digests on record; checked once, so a first run looks none up.
        self._devs_with_digests: set[int] = set()
        self.counters = Counters(errors=report.errors)
        self.batch = catalogue.batch()
        self.index = StoreIndex(home.store_dir, catalogue)
        self.stop = StopRequest()
        self.trees: list[Tree] = []
        self.openers: list[DirOpener] = []
        self.flags_ok = True
        self.temp_names = TempNames(home.secret()) if not self.dry_run else None
        self.linker: Linker | None = None
        self.files = TreeFiles([], [], reporter, self.counters)
        self._bytes_hashed = 0
        self._lane_failure: tuple[int, str] | None = None
        self._lane_progress: dict[int, tuple[int, int, int]] = {}
        self._channel: Channel | None = None  # set in a forked lane

    # -- plumbing -----------------------------------------------------------------------

    @property
    def stop_signal(self) -> int:
        return self.stop.signum

    def signals(self) -> AbstractContextManager[None]:
        return self.stop.catching()

    def checkpoint(self) -> None:
        """Stop here if a signal asked us to; only called where every path is whole."""
        if self.stop_signal:
            raise _Stop()

    def problem(self, path: str, error: str) -> None:
        self.files.problem(path, error)

    def show_progress(self) -> None:
        hashed, bytes_hashed = self.report.files_hashed, self._bytes_hashed
        linked = self.counters.files_linked
        if self._channel is not None:
            self._channel.send(("progress", hashed, bytes_hashed, linked))
            return
        for lane_hashed, lane_bytes, lane_linked in self._lane_progress.values():
            hashed += lane_hashed
            bytes_hashed += lane_bytes
            linked += lane_linked
        self.reporter.progress(
            f"scanned {sum(t.regular_files for t in self.trees)} files, "
            f"hashed {hashed} ({bytes_hashed >> 20} MiB), linked {linked}"
        )

    # -- the run ------------------------------------------------------------------------

    def run(self, roots: list[_Root]) -> None:
        with ExitStack() as stack:
            stack.callback(self._finish_counters)
            link_max = self.options.max_links or 65000
            if not self.dry_run:
                store_fd = os.open(self.home.store_dir, os.O_RDONLY | os.O_DIRECTORY)
                stack.callback(os.close, store_fd)
                link_max = min(link_max, os.fpathconf(store_fd, "PC_LINK_MAX"))
                self._probe_flags(store_fd)
            self.index.load(recover=not self.dry_run, problem=self.problem)
            if not self.dry_run:
                self.catalogue.set_meta("dirty", "1")
            dir_fds = FdCache(_dir_fds_to_keep(_raise_open_file_limit()))
            stack.callback(dir_fds.close)
            for root in roots:
                fd = os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                stack.callback(os.close, fd)
                self.checkpoint()
                tree = walk(
                    fd,
                    root.path,
                    rules=root.rules,
                    min_size=max(self.options.min_size, 1),
                    is_object=self.index.is_object,
                    is_temp_name=self._is_temp_name,
                    observer=_WalkObserver(self),
                )
                self.trees.append(tree)
                if self.catalogue.has_digests(tree.dev):
                    self._devs_with_digests.add(tree.dev)
                self.openers.append(DirOpener(tree, fd, dir_fds))
            self.files = TreeFiles(self.trees, self.openers, self.reporter, self.counters)
            self.report.files_scanned = sum(t.regular_files for t in self.trees)
            self.report.already_linked = sum(len(t.linked) for t in self.trees)
            if not self.dry_run:
                self.linker = self._new_linker(link_max)
                stack.callback(self.linker.close)
                stack.callback(self.batch.flush)
                for tree_index, tree in enumerate(self.trees):
                    for dir_index, name, ino in tree.leftovers:
                        self.linker.remove_leftover(tree_index, dir_index, name, ino)
                self._reconcile_names()
            if self.flags_ok or self.options.allow_mutable:
                self._unify_candidates()
            if not self.dry_run:
                self.batch.flush()
                self.catalogue.set_meta("dirty", None)

    def _new_linker(self, link_max: int) -> Linker:
        assert self.temp_names is not None
        return Linker(
            store=self.home.store_dir,
            files=self.files,
            index=self.index,
            batch=self.batch,
            temp_names=self.temp_names,
            flags_ok=self.flags_ok,
            link_max=link_max,
            counters=self.counters,
            checkpoint=self.checkpoint,
        )

    def _finish_counters(self) -> None:
        self.report.files_linked = self.counters.files_linked
        self.report.objects_created = self.counters.objects_created
        self.report.bytes_saved = self.counters.bytes_saved

    def _probe_flags(self, store_fd: int) -> None:
        probe = f".probe-{os.getpid()}"
        fd = os.open(probe, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=store_fd)
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
            os.unlink(probe, dir_fd=store_fd)

    def _is_temp_name(self, name: bytes) -> bool:
        return self.temp_names is not None and self.temp_names.is_ours(name)

    def _reconcile_names(self) -> None:
        """Bring the link-group records in line with the names linked to objects now."""
        for tree in self.trees:
            linked = tree.linked
            paths = (
                os.fsencode(tree.path_of(linked.dir[i], linked.name(i))) for i in range(len(linked))
            )
            missing = self.catalogue.sync_names(tree.root, paths)
            # A name with no record lost its group (catalogue rebuilt, or linked outside
            # cowlink): it is safest treated as a file of its own.
            self.batch.put_names(tree.root, [(path, self.batch.new_group()) for path in missing])
        self.batch.flush()

    # -- candidates ---------------------------------------------------------------------

    def _unify_candidates(self) -> None:
        # Only sizes that occur twice (counting store objects) can hold a duplicate; the
        # rest of the files are never looked at again.
        counts: Counter[int] = Counter()
        for tree in self.trees:
            counts.update(tree.files.size)
        for size, rows in self.index.by_size.items():
            counts[size] += len(rows)
        wanted = {size for size, count in counts.items() if count > 1}
        del counts
        buckets: dict[int, array[int]] = {}
        for tree_index, tree in enumerate(self.trees):
            sizes = tree.files.size
            for i in range(len(sizes)):
                size = sizes[i]
                if size in wanted:
                    bucket = buckets.get(size)
                    if bucket is None:
                        bucket = buckets[size] = array("Q")
                    bucket.append(tree_index << _TREE_SHIFT | i)
        del wanted
        lanes = min(self.options.jobs or default_lanes(), len(buckets))
        by_size = sorted(buckets, reverse=True)
        if self.linker is None or lanes < 2 or not can_fork():
            # One process: each class's list is freed once it is linked.
            self._link_sizes(functools.partial(next, iter(by_size), None), buckets.pop)
            return
        self.batch.flush()  # a forked lane must not inherit rows it would write again
        run_lanes(
            lanes,
            by_size,
            functools.partial(self._lane, buckets),
            self.stop,
            self._lane_event,
            self._lane_result,
        )
        if self._lane_failure is not None:
            code, message = self._lane_failure
            raise LaneFailed(message, code)
        self.checkpoint()  # a lane stopped by a signal stops the run

    def _lane(
        self,
        buckets: dict[int, array[int]],
        next_size: Callable[[], int | None],
        channel: Channel,
    ) -> LaneResult:
        """Link the size classes the queue hands out, as a forked lane (see _lanes)."""
        assert self.linker is not None
        self._channel = channel
        with storage_faults(str(self.home.path)):
            # SQLite connections must not cross fork(): the lane gets its own, with a
            # small page cache, since every lane's private memory adds up.
            self.catalogue = Catalogue.another(self.catalogue.path, cache_kib=_LANE_CACHE_KIB)
            self.batch = self.catalogue.batch()
            self.counters = Counters()
            self.report.files_hashed = 0
            self._bytes_hashed = 0
            self.reporter = _LaneReporter(channel, self.reporter.verbose)
            self.files = TreeFiles(self.trees, self.openers, self.reporter, self.counters)
            self.linker = self._new_linker(self.linker.link_max)
            stopped = 0
            try:
                # A lane only reads the lists: freeing one would write to pages it shares
                # with its parent, and copy them.
                self._link_sizes(next_size, buckets.__getitem__)
            except _Stop:
                stopped = self.stop_signal
            finally:
                self.linker.close()
                self.batch.flush()
                self.catalogue.close()
        c = self.counters
        return LaneResult(
            files_linked=c.files_linked,
            objects_created=c.objects_created,
            bytes_saved=c.bytes_saved,
            files_hashed=self.report.files_hashed,
            bytes_hashed=self._bytes_hashed,
            errors=c.errors,
            stopped=stopped,
        )

    def _lane_event(self, lane: int, event: Event) -> None:
        kind, *args = event
        if kind == "action":
            self.reporter.action(*args)
        elif kind == "problem":
            self.reporter.problem(*args)
        elif kind == "warning":
            self.reporter.warning(*args)
        elif kind == "progress":
            self._lane_progress[lane] = (args[0], args[1], args[2])
            self.show_progress()

    def _lane_result(self, lane: int, result: LaneResult) -> None:
        self._lane_progress.pop(lane, None)
        c = self.counters
        c.files_linked += result.files_linked
        c.objects_created += result.objects_created
        c.bytes_saved += result.bytes_saved
        c.errors.extend(result.errors)
        self.report.files_hashed += result.files_hashed
        self._bytes_hashed += result.bytes_hashed
        if result.stopped and not self.stop.signum:
            self.stop.signum = result.stopped
        if result.fatal is not None:
            self._lane_failure = self._lane_failure or result.fatal
            # The other lanes stop at their next safe point.
            self.stop.signum = self.stop.signum or signal.SIGTERM

    def _link_sizes(
        self, next_size: Callable[[], int | None], size_class: Callable[[int], array[int]]
    ) -> None:
        """Link size class after size class, as long as `next_size` hands them out;
        `size_class(size)` gives a class's candidates as codes (see _TREE_SHIFT)."""
        while True:
            self.checkpoint()
            size = next_size()
            if size is None:
                return
            for full, members in self._content_groups(size, self._candidates(size_class(size))):
                for group in self._key_groups(members):
                    if self.linker is not None:
                        self.linker.link_group(size, full, group)
                    else:
                        self._plan_group(size, full, group)
                    self.checkpoint()
            if len(self.batch) > _BATCH_ROWS:
                self.batch.flush()

    def _candidates(self, codes: array[int]) -> list[Candidate]:
        """One Candidate per inode of a size class, with all the names the walk saw."""
        nodes: dict[tuple[int, int], Candidate] = {}
        for code in codes:
            tree_index, i = code >> _TREE_SHIFT, code & _FILE_MASK
            tree = self.trees[tree_index]
            rec = tree.files.rec(i)
            node = nodes.get((tree.dev, rec.ino))
            if node is None:
                nodes[(tree.dev, rec.ino)] = Candidate(rec, [(tree_index, rec)])
            else:
                node.names.append((tree_index, rec))
        return list(nodes.values())

    def _content_groups(
        self, size: int, nodes: list[Candidate]
    ) -> list[tuple[bytes, list[Candidate]]]:
        """Split one size class into groups whose full digests are equal."""
        objects = self.index.by_size.get(size, [])
        by_dev: dict[int, list[Candidate]] = defaultdict(list)
        for node in nodes:
            by_dev[self.trees[node.names[0][0]].dev].append(node)
        for dev, same_dev in by_dev.items():
            if dev not in self._devs_with_digests:
                continue
            cached = self.catalogue.cached_digests(
                dev, ((n.rec.ino, n.rec.size, n.rec.mtime_ns, n.rec.ctime_ns) for n in same_dev)
            )
            for node in same_dev:
                found = cached.get(node.rec.ino)
                if found is not None:
                    node.head, node.full = found
        # Heads first: most same-sized files differ in their first 4 KiB.
        self._digest(nodes, full=False)
        by_head: dict[bytes, list[Candidate]] = defaultdict(list)
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
        self._digest(need_full, full=True)
        by_full: dict[bytes, list[Candidate]] = defaultdict(list)
        for node in need_full:
            if node.full is not None:
                by_full[node.full].append(node)
        object_fulls = {row.full for row in objects}
        return [
            (full, group)
            for full, group in by_full.items()
            if len(group) > 1 or full in object_fulls
        ]

    def _digest(self, nodes: list[Candidate], *, full: bool) -> None:
        """Fill in head or full digests (and, while the file is open, its link key)."""
        for node in nodes:
            if (node.full if full else node.head) is not None:
                continue
            rec = node.rec
            if full and rec.size <= HEAD_SIZE:
                node.full = node.head
                continue
            began = time.time_ns()
            fd = self.files.open_first(node)
            if fd is None:
                continue
            try:
                if full:
                    node.full = full_digest(fd, rec.size)
                    self._bytes_hashed += rec.size
                    self.report.files_hashed += 1
                elif rec.size <= WHOLE_SIZE:
                    node.head, node.full = head_and_full(fd, rec.size)
                    self._bytes_hashed += rec.size
                    self.report.files_hashed += 1
                else:
                    node.head = head_digest(fd, rec.size)
                    self._bytes_hashed += HEAD_SIZE
                if node.full is not None:
                    node.key = self._key(rec, fd)
            except (OSError, ValueError) as exc:
                node.head = node.full = None
                self.files.skip(node.names[0][0], rec, exc)
                continue
            finally:
                os.close(fd)
            if self.report.files_hashed % 256 == 0:
                self.show_progress()
            if max(rec.mtime_ns, rec.ctime_ns) < began - _RACY_NS and node.head is not None:
                tree = self.trees[node.names[0][0]]
                self.batch.put_digests(
                    [
                        (
                            tree.dev,
                            rec.ino,
                            rec.size,
                            rec.mtime_ns,
                            rec.ctime_ns,
                            node.head,
                            node.full,
                        )
                    ]
                )

    def _key(self, rec: FileRec, fd: int) -> LinkKey:
        return LinkKey(
            mode=stat.S_IMODE(rec.mode),
            uid=rec.uid,
            gid=rec.gid,
            mtime_ns=None if self.options.ignore_mtime else rec.mtime_ns,
            xattrs=read_xattrs(fd),
        )

    def _key_groups(self, members: list[Candidate]) -> list[list[tuple[Candidate, LinkKey]]]:
        """Split a content group by link key; keys are read where the digest did not."""
        by_key: dict[LinkKey, list[tuple[Candidate, LinkKey]]] = defaultdict(list)
        for node in members:
            if node.key is None:
                fd = self.files.open_first(node)
                if fd is None:
                    continue
                try:
                    node.key = self._key(node.rec, fd)
                except OSError as exc:
                    self.files.skip(node.names[0][0], node.rec, exc)
                    continue
                finally:
                    os.close(fd)
            by_key[node.key].append((node, node.key))
        return list(by_key.values())

    def _plan_group(self, size: int, full: bytes, group: list[tuple[Candidate, LinkKey]]) -> None:
        """--dry-run: count what linking this group would do, changing nothing."""
        has_object = bool(self.index.matching(size, full, group[0][1].packed()))
        if len(group) < 2 and not has_object:
            return
        ordered = sorted((node for node, _ in group), key=lambda n: -n.rec.nlink)
        if not has_object:
            self.counters.objects_created += 1
            ordered = ordered[1:]
        for node in ordered:
            self.counters.files_linked += len(node.names)
            if len(node.names) >= node.rec.nlink:
                self.counters.bytes_saved += node.rec.blocks * 512
            for tree_index, rec in node.names:
                self.reporter.action(
                    self.files.display(tree_index, rec), "would link", "same content"
                )
