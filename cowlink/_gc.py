"""`gc`: remove store objects nothing links any more, and catalogue rows of inodes that are gone.

An object's link count is the truth, not the catalogue: an object is removed only when
the store's own name is its last link (st_nlink == 1), checked again under a read lease
just before the unlink, whatever the catalogue says about guests. A path outside every
known guest that links an object keeps it alive.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import _linux
from ._catalogue import Catalogue
from ._errors import Problem, ReportsProblems
from ._home import Home
from ._linker import Reporter
from ._store import thawed
from ._storeindex import OPEN_FLAGS, iter_object_names


@dataclass
class GcReport(ReportsProblems):
    objects_removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    objects_kept: int = 0
    rows_dropped: dict[str, int] = field(
        default_factory=lambda: {"objects": 0, "digests": 0, "names": 0}
    )
    errors: list[Problem] = field(default_factory=list)
    duration_s: float = 0.0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "objects_removed": len(self.objects_removed),
            "removed": self.objects_removed,
            "bytes_freed": self.bytes_freed,
            "objects_kept": self.objects_kept,
            "catalogue_rows_dropped": self.rows_dropped,
            "errors": [p.as_dict() for p in self.errors],
            "duration_s": round(self.duration_s, 3),
            "dry_run": self.dry_run,
        }

    def summary_lines(self) -> list[str]:
        would = "would be " if self.dry_run else ""
        rows = sum(self.rows_dropped.values())
        return [
            f"{len(self.objects_removed)} store objects {would}removed, "
            f"{self.bytes_freed} bytes {would}freed; {self.objects_kept} objects still linked",
            f"{rows} catalogue rows of gone inodes {would}dropped",
        ]


def run_gc(
    home: Home, reporter: Reporter, *, dry_run: bool = False, wait: bool = False
) -> GcReport:
    """Remove unlinked store objects and stale catalogue rows.

    Raises:
        LockHeld: another command holds the home's lock.
    """
    started = time.monotonic()
    report = GcReport(dry_run=dry_run)
    with home.lock("gc", wait=wait), Catalogue.open(home.catalogue_path) as catalogue:
        _linux.ignore_lease_breaks()
        if not dry_run:
            # A kill inside a thaw leaves an object without its immutable flag: until gc
            # ends, the next run rechecks the store's flags.
            catalogue.set_meta("dirty", "1")
        present: set[tuple[int, int]] = set()
        for name in iter_object_names(home.store_dir):
            path = home.store_dir / name
            try:
                st = os.lstat(path)
                present.add((st.st_dev, st.st_ino))
                if st.st_nlink > 1 or (not dry_run and not _remove_object(path)):
                    report.objects_kept += 1
                    continue
            except OSError as exc:
                report.errors.append(Problem(str(path), exc.strerror or str(exc)))
                reporter.problem(str(path), exc.strerror or str(exc))
                continue
            present.discard((st.st_dev, st.st_ino))
            report.objects_removed.append(name)
            report.bytes_freed += st.st_blocks * 512
            reporter.action(str(path), "would remove" if dry_run else "remove", "no other link")
        if not dry_run:
            _remove_empty_fanout(home)
        _drop_stale_rows(home, catalogue, present, report)
        if not dry_run:
            catalogue.set_meta("dirty", None)
    report.duration_s = time.monotonic() - started
    return report


def _remove_object(path: os.PathLike[str]) -> bool:
    """Unlink the store's name of an object if it is still the last link; True if removed."""
    fd = os.open(path, OPEN_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:
            flagged = _linux.is_immutable(fd)
        except OSError as exc:
            if not _linux.flags_unsupported(exc):
                raise
            flagged = False
        if not flagged:
            if os.fstat(fd).st_nlink != 1:
                return False
            os.unlink(path)
            return True
        with thawed(fd):
            # Under the lease and with the flag cleared, a link could appear only now;
            # the count read here is the one that decides.
            if os.fstat(fd).st_nlink != 1:
                return False
            os.unlink(path)
        return True
    finally:
        os.close(fd)


def _remove_empty_fanout(home: Home) -> None:
    try:
        entries = os.listdir(home.store_dir)
    except FileNotFoundError:
        return
    for entry in entries:
        if len(entry) == 2:
            try:
                os.rmdir(home.store_dir / entry)
            except OSError:
                pass  # not empty, or not ours


def _drop_stale_rows(
    home: Home, catalogue: Catalogue, present: set[tuple[int, int]], report: GcReport
) -> None:
    dry = report.dry_run
    gone_objects = [row.name for row in catalogue.objects() if (row.dev, row.ino) not in present]
    stale_names: dict[str, list[bytes]] = {}
    for root in catalogue.roots():
        stale = [p for p in catalogue.names(root) if not _links_object(root, p, present)]
        if stale:
            stale_names[root] = stale
    roots = set(catalogue.roots()) | {
        os.path.realpath(home.guest_root(n)) for n in home.guest_names()
    }
    alive = _inodes_below(roots)
    gone_digests = [inode for inode in catalogue.digest_inodes() if inode not in alive]
    report.rows_dropped = {
        "objects": len(gone_objects),
        "digests": len(gone_digests),
        "names": sum(len(v) for v in stale_names.values()),
    }
    if dry:
        return
    with catalogue.transaction():
        for name in gone_objects:
            catalogue.drop_object(name)
        catalogue.forget_digests(gone_digests)
        for root, paths in stale_names.items():
            catalogue.drop_names(root, paths)


def _links_object(root: str, path: bytes, present: set[tuple[int, int]]) -> bool:
    try:
        st = os.lstat(os.fsencode(root) + path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in present


def _inodes_below(roots: Iterable[str]) -> set[tuple[int, int]]:
    """(dev, ino) of every regular file in these trees; mounts and symlinks are not crossed."""
    seen: set[tuple[int, int]] = set()
    for root in roots:
        try:
            dev = os.lstat(root).st_dev
        except OSError:
            continue
        stack = [root]
        while stack:
            try:
                entries = list(os.scandir(stack.pop()))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.stat(follow_symlinks=False).st_dev == dev:
                            stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        seen.add((dev, entry.inode()))
                except OSError:
                    continue
    return seen
