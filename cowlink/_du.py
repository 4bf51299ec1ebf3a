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

Speed: the walk is a tight `os.scandir` loop that keeps no per-file objects except one
small tuple per multiply-linked inode. Once an inode with several links has been stat'ed,
later links to it are recognised by the directory entry's inode number (`d_ino`) and
need no stat at all; this is checked against `st_ino` on every stat and abandoned (the
walk starts again without it) on a filesystem where the two differ.
"""

from __future__ import annotations

import heapq
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import Problem, UsageError
from ._home import Home
from ._linux import mount_points

BLOCK = 512  # st_blocks is always in 512-byte units, whatever the filesystem's block size
_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR
_DEV_SHIFT = 64  # inode keys of a second filesystem are ino | index << 64


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

    def __init__(self, *, depth: int | None, trust_d_ino: bool) -> None:
        self.depth = depth
        self.trust = trust_d_ino
        self.devs: dict[int, int] = {}
        # key -> (nlink, blocks, size, first path) for every non-directory with nlink > 1.
        self.seen: dict[int, tuple[int, int, int, str]] = {}
        self.links: list[dict[int, int]] = []  # per guest: key -> paths in that guest
        self.rows: list[DirUsage] = []
        self.owners: list[dict[int, int]] = []  # per guest: key -> row of its first path
        self.problems: list[Problem] = []
        self.mounts = _safe_mount_points()

    def devkey(self, dev: int) -> int:
        index = self.devs.setdefault(dev, len(self.devs))
        return index << _DEV_SHIFT

    def mounts_below(self, root: str) -> frozenset[str]:
        prefix = root.rstrip("/") + "/"
        return frozenset(m for m in self.mounts if m.startswith(prefix))

    def walk_guest(self, usage: GuestUsage) -> None:
        """Walk one guest's tree, filling `usage` except the exclusive/shared split."""
        root = usage.root
        st = os.lstat(root)
        dev = st.st_dev
        devkey = self.devkey(dev)
        mounts = self.mounts_below(root)
        trust = self.trust and not mounts
        depth = self.depth
        rows = self.rows
        seen = self.seen
        seen_get = seen.get
        mine: dict[int, int] = {}
        mine_get = mine.get
        owner: dict[int, int] = {}
        self.links.append(mine)
        self.owners.append(owner)
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
            try:
                it = os.scandir(path)
            except OSError as exc:
                problems.append(Problem(path, exc.strerror or str(exc)))
                continue
            d_files = d_apparent = d_alloc = d_unlinked = 0
            moved_apparent = moved_alloc = 0  # subdirectories that start rows of their own
            with it:
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
                            problems.append(Problem(e.path, exc.strerror or str(exc)))
                            continue
                        if st.st_dev != dev or (mounts and e.path in mounts):
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
                                rel = os.path.relpath(e.path, root)
                                rows.append(
                                    _row(usage.name, rel, level + 1, row, st.st_size, blocks)
                                )
                                moved_apparent += st.st_size
                                moved_alloc += blocks
                            push((e.path, level + 1, sub))
                            continue
                        if trust and key != st.st_ino | devkey:
                            raise _InodeMismatch
                        d_files += 1
                        if st.st_nlink == 1:
                            d_unlinked += blocks
                            d_apparent += st.st_size
                            d_alloc += blocks
                            continue
                        d_files -= 1  # counted with the other multiply-linked paths below
                        key = st.st_ino | devkey
                        if not trust:
                            info = seen_get(key)
                        if info is None:
                            info = seen[key] = (st.st_nlink, blocks, st.st_size, e.path)
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

    def walk_store(self, store: str, totals: Totals) -> dict[int, int]:
        """Count the objects under HOME/store/xx/yy/; returns key -> links from the store."""
        in_store: dict[int, int] = {}
        try:
            dev = os.lstat(store).st_dev
        except OSError:
            return in_store
        devkey = self.devkey(dev)
        seen_get = self.seen.get
        objects = blocks = 0
        counted: set[int] = set()
        for level1 in _subdirs(store, self.problems):
            for level2 in _subdirs(level1, self.problems):
                try:
                    it = os.scandir(level2)
                except OSError as exc:
                    self.problems.append(Problem(level2, exc.strerror or str(exc)))
                    continue
                with it:
                    for e in it:
                        if e.name.startswith("."):
                            continue
                        info = seen_get(e.inode() | devkey) if self.trust else None
                        if info is not None:
                            key = e.inode() | devkey
                            nblocks = info[1]
                        else:
                            try:
                                st = e.stat(follow_symlinks=False)
                            except OSError as exc:
                                self.problems.append(Problem(e.path, exc.strerror or str(exc)))
                                continue
                            if not stat.S_ISREG(st.st_mode):
                                continue
                            key = st.st_ino | devkey
                            nblocks = st.st_blocks
                        in_store[key] = in_store.get(key, 0) + 1
                        if key not in counted:
                            counted.add(key)
                            objects += 1
                            blocks += nblocks
        totals.store_objects = objects
        totals.store_bytes = blocks * BLOCK
        return in_store


def _safe_mount_points() -> list[str]:
    try:
        return mount_points()
    except OSError:
        return []


