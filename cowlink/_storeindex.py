"""The store index: which inodes are store objects, found fast by inode or by size.

It is loaded from the catalogue. When the catalogue is new, or the last changing run did
not finish (the `dirty` mark), it is rebuilt from the store itself, and objects that an
interrupted run left without their immutable flag are checked against their name and
flagged again (or taken out of the store when they do not match it).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import _linux
from ._catalogue import Catalogue, ObjectRow
from ._hashing import full_digest, head_digest
from ._store import is_object_name, parse_object_name, read_key, thawed

OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME


def iter_object_names(store: Path) -> Iterator[str]:
    """Names (relative to the store) of every object file, in name order."""
    try:
        fanout = sorted(os.listdir(store))
    except FileNotFoundError:
        return
    for first in fanout:
        sub = store / first
        if len(first) != 2 or not sub.is_dir():
            continue
        for entry in sorted(os.scandir(sub), key=lambda e: e.name):
            name = f"{first}/{entry.name}"
            if entry.is_file(follow_symlinks=False) and is_object_name(name):
                yield name


@dataclass(frozen=True)
class ObjectCheck:
    """What reading an object back showed: a row for the index, or what is wrong with it."""

    row: ObjectRow | None
    problem: str | None = None


def check_object(fd: int, name: str, *, quick: bool = False) -> ObjectCheck:
    """Compare an open object with its name: content digest and link-key digest.

    With `quick`, the content is not read and the row's digests come from the name.
    """
    st = os.fstat(fd)
    digest, key_hex, _ = parse_object_name(name)
    keys = [read_key(fd, st, ignore_mtime=m) for m in (False, True)]
    key = next((k for k in keys if k.digest() == key_hex), None)
    if key is None:
        return ObjectCheck(None, "mode, owner, mtime or xattrs differ from the object's name")
    if quick:
        head = head_digest(fd, st.st_size) if st.st_size <= 4096 else b""
        return ObjectCheck(
            ObjectRow(name, st.st_dev, st.st_ino, st.st_size, head, digest, key.packed())
        )
    try:
        actual = full_digest(fd, st.st_size)
    except (OSError, ValueError) as exc:
        return ObjectCheck(None, f"cannot read: {exc}")
    if actual != digest:
        return ObjectCheck(None, "content does not match the object's name")
    row = ObjectRow(
        name, st.st_dev, st.st_ino, st.st_size, head_digest(fd, st.st_size), actual, key.packed()
    )
    return ObjectCheck(row)


class StoreIndex:
    """Store objects by inode and by size, for one run."""

    def __init__(self, store: Path, catalogue: Catalogue) -> None:
        self.store = store
        self.catalogue = catalogue
        self.by_inode: dict[tuple[int, int], ObjectRow] = {}
        self.by_size: dict[int, list[ObjectRow]] = defaultdict(list)
        #: Objects that reached the link limit in this run.
        self.full: set[str] = set()

    def load(self, *, recover: bool, problem: Callable[[str, str], None]) -> None:
        needs_scan = (
            self.catalogue.get_meta("dirty") is not None
            or self.catalogue.get_meta("store_indexed") is None
        ) and self.store.is_dir()
        if needs_scan:
            self._rescan(recover=recover, problem=problem)
        for row in self.catalogue.objects():
            self.add(row)

    def add(self, row: ObjectRow) -> None:
        self.by_inode[(row.dev, row.ino)] = row
        self.by_size[row.size].append(row)

    def is_object(self, dev: int, ino: int) -> bool:
        return (dev, ino) in self.by_inode

    def matching(self, size: int, full: bytes, key: bytes) -> list[ObjectRow]:
        """Objects with this content and link key that still take links."""
        return [
            row
            for row in self.by_size.get(size, ())
            if row.full == full and row.key == key and row.name not in self.full
        ]

    def _rescan(self, *, recover: bool, problem: Callable[[str, str], None]) -> None:
        known = {row.name: row for row in self.catalogue.objects()}
        seen: set[str] = set()
        with self.catalogue.transaction():
            for name in iter_object_names(self.store):
                seen.add(name)
                path = self.store / name
                try:
                    fd = os.open(path, OPEN_FLAGS)
                except OSError as exc:
                    problem(str(path), exc.strerror or str(exc))
                    continue
                try:
                    self._rescan_one(fd, name, known.get(name), recover=recover, problem=problem)
                finally:
                    os.close(fd)
            for name in set(known) - seen:
                self.catalogue.drop_object(name)
            self.catalogue.set_meta("store_indexed", "1")

    def _rescan_one(
        self,
        fd: int,
        name: str,
        row: ObjectRow | None,
        *,
        recover: bool,
        problem: Callable[[str, str], None],
    ) -> None:
        path = str(self.store / name)
        st = os.fstat(fd)
        try:
            flagged = _linux.is_immutable(fd)
        except OSError:
            flagged = True  # no flag support here: nothing to recover
        if row is not None and row.ino == st.st_ino and flagged:
            return
        check = check_object(fd, name)
        if check.row is None:
            problem(path, f"{check.problem}; taken out of the store (guest names kept)")
            if recover:
                try:
                    # Guests may still share the inode: it stays immutable, only the
                    # store's own name goes.
                    if not flagged:
                        _linux.set_immutable(fd, True)
                    with thawed(fd):
                        os.unlink(path)
                except OSError as exc:
                    problem(path, exc.strerror or str(exc))
            return
        if recover and not flagged:
            _linux.set_immutable(fd, True)
        self.catalogue.put_object(check.row)
