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
from tests._mounts import Guests, cowlink, make_guests, write
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


async def _listing(
    ops: CowlinkOperations, ino: int, monkeypatch: pytest.MonkeyPatch
) -> dict[bytes, pyfuse3.EntryAttributes]:
    """One readdir pass, as readdirplus hands it to the kernel."""
    entries: dict[bytes, pyfuse3.EntryAttributes] = {}

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        entries[name] = attr
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = await ops.opendir(ino, CTX)
    await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
    await ops.releasedir(fh)
    return entries


async def test_readdir_follows_every_change_made_through_the_mount(
    ops: CowlinkOperations, monkeypatch: pytest.MonkeyPatch
) -> None:
    usr = await _walk(ops, "usr")
    a = await _walk(ops, "usr/a")
    seen = await _listing(ops, usr.st_ino, monkeypatch)
    assert seen[b"a"].st_ino == seen[b"a2"].st_ino == a.st_ino
    assert seen[b"a"].st_nlink == 2
    info = await ops.open(a.st_ino, os.O_WRONLY, CTX)  # breaks the link group
    await ops.release(info.fh)
    seen = await _listing(ops, usr.st_ino, monkeypatch)
    assert seen[b"a"].st_ino == seen[b"a2"].st_ino == a.st_ino
    assert seen[b"a"].st_nlink == 2
    await ops.rename(usr.st_ino, b"a2", usr.st_ino, b"b", 0, CTX)
    seen = await _listing(ops, usr.st_ino, monkeypatch)
    assert b"a2" not in seen
    assert seen[b"b"].st_ino == a.st_ino
    await ops.unlink(usr.st_ino, b"b", CTX)
    created, attr = await ops.create(usr.st_ino, b"c", 0o100644, os.O_WRONLY | os.O_CREAT, CTX)
    await ops.release(created.fh)
    seen = await _listing(ops, usr.st_ino, monkeypatch)
    assert sorted(seen) == [b"a", b"c", b"x", b"y"]
    assert (seen[b"a"].st_ino, seen[b"a"].st_nlink) == (a.st_ino, 1)
    assert seen[b"c"].st_ino == attr.st_ino


async def test_a_file_unify_makes_a_store_object_meanwhile_is_shared_from_then_on(
    guests: Guests, ops: CowlinkOperations, monkeypatch: pytest.MonkeyPatch
) -> None:
    for root in guests.roots.values():
        write(root / "usr/late", b"late\n", xattrs={"user.origin": b"debian"})
    usr = await _walk(ops, "usr")
    before = await ops.lookup(usr.st_ino, b"late", CTX)
    assert (await _listing(ops, usr.st_ino, monkeypatch))[b"late"].st_ino == before.st_ino
    late = guests.roots["g1"] / "usr/late"
    ino = os.stat(late).st_ino
    cowlink(guests.home, "unify", "--no-default-excludes", *map(str, guests.roots.values()))
    # unify made g1's own inode the object: only the catalogue tells the daemon
    assert os.stat(late).st_ino == ino
    assert os.stat(late).st_nlink == 3  # g1, g2 and the store
    ops.index = SharedIndex(Catalogue.open(guests.home / "catalogue.sqlite"), ops.root)
    listed = (await _listing(ops, usr.st_ino, monkeypatch))[b"late"]
    looked_up = await ops.lookup(usr.st_ino, b"late", CTX)
    assert listed.st_ino == looked_up.st_ino
    assert looked_up.st_nlink == 1  # g2's link and the store's are not g1's business
    info = await ops.open(looked_up.st_ino, os.O_WRONLY | os.O_TRUNC, CTX)
    await ops.write(info.fh, 0, b"mine\n")
    await ops.release(info.fh)
    assert ops.stats.breaks == 1
    assert (guests.roots["g2"] / "usr/late").read_bytes() == b"late\n"
    assert late.read_bytes() == b"mine\n"


async def test_new_files_carry_no_capability_until_one_is_set(ops: CowlinkOperations) -> None:
    usr = await _walk(ops, "usr")
    info, attr = await ops.create(usr.st_ino, b"tool", 0o100755, os.O_WRONLY | os.O_CREAT, CTX)
    caps = b"security.capability"
    with pytest.raises(pyfuse3.FUSEError) as missing:
        await ops.getxattr(attr.st_ino, caps, CTX)
    assert missing.value.errno == pyfuse3.ENOATTR
    value = bytes.fromhex("0000000200200000000000000000000000000000")  # cap_net_raw+ep
    await ops.setxattr(attr.st_ino, caps, value, CTX)
    assert await ops.getxattr(attr.st_ino, caps, CTX) == value
    await ops.release(info.fh)


async def test_setattr_through_an_open_handle_reaches_an_unlinked_file(
    ops: CowlinkOperations,
) -> None:
    usr = await _walk(ops, "usr")
    info, attr = await ops.create(usr.st_ino, b"tmp", 0o100600, os.O_RDWR | os.O_CREAT, CTX)
    await ops.write(info.fh, 0, b"data")
    await ops.unlink(usr.st_ino, b"tmp", CTX)
    new = pyfuse3.EntryAttributes()
    new.st_mode, new.st_uid, new.st_gid = 0o100640, 1000, 1000
    new.st_atime_ns, new.st_mtime_ns = 0, 1_000_000_000
    fields = _fields(mode=True, uid=True, gid=True, mtime=True)
    out = await ops.setattr(attr.st_ino, new, fields, None, CTX)
    assert (out.st_mode & 0o7777, out.st_uid, out.st_gid) == (0o640, 1000, 1000)
    assert out.st_mtime_ns == 1_000_000_000
    assert out.st_atime_ns == attr.st_atime_ns  # only what was asked for changes
    size = pyfuse3.EntryAttributes()
    size.st_size = 2
    assert (await ops.setattr(attr.st_ino, size, _fields(size=True), None, CTX)).st_size == 2
    assert await ops.read(info.fh, 0, 10) == b"da"
    await ops.release(info.fh)


async def test_directory_handles_sync_and_list_without_reading_first(
    ops: CowlinkOperations, monkeypatch: pytest.MonkeyPatch
) -> None:
    usr = await _walk(ops, "usr")
    fh = await ops.opendir(usr.st_ino, CTX)
    await ops.fsyncdir(fh, False)
    await ops.releasedir(fh)
    await ops.releasedir(await ops.opendir(usr.st_ino, CTX))  # never read: nothing to close
    assert sorted(await _listing(ops, usr.st_ino, monkeypatch)) == [b"a", b"a2", b"x", b"y"]
