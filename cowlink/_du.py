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
walk starts again without it) on a filesystem where the two differ.

The walk goes by relative path rather than guest by guest: the top of the trees is
listed first (the roots, then the heaviest directories, the same relative path in every
guest at once), and what is below is cut into subtrees, each walked in every guest that
has it, one guest after the other. Unified guests link the same files at the same
relative paths, so a subtree's later guests find most inodes already stat'ed. With a
CPU to spare, a forked second process takes subtrees from a shared queue, so the two
processes split the work evenly and each keeps the d_ino shortcut for what it walks.
The cut depends on the trees alone, so one process or two walk in the same order and
report the same first path for every inode.
"""

from __future__ import annotations

import heapq
import itertools
import operator
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
from ._mountinfo import mount_points

BLOCK = 512  # st_blocks is always in 512-byte units, whatever the filesystem's block size
_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR
_DEV_SHIFT = 64  # inode keys of a second filesystem are ino | index << 64
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NLINK, _BLOCKS, _SIZE = (operator.itemgetter(i) for i in range(3))  # fields of an _Info


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


# A guest as the walk sees it: (root, st_dev, key bits of that device, mount points
# below the root, whether d_ino may stand in for st_ino in it).
_Guest = tuple[str, int, int, frozenset[str], bool]
# Where one guest holds a directory of the plan: (guest index, path, level, row).
_Holder = tuple[int, str, int, int]
# A subdirectory met while listing: (name, path, level, row, weight).
_Child = tuple[str, str, int, int, int]
# What a multiply-linked inode's first stat said: (nlink, blocks, size, first path or
# None, walk order of that path).
_Info = tuple[int, int, int, str | None, int]


class _Lane:
    """What one walking process gathers. Two lanes' figures add up (see _merge).

    Per guest, directories and singly-linked files are summed as they are met; an inode
    with several links only has its paths counted per guest (`links`): its size and
    blocks are added once per guest when the lanes are summed, from `seen`.
    """

    def __init__(
        self,
        guests: list[_Guest],
        *,
        depth: int | None,
        trust_d_ino: bool,
        paths: bool,
        devkeys: dict[int, int],
        mounts: list[str],
    ) -> None:
        n = len(guests)
        self.guests = guests
        self.depth = depth
        self.trust = trust_d_ino
        self.paths = paths  # keep each inode's first path (only --top shows them)
        self.devkeys = devkeys
        self.mounts = mounts  # every mount point, for the store's walk
        self.files = [0] * n
        self.dirs = [0] * n
        self.apparent = [0] * n  # st_size of directories and singly-linked files
        self.blocks = [0] * n  # their st_blocks
        self.unlinked = [0] * n  # st_blocks of every path
        self.links: list[dict[int, int]] = [{} for _ in range(n)]  # key -> paths in guest
        # With --depth: key -> (walk order, row) of the first directory linking it.
        self.owners: list[dict[int, tuple[int, int]]] = [{} for _ in range(n)]
        self.seen: dict[int, _Info] = {}
        self.rows: list[DirUsage] = []
        self.problems: list[Problem] = []
        self.store_objects = self.store_blocks = 0
        self.in_store: dict[int, int] = {}  # key -> links from the store

    def walk(
        self,
        i: int,
        top: str,
        top_level: int,
        top_row: int,
        order: int,
        children: list[_Child] | None = None,
    ) -> None:
        """Count everything below directory `top` of guest `i` (its parent counted `top`).

        With `children`, only `top` itself is listed and its subdirectories are handed
        back instead of walked. `order` is this walk's place in the deterministic walk
        order, kept with each inode's first path so that any split into lanes names the
        same first path.
        """
        _root, dev, devkey, mounts, trust = self.guests[i]
        depth = self.depth
        rows = self.rows
        seen = self.seen
        seen_get = seen.get
        mine = self.links[i]
        mine_get = mine.get
        owner = self.owners[i]
        problems = self.problems
        paths = self.paths
        guest_name = ""
        if depth is not None:
            guest_name = rows[top_row].guest if top_row >= 0 else ""

        files = dirs = apparent = alloc = unlinked = 0
        # (path, level, row): row is the breakdown row this directory's entries add to.
        stack: list[tuple[str, int, int]] = [(top, top_level, top_row)]
        pop = stack.pop
        push = stack.append if children is None else None
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
                                    rel = os.path.relpath(prefix + e.name, _root)
                                    rows.append(
                                        _row(guest_name, rel, level + 1, row, st.st_size, blocks)
                                    )
                                    moved_apparent += st.st_size
                                    moved_alloc += blocks
                                if push is not None:
                                    push((prefix + e.name, level + 1, sub))
                                else:
                                    assert children is not None
                                    # Subdirectories and entry-table size stand in for
                                    # the work below it, to split the walk evenly.
                                    weight = st.st_nlink - 2 + (st.st_size >> 10)
                                    children.append(
                                        (e.name, prefix + e.name, level + 1, sub, weight)
                                    )
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
                                    prefix + e.name if paths else None,
                                    order,
                                )
                        # A multiply-linked inode; `info` holds its first stat. Its size
                        # counts once per guest, when the lanes are summed.
                        d_files += 1
                        d_unlinked += info[1]
                        mine[key] = mine_get(key, 0) + 1
                        if row >= 0 and key not in owner:
                            owner[key] = (order, row)
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
        self.files[i] += files
        self.dirs[i] += dirs
        self.apparent[i] += apparent
        self.blocks[i] += alloc
        self.unlinked[i] += unlinked

    def walk_store(self, store: str) -> None:
        """Count the objects in the store: its regular files, at any fan-out depth.

        Names starting with "." (temporary files and directories) are not objects. Most
        objects were met in a guest already, so the store is listed by path: no
        descriptor per directory, and a stat by path only for an object no guest links.
        """
        in_store = self.in_store
        try:
            dev = os.lstat(store).st_dev
        except OSError:
            return
        devkey = self.devkeys.setdefault(dev, len(self.devkeys) << _DEV_SHIFT)
        mounts = frozenset(_below(self.mounts, store))
        seen_get = self.seen.get
        trust = self.trust
        problems = self.problems
        objects = blocks = 0
        stack = [store]
        while stack:
            path = stack.pop()
            prefix = path + "/"
            try:
                with os.scandir(path) as it:
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
            except OSError as exc:
                problems.append(Problem(path, exc.strerror or str(exc)))
        self.store_objects += objects
        self.store_blocks += blocks

    def forked(self) -> int:
        """Start this (child) lane from nothing but what was seen; returns len(seen) then."""
        n = len(self.guests)
        self.files, self.dirs = [0] * n, [0] * n
        self.apparent, self.blocks, self.unlinked = [0] * n, [0] * n, [0] * n
        self.links = [{} for _ in range(n)]
        self.owners = [{} for _ in range(n)]
        self.problems = []
        for r in self.rows:  # rows made before the fork: the parent has their sums
            r.files = r.apparent_bytes = r.allocated_bytes = r.exclusive_bytes = 0
        return len(self.seen)


def _below(mounts: list[str], root: str) -> list[str]:
    prefix = root.rstrip("/") + "/"
    return [m for m in mounts if m.startswith(prefix)]


def _safe_mount_points() -> list[str]:
    try:
        return mount_points()
    except OSError:
        return []


#: The walk is split into subtrees for two lanes by listing the heaviest directories
#: first (the same relative path in every guest at once), until no subtree weighs more
#: than 1/_SPLIT_PARTS of all, or _SPLIT_LISTINGS relative paths were listed.
_SPLIT_PARTS = 64
_SPLIT_LISTINGS = 16
_SPLIT_LEVELS = 3


def _plan(lane: _Lane, roots: list[_Holder]) -> tuple[list[list[_Holder]], int]:
    """List the top of the trees and cut the rest into subtrees, heaviest first.

    Each subtree is one relative path, held by every guest that has it: walking it in
    all guests in a row keeps the d_ino shortcut working across guests whichever lane
    takes it. The cut depends on the trees only, never on the number of lanes, so that
    every split walks in the same order. Returns the subtrees and the next walk order.
    """
    items: dict[str, list[_Holder]] = {"": roots}
    weights: dict[str, int] = {"": 0}
    order = 0
    listings = 0
    while items:
        if listings:
            # Only the top levels are split: deeper, wide directories (docs, locales)
            # hold many small subtrees, which the queue balances well enough uncut.
            rel = max(
                (r for r in items if r.count("/") < _SPLIT_LEVELS - 1),
                key=lambda r: (weights[r], r),
                default="",
            )
            if (
                not rel
                or weights[rel] * _SPLIT_PARTS <= sum(weights.values())
                or (listings >= _SPLIT_LISTINGS)
            ):
                break
        else:
            rel = ""  # the roots themselves, always listed first
        holders = items.pop(rel)
        del weights[rel]
        listings += 1
        for i, path, level, row in holders:
            children: list[_Child] = []
            lane.walk(i, path, level, row, order, children)
            order += 1
            for name, sub, sub_level, sub_row, weight in children:
                child = f"{rel}/{name}" if rel else name
                items.setdefault(child, []).append((i, sub, sub_level, sub_row))
                weights[child] = weights.get(child, 0) + max(weight, 1)
    plan = sorted(items, key=lambda r: (-weights[r], r))
    return [items[r] for r in plan], order


def _work(
    lane: _Lane,
    plan: list[list[_Holder]],
    base: int,
    store: str | None,
    queue: int | None,
) -> None:
    """Walk the subtrees of the plan, then the store; with a queue, those it hands out."""
    n = len(lane.guests)

    def item(index: int) -> None:
        if index == len(plan):
            assert store is not None
            lane.walk_store(store)
            return
        for i, path, level, row in plan[index]:
            lane.walk(i, path, level, row, base + index * n + i)

    if queue is None:
        for index in range(len(plan) + (store is not None)):
            item(index)
        return
    while data := os.read(queue, 2):
        item(int.from_bytes(data, "little"))


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
        parallel: walk in two processes; None decides (see _can_fork).

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
    for trust in (True, False):
        guests = [GuestUsage(name, real) for name, real in resolved]
        try:
            lane = _run(guests, store, depth, trust_d_ino=trust, parallel=parallel, paths=top > 0)
            break
        except _InodeMismatch:
            continue  # d_ino cannot stand in for st_ino here: walk again, stat'ing all
    report = _summarise(lane, guests, store, top)
    report.elapsed_s = time.perf_counter() - start
    return report


_CHILD_MISMATCH = 3  # the second lane's exit status for _InodeMismatch


class _LaneFailed(Exception):
    """The second walking process died; the measurement is redone in one process."""


#: Directories the top of the trees must hold before a second lane is worth its few
#: milliseconds (fork, sending its figures back): the bench's four guests have 476.
_FORK_MIN_DIRS = 200


def _can_fork(lane: _Lane) -> bool:
    """A second lane pays on big trees when a CPU is idle now (bench/README.md, cowlink du).

    Forking a process that runs other threads could also copy a lock in a held state.
    """
    return (
        sum(lane.dirs) >= _FORK_MIN_DIRS
        and threading.active_count() == 1
        and len(os.sched_getaffinity(0)) > 1
        and _runnable() < (os.cpu_count() or 1)
    )


def _runnable() -> int:
    """Tasks running or ready to run on the host at this instant, this one included.

    The fourth field of /proc/loadavg. The walk lasts a tenth of a second, so what the
    CPUs do now predicts better than the load averages: on the bench's busy host (the
    1-minute load average between 1.5 and 2.9 throughout), two lanes won 136 of 137
    paired runs when nothing else was runnable, and fewer than half when something was.
    """
    try:
        with open("/proc/loadavg", "rb") as f:
            return int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return os.cpu_count() or 1  # unknown: as if every CPU were taken


def _run(
    guests: list[GuestUsage],
    store: str | None,
    depth: int | None,
    *,
    trust_d_ino: bool,
    parallel: bool | None,
    paths: bool = True,
) -> _Lane:
    """Walk the guests and the store, in one process or two."""
    for attempt in (True, False):
        lane, plan, base = _start(guests, store, depth, trust_d_ino, paths)
        items = len(plan) + (store is not None)
        two = attempt and items > 1 and items < 0x8000  # the queue must fit a pipe's 64 KiB
        if two and (parallel if parallel is not None else _can_fork(lane)):
            try:
                _run_two_lanes(lane, plan, base, store)
                return lane
            except _LaneFailed:
                continue
        _work(lane, plan, base, store, None)
        return lane
    raise AssertionError("unreachable")


def _start(
    guests: list[GuestUsage], store: str | None, depth: int | None, trust: bool, paths: bool
) -> tuple[_Lane, list[list[_Holder]], int]:
    """Count each root, then plan the walk below them."""
    mounts = _safe_mount_points()
    devkeys: dict[int, int] = {}

    def devkey(dev: int) -> int:
        return devkeys.setdefault(dev, len(devkeys) << _DEV_SHIFT)

    walked: list[_Guest] = []
    stats: list[os.stat_result | None] = []
    problems: list[Problem] = []
    for usage in guests:
        try:
            st = os.lstat(usage.root)
        except OSError as exc:
            problems.append(Problem(usage.root, exc.strerror or str(exc)))
            walked.append((usage.root, -1, 0, frozenset(), False))
            stats.append(None)
            continue
        below = frozenset(_below(mounts, usage.root))
        # With a mount below the root, every entry is stat'ed so that none is missed.
        walked.append((usage.root, st.st_dev, devkey(st.st_dev), below, trust and not below))
        stats.append(st)
    if store:
        try:
            devkey(os.lstat(store).st_dev)
        except OSError:
            pass
    lane = _Lane(
        walked, depth=depth, trust_d_ino=trust, paths=paths, devkeys=devkeys, mounts=mounts
    )
    lane.problems += problems
    roots: list[_Holder] = []
    for i, (usage, root_st) in enumerate(zip(guests, stats, strict=True)):
        if root_st is None:
            continue
        st = root_st
        lane.dirs[i] = 1
        lane.apparent[i] = st.st_size
        lane.blocks[i] = lane.unlinked[i] = st.st_blocks
        row = -1
        if depth is not None:
            row = len(lane.rows)
            lane.rows.append(_row(usage.name, ".", 0, -1, st.st_size, st.st_blocks))
        roots.append((i, usage.root, 0, row))
    plan, base = _plan(lane, roots)
    return lane, plan, base


def _run_two_lanes(lane: _Lane, plan: list[list[_Holder]], base: int, store: str | None) -> None:
    """Walk in this process and a forked one, which take subtrees from a shared pipe.

    Each pipe read of two bytes is atomic, so every subtree (and the store) is walked
    by exactly one lane; the child sends what its lane gathered back through a pipe
    (marshal: plain numbers, strings and dicts), and the parent adds it to its own.
    The d_ino shortcut then works within each lane only.
    """
    import marshal

    queue_r, queue_w = os.pipe()
    items = len(plan) + (store is not None)
    os.write(queue_w, b"".join(i.to_bytes(2, "little") for i in range(items)))
    os.close(queue_w)
    result_r, result_w = os.pipe()
    pre_rows = len(lane.rows)
    pid = os.fork()
    if pid == 0:  # the second lane
        status = 1
        try:
            os.close(result_r)
            pre_seen = lane.forked()
            _work(lane, plan, base, store, queue_r)
            data = marshal.dumps(_lane_state(lane, pre_seen))
            with os.fdopen(result_w, "wb") as f:
                f.write(data)
            status = 0
        except _InodeMismatch:
            status = _CHILD_MISMATCH
        finally:
            os._exit(status)
    os.close(result_w)
    try:
        _work(lane, plan, base, store, queue_r)
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
    _merge(lane, marshal.loads(data), pre_rows)


def _lane_state(lane: _Lane, pre_seen: int) -> tuple[Any, ...]:
    new_seen = dict(itertools.islice(lane.seen.items(), pre_seen, None))
    rows = [
        (
            r.guest,
            r.path,
            r.depth,
            r.files,
            r.apparent_bytes,
            r.allocated_bytes,
            r.exclusive_bytes,
            r.parent,
        )
        for r in lane.rows
    ]
    return (
        lane.files,
        lane.dirs,
        lane.apparent,
        lane.blocks,
        lane.unlinked,
        lane.links,
        lane.owners,
        new_seen,
        rows,
        [(p.path, p.error) for p in lane.problems],
        lane.store_objects,
        lane.store_blocks,
        lane.in_store,
    )


def _merge(lane: _Lane, state: tuple[Any, ...], pre_rows: int) -> None:
    """Add a second lane's state (from _lane_state) to this one."""
    files, dirs, apparent, blocks, unlinked, links, owners, seen, rows, problems, *store = state
    for mine, theirs in (
        (lane.files, files),
        (lane.dirs, dirs),
        (lane.apparent, apparent),
        (lane.blocks, blocks),
        (lane.unlinked, unlinked),
    ):
        for i, n in enumerate(theirs):
            mine[i] += n
    for mine_links, their_links in zip(lane.links, links, strict=True):
        get = mine_links.get
        for key, n in their_links.items():
            mine_links[key] = get(key, 0) + n
    ours = lane.seen
    if lane.paths:
        for key, info in seen.items():
            # Keep the path met first in the walk order, as one lane would have.
            known = ours.get(key)
            if known is None or info[4] < known[4]:
                ours[key] = info
    else:
        for key in seen.keys() - ours.keys():
            ours[key] = seen[key]
    # Rows made before the fork come back as sums since the fork; later rows are new.
    offset = len(lane.rows) - pre_rows
    for index, (guest, path, depth, nfiles, size, alloc, exclusive, parent) in enumerate(rows):
        if index < pre_rows:
            r = lane.rows[index]
            r.files += nfiles
            r.apparent_bytes += size
            r.allocated_bytes += alloc
            r.exclusive_bytes += exclusive
            continue
        r = DirUsage(
            guest=guest,
            path=path,
            depth=depth,
            files=nfiles,
            apparent_bytes=size,
            allocated_bytes=alloc,
            exclusive_bytes=exclusive,
            parent=parent + offset if parent >= pre_rows else parent,
        )
        lane.rows.append(r)
    for mine_owner, their_owner in zip(lane.owners, owners, strict=True):
        for key, (order, row) in their_owner.items():
            row = row + offset if row >= pre_rows else row
            owned = mine_owner.get(key)
            if owned is None or order < owned[0]:
                mine_owner[key] = (order, row)
    lane.problems += [Problem(path, error) for path, error in problems]
    store_objects, store_blocks, in_store = store
    lane.store_objects += store_objects
    lane.store_blocks += store_blocks
    for key, n in in_store.items():
        lane.in_store[key] = lane.in_store.get(key, 0) + n


