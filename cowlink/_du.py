"""Disk usage of guest trees: what each guest costs, what it shares, what unification saved.

The model is `btrfs filesystem du` (Total / Exclusive / Set shared) with `du`'s counting
rules, so every total can be checked against GNU du:

- Sizes are allocated bytes, `st_blocks * 512`, so sparse files count what they occupy.
  Apparent bytes are `st_size`, as `du --apparent-size` counts them (directories and
  symlinks included).
- Every entry counts: directories, symlinks and special files carry their own blocks.
  An inode is counted once however many paths link it: once per guest in that guest's
  figures, once overall in the totals. The totals therefore equal
  `du -s -x --total -B1 ROOT...`, and each guest equals `du -s -x -B1 ROOT`.
- Symlinks are never followed. The walk never leaves a root's filesystem: an entry whose
  `st_dev` differs from its root's is skipped with everything below it (as `du -x` does),
  and so is any mount point listed in /proc/self/mountinfo, which also catches bind
  mounts of the same filesystem (`du -x` would descend into those).

Per guest, an inode (file, symlink or special file) is *exclusive* when all its links lie
inside that guest's tree, i.e. deleting the guest would free it; otherwise it is *shared*:
another guest, the store, or some path outside every scanned tree also links it.
Directories cannot be hardlinked and are always exclusive. The *fair share* splits each
shared inode's blocks evenly among the guests that link it; the store is not a tenant
and takes no share, so the guests' exclusive plus fair-share bytes add up to the total
(up to rounding to whole bytes).

Speed: the walk is a tight `os.scandir` loop over directory descriptors (so each stat
looks up one name, not a whole path) that keeps no per-file objects except one small
tuple per multiply-linked inode. Once an inode with several links has been stat'ed,
later links to it are recognised by the directory entry's inode number (`d_ino`) and
need no stat at all; this is checked against `st_ino` on every stat and abandoned (the
walk starts again without it) on a filesystem where the two differ. With a CPU to
spare, a forked second process takes guests (or the store) from a shared queue.
"""

from __future__ import annotations

import heapq
import os
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import Problem, UsageError
from ._home import Home
from ._linux import mount_points

BLOCK = 512  # st_blocks is always in 512-byte units, whatever the filesystem's block size
_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR
_DEV_SHIFT = 64  # inode keys of a second filesystem are ino | index << 64
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class GuestUsage:
    """One guest's figures.

    Attributes:
        name: the guest name, or the root's path when it is not a guest of the home.
        root: the walked directory (symlinks resolved).
        files: non-directory paths (regular files, symlinks, special files).
        dirs: directories, the root included.
        apparent_bytes: `st_size` of each inode in the tree, counted once.
        allocated_bytes: blocks of each inode in the tree, counted once.
        exclusive_bytes: blocks of inodes linked only from inside this tree.
        shared_bytes: blocks of inodes that are also linked from elsewhere.
        fair_share_bytes: each shared inode's blocks divided by the number of guests
            linking it, summed and rounded.
        unlinked_bytes: what the tree would take if no path shared an inode
            (every path counted, as `du -l`).
    """

    name: str
    root: str
    files: int = 0
    dirs: int = 0
    apparent_bytes: int = 0
    allocated_bytes: int = 0
    exclusive_bytes: int = 0
    shared_bytes: int = 0
    fair_share_bytes: int = 0
    unlinked_bytes: int = 0


@dataclass
class DirUsage:
    """One directory of the per-directory breakdown; sizes include everything below it.

    An inode linked from several directories of one guest counts in the first one the
    walk reaches, as with du.
    """

    guest: str
    path: str  # relative to the guest's root; "." is the root
    depth: int
    files: int = 0
    apparent_bytes: int = 0
    allocated_bytes: int = 0
    exclusive_bytes: int = 0
    shared_bytes: int = 0
    parent: int = -1  # index of the parent row, -1 for a root


@dataclass(frozen=True)
class SharedFile:
    """A shared inode and what its links save: blocks times (guest paths - 1)."""

    path: str  # the first path the walk met (absolute)
    guests: tuple[str, ...]
    links: int  # paths to it inside the scanned guests
    nlink: int  # st_nlink: all links, store and elsewhere included
    in_store: bool
    allocated_bytes: int
    saved_bytes: int


