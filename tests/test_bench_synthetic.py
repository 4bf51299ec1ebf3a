"""Smoke test of the benchmark's synthetic tree generator, on about 100 files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from bench._synthetic import Spec, synthetic
from tests._util import need_root


def _files(root: Path) -> dict[str, tuple[int, int, int, int, bytes]]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    data = f.read()
                key = os.path.relpath(path, root)
                out[key] = (st.st_size, st.st_mode, st.st_uid, st.st_mtime_ns, data)
    return out


def test_synthetic_is_seeded_and_mostly_shared(tmp_path: Path) -> None:
    need_root()  # it chowns files to other users
    spec = Spec(guests=2, files_per_guest=50, seed=7)
    first = synthetic(spec, tmp_path / "a")
    again = synthetic(spec, tmp_path / "b")
    trees = [_files(first.source / g) for g in first.guests]
    assert [len(t) for t in trees] == [50, 50]
    assert trees == [_files(again.source / g) for g in again.guests]
    shared = [k for k in trees[0] if trees[0][k] == trees[1].get(k)]
    assert 40 <= len(shared) < 50
