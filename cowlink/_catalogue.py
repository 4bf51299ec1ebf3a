"""The SQLite catalogue: digest cache, store index, guests' link groups, run history.

Everything in it can be lost without losing data: digests are recomputed, the store
index is rebuilt from the store, and a name without a link-group row is treated as a
file of its own. A missing or corrupt catalogue is therefore set aside and rebuilt.

Tables:
    digests(dev, ino, size, mtime_ns, ctime_ns, head, full)
        Content digests of guest inodes, valid while size, mtime_ns and ctime_ns match.
    objects(name, dev, ino, size, head, full, key)
        Store objects: their name below HOME/store, inode, digests and packed link key.
    names(root, path, grp)
        Every guest name linked to a store object. Names that were one inode inside the
        guest before unification share a `grp`: they stay one file to the guest.
    runs(id, command, started_ns, duration_s, exit_code, stats)
        One row per finished command run; `stats` is its JSON report.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

#: Bound parameters per query; SQLite's own limit is 32,766 (at least 999 in old builds).
_MAX_PARAMS = 900

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS digests(
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    head BLOB NOT NULL, full BLOB,
    PRIMARY KEY (dev, ino)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS objects(
    name TEXT PRIMARY KEY, dev INTEGER NOT NULL, ino INTEGER NOT NULL,
    size INTEGER NOT NULL, head BLOB NOT NULL, full BLOB NOT NULL, key BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS objects_inode ON objects(dev, ino);
CREATE TABLE IF NOT EXISTS names(
    root TEXT NOT NULL, path BLOB NOT NULL, grp INTEGER NOT NULL,
    PRIMARY KEY (root, path)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS names_group ON names(root, grp);
CREATE TABLE IF NOT EXISTS runs(
    id INTEGER PRIMARY KEY, command TEXT NOT NULL, started_ns INTEGER NOT NULL,
    duration_s REAL NOT NULL, exit_code INTEGER NOT NULL, stats TEXT NOT NULL);
"""

#: (dev, ino, size, mtime_ns, ctime_ns, head digest, full digest or None)
DigestRow: TypeAlias = tuple[int, int, int, int, int, bytes, bytes | None]


@dataclass(frozen=True)
class ObjectRow:
    name: str
    dev: int
    ino: int
    size: int
    head: bytes
    full: bytes
    key: bytes


@dataclass(frozen=True)
class RunRow:
    command: str
    started_ns: int
    duration_s: float
    exit_code: int
    stats: dict[str, Any]


