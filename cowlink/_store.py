"""The content-addressed store: object names, link keys, and safe temporary names.

An object is one immutable inode per (content, link key). Its name is

    HOME/store/ab/<rest of the 32-hex content digest>-<16-hex key digest>-<slot>

fanned out as VServer's vhashify does, by the digest's first byte. vhashify uses two
levels (ab/cd/); one is enough for ext4's hashed directories (a million objects are
4,000 per directory) and saves a first run one mkdir per object, each ~0.2 ms here.

A name only proposes a match: before anything is linked, the object's content is compared
byte by byte and its link key is
read from the object itself. When an object reaches the link limit, the next file with
the same content and key becomes the object of the next slot.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import re
import secrets
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from . import _linux
from ._hashing import key_digest

_XATTR_CHUNK = struct.Struct("<I")


@dataclass(frozen=True)
class LinkKey:
    """Everything besides content that two files must share to become one inode."""

    mode: int
    uid: int
    gid: int
    mtime_ns: int | None  # None under --ignore-mtime
    xattrs: tuple[tuple[str, bytes], ...]

    def packed(self) -> bytes:
        parts = [
            struct.pack(
                "<IIIq?",
                self.mode,
                self.uid,
                self.gid,
                self.mtime_ns or 0,
                self.mtime_ns is not None,
            )
        ]
        for name, value in self.xattrs:
            raw = name.encode()
            parts += [_XATTR_CHUNK.pack(len(raw)), raw, _XATTR_CHUNK.pack(len(value)), value]
        return b"".join(parts)

    def digest(self) -> str:
        return key_digest(self.packed())


def read_xattrs(fd: int) -> tuple[tuple[str, bytes], ...]:
    """Every extended attribute of the open file, sorted: security.*, system.*, trusted.*, user.*"""
    names = os.listxattr(fd)
    return tuple(sorted((name, os.getxattr(fd, name)) for name in names))


def read_key(fd: int, st: os.stat_result, *, ignore_mtime: bool) -> LinkKey:
    return LinkKey(
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=None if ignore_mtime else st.st_mtime_ns,
        xattrs=read_xattrs(fd),
    )


def object_name(full_digest: bytes, key: LinkKey, slot: int) -> str:
    hexd = full_digest.hex()
    return f"{hexd[:2]}/{hexd[2:]}-{key.digest()}-{slot}"


_OBJECT_NAME = re.compile(r"[0-9a-f]{2}/[0-9a-f]{30}-[0-9a-f]{16}-[0-9]+")


def is_object_name(name: str) -> bool:
    return _OBJECT_NAME.fullmatch(name) is not None


def parse_object_name(name: str) -> tuple[bytes, str, int]:
    """(content digest, key digest, slot) of a well-formed object name."""
    path, key_hex, slot = name.rsplit("-", 2)
    return bytes.fromhex(path.replace("/", "")), key_hex, int(slot)


class TempNames:
    """Temporary names that cowlink, and only cowlink, can recognise later.

    A leftover temporary name (after kill -9 or a power cut) is removed by the next run.
    The name carries a MAC under the home's secret key, so a guest cannot make cowlink
    remove a file of its own by giving it a name that looks like ours.
    """

    PREFIX = b".cowlink-"

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, nonce: bytes) -> bytes:
        # Keyed BLAKE2 is a MAC by design, and much cheaper per name than hmac.new().
        return hashlib.blake2b(nonce, key=self._secret, digest_size=8).hexdigest().encode()

    def make(self) -> bytes:
        nonce = secrets.token_hex(8).encode()
        return self.PREFIX + nonce + b"-" + self._mac(nonce)

    def is_ours(self, name: bytes) -> bool:
        if not name.startswith(self.PREFIX) or len(name) != len(self.PREFIX) + 33:
            return False
        nonce, _, mac = name[len(self.PREFIX) :].partition(b"-")
        return hmac.compare_digest(mac, self._mac(nonce))


class InUseForWriting(OSError):
    """Someone holds the inode open for writing, so it cannot be thawed safely."""


@contextmanager
def thawed(fd: int, *, lease: bool = True) -> Iterator[None]:
    """Clear an object's immutable flag for the moment a name must be added or removed.

    A name of an immutable inode can be neither linked, renamed nor unlinked. The flag is
    cleared only while we hold a read lease on `fd` (open read-only): the lease cannot be
    had while anyone has the inode open for writing, and while it is held any open for
    writing waits for us. A writer that got through meanwhile finds the flag set again
    when we let it go, and the kernel refuses its writes. So the content is never
    writable, even for a moment. Pass lease=False when the caller already holds one.

    Raises:
        InUseForWriting: someone has the inode open for writing.
    """
    if lease:
        try:
            _linux.take_read_lease(fd)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise InUseForWriting(exc.errno, "the file is open for writing") from None
            raise
    try:
        flagged = _linux.is_immutable(fd)
        if flagged:
            _linux.set_immutable(fd, False)
        try:
            yield
        finally:
            if flagged:
                _linux.set_immutable(fd, True)
    finally:
        if lease:
            _linux.release_lease(fd)
