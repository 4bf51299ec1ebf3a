"""What the catalogue says about one guest: which inodes are store objects, and its link groups.

Used from the trio thread only (a Catalogue is bound to its thread). Every change the
guest makes to a shared name is written through at once, so a `cowlink unify` run or
another mount sees it.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator

from cowlink._catalogue import Catalogue

from ._inodes import Share

log = logging.getLogger(__name__)


class SharedIndex:
    """The catalogue seen by one mounted guest root.

    Notes:
        Whether an inode is a store object is cached: objects stay objects while they
        have guest links. A "no" is cached with the inode's ctime, because a unify run
        that makes an inode an object links it (which changes its ctime).
    """

    def __init__(self, catalogue: Catalogue, root: str) -> None:
        self.catalogue = catalogue
        self.root = root
        self._objects: set[tuple[int, int]] = set()
        self._not_objects: dict[tuple[int, int], int] = {}

    def close(self) -> None:
        self.catalogue.close()

    def is_object(self, dev: int, ino: int, ctime_ns: int) -> bool:
        key = (dev, ino)
        if key in self._objects:
            return True
        if self._not_objects.get(key) == ctime_ns:
            return False
        if self.catalogue.object_by_inode(dev, ino) is not None:
            self._objects.add(key)
            self._not_objects.pop(key, None)
            return True
        if len(self._not_objects) > 1 << 20:
            self._not_objects.clear()
        self._not_objects[key] = ctime_ns
        return False

    def share_of(self, path: bytes) -> Share:
        """The share of a name linked to a store object."""
        group = self.catalogue.group_of(self.root, path)
        return Share(group) if group is not None else Share(None, path)

    def paths(self, share: Share) -> list[bytes]:
        """Every name of the guest's file: what one break moves to one private copy."""
        if share.group is None:
            return [share.path] if share.path is not None else []
        return self.catalogue.group_names(self.root, share.group)

    def link_count(self, share: Share) -> int:
        """st_nlink as the guest must see it: its own names, never other guests' or the store's."""
        return max(1, len(self.paths(share)))

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """A write transaction that starts with a write, so SQLite waits for the lock.

        The change on disk is done already when we get here; a catalogue that cannot
        record it loses a link group, which only makes names separate files (safe).
        """
        try:
            with self.catalogue.transaction():
                yield
        except sqlite3.Error as exc:
            log.warning("catalogue: cannot record %s: %s", what, exc)

    def dropped(self, paths: list[bytes]) -> None:
        """These names no longer lead to a store object (unlinked, replaced or broken)."""
        with self._writing("removed names"):
            self.catalogue.drop_names(self.root, paths)

    def renamed(self, old: bytes, new: bytes, *, is_dir: bool) -> None:
        """`old` is now called `new`; whatever `new` named is gone."""
        if is_dir:
            with self._writing("a renamed directory"):
                self.catalogue.rename_name(self.root, old, new)
            return
        # A file has no subtree: skip rename_name's scan of every name of the guest.
        group = self.catalogue.group_of(self.root, old)
        with self._writing("a renamed file"):
            self.catalogue.drop_names(self.root, [old, new])
            if group is not None:
                self.catalogue.put_names(self.root, [(new, group)])

    def exchanged(self, a: bytes, b: bytes) -> None:
        """RENAME_EXCHANGE swapped two names (and their subtrees)."""
        parking = b"\0cowlink-exchange"  # no guest path holds a NUL byte
        with self._writing("exchanged names"):
            self.catalogue.rename_name(self.root, a, parking)
            self.catalogue.rename_name(self.root, b, a)
            self.catalogue.rename_name(self.root, parking, b)