def _summarise(lane: _Lane, guests: list[GuestUsage], store: str | None, top: int) -> UsageReport:
    seen = lane.seen
    links = lane.links
    # How many guests link each multiply-linked inode (Counter counts keys in C).
    n_guests: Counter[int] = Counter()
    for mine in links:
        n_guests.update(mine.keys())

    rows = lane.rows
    for index, usage in enumerate(guests):
        mine = links[index]
        usage.files = lane.files[index]
        usage.dirs = lane.dirs[index]
        usage.unlinked_bytes = lane.unlinked[index] * BLOCK
        # Column by column, in C: each inode's first stat, and whether it has links
        # outside this guest (fewer paths here than st_nlink).
        infos = list(map(seen.__getitem__, mine))
        inode_blocks = list(map(_BLOCKS, infos))
        shared = list(map(operator.lt, mine.values(), map(_NLINK, infos)))
        shared_blocks = list(itertools.compress(inode_blocks, shared))
        sharers = map(n_guests.__getitem__, itertools.compress(mine, shared))
        fair = sum(map(operator.truediv, shared_blocks, sharers))
        usage.apparent_bytes = lane.apparent[index] + sum(map(_SIZE, infos))
        usage.allocated_bytes = (lane.blocks[index] + sum(inode_blocks)) * BLOCK
        usage.shared_bytes = sum(shared_blocks) * BLOCK
        usage.exclusive_bytes = usage.allocated_bytes - usage.shared_bytes
        usage.fair_share_bytes = round(fair * BLOCK)
        for key, (_order, row) in lane.owners[index].items():
            nlink, nblocks, nsize = seen[key][:3]
            r = rows[row]
            r.apparent_bytes += nsize
            r.allocated_bytes += nblocks
            if mine[key] < nlink:
                r.shared_bytes += nblocks
            else:
                r.exclusive_bytes += nblocks
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
        store_objects=lane.store_objects,
        store_bytes=lane.store_blocks * BLOCK,
    )
    # Every inode once: what the guests hold alone, plus each multiply-linked inode
    # that any of them links, a single time.
    every = list(map(seen.__getitem__, n_guests))
    totals.allocated_bytes = (sum(lane.blocks) + sum(map(_BLOCKS, every))) * BLOCK
    totals.apparent_bytes = sum(lane.apparent) + sum(map(_SIZE, every))
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
            nlink, blocks, _size, path, _order = seen[key]
            top_files.append(
                SharedFile(
                    path=path or "",  # paths are kept whenever --top asks for files
                    guests=tuple(
                        g.name for g, mine in zip(guests, links, strict=True) if key in mine
                    ),
                    links=n_paths[key],
                    nlink=nlink,
                    in_store=key in lane.in_store,
                    allocated_bytes=blocks * BLOCK,
                    saved_bytes=blocks * (n_paths[key] - 1) * BLOCK,
                )
            )
    return UsageReport(
        guests=guests,
        totals=totals,
        top=top_files,
        dirs=dirs,
        problems=lane.problems,
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