class Catalogue:
    """An open catalogue. Not thread-safe: use it from the thread that opened it."""

    def __init__(self, db: sqlite3.Connection, path: Path, rebuilt_from: Path | None) -> None:
        self._db = db
        self.path = path
        #: Where a corrupt catalogue was moved to, when this one had to be rebuilt.
        self.rebuilt_from = rebuilt_from

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> Catalogue:
        """Open (creating if needed) the catalogue; a corrupt one is set aside and rebuilt."""
        if readonly:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            return cls(db, path, None)
        try:
            return cls(_connect(path), path, None)
        except sqlite3.DatabaseError:
            aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{path}{suffix}", f"{aside}{suffix}")
            return cls(_connect(path), path, aside)

    @classmethod
    def another(cls, path: Path, *, cache_kib: int | None = None) -> Catalogue:
        """One more connection to a catalogue this run has opened (and checked) already.

        `cache_kib` bounds its page cache (SQLite's default is about 2 MiB): a connection
        that mostly writes gains little from a larger one.
        """
        db = _connect(path, checked=True)
        if cache_kib is not None:
            db.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        return cls(db, path, None)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def data_version(self) -> int:
        """A number that changes whenever another connection commits (SQLite's data_version)."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        # IMMEDIATE: take the write lock up front, so busy_timeout applies; a deferred
        # transaction that reads, then writes, fails at once when a mount daemon writes too.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- meta ---------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self._db.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- digests ------------------------------------------------------------------------

    def cached_digests(
        self, dev: int, stats: Iterable[tuple[int, int, int, int]]
    ) -> dict[int, tuple[bytes, bytes | None]]:
        """{ino: (head, full-or-None)} recorded for these (ino, size, mtime_ns, ctime_ns)
        of one device, for the inodes whose stat is unchanged since."""
        wanted = {ino: (size, mtime_ns, ctime_ns) for ino, size, mtime_ns, ctime_ns in stats}
        found: dict[int, tuple[bytes, bytes | None]] = {}
        inodes = list(wanted)
        # One query per chunk, not per inode: a size class can hold thousands of files.
        for start in range(0, len(inodes), _MAX_PARAMS):
            chunk = inodes[start : start + _MAX_PARAMS]
            rows = self._db.execute(
                "SELECT ino, size, mtime_ns, ctime_ns, head, full FROM digests "
                f"WHERE dev = ? AND ino IN ({','.join('?' * len(chunk))})",
                (dev, *chunk),
            )
            for ino, size, mtime_ns, ctime_ns, head, full in rows:
                if wanted[ino] == (size, mtime_ns, ctime_ns):
                    found[ino] = bytes(head), None if full is None else bytes(full)
        return found

    def has_digests(self, dev: int) -> bool:
        """Whether any digest of this device is recorded (a first run has none to look up)."""
        row = self._db.execute("SELECT 1 FROM digests WHERE dev = ? LIMIT 1", (dev,)).fetchone()
        return row is not None

    def put_digests(self, rows: Iterable[DigestRow]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def forget_digests(self, inodes: Iterable[tuple[int, int]]) -> None:
        self._db.executemany("DELETE FROM digests WHERE dev = ? AND ino = ?", inodes)

    def digest_inodes(self) -> list[tuple[int, int]]:
        """(dev, ino) of every digest row: gc drops those of inodes that are gone."""
        return [(r[0], r[1]) for r in self._db.execute("SELECT dev, ino FROM digests")]

    # -- store objects ------------------------------------------------------------------

    def objects(self) -> list[ObjectRow]:
        return [
            ObjectRow(r[0], r[1], r[2], r[3], bytes(r[4]), bytes(r[5]), bytes(r[6]))
            for r in self._db.execute("SELECT name, dev, ino, size, head, full, key FROM objects")
        ]

    def object_by_inode(self, dev: int, ino: int) -> ObjectRow | None:
        r = self._db.execute(
            "SELECT name, dev, ino, size, head, full, key FROM objects WHERE dev = ? AND ino = ?",
            (dev, ino),
        ).fetchone()
        return (
            None
            if r is None
            else ObjectRow(r[0], r[1], r[2], r[3], bytes(r[4]), bytes(r[5]), bytes(r[6]))
        )

    def objects_among(self, dev: int, inos: Iterable[int]) -> set[int]:
        """Which of these inode numbers on `dev` are store objects (one query per 500)."""
        wanted = list(inos)
        found: set[int] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                r[0]
                for r in self._db.execute(
                    f"SELECT ino FROM objects WHERE dev = ? AND ino IN ({marks})", (dev, *chunk)
                )
            )
        return found

    def put_object(self, row: ObjectRow) -> None:
        self.put_objects([row])

    def put_objects(self, rows: Iterable[ObjectRow]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?)",
            ((r.name, r.dev, r.ino, r.size, r.head, r.full, r.key) for r in rows),
        )

    def drop_object(self, name: str) -> None:
        self._db.execute("DELETE FROM objects WHERE name = ?", (name,))

    # -- link groups --------------------------------------------------------------------

    def reserve_groups(self, count: int) -> int:
        """Reserve `count` link-group numbers never handed out before; return the first.

        Atomic across processes (unify and the FUSE daemons share the catalogue).
        """
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'next_group'").fetchone()
            first = int(row[0]) if row else 1
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('next_group', ?)", (str(first + count),)
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return first

    def new_group(self) -> int:
        """A link-group number never handed out before in this catalogue."""
        return self.reserve_groups(1)

    def batch(self) -> Batch:
        return Batch(self)

    def names(self, root: str) -> dict[bytes, int]:
        """Every recorded name of `root` linked to a store object, with its group."""
        return {
            bytes(path): grp
            for path, grp in self._db.execute("SELECT path, grp FROM names WHERE root = ?", (root,))
        }

    def group_of(self, root: str, path: bytes) -> int | None:
        row = self._db.execute(
            "SELECT grp FROM names WHERE root = ? AND path = ?", (root, path)
        ).fetchone()
        return None if row is None else int(row[0])

    def group_names(self, root: str, grp: int) -> list[bytes]:
        """All names of one link group: what the guest sees as one file."""
        return sorted(
            bytes(r[0])
            for r in self._db.execute(
                "SELECT path FROM names WHERE root = ? AND grp = ?", (root, grp)
            )
        )

    def put_names(self, root: str, rows: Iterable[tuple[bytes, int]]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO names VALUES (?, ?, ?)",
            ((root, path, grp) for path, grp in rows),
        )

    def drop_names(self, root: str, paths: Iterable[bytes]) -> None:
        self._db.executemany(
            "DELETE FROM names WHERE root = ? AND path = ?", ((root, p) for p in paths)
        )

    def rename_name(self, root: str, old: bytes, new: bytes) -> None:
        """Keep a name's group when the guest renames it (a directory moves its whole subtree)."""
        self._db.execute("DELETE FROM names WHERE root = ? AND path = ?", (root, new))
        self._db.execute("UPDATE names SET path = ? WHERE root = ? AND path = ?", (new, root, old))
        prefix = old + b"/"
        rows = self._db.execute(
            "SELECT path FROM names WHERE root = ? AND substr(path, 1, ?) = ?",
            (root, len(prefix), prefix),
        ).fetchall()
        for (path,) in rows:
            moved = new + b"/" + bytes(path)[len(prefix) :]
            self._db.execute(
                "UPDATE names SET path = ? WHERE root = ? AND path = ?", (moved, root, path)
            )

    def sync_names(self, root: str, linked: Iterable[bytes]) -> list[bytes]:
        """Drop the records of names no longer linked; return linked names with no record.

        Done inside SQLite, so a rerun over millions of linked names needs no set of them
        in Python.
        """
        with self.transaction():
            self._db.execute("CREATE TEMP TABLE IF NOT EXISTS linked(path BLOB PRIMARY KEY)")
            self._db.execute("DELETE FROM linked")
            self._db.executemany(
                "INSERT OR IGNORE INTO linked VALUES (?)", ((path,) for path in linked)
            )
            self._db.execute(
                "DELETE FROM names WHERE root = ? AND path NOT IN (SELECT path FROM linked)",
                (root,),
            )
            missing = [
                bytes(row[0])
                for row in self._db.execute(
                    "SELECT path FROM linked WHERE path NOT IN"
                    " (SELECT path FROM names WHERE root = ?) ORDER BY path",
                    (root,),
                )
            ]
            self._db.execute("DELETE FROM linked")
        return missing

    def roots(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT root FROM names")]

    # -- runs ---------------------------------------------------------------------------

    def record_run(
        self, command: str, started_ns: int, duration_s: float, exit_code: int, stats: object
    ) -> None:
        self._db.execute(
            "INSERT INTO runs(command, started_ns, duration_s, exit_code, stats)"
            " VALUES (?, ?, ?, ?, ?)",
            (command, started_ns, duration_s, exit_code, json.dumps(stats)),
        )

    def last_run(self, command: str) -> RunRow | None:
        row = self._db.execute(
            "SELECT command, started_ns, duration_s, exit_code, stats FROM runs"
            " WHERE command = ? ORDER BY id DESC LIMIT 1",
            (command,),
        ).fetchone()
        if row is None:
            return None
        return RunRow(row[0], row[1], row[2], row[3], json.loads(row[4]))


class Batch:
    """Catalogue writes gathered and committed together: one transaction per flush.

    A run that makes thousands of changes would spend most of its time committing them
    one by one. What a crash loses from an unflushed batch is recomputed (digests), found
    again in the store (objects), or a name's link group, which callers that care flush
    before the filesystem change it describes.
    """

    _BLOCK = 4096

    def __init__(self, catalogue: Catalogue) -> None:
        self._catalogue = catalogue
        self._names: list[tuple[str, bytes, int]] = []
        self._dropped: list[tuple[str, bytes]] = []
        self._objects: list[ObjectRow] = []
        #: Keyed by (dev, ino), so that forgetting an inode drops a digest still waiting.
        self._digests: dict[tuple[int, int], DigestRow] = {}
        self._forget: list[tuple[int, int]] = []
        self._next_group = 0
        self._groups_left = 0

    def new_group(self) -> int:
        if self._groups_left == 0:
            self._next_group = self._catalogue.reserve_groups(self._BLOCK)
            self._groups_left = self._BLOCK
        self._groups_left -= 1
        self._next_group += 1
        return self._next_group - 1

    def put_names(self, root: str, rows: Iterable[tuple[bytes, int]]) -> None:
        self._names.extend((root, path, grp) for path, grp in rows)

    def drop_names(self, root: str, paths: Iterable[bytes]) -> None:
        self._dropped.extend((root, path) for path in paths)

    def put_object(self, row: ObjectRow) -> None:
        self._objects.append(row)

    def put_digests(self, rows: Iterable[DigestRow]) -> None:
        for row in rows:
            self._digests[(row[0], row[1])] = row

    def forget_digests(self, inodes: Iterable[tuple[int, int]]) -> None:
        # A first run hashes most files only to replace them moments later: their rows
        # need not be written at all. An older row on record must still go.
        for inode in inodes:
            self._digests.pop(inode, None)
            self._forget.append(inode)

    def __len__(self) -> int:
        return (
            len(self._names)
            + len(self._dropped)
            + len(self._objects)
            + len(self._digests)
            + len(self._forget)
        )

    def flush(self) -> None:
        if not len(self):
            return
        cat = self._catalogue
        with cat.transaction():
            cat.put_objects(self._objects)
            cat.put_digests(self._digests.values())
            cat.forget_digests(self._forget)
            cat._db.executemany("INSERT OR REPLACE INTO names VALUES (?, ?, ?)", self._names)
            cat._db.executemany("DELETE FROM names WHERE root = ? AND path = ?", self._dropped)
        for pending in (self._names, self._dropped, self._objects, self._digests, self._forget):
            pending.clear()


def _connect(path: Path, *, checked: bool = False) -> sqlite3.Connection:
    """A connection; unless the catalogue is `checked` already, checked and brought to
    the current schema."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=30000")
        if checked:
            return db
        db.execute("PRAGMA journal_mode=WAL")
        status = db.execute("PRAGMA quick_check").fetchone()
        if status is None or status[0] != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {status}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"unknown schema version {version}")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        db.close()
        raise
    return db
