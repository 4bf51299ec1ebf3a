"""Digests: the one-read path for small files gives exactly the digests of the long path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cowlink._hashing import (
    _CHUNK,
    WHOLE_SIZE,
    full_digest,
    head_and_full,
    head_digest,
    same_content,
)


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


def _fds(tmp_path: Path, a: bytes, b: bytes) -> tuple[int, int]:
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "b").write_bytes(b)
    return os.open(tmp_path / "a", os.O_RDONLY), os.open(tmp_path / "b", os.O_RDONLY)


@pytest.mark.parametrize("size", [0, 1, _CHUNK - 1, _CHUNK, _CHUNK + 1, 2 * _CHUNK, 2 * _CHUNK + 5])
def test_same_content_finds_any_differing_byte_and_any_extra_byte(
    tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    variants = {"equal": (data, True), "longer": (data + b"x", False)}
    for at in {0, size // 2, _CHUNK - 1, _CHUNK, size - 1}:
        if 0 <= at < size:
            flipped = bytearray(data)
            flipped[at] ^= 0xFF
            variants[f"byte {at}"] = (bytes(flipped), False)
    for what, (other, expected) in variants.items():
        fd_a, fd_b = _fds(tmp_path, data, other)
        try:
            assert same_content(fd_a, fd_b, size) is expected, what
            assert same_content(fd_b, fd_a, size) is expected, what
        finally:
            os.close(fd_a)
            os.close(fd_b)
