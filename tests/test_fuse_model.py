"""Model-based test: one seeded random sequence on a mounted unified guest and on a plain copy.

The plain copy is the guest as it was before unification, on ext4. Every operation's
result (value or errno) must be the same on both sides, and so must the final trees:
contents, modes, owners, sizes, xattrs, link counts and which names are one file.
COWLINK_MODEL_OPS and COWLINK_MODEL_SEED scale and vary it (bench/ runs thousands).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import mmap
import os
import random
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from cowlink import _linux
from cowlink._catalogue import Catalogue
from tests._mounts import Guests, make_guests, mounted
from tests._util import manifest, need_fuse, need_immutable

OPS = int(os.environ.get("COWLINK_MODEL_OPS", "400"))
SEED = int(os.environ.get("COWLINK_MODEL_SEED", "20261126"))

FILES = {
    "d1/a": b"alpha\n" * 300,
    "d1/b": b"beta\n" * 3000,
    "d1/c": b"GPL\n" * 40,
    "d2/c": b"GPL\n" * 40,
    "d2/e": bytes(range(256)) * 64,
    "d2/f": b"f" * 5000,
}
LINKS = [("d1/a", "d2/a-link")]
NAMES = [
    *FILES,
    "d2/a-link",
    "d1/n1",
    "d1/n2",
    "d2/n3",
    "d2/n4",
    "d1/s",
    "d2/s",
    "d1/s/k",
    "d1",
    "d3",
]


AT = _linux.AT_FDCWD

# fmt: off
KINDS = [
    "write", "write", "read", "truncate", "mmap", "rename", "link", "unlink",
    "chmod", "chown", "utime", "setxattr", "open", "open", "close", "hwrite",
    "hread", "hread", "ftruncate", "fsync", "stat", "create",
    "mkdir", "rmdir", "symlink", "readlink", "listdir", "lstat", "exchange", "dirmove",
]
# fmt: on


class Side:
    """One tree the operations are applied to, with its open handles by slot."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fds: dict[int, int] = {}

    def p(self, name: str) -> str:
        return str(self.root / name)

    def close_all(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _result(fn: Callable[[], object]) -> tuple[str, object]:
    try:
        return ("ok", fn())
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, exc.errno))


def _stat(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size)


def _mmap_write(path: str, off: int, data: bytes) -> int:
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        off %= size
        data = data[: size - off]
        with mmap.mmap(fd, size) as m:
            m[off : off + len(data)] = data
            m.flush()
        return len(data)
    finally:
        os.close(fd)


