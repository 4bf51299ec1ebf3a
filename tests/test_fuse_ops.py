"""The request handlers without a kernel: await CowlinkOperations coroutines directly."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
from cowlink_fuse import CowlinkOperations
from cowlink_fuse._groups import SharedIndex

from cowlink._catalogue import Catalogue
from cowlink._store import TempNames
from tests._mounts import Guests, make_guests
from tests._util import need_immutable

CTX: Any = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)
FILES = {"usr/a": b"shared\n" * 10, "usr/x/c": b"GPL\n", "usr/y/c": b"GPL\n"}


def _fields(**kw: bool) -> Any:
    names = ("atime", "mtime", "ctime", "mode", "uid", "gid", "size")
    return SimpleNamespace(**{f"update_{n}": kw.get(n, False) for n in names})


@pytest.fixture
def guests(tmp_path: Path) -> Guests:
    need_immutable()
    return make_guests(tmp_path, FILES, links=[("usr/a", "usr/a2")])


@pytest.fixture
def ops(guests: Guests) -> Iterator[CowlinkOperations]:
    root = str(guests.roots["g1"])
    index = SharedIndex(Catalogue.open(guests.home / "catalogue.sqlite"), root)
    operations = CowlinkOperations(root, index, TempNames(b"k" * 32))
    yield operations
    operations.close()


async def _walk(ops: CowlinkOperations, path: str) -> pyfuse3.EntryAttributes:
    ino = pyfuse3.ROOT_INODE
    attr = await ops.getattr(ino, CTX)
    for part in path.split("/"):
        attr = await ops.lookup(ino, part.encode(), CTX)
        ino = attr.st_ino
    return attr


async def test_guest_link_counts_and_separate_files(ops: CowlinkOperations) -> None:
    a, a2 = await _walk(ops, "usr/a"), await _walk(ops, "usr/a2")
    assert a.st_ino == a2.st_ino
    assert a.st_nlink == 2  # the store's and g2's links are not the guest's business
    xc, yc = await _walk(ops, "usr/x/c"), await _walk(ops, "usr/y/c")
    assert xc.st_ino != yc.st_ino
    assert xc.st_nlink == yc.st_nlink == 1
    missing = await ops.lookup(pyfuse3.ROOT_INODE, b"nope", CTX)
    assert missing.st_ino == 0  # a cached negative entry


async def test_open_for_writing_breaks_the_whole_link_group(
    ops: CowlinkOperations, guests: Guests
) -> None:
    backing = guests.roots["g1"] / "usr/a"
    before = os.stat(backing)
    a = await _walk(ops, "usr/a")
    reader = await ops.open(a.st_ino, os.O_RDONLY, CTX)
    writer = await ops.open(a.st_ino, os.O_WRONLY, CTX)
    assert await ops.write(writer.fh, 0, b"SHARED") == 6
    assert await ops.read(reader.fh, 0, 6) == b"SHARED"  # the old handle follows
    await ops.fsync(writer.fh, False)
    for fh in (reader.fh, writer.fh):
        await ops.release(fh)
    after = os.stat(backing)
    assert after.st_ino != before.st_ino
    assert os.stat(guests.roots["g1"] / "usr/a2").st_ino == after.st_ino
    assert os.stat(guests.roots["g2"] / "usr/a").st_ino == before.st_ino
    assert (guests.roots["g2"] / "usr/a").read_bytes() == FILES["usr/a"]
    assert (await ops.getattr(a.st_ino, CTX)).st_nlink == 2
    assert ops.stats.breaks == 1


async def test_setattr_breaks_only_when_something_changes(ops: CowlinkOperations) -> None:
    a = await _walk(ops, "usr/a")
    same = await ops.setattr(a.st_ino, a, _fields(mtime=True, ctime=True), None, CTX)
    assert ops.stats.breaks == 0
    assert same.st_mtime_ns == a.st_mtime_ns
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = 0o100600
    changed = await ops.setattr(a.st_ino, attr, _fields(mode=True), None, CTX)
    assert changed.st_mode & 0o777 == 0o600
    assert ops.stats.breaks == 1


async def test_unlink_of_a_shared_name_keeps_the_store_link(
    ops: CowlinkOperations, guests: Guests
) -> None:
    obj = os.stat(guests.roots["g2"] / "usr/a")
    usr = await _walk(ops, "usr")
    await ops.unlink(usr.st_ino, b"a2", CTX)
    assert os.stat(guests.roots["g2"] / "usr/a").st_nlink == obj.st_nlink - 1
    assert (await _walk(ops, "usr/a")).st_nlink == 1
    with Catalogue.open(guests.home / "catalogue.sqlite") as cat:
        assert cat.group_of(str(guests.roots["g1"]), b"/usr/a2") is None


async def test_errors_are_fuse_errors(ops: CowlinkOperations) -> None:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getattr(12345, CTX)
    assert info.value.errno == errno.ESTALE
    usr = await _walk(ops, "usr")
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.mkdir(usr.st_ino, b"a", 0o755, CTX)
    assert info.value.errno == errno.EEXIST
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.rmdir(pyfuse3.ROOT_INODE, b"usr", CTX)
    assert info.value.errno == errno.ENOTEMPTY


async def test_created_entries_get_the_callers_owner_and_mode(
    ops: CowlinkOperations, guests: Guests
) -> None:
    ctx: Any = SimpleNamespace(uid=1000, gid=1001, pid=os.getpid(), umask=0)
    usr = await _walk(ops, "usr")
    info, attr = await ops.create(usr.st_ino, b"new", 0o104750, os.O_WRONLY | os.O_CREAT, ctx)
    await ops.release(info.fh)
    assert (attr.st_uid, attr.st_gid, attr.st_mode & 0o7777) == (1000, 1001, 0o4750)
    d = await ops.mkdir(usr.st_ino, b"dir", 0o40700, ctx)
    assert (d.st_uid, d.st_gid, d.st_mode & 0o7777) == (1000, 1001, 0o700)
    ln = await ops.symlink(usr.st_ino, b"ln", b"target", ctx)
    assert await ops.readlink(ln.st_ino, CTX) == b"target"
    st = os.lstat(guests.roots["g1"] / "usr/ln")
    assert (st.st_uid, st.st_gid) == (1000, 1001)


async def test_forget_releases_nodes(ops: CowlinkOperations) -> None:
    usr = await _walk(ops, "usr")
    a = await ops.lookup(usr.st_ino, b"a", CTX)
    count = len(ops.table)
    await ops.forget([(a.st_ino, 2)])  # _walk looked it up once, and we once more
    assert len(ops.table) == count - 1