@dataclass
class Totals:
    """Figures over all roots, each inode counted once.

    Attributes:
        allocated_bytes: equals `du -s -x --total -B1` over the roots.
        apparent_bytes: equals `du -s -x --total --apparent-size -B1`.
        unlinked_bytes: the trees without any hardlink (`du -s -x -l --total -B1`).
        saved_bytes: unlinked minus allocated.
        saved_ratio: saved / unlinked (0 when empty).
        store_objects, store_bytes: objects in HOME/store and their allocated bytes.
    """

    files: int = 0
    dirs: int = 0
    apparent_bytes: int = 0
    allocated_bytes: int = 0
    unlinked_bytes: int = 0
    saved_bytes: int = 0
    saved_ratio: float = 0.0
    store_objects: int = 0
    store_bytes: int = 0


@dataclass
class UsageReport:
    """What `cowlink du` found; rendering lives in _du_render."""

    guests: list[GuestUsage]
    totals: Totals
    top: list[SharedFile] = field(default_factory=list)
    dirs: list[DirUsage] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    store: str | None = None
    elapsed_s: float = 0.0


def _row(guest: str, path: str, depth: int, parent: int, size: int, blocks: int) -> DirUsage:
    return DirUsage(
        guest=guest,
        path=path,
        depth=depth,
        apparent_bytes=size,
        allocated_bytes=blocks,
        exclusive_bytes=blocks,
        parent=parent,
    )


class _InodeMismatch(Exception):
    """d_ino differs from st_ino here: the shortcut is unsound on this filesystem."""


