"""What the catalogue says about one guest: which inodes are store objects, and its link groups.

Used from the trio thread only (a Catalogue is bound to its thread). The guest's names
are mirrored in memory, so lookups and readdir never wait for SQLite; every change the
guest makes to a shared name is written through at once, so a later `cowlink unify` run
or another mount sees it. When another process commits (a unify run over the mounted
guest), `refresh` reads the names again and bumps `generation`, so the operations
re-examine the files the kernel already knows.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterator

from cowlink._catalogue import Catalogue

from ._inodes import Share

log = logging.getLogger(__name__)

#: How often, at most, the catalogue is asked whether another process changed it.
REFRESH_S = 0.1


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
        self._group: dict[bytes, int] = {}
        self._members: defaultdict[int, set[bytes]] = defaultdict(set)
        #: Bumped whenever another process's changes were read in.
        self.generation = 0
        self._version = catalogue.data_version()
        self._next_refresh = 0.0
        self._load_names()

    def _load_names(self) -> None:
        self._group = self.catalogue.names(self.root)
        self._members = defaultdict(set)
        for path, group in self._group.items():
            self._members[group].add(path)

    def refresh(self) -> None:
        """Catch up with what other processes committed since: new objects, new groups.

        Asked before most requests, so SQLite is asked at most every REFRESH_S: a unify
        run's commit is seen that much later at most.
        """
        now = time.monotonic()
        if now < self._next_refresh:
            return
        self._next_refresh = now + REFRESH_S
        version = self.catalogue.data_version()
        if version == self._version:
            return
        self._version = version
        self._not_objects.clear()
        self._load_names()
        self.generation += 1

    def close(self) -> None:
        self.catalogue.close()

    def is_object(self, dev: int, ino: int, ctime_ns: int) -> bool:
        key = (dev, ino)
        if key in self._objects:
            return True
        if self._not_objects.get(key) == ctime_ns:
            return False
        found = self.catalogue.object_by_inode(dev, ino) is not None
        self._learn(key, ctime_ns, found)
        return found

    def prefetch(self, inodes: list[tuple[int, int, int]]) -> None:
        """Answer `is_object` for these (dev, ino, ctime_ns) ahead, in one query per device."""
        unknown: defaultdict[int, dict[int, int]] = defaultdict(dict)
        for dev, ino, ctime_ns in inodes:
            key = (dev, ino)
            if key not in self._objects and self._not_objects.get(key) != ctime_ns:
                unknown[dev][ino] = ctime_ns
        for dev, ctimes in unknown.items():
            found = self.catalogue.objects_among(dev, ctimes)
            for ino, ctime_ns in ctimes.items():
                self._learn((dev, ino), ctime_ns, ino in found)

    def _learn(self, key: tuple[int, int], ctime_ns: int, is_object: bool) -> None:
        if is_object:
            self._objects.add(key)
            self._not_objects.pop(key, None)
            return
        if len(self._not_objects) > 1 << 20:
            self._not_objects.clear()
        self._not_objects[key] = ctime_ns

    def share_of(self, path: bytes) -> Share:
        """The share of a name linked to a store object."""
        group = self._group.get(path)
        return Share(group) if group is not None else Share(None, path)

    def paths(self, share: Share) -> list[bytes]:
        """Every name of the guest's file: what one break moves to one private copy."""
        if share.group is None:
            return [share.path] if share.path is not None else []
        return sorted(self._members.get(share.group, ()))

    def link_count(self, share: Share) -> int:
        """st_nlink as the guest must see it: its own names, never other guests' or the store's."""
        if share.group is None:
            return 1
        return max(1, len(self._members.get(share.group, ())))

    # -- changes: memory first, then the catalogue --------------------------------------

    def _forget(self, path: bytes) -> None:
        group = self._group.pop(path, None)
        if group is not None:
            members = self._members[group]
            members.discard(path)
            if not members:
                del self._members[group]

    def _record(self, path: bytes, group: int) -> None:
        self._forget(path)
        self._group[path] = group
        self._members[group].add(path)

    def _moved(self, old: bytes, new: bytes) -> list[tuple[bytes, bytes]]:
        """The recorded names at or below `old`, with where they go under `new`."""
        prefix = old + b"/"
        return [
            (path, new + path[len(old) :])
            for path in self._group
            if path == old or path.startswith(prefix)
        ]

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
        for path in paths:
            self._forget(path)
        with self._writing("removed names"):
            self.catalogue.drop_names(self.root, paths)

    def renamed(self, old: bytes, new: bytes, *, is_dir: bool) -> None:
        """`old` is now called `new`; whatever `new` named is gone."""
        moves = self._moved(old, new) if is_dir else []
        groups = {path: self._group[path] for path, _ in moves}
        self._forget(new)
        for path, _ in moves:
            self._forget(path)
        for path, dest in moves:
            self._record(dest, groups[path])
        if is_dir:
            if moves:  # rename_name scans every name of the guest: only when needed
                with self._writing("a renamed directory"):
                    self.catalogue.rename_name(self.root, old, new)
            return
        group = self._group.get(old)
        self._forget(old)
        if group is not None:
            self._record(new, group)
        with self._writing("a renamed file"):
            self.catalogue.drop_names(self.root, [old, new])
            if group is not None:
                self.catalogue.put_names(self.root, [(new, group)])

    def exchanged(self, a: bytes, b: bytes) -> None:
        """RENAME_EXCHANGE swapped two names (and their subtrees)."""
        there, back = self._moved(a, b), self._moved(b, a)
        groups = {path: self._group[path] for path, _ in there + back}
        for path, _ in there + back:
            self._forget(path)
        for path, dest in there + back:
            self._record(dest, groups[path])
        if not there and not back:
            return
        parking = b"\0cowlink-exchange"  # no guest path holds a NUL byte
        with self._writing("exchanged names"):
            self.catalogue.rename_name(self.root, a, parking)
            self.catalogue.rename_name(self.root, b, a)
            self.catalogue.rename_name(self.root, parking, b)