def _subdirs(path: str, problems: list[Problem]) -> list[str]:
    try:
        with os.scandir(path) as it:
            return [e.path for e in it if not e.name.startswith(".") and e.is_dir()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        problems.append(Problem(path, exc.strerror or str(exc)))
        return []


def measure(
    roots: list[tuple[str, str]],
    *,
    store: str | None = None,
    top: int = 0,
    depth: int | None = None,
) -> UsageReport:
    """Measure guest trees and the store.

    Args:
        roots: (name, directory) pairs, one per guest.
        store: the store directory, or None to leave the store out.
        top: how many of the shared files that save most to list.
        depth: directory levels below each root to break down (0 = roots only), or None.

    Raises:
        UsageError: a root is missing or not a directory.
    """
    start = time.perf_counter()
    resolved: list[tuple[str, str]] = []
    for name, path in roots:
        real = os.path.realpath(path)
        if not os.path.isdir(real):
            raise UsageError(f"{path}: not a directory")
        resolved.append((name, real))
    guests = [GuestUsage(name, real) for name, real in resolved]
    try:
        result = _run(guests, store, depth, trust_d_ino=True)
    except _InodeMismatch:
        guests = [GuestUsage(name, real) for name, real in resolved]
        result = _run(guests, store, depth, trust_d_ino=False)
    report = _summarise(result, guests, store, top)
    report.elapsed_s = time.perf_counter() - start
    return report


@dataclass
class _Result:
    scan: _Scan
    totals: Totals
    in_store: dict[int, int]


def _run(
    guests: list[GuestUsage], store: str | None, depth: int | None, *, trust_d_ino: bool
) -> _Result:
    scan = _Scan(depth=depth, trust_d_ino=trust_d_ino)
    for usage in guests:
        scan.walk_guest(usage)
    totals = Totals()
    in_store = scan.walk_store(store, totals) if store else {}
    return _Result(scan, totals, in_store)


def _summarise(
    result: _Result, guests: list[GuestUsage], store: str | None, top: int
) -> UsageReport:
    scan, totals, in_store = result.scan, result.totals, result.in_store
    seen = scan.seen
    # How many guests link each multiply-linked inode, and through how many paths.
    n_guests: dict[int, int] = {}
    n_paths: dict[int, int] = {}
    for mine in scan.links:
        for key, count in mine.items():
            n_guests[key] = n_guests.get(key, 0) + 1
            n_paths[key] = n_paths.get(key, 0) + count

    rows = scan.rows
    for usage, mine, owner in zip(guests, scan.links, scan.owners, strict=True):
        shared = 0
        fair = 0.0
        for key, count in mine.items():
            nlink, blocks = seen[key][0], seen[key][1]
            if count < nlink:
                shared += blocks
                fair += blocks / n_guests[key]
                row = owner.get(key)
                if row is not None:
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
    for r in reversed(rows):
        if r.parent >= 0:
            p = rows[r.parent]
            p.files += r.files
            p.apparent_bytes += r.apparent_bytes
            p.allocated_bytes += r.allocated_bytes
            p.exclusive_bytes += r.exclusive_bytes
            p.shared_bytes += r.shared_bytes

    totals.files = sum(g.files for g in guests)
    totals.dirs = sum(g.dirs for g in guests)
    totals.unlinked_bytes = sum(g.unlinked_bytes for g in guests)
    # Every inode once: guests' own inodes plus each multiply-linked inode a single time.
    once_blocks = 0
    once_size = 0
    for key in n_guests:
        info = seen[key]
        once_blocks += info[1]
        once_size += info[2]
    per_guest_multi_blocks = 0
    per_guest_multi_size = 0
    for mine in scan.links:
        for key in mine:
            info = seen[key]
            per_guest_multi_blocks += info[1]
            per_guest_multi_size += info[2]
    totals.allocated_bytes = (
        sum(g.allocated_bytes for g in guests) + (once_blocks - per_guest_multi_blocks) * BLOCK
    )
    totals.apparent_bytes = sum(g.apparent_bytes for g in guests) + once_size - per_guest_multi_size
    totals.saved_bytes = totals.unlinked_bytes - totals.allocated_bytes
    totals.saved_ratio = (
        totals.saved_bytes / totals.unlinked_bytes if totals.unlinked_bytes else 0.0
    )

    top_files: list[SharedFile] = []
    if top > 0:
        names = [g.name for g in guests]
        best = heapq.nlargest(
            top,
            (k for k, n in n_paths.items() if n > 1 or n < seen[k][0]),
            key=lambda k: (seen[k][1] * (n_paths[k] - 1), seen[k][1], k),
        )
        for key in best:
            nlink, blocks, _size, path = seen[key]
            top_files.append(
                SharedFile(
                    path=path,
                    guests=tuple(
                        name for name, mine in zip(names, scan.links, strict=True) if key in mine
                    ),
                    links=n_paths[key],
                    nlink=nlink,
                    in_store=key in in_store,
                    allocated_bytes=blocks * BLOCK,
                    saved_bytes=blocks * (n_paths[key] - 1) * BLOCK,
                )
            )
    return UsageReport(
        guests=guests,
        totals=totals,
        top=top_files,
        dirs=rows,
        problems=scan.problems,
        store=store,
    )


def measure_home(
    home: Home,
    roots: list[str] | None = None,
    *,
    top: int = 0,
    depth: int | None = None,
) -> UsageReport:
    """Measure the home's guests, or the given roots (named after their guest if any).

    The store is always counted when it exists, so that store links are told apart.
    """
    if roots:
        pairs = [(home.guest_of_root(r) or str(Path(r)), r) for r in roots]
    else:
        pairs = [(name, str(home.guest_root(name))) for name in home.guest_names()]
    store = str(home.store_dir) if home.store_dir.is_dir() else None
    return measure(pairs, store=store, top=top, depth=depth)