class _Scan:
    """One measurement: the walk state shared by every root and the store."""

    def __init__(
        self, *, depth: int | None, trust_d_ino: bool, devs: dict[int, int], mounts: list[str]
    ) -> None:
        self.depth = depth
        self.trust = trust_d_ino
        self.devs = devs  # st_dev -> index, fixed before any lane starts so keys agree
        self.mounts = mounts
        # key -> (nlink, blocks, size, first path, its guest's index) for every
        # non-directory with nlink > 1.
        self.seen: dict[int, tuple[int, int, int, str, int]] = {}
        self.links: dict[int, dict[int, int]] = {}  # guest index -> {key: paths in it}
        self.owners: dict[int, dict[int, int]] = {}  # guest index -> {key: row of 1st path}
        self.rows: list[DirUsage] = []
        self.problems: list[Problem] = []
        self.store_objects = self.store_blocks = 0
        self.in_store: dict[int, int] = {}  # key -> links from the store

    def devkey(self, dev: int) -> int:
        index = self.devs.setdefault(dev, len(self.devs))
        return index << _DEV_SHIFT

    def work(self, guests: list[GuestUsage], store: str | None, queue: int | None) -> None:
        """Walk every guest and the store, or, with a queue, the items it hands out."""
        if queue is None:
            for index, usage in enumerate(guests):
                self.walk_guest(index, usage)
            if store:
                self.walk_store(store)
            return
        while item := os.read(queue, 2):
            index = int.from_bytes(item, "little")
            if index == _STORE_ITEM:
                assert store is not None
                self.walk_store(store)
            else:
                self.walk_guest(index, guests[index])

    def mounts_below(self, root: str) -> frozenset[str]:
        prefix = root.rstrip("/") + "/"
        return frozenset(m for m in self.mounts if m.startswith(prefix))

    def walk_guest(self, index: int, usage: GuestUsage) -> None:
        """Walk one guest's tree, filling `usage` except the exclusive/shared split."""
        root = usage.root
        mine: dict[int, int] = {}
        owner: dict[int, int] = {}
        self.links[index] = mine
        self.owners[index] = owner
        try:
            st = os.lstat(root)
        except OSError as exc:
            self.problems.append(Problem(root, exc.strerror or str(exc)))
            return
        dev = st.st_dev
        devkey = self.devkey(dev)
        mounts = self.mounts_below(root)
        trust = self.trust and not mounts
        depth = self.depth
        rows = self.rows
        seen = self.seen
        seen_get = seen.get
        mine_get = mine.get
        problems = self.problems

        files = 0
        dirs = 1
        apparent = st.st_size
        alloc = unlinked = st.st_blocks
        root_row = -1
        if depth is not None:
            root_row = len(rows)
            rows.append(_row(usage.name, ".", 0, -1, st.st_size, st.st_blocks))
        # (path, level, row): row is the breakdown row this directory's entries add to.
        stack: list[tuple[str, int, int]] = [(root, 0, root_row)]
        pop = stack.pop
        push = stack.append
        key = 0
        while stack:
            path, level, row = pop()
            # Listing through a descriptor makes each stat a one-name lookup in this
            # directory instead of a walk down the whole path: a quarter less kernel time.
            try:
                fd = os.open(path, _DIR_FLAGS)
            except OSError as exc:
                problems.append(Problem(path, exc.strerror or str(exc)))
                continue
            prefix = path if path.endswith("/") else path + "/"
            d_files = d_apparent = d_alloc = d_unlinked = 0
            moved_apparent = moved_alloc = 0  # subdirectories that start rows of their own
            try:
                with os.scandir(fd) as it:
                    for e in it:
                        if trust:
                            key = e.inode() | devkey
                            info = seen_get(key)
                        else:
                            info = None
                        if info is None:
                            try:
                                st = e.stat(follow_symlinks=False)
                            except OSError as exc:
                                problems.append(Problem(prefix + e.name, exc.strerror or str(exc)))
                                continue
                            if st.st_dev != dev or (mounts and prefix + e.name in mounts):
                                continue  # a mount point: du -x leaves it out entirely
                            blocks = st.st_blocks
                            if st.st_mode & _S_IFMT == _S_IFDIR:
                                dirs += 1
                                d_apparent += st.st_size
                                d_alloc += blocks
                                d_unlinked += blocks
                                sub = row
                                if depth is not None and level < depth:
                                    sub = len(rows)
                                    rel = os.path.relpath(prefix + e.name, root)
                                    rows.append(
                                        _row(usage.name, rel, level + 1, row, st.st_size, blocks)
                                    )
                                    moved_apparent += st.st_size
                                    moved_alloc += blocks
                                push((prefix + e.name, level + 1, sub))
                                continue
                            if trust and key != st.st_ino | devkey:
                                raise _InodeMismatch
                            if st.st_nlink == 1:
                                d_files += 1
                                d_unlinked += blocks
                                d_apparent += st.st_size
                                d_alloc += blocks
                                continue
                            key = st.st_ino | devkey
                            if not trust:
                                info = seen_get(key)
                            if info is None:
                                info = seen[key] = (
                                    st.st_nlink,
                                    blocks,
                                    st.st_size,
                                    prefix + e.name,
                                    index,
                                )
                        # A multiply-linked inode; `info` holds its first stat.
                        d_files += 1
                        d_unlinked += info[1]
                        n = mine_get(key)
                        if n is None:
                            mine[key] = 1
                            d_apparent += info[2]
                            d_alloc += info[1]
                            if row >= 0:
                                owner[key] = row
                        else:
                            mine[key] = n + 1
            finally:
                os.close(fd)
            files += d_files
            apparent += d_apparent
            alloc += d_alloc
            unlinked += d_unlinked
            if row >= 0:
                r = rows[row]
                r.files += d_files
                r.apparent_bytes += d_apparent - moved_apparent
                r.allocated_bytes += d_alloc - moved_alloc
                r.exclusive_bytes += d_alloc - moved_alloc  # shared inodes move out later
        usage.files = files
        usage.dirs = dirs
        usage.apparent_bytes = apparent
        usage.allocated_bytes = alloc * BLOCK
        usage.unlinked_bytes = unlinked * BLOCK

    def walk_store(self, store: str) -> None:
        """Count the objects in the store: its regular files, at any fan-out depth.

        Names starting with "." (temporary files and directories) are not objects.
        """
        in_store = self.in_store
        try:
            dev = os.lstat(store).st_dev
        except OSError:
            return
        devkey = self.devkey(dev)
        mounts = self.mounts_below(store)
        seen_get = self.seen.get
        trust = self.trust
        problems = self.problems
        objects = blocks = 0
        stack = [store]
        while stack:
            path = stack.pop()
            try:
                fd = os.open(path, _DIR_FLAGS)
            except OSError as exc:
                problems.append(Problem(path, exc.strerror or str(exc)))
                continue
            prefix = path + "/"
            try:
                with os.scandir(fd) as it:
                    for e in it:
                        if e.name.startswith("."):
                            continue
                        if e.is_dir(follow_symlinks=False):  # from d_type: no stat needed
                            if prefix + e.name not in mounts:
                                stack.append(prefix + e.name)
                            continue
                        key = e.inode() | devkey
                        info = seen_get(key) if trust else None
                        if info is not None:
                            nblocks = info[1]  # a guest links it: already stat'ed
                        else:
                            try:
                                st = e.stat(follow_symlinks=False)
                            except OSError as exc:
                                problems.append(Problem(prefix + e.name, exc.strerror or str(exc)))
                                continue
                            if st.st_dev != dev or not stat.S_ISREG(st.st_mode):
                                continue
                            key = st.st_ino | devkey
                            nblocks = st.st_blocks
                        n = in_store.get(key, 0)
                        in_store[key] = n + 1
                        if n == 0:
                            objects += 1
                            blocks += nblocks
            finally:
                os.close(fd)
        self.store_objects = objects
        self.store_blocks = blocks