def _step(rng: random.Random) -> Callable[[Side], object]:
    """One random operation, as a function of the side it runs on."""
    name, other = rng.choice(NAMES), rng.choice(NAMES)
    slot = rng.randrange(4)
    off = rng.randrange(0, 20000)
    data = rng.randbytes(rng.randrange(1, 3000))
    kind = rng.choice(KINDS)

    def run(s: Side) -> object:
        if kind == "write":
            fd = os.open(s.p(name), os.O_WRONLY)
            try:
                return os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        if kind == "read":
            with open(s.p(name), "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        if kind == "truncate":
            os.truncate(s.p(name), off // 2)
            return None
        if kind == "mmap":
            return _mmap_write(s.p(name), off, data)
        if kind == "rename":
            os.rename(s.p(name), s.p(other))
            return None
        if kind == "link":
            os.link(s.p(name), s.p(other))
            return None
        if kind == "unlink":
            os.unlink(s.p(name))
            return None
        if kind == "chmod":
            os.chmod(s.p(name), rng_mode)
            return None
        if kind == "chown":
            os.chown(s.p(name), off % 3 * 1000, -1)
            return None
        if kind == "utime":
            os.utime(s.p(name), ns=(off * 10**9, off * 10**9 + 1))
            return None
        if kind == "setxattr":
            os.setxattr(s.p(name), f"user.k{off % 3}", data[:20])
            return None
        if kind == "create":
            fd = os.open(s.p(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
            os.close(fd)
            return None
        if kind == "exchange":  # renameat2(RENAME_EXCHANGE): names, or the two directories
            a, b = ("d1", "d2") if off % 2 else (name, other)
            _linux.rename_at(AT, s.p(a).encode(), AT, s.p(b).encode(), _linux.RENAME_EXCHANGE)
            return None
        if kind == "dirmove":  # a directory of shared files moves away and back
            os.rename(s.p("d1"), s.p("d3"))
            os.rename(s.p("d3"), s.p("d1"))
            return None
        if kind == "mkdir":
            os.mkdir(s.p(name), 0o750)
            return None
        if kind == "rmdir":
            os.rmdir(s.p(name))
            return None
        if kind == "symlink":
            os.symlink(f"../{other}", s.p(name))
            return None
        if kind == "readlink":
            return os.readlink(s.p(name))
        if kind == "listdir":
            return sorted(os.listdir(os.path.dirname(s.p(name))))
        if kind == "lstat":
            st = os.lstat(s.p(name))
            return _stat(st) if not stat.S_ISDIR(st.st_mode) else st.st_mode
        if kind == "open":
            if slot in s.fds:
                os.close(s.fds.pop(slot))
            flags = [os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND, os.O_RDONLY][slot]
            s.fds[slot] = os.open(s.p(name), flags)
            return None
        if slot not in s.fds:
            return "no handle"
        fd = s.fds[slot]
        if kind == "close":
            os.close(s.fds.pop(slot))
            return None
        if kind == "hwrite":
            return os.pwrite(fd, data, off) if slot != 2 else os.write(fd, data)
        if kind == "hread":
            return hashlib.sha256(os.pread(fd, 30000, 0)).hexdigest()
        if kind == "ftruncate":
            os.ftruncate(fd, off // 3)
            return None
        if kind == "fsync":
            os.fsync(fd)
            return None
        return _stat(os.fstat(fd))

    rng_mode = rng.choice([0o600, 0o644, 0o755, 0o4755, 0o400])
    run.__qualname__ = f"{kind}({name}, {other}, slot={slot}, off={off})"
    return run


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    """What the guest sees: manifest without mtimes, plus link counts and link partitions."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, list[str]] = {}
    for rel, entry in manifest(root).items():
        st = os.lstat(root / os.fsdecode(rel))
        key = os.fsdecode(rel)
        out[key] = (*entry[:5], entry[6], st.st_nlink)
        if stat.S_ISREG(st.st_mode):
            inodes.setdefault(st.st_ino, []).append(key)
    for names in inodes.values():
        for n in names:
            out[n] = (*out[n], tuple(sorted(names)))
    return out


@pytest.mark.parametrize("writeback", [True, False], ids=["writeback", "no-writeback"])
def test_random_operations_match_ext4(tmp_path: Path, writeback: bool) -> None:
    need_fuse()
    need_immutable()
    g: Guests = make_guests(tmp_path, FILES, links=LINKS)
    store = g.store_state()
    other = manifest(g.roots["g2"])
    rng = random.Random(SEED + writeback)
    extra = (() if writeback else ("--no-writeback",)) + tuple(
        os.environ.get("MODEL_DEBUG", "").split()
    )
    with mounted(g.home, g.roots["g1"], tmp_path / "mnt", *extra) as mnt:
        model, real = Side(g.plain), Side(mnt)
        succeeded = 0
        try:
            for i in range(OPS):
                step = _step(rng)
                want = _result(functools.partial(step, model))
                got = _result(functools.partial(step, real))
                assert got == want, f"op {i} {step.__qualname__}: mount {got}, ext4 {want}"
                succeeded += got[0] == "ok"
        finally:
            model.close_all()
            real.close_all()
        assert _tree(mnt) == _tree(g.plain)
        assert succeeded > OPS // 4, f"only {succeeded} of {OPS} operations did anything"
    after = g.store_state()
    assert {k: v[:2] for k, v in after.items()} == {k: v[:2] for k, v in store.items()}
    assert manifest(g.roots["g2"]) == other
    # The catalogue still records exactly the guest's names that lead to store objects.
    with Catalogue.open(g.home / "catalogue.sqlite") as cat:
        objects = {(o.dev, o.ino) for o in cat.objects()}
        for path in cat.names(str(g.roots["g1"])):
            st = os.lstat(os.fsdecode(os.fsencode(g.roots["g1"]) + path))
            assert (st.st_dev, st.st_ino) in objects, path
