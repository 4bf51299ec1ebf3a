"""`verify`: reread every store object and check it against its name and its flags.

Checks, per object: the immutable flag is set; the link key (mode, owner, xattrs, and
mtime unless the object was made under --ignore-mtime) matches the key digest in the
name; and, unless `quick`, the content's digest matches the name. Each problem lists
the guests' names that link the object (from the catalogue), and how many links the
link count shows beyond those (paths outside every known guest, or names the catalogue
lost).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from . import _linux
from ._catalogue import Catalogue
from ._errors import EXIT_OK, EXIT_PROBLEMS
from ._home import Home
from ._linker import Reporter
from ._store import parse_object_name, read_key
from ._storeindex import OPEN_FLAGS, check_object, iter_object_names


@dataclass
class ObjectProblem:
    name: str
    problems: list[str]
    nlink: int
    #: Guest names that link the object: root + path as the host sees them.
    linked_by: list[str] = field(default_factory=list)
    #: Links the link count shows beyond the store's own name and `linked_by`.
    unknown_links: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "object": self.name,
            "problems": self.problems,
            "nlink": self.nlink,
            "linked_by": self.linked_by,
            "unknown_links": self.unknown_links,
        }


@dataclass
class VerifyReport:
    objects_checked: int = 0
    bytes_read: int = 0
    problems: list[ObjectProblem] = field(default_factory=list)
    duration_s: float = 0.0
    quick: bool = False

    @property
    def exit_code(self) -> int:
        return EXIT_PROBLEMS if self.problems else EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "objects_checked": self.objects_checked,
            "bytes_read": self.bytes_read,
            "problems": [p.as_dict() for p in self.problems],
            "duration_s": round(self.duration_s, 3),
            "quick": self.quick,
        }

    def summary_lines(self) -> list[str]:
        lines = []
        for p in self.problems:
            lines.append(f"{p.name}: {'; '.join(p.problems)}")
            lines.extend(f"  linked by {path}" for path in p.linked_by)
            if p.unknown_links:
                lines.append(f"  and {p.unknown_links} links outside the catalogue's guest names")
        how = "stat and flags" if self.quick else "content, stat and flags"
        lines.append(
            f"checked {self.objects_checked} objects ({how}): "
            f"{len(self.problems) or 'no'} problems ({self.duration_s:.1f} s)"
        )
        return lines


def run_verify(
    home: Home, reporter: Reporter, *, quick: bool = False, wait: bool = False
) -> VerifyReport:
    """Check every store object; the lock keeps unify from thawing objects meanwhile.

    Raises:
        LockHeld: another command holds the home's lock.
    """
    started = time.monotonic()
    report = VerifyReport(quick=quick)
    found: dict[tuple[int, int], ObjectProblem] = {}
    with home.lock("verify", wait=wait):
        for name in iter_object_names(home.store_dir):
            report.objects_checked += 1
            if report.objects_checked % 256 == 0:
                reporter.progress(f"checked {report.objects_checked} objects")
            path = home.store_dir / name
            try:
                fd = os.open(path, OPEN_FLAGS)
            except OSError as exc:
                st = os.lstat(path)
                found[(st.st_dev, st.st_ino)] = ObjectProblem(
                    name, [f"cannot open: {exc.strerror}"], st.st_nlink
                )
                continue
            try:
                st = os.fstat(fd)
                problems = _check(fd, name, quick=quick)
                if not quick:
                    report.bytes_read += st.st_size
            finally:
                os.close(fd)
            if problems:
                found[(st.st_dev, st.st_ino)] = ObjectProblem(name, problems, st.st_nlink)
        if found and home.catalogue_path.exists():
            with Catalogue.open(home.catalogue_path) as catalogue:
                _attach_links(catalogue, found)
    for problem in found.values():
        problem.unknown_links = max(0, problem.nlink - 1 - len(problem.linked_by))
        reporter.problem(str(home.store_dir / problem.name), "; ".join(problem.problems))
    report.problems = sorted(found.values(), key=lambda p: p.name)
    report.duration_s = time.monotonic() - started
    return report


def _check(fd: int, name: str, *, quick: bool) -> list[str]:
    problems = []
    try:
        if not _linux.is_immutable(fd):
            problems.append("immutable flag not set")
    except OSError as exc:
        problems.append(f"cannot read flags: {exc.strerror}")
    if quick:
        st = os.fstat(fd)
        _, key_hex, _ = parse_object_name(name)
        try:
            keys = {read_key(fd, st, ignore_mtime=m).digest() for m in (False, True)}
        except OSError as exc:
            problems.append(f"cannot read xattrs: {exc.strerror}")
        else:
            if key_hex not in keys:
                problems.append("mode, owner, mtime or xattrs differ from the object's name")
        return problems
    check = check_object(fd, name)
    if check.problem is not None:
        problems.append(check.problem)
    return problems


def _attach_links(catalogue: Catalogue, found: dict[tuple[int, int], ObjectProblem]) -> None:
    """Find which recorded guest names lead to the objects with problems (one lstat each)."""
    links: dict[tuple[int, int], list[str]] = defaultdict(list)
    for root in catalogue.roots():
        for path in catalogue.names(root):
            full = os.fsencode(root) + path
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in found:
                links[(st.st_dev, st.st_ino)].append(os.fsdecode(full))
    for inode, paths in links.items():
        found[inode].linked_by = sorted(paths)
