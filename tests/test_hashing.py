"""Digests: the one-read path for small files gives exactly the digests of the long path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cowlink._hashing import WHOLE_SIZE, full_digest, head_and_full, head_digest


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 65535, WHOLE_SIZE])
def test_head_and_full_match_the_separate_digests(tmp_path: Path, size: int) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(size))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert head_and_full(fd, size) == (head_digest(fd, size), full_digest(fd, size))
        with pytest.raises(ValueError, match="changed size"):
            head_and_full(fd, size + 1)
    finally:
        os.close(fd)
