"""Test helpers: capability probes, privileged-test gating, tree manifests, loop-device images."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_PRIVILEGED = os.environ.get("COWLINK_REQUIRE_PRIVILEGED") == "1"


def need(condition: bool, why: str) -> None:
    """Skip the test unless `condition`; under COWLINK_REQUIRE_PRIVILEGED=1, fail instead.

    CI sets that variable, so a green CI means every privileged test really ran.
    """
    if condition:
        return
    if REQUIRE_PRIVILEGED:
        pytest.fail(f"privileged test cannot run: {why}", pytrace=False)
    pytest.skip(why)


@functools.lru_cache
def is_root() -> bool:
    return os.geteuid() == 0


@functools.lru_cache
def can_set_immutable() -> bool:
    """Probe CAP_LINUX_IMMUTABLE and flag support on the filesystem tests use."""
    from cowlink import _linux

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "probe")
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
        try:
            _linux.set_immutable(fd, True)
            _linux.set_immutable(fd, False)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)


def need_root() -> None:
    need(is_root(), "needs root")


def need_immutable() -> None:
    need(is_root() and can_set_immutable(), "needs root and immutable-flag support")


def need_loop() -> None:
    need(
        is_root() and shutil.which("mkfs.ext4") is not None and os.path.exists("/dev/loop-control"),
        "needs root, mkfs.ext4 and loop devices",
    )


def need_fuse() -> None:
    need(
        is_root() and os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None,
        "needs root, /dev/fuse and fusermount3",
    )


def file_digest(path: str | bytes | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))


def manifest(root: str | Path) -> dict[bytes, tuple[object, ...]]:
    """What a guest sees of every path under `root`: type, content, mode, owner, mtime, xattrs.

    Link counts and inode numbers are left out: unification changes those on purpose.
    """
    out: dict[bytes, tuple[object, ...]] = {}
    root_b = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(root_b):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root_b)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                content: object = file_digest(full)
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                content = st.st_rdev
            else:
                content = None
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            out[rel] = (
                kind,
                content,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                mtime,
                _xattrs(full.decode("utf-8", "surrogateescape")),
            )
    return out


def assert_same_manifest(
    before: dict[bytes, tuple[object, ...]], root: str | Path, *, allow_temp_names: bool = False
) -> None:
    """Every path as before. With `allow_temp_names`, cowlink's leftover temporary names
    (which an interrupted run may leave and the next run removes) are not counted."""
    after = manifest(root)
    if allow_temp_names:
        after = {p: v for p, v in after.items() if not os.path.basename(p).startswith(b".cowlink-")}
    missing = sorted(set(before) - set(after))
    added = sorted(set(after) - set(before))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    assert not missing, f"paths lost: {missing[:10]}"
    assert not added, f"paths added: {added[:10]}"
    assert not changed, f"paths changed: {[(p, before[p], after[p]) for p in changed[:5]]}"


def clear_immutable_tree(root: str | Path) -> None:
    """Clear immutable flags below `root` so that a temporary tree can be deleted."""
    if not os.path.exists(root):
        return
    subprocess.run(
        ["chattr", "-R", "-f", "-i", "-a", os.fspath(root)],
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def loop_ext4(size_mb: int, workdir: Path, *, inodes: int | None = None) -> Iterator[Path]:
    """A fresh ext4 filesystem on a loop device, mounted under `workdir`; always torn down."""
    image = workdir / "fs.img"
    mnt = workdir / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    mkfs = ["mkfs.ext4", "-q", "-F", "-O", "^has_journal"]
    if inodes:
        mkfs += ["-N", str(inodes)]
    subprocess.run([*mkfs, str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        clear_immutable_tree(mnt)
        subprocess.run(["umount", "-l", str(mnt)], check=False)