def _safe_mount_points() -> list[str]:
    try:
        return mount_points()
    except OSError:
        return []


def measure(
    roots: list[tuple[str, str]],
    *,
    store: str | None = None,
    top: int = 0,
    depth: int | None = None,
    parallel: bool | None = None,
) -> UsageReport:
    """Measure guest trees and the store.

    Args:
        roots: (name, directory) pairs, one per guest.
        store: the store directory, or None to leave the store out.
        top: how many of the shared files that save most to list.
        depth: directory levels below each root to break down (0 = roots only), or None.
        parallel: walk in two processes; None decides: yes when a CPU is idle (load
            average below the CPU count minus one) and no other thread runs.

    Raises:
        UsageError: a root is missing or not a directory.
    """
    start = time.perf_counter()
    resolved: list[tuple[str, str]] = []
    for name, path in roots:
        real = os.path.realpath(path)
        if not os.path.isdir(real):
            raise UsageError(f"{path}: not a directory")
        if all(real != r for _, r in resolved):  # a root named twice counts once, as in du
            resolved.append((name, real))
    if parallel is None:
        parallel = _can_fork()
    parallel = parallel and len(resolved) + (store is not None) > 1
    for trust in (True, False):
        guests = [GuestUsage(name, real) for name, real in resolved]
        try:
            scan = _run(guests, store, depth, trust_d_ino=trust, parallel=parallel)
            break
        except _InodeMismatch:
            continue  # d_ino cannot stand in for st_ino here: walk again, stat'ing all
    report = _summarise(scan, guests, store, top)
    report.elapsed_s = time.perf_counter() - start
    return report


_STORE_ITEM = 0xFFFF  # the work-queue item for the store; guests are 0, 1, 2, ...
_CHILD_MISMATCH = 3  # the second lane's exit status for _InodeMismatch


class _LaneFailed(Exception):
    """The second walking process died; the measurement is redone in one process."""


def _can_fork() -> bool:
    """A second lane pays only with a CPU to spare (measured: it loses when both are busy).

    Forking a process that runs other threads could also copy a lock in a held state.
    """
    cpus = len(os.sched_getaffinity(0))
    return threading.active_count() == 1 and cpus > 1 and os.getloadavg()[0] < cpus - 1


def _scan_setup(
    guests: list[GuestUsage], store: str | None, depth: int | None, trust: bool
) -> _Scan:
    devs: dict[int, int] = {}
    for path in [g.root for g in guests] + ([store] if store else []):
        try:
            devs.setdefault(os.lstat(path).st_dev, len(devs))
        except OSError:
            pass
    return _Scan(depth=depth, trust_d_ino=trust, devs=devs, mounts=_safe_mount_points())


