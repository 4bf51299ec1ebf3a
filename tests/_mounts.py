"""Helpers for FUSE tests: unified guest fixtures, mounting in a daemon, store checks."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cowlink import _linux
from cowlink._catalogue import Catalogue
from cowlink._hashing import full_digest

MTIME = 1_577_836_800  # 2020-01-01: identical files must share their mtime to be unified


def cowlink(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cowlink", "--home", str(home), *args],
        check=check,
        capture_output=True,
        text=True,
    )


def write(path: Path, data: bytes, *, mode: int = 0o644, xattrs: dict[str, bytes] | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    for name, value in (xattrs or {}).items():
        os.setxattr(path, name, value)
    os.utime(path, (MTIME, MTIME))


@dataclass
class Guests:
    """A home with guests unified against each other, and a plain copy of g1 from before."""

    home: Path
    roots: dict[str, Path]
    plain: Path

    def store_state(self) -> dict[str, tuple[bytes, bool, int]]:
        """Every store object: (digest as hashed now, immutable flag, link count)."""
        out: dict[str, tuple[bytes, bool, int]] = {}
        with Catalogue.open(self.home / "catalogue.sqlite") as cat:
            for row in cat.objects():
                fd = os.open(self.home / "store" / row.name, os.O_RDONLY | os.O_NOATIME)
                try:
                    st = os.fstat(fd)
                    digest = full_digest(fd, st.st_size)
                    assert digest == row.full, f"store object {row.name} no longer hashes right"
                    out[row.name] = (digest, _linux.is_immutable(fd), st.st_nlink)
                finally:
                    os.close(fd)
        return out


def make_guests(tmp: Path, files: dict[str, bytes], *, guests: int = 2, links=()) -> Guests:
    """Guests g1..gN each holding `files`; `links` are (existing, new) hardlinks in g1."""
    home = tmp / "home"
    roots = {}
    for i in range(1, guests + 1):
        root = tmp / f"g{i}"
        for rel, data in files.items():
            mode = 0o755 if "/bin/" in f"/{rel}" else 0o644
            write(root / rel, data, mode=mode, xattrs={"user.origin": b"debian"})
        roots[f"g{i}"] = root
    for existing, new in links:
        os.link(roots["g1"] / existing, roots["g1"] / new)
    plain = tmp / "plain"
    subprocess.run(["cp", "-a", str(roots["g1"]), str(plain)], check=True)
    cowlink(home, "unify", "--no-default-excludes", *map(str, roots.values()))
    return Guests(home, roots, plain)


@contextlib.contextmanager
def mounted(home: Path, root: Path, mnt: Path, *extra: str) -> Iterator[Path]:
    """`cowlink mount` in a background daemon; always unmounted afterwards."""
    mnt.mkdir(exist_ok=True)
    result = cowlink(home, "mount", *extra, str(root), str(mnt), check=False)
    assert result.returncode == 0, result.stderr
    try:
        yield mnt
    finally:
        if cowlink(home, "umount", str(mnt), check=False).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def stat_view(path: Path) -> tuple[int, int, int, int, int]:
    st = os.lstat(path)
    return (st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size)
