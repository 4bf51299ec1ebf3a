"""Content digests (xxh3-128) and byte-for-byte comparison: the only module that imports xxhash.

A digest only proposes a match. Nothing is linked on a digest alone: `same_content`
compares the bytes just before linking, because a guest can craft a collision.
"""

from __future__ import annotations

import os
from typing import NewType

import xxhash

Digest = NewType("Digest", bytes)

HEAD_SIZE = 4096
#: Files up to this size are read whole at once: both digests from one read cost about
#: what the head alone does, and spare a second open when the full digest is wanted.
WHOLE_SIZE = 64 * 1024
#: Large files are read in pieces this big: it fits the CPU's cache, and a lane holds
#: at most two at a time.
_CHUNK = 256 * 1024


def digest_bytes(data: bytes) -> Digest:
    return Digest(xxhash.xxh3_128_digest(data))


def head_digest(fd: int, size: int) -> Digest:
    """Digest of the first HEAD_SIZE bytes; for a file no larger, this is its full digest."""
    return digest_bytes(os.pread(fd, HEAD_SIZE, 0))


def head_and_full(fd: int, size: int) -> tuple[Digest, Digest]:
    """`head_digest` and `full_digest` of a file of at most WHOLE_SIZE bytes, in one read.

    Raises:
        ValueError: the file is no longer `size` bytes long.
    """
    data = os.pread(fd, size + 1, 0)
    if len(data) != size:
        raise ValueError("file changed size while being read")
    full = digest_bytes(data)
    return (digest_bytes(data[:HEAD_SIZE]) if size > HEAD_SIZE else full), full


def full_digest(fd: int, size: int) -> Digest:
    """Digest of the whole file, read from offset 0 through `fd` (its position is not used).

    Raises:
        ValueError: the file is no longer `size` bytes long.
    """
    if size <= HEAD_SIZE:
        data = os.pread(fd, HEAD_SIZE + 1, 0)
        if len(data) != size:
            raise ValueError("file changed size while being read")
        return digest_bytes(data)
    hasher = xxhash.xxh3_128()
    buf = bytearray(min(_CHUNK, size))
    view = memoryview(buf)
    offset = 0
    while True:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            break
        hasher.update(view[:n])
        offset += n
    if offset != size:
        raise ValueError("file changed size while being read")
    return Digest(hasher.digest())


def same_content(fd_a: int, fd_b: int, size: int) -> bool:
    """Compare two files byte by byte over `size` bytes, and check neither is longer."""
    offset = 0
    whole = size - size % _CHUNK
    if whole:
        # Reused buffers: a fresh 256 KiB bytes object per read costs page faults, and
        # whole buffers compare with memcmp where memoryview slices would go byte by byte.
        buf_a, buf_b = bytearray(_CHUNK), bytearray(_CHUNK)
        view_a, view_b = memoryview(buf_a), memoryview(buf_b)
        while offset < whole:
            if os.preadv(fd_a, [view_a], offset) != _CHUNK:
                return False
            if os.preadv(fd_b, [view_b], offset) != _CHUNK or buf_a != buf_b:
                return False
            offset += _CHUNK
    if offset < size:
        a = os.pread(fd_a, size - offset, offset)
        if len(a) != size - offset or a != os.pread(fd_b, size - offset, offset):
            return False
    return os.pread(fd_a, 1, size) == b"" and os.pread(fd_b, 1, size) == b""


def key_digest(data: bytes) -> str:
    """A short hex name for a link key (mode, owner, xattrs, mtime): part of the object name."""
    return xxhash.xxh3_64_hexdigest(data)