def _run(
    guests: list[GuestUsage],
    store: str | None,
    depth: int | None,
    *,
    trust_d_ino: bool,
    parallel: bool,
) -> _Scan:
    scan = _scan_setup(guests, store, depth, trust_d_ino)
    if parallel and len(guests) < 0x4000:  # the queue must fit a pipe's 64 KiB buffer
        try:
            _run_two_lanes(scan, guests, store)
            return scan
        except _LaneFailed:
            scan = _scan_setup(guests, store, depth, trust_d_ino)
            for usage in guests:
                usage.__dict__.update(GuestUsage(usage.name, usage.root).__dict__)
    scan.work(guests, store, None)
    return scan


def _run_two_lanes(scan: _Scan, guests: list[GuestUsage], store: str | None) -> None:
    """Walk in this process and a forked one, which take guests from a shared pipe.

    Each pipe read of two bytes is atomic, so every guest (and the store) is walked by
    exactly one lane; the child sends its lane's state back pickled, and the parent
    merges it. The d_ino shortcut then works within each lane only.
    """
    import pickle

    # The store goes last: by then its lane has stat'ed most objects through the guests.
    items = list(range(len(guests))) + ([_STORE_ITEM] if store else [])
    queue_r, queue_w = os.pipe()
    os.write(queue_w, b"".join(i.to_bytes(2, "little") for i in items))
    os.close(queue_w)
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the second lane
        status = 1
        try:
            os.close(result_r)
            scan.work(guests, store, queue_r)
            lane = {i: vars(guests[i]) for i in scan.links}
            data = pickle.dumps((lane, _lane_state(scan)), protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(result_w, "wb") as f:
                f.write(data)
            status = 0
        except _InodeMismatch:
            status = _CHILD_MISMATCH
        finally:
            os._exit(status)
    os.close(result_w)
    try:
        scan.work(guests, store, queue_r)
    finally:
        os.close(queue_r)
        with os.fdopen(result_r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == _CHILD_MISMATCH:
        raise _InodeMismatch
    if code != 0:
        raise _LaneFailed
    lane, state = pickle.loads(data)
    for index, fields in lane.items():
        vars(guests[index]).update(fields)
    _merge(scan, state)


def _lane_state(scan: _Scan) -> tuple[Any, ...]:
    return (
        scan.seen,
        scan.links,
        scan.owners,
        scan.rows,
        scan.problems,
        scan.store_objects,
        scan.store_blocks,
        scan.in_store,
    )


def _merge(scan: _Scan, state: tuple[Any, ...]) -> None:
    seen, links, owners, rows, problems, store_objects, store_blocks, in_store = state
    mine = scan.seen
    for key, info in seen.items():
        # Keep the path from the first guest, as one process walking in order would.
        if key not in mine or info[4] < mine[key][4]:
            mine[key] = info
    offset = len(scan.rows)
    for r in rows:
        if r.parent >= 0:
            r.parent += offset
    scan.rows += rows
    scan.links.update(links)
    for index, owner in owners.items():
        scan.owners[index] = {key: row + offset for key, row in owner.items()}
    scan.problems += problems
    scan.store_objects += store_objects
    scan.store_blocks += store_blocks
    for key, n in in_store.items():
        scan.in_store[key] = scan.in_store.get(key, 0) + n


def _summarise(scan: _Scan, guests: list[GuestUsage], store: str | None, top: int) -> UsageReport:
    seen = scan.seen
    links = [scan.links[i] for i in range(len(guests))]
    # How many guests link each multiply-linked inode (Counter counts keys in C).
    n_guests: Counter[int] = Counter()
    for mine in links:
        n_guests.update(mine.keys())

    rows = scan.rows
    for index, usage in enumerate(guests):
        owner = scan.owners[index]
        shared = 0
        fair = 0.0
        for key, count in links[index].items():
            info = seen[key]
            if count < info[0]:
                blocks = info[1]
                shared += blocks
                fair += blocks / n_guests[key]
                if owner:
                    row = owner[key]
                    rows[row].exclusive_bytes -= blocks
                    rows[row].shared_bytes += blocks
        usage.shared_bytes = shared * BLOCK
        usage.exclusive_bytes = usage.allocated_bytes - usage.shared_bytes
        usage.fair_share_bytes = round(fair * BLOCK)

    # Sizes were gathered in 512-byte blocks; roll directories up into their parents.
    for r in rows:
        r.allocated_bytes *= BLOCK
        r.exclusive_bytes *= BLOCK
        r.shared_bytes *= BLOCK
    for r in reversed(rows):  # a row's parent always comes before it
        if r.parent >= 0:
            p = rows[r.parent]
            p.files += r.files
            p.apparent_bytes += r.apparent_bytes
            p.allocated_bytes += r.allocated_bytes
            p.exclusive_bytes += r.exclusive_bytes
            p.shared_bytes += r.shared_bytes
    order = {id(g): i for i, g in enumerate(guests)}
    by_name = {g.name: order[id(g)] for g in reversed(guests)}
    dirs = sorted(rows, key=lambda r: (by_name[r.guest], [] if r.depth == 0 else r.path.split("/")))
    for r in dirs:
        r.parent = -1  # indices into the walk's rows mean nothing to a reader

    totals = Totals(
        files=sum(g.files for g in guests),
        dirs=sum(g.dirs for g in guests),
        unlinked_bytes=sum(g.unlinked_bytes for g in guests),
        store_objects=scan.store_objects,
        store_bytes=scan.store_blocks * BLOCK,
    )
    # Every inode once: each guest's figures count its multiply-linked inodes once per
    # guest, so take those out and add each such inode a single time.
    extra_blocks = extra_size = 0
    for key, n in n_guests.items():
        if n > 1:
            info = seen[key]
            extra_blocks += info[1] * (n - 1)
            extra_size += info[2] * (n - 1)
    totals.allocated_bytes = sum(g.allocated_bytes for g in guests) - extra_blocks * BLOCK
    totals.apparent_bytes = sum(g.apparent_bytes for g in guests) - extra_size
    totals.saved_bytes = totals.unlinked_bytes - totals.allocated_bytes
    if totals.unlinked_bytes:
        totals.saved_ratio = totals.saved_bytes / totals.unlinked_bytes

    top_files: list[SharedFile] = []
    if top > 0:
        n_paths: Counter[int] = Counter()
        for mine in links:
            for key, count in mine.items():
                n_paths[key] += count
        best = heapq.nlargest(
            top,
            # Shared (not all links in one guest) and saving (two paths or more).
            (k for k, n in n_paths.items() if n > 1 and (n_guests[k] > 1 or n < seen[k][0])),
            key=lambda k: (seen[k][1] * (n_paths[k] - 1), seen[k][1], k),
        )
        for key in best:
            nlink, blocks, _size, path, _guest = seen[key]
            top_files.append(
                SharedFile(
                    path=path,
                    guests=tuple(
                        g.name for g, mine in zip(guests, links, strict=True) if key in mine
                    ),
                    links=n_paths[key],
                    nlink=nlink,
                    in_store=key in scan.in_store,
                    allocated_bytes=blocks * BLOCK,
                    saved_bytes=blocks * (n_paths[key] - 1) * BLOCK,
                )
            )
    return UsageReport(
        guests=guests,
        totals=totals,
        top=top_files,
        dirs=dirs,
        problems=scan.problems,
        store=store,
    )


def measure_home(
    home: Home,
    roots: list[str] | None = None,
    *,
    top: int = 0,
    depth: int | None = None,
    parallel: bool | None = None,
) -> UsageReport:
    """Measure the home's guests, or the given roots (named after their guest if any).

    The store is always counted when it exists, so that store links are told apart.
    """
    if roots:
        pairs = [(home.guest_of_root(r) or str(Path(r)), r) for r in roots]
    else:
        pairs = [(name, str(home.guest_root(name))) for name in home.guest_names()]
    store = str(home.store_dir) if home.store_dir.is_dir() else None
    return measure(pairs, store=store, top=top, depth=depth, parallel=parallel)
