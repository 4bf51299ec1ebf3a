"""The catalogue's batched writes: what a flush leaves on record."""

from __future__ import annotations

from pathlib import Path

from cowlink._catalogue import Catalogue, DigestRow, ObjectRow


def _row(ino: int, mtime_ns: int = 1) -> DigestRow:
    return (7, ino, 100, mtime_ns, mtime_ns, b"h" * 16, b"f" * 16)


def test_a_forgotten_inode_leaves_no_digest_whether_waiting_or_on_record(tmp_path: Path) -> None:
    with Catalogue.open(tmp_path / "catalogue.sqlite") as catalogue:
        earlier = catalogue.batch()
        earlier.put_digests([_row(1), _row(2)])
        earlier.flush()
        batch = catalogue.batch()
        batch.put_digests([_row(1, mtime_ns=2), _row(3), _row(4)])
        batch.forget_digests([(7, 1), (7, 3)])
        batch.flush()
        assert sorted(catalogue.digest_inodes()) == [(7, 2), (7, 4)]
        assert len(batch) == 0


def test_objects_flushed_together_are_all_on_record(tmp_path: Path) -> None:
    rows = [ObjectRow(f"ab/{i:030x}-0-0", 7, 100 + i, 10, b"h", b"f" * 16, b"k") for i in range(3)]
    with Catalogue.open(tmp_path / "catalogue.sqlite") as catalogue:
        batch = catalogue.batch()
        for row in rows:
            batch.put_object(row)
        batch.flush()
        assert sorted(catalogue.objects(), key=lambda r: r.name) == rows
        assert catalogue.object_by_inode(7, 101) == rows[1]
