"""`cowlink split`: private copies that keep everything a guest sees, and unify undoes them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cowlink import _linux
from cowlink._catalogue import Catalogue
from tests._guests import MTIME_NS, cowlink, make_guests, same_inode, store_objects, write
from tests._util import assert_same_manifest, manifest, need_immutable

pytestmark = pytest.mark.privileged

FILES = {
    "usr/bin/tool": b"#!/bin/sh\necho tool\n" * 300,
    "usr/lib/libx.so": os.urandom(70_000),
    "usr/share/doc/copyright": b"GPL" * 1000,
    "usr/share/c1": b"C" * 4000,
}
CAP = bytes.fromhex("01000002") + (1 << 13).to_bytes(4, "little") + bytes(12)


@pytest.fixture(autouse=True)
def _privileged() -> None:
    need_immutable()


def immutable(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _linux.is_immutable(fd)
    finally:
        os.close(fd)


def unified(home: Path) -> tuple[Path, Path]:
    """Two guests sharing FILES, a sparse file, a capability, an ACL and guest hardlinks."""
    a, b = make_guests(home, FILES)
    for root in (a, b):
        sparse = root / "var-lib/sparse.img"
        sparse.parent.mkdir(parents=True)
        with open(sparse, "wb") as f:
            f.truncate(32 << 20)
            f.seek(1 << 20)
            f.write(b"data" * 1024)
        os.utime(sparse, ns=(MTIME_NS, MTIME_NS))
        os.setxattr(root / "usr/bin/tool", "security.capability", CAP)
        subprocess.run(["setfacl", "-m", "u:1234:r", str(root / "usr/lib/libx.so")], check=True)
        os.utime(root / "usr/lib/libx.so", ns=(MTIME_NS - 10**9, MTIME_NS))  # an old atime
        os.chown(root / "usr/share/doc/copyright", 1000, 1001)
        os.link(root / "usr/bin/tool", root / "usr/bin/tool-alias")
        write(root / "usr/share/c2", b"C" * 4000)  # same content, but a file of its own
    assert cowlink(home, "unify").exit_code == 0
    assert same_inode(a / "usr/bin/tool", b / "usr/bin/tool")
    return a, b


class Killed(BaseException):
    """Stands for SIGKILL: nothing in cowlink catches it, and its clean-up is disabled."""


def linked_to_store(home: Path, path: Path) -> bool:
    return os.lstat(path).st_ino in {os.lstat(o).st_ino for o in store_objects(home)}


def test_split_whole_guest_keeps_everything_it_sees(home: Path) -> None:
    a, b = unified(home)
    before = {r: manifest(r) for r in (a, b)}
    sparse_blocks = os.lstat(a / "var-lib/sparse.img").st_blocks
    atime = os.lstat(a / "usr/lib/libx.so").st_atime_ns
    objects = {o: os.lstat(o).st_nlink for o in store_objects(home)}

    result = cowlink(home, "split", "--json", str(a))

    assert result.exit_code == 0, result.stderr
    # Checked before anything reads the copy: a read moves atime (its ctime is newer).
    assert os.lstat(a / "usr/lib/libx.so").st_atime_ns == atime
    report = result.json
    assert report["files_split"] == 6  # tool (+alias), libx.so, copyright, c1, c2, sparse.img
    assert report["names_split"] == 7
    assert report["bytes_added"] > 70_000
    for root in (a, b):
        assert_same_manifest(before[root], root)
    for rel in (*FILES, "var-lib/sparse.img", "usr/bin/tool-alias", "usr/share/c2"):
        assert not linked_to_store(home, a / rel)
        assert not immutable(a / rel)
        assert linked_to_store(home, b / rel)
        assert immutable(b / rel)
    # One file to the guest stays one file; separate files stay separate.
    assert same_inode(a / "usr/bin/tool", a / "usr/bin/tool-alias")
    assert not same_inode(a / "usr/share/c1", a / "usr/share/c2")
    assert os.getxattr(a / "usr/bin/tool", "security.capability") == CAP
    acl = subprocess.run(
        ["getfacl", "-c", str(a / "usr/lib/libx.so")], capture_output=True, check=True
    )
    assert b"user:1234:r--" in acl.stdout
    assert os.lstat(a / "var-lib/sparse.img").st_blocks == sparse_blocks
    assert os.lstat(a / "usr/share/doc/copyright").st_uid == 1000
    for obj, nlink in objects.items():
        assert immutable(obj)
        assert os.lstat(obj).st_nlink < nlink
    with Catalogue.open(home / "catalogue.sqlite") as cat:
        assert cat.names(os.path.realpath(a)) == {}
        assert len(cat.names(os.path.realpath(b))) == 7
    assert not [n for n in os.listdir(a / "usr/bin") if n.startswith(".cowlink-")]


def test_split_some_paths_moves_whole_link_groups(home: Path) -> None:
    a, _b = unified(home)
    before = manifest(a)

    report = cowlink(home, "split", "--json", str(a), "/usr/bin/tool-alias", "usr/share/doc").json

    assert report["files_split"] == 2
    assert report["names_split"] == 3
    assert not linked_to_store(home, a / "usr/bin/tool")  # the alias's other name
    assert same_inode(a / "usr/bin/tool", a / "usr/bin/tool-alias")
    assert not linked_to_store(home, a / "usr/share/doc/copyright")
    assert linked_to_store(home, a / "usr/lib/libx.so")
    assert linked_to_store(home, a / "usr/share/c1")
    assert_same_manifest(before, a)


def test_dry_run_changes_nothing(home: Path) -> None:
    a, _b = unified(home)
    inodes = {rel: os.lstat(a / rel).st_ino for rel in FILES}

    report = cowlink(home, "split", "--dry-run", "--json", str(a)).json

    assert report["files_split"] == 6
    assert report["bytes_added"] > 70_000
    assert {rel: os.lstat(a / rel).st_ino for rel in FILES} == inodes


def test_unify_after_split_relinks_and_loses_nothing(home: Path) -> None:
    a, b = unified(home)
    before = {r: manifest(r) for r in (a, b)}
    cowlink(home, "split", str(a))

    report = cowlink(home, "unify", "--json").json

    assert report["errors"] == []
    assert report["objects_created"] == 0
    assert report["files_linked"] == 7
    for rel in (*FILES, "var-lib/sparse.img"):
        assert same_inode(a / rel, b / rel)
    assert same_inode(a / "usr/bin/tool", a / "usr/bin/tool-alias")
    for root in (a, b):
        assert_same_manifest(before[root], root)


def test_too_little_space_is_refused_before_anything_changes(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _b = unified(home)
    inodes = {rel: os.lstat(a / rel).st_ino for rel in FILES}
    real = os.statvfs(a)

    def tiny(fd: int) -> os.statvfs_result:
        fields = list(real)
        fields[4] = 10  # f_bavail: ten blocks
        return os.statvfs_result(fields)

    monkeypatch.setattr("cowlink._copy.os.fstatvfs", tiny)
    result = cowlink(home, "split", str(a))

    assert result.exit_code == 2
    assert "not enough free space" in result.stderr
    assert "nothing was changed" in result.stderr
    assert {rel: os.lstat(a / rel).st_ino for rel in FILES} == inodes


def test_an_interrupted_group_is_finished_with_one_copy(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between the renames of a group's names: the rerun joins the rest to the copy."""
    a, _b = unified(home)
    before = manifest(a)
    real_rename = os.rename
    calls = []

    def rename_then_die(*args: object, **kwargs: object) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise Killed()
        real_rename(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("cowlink._copy.os.rename", rename_then_die)
    monkeypatch.setattr("cowlink._copy._unlink_quietly", lambda ref: None)
    with pytest.raises(Killed):
        cowlink(home, "split", str(a), "/usr/bin/tool")
    monkeypatch.undo()
    assert not same_inode(a / "usr/bin/tool", a / "usr/bin/tool-alias")
    assert [n for n in os.listdir(a / "usr/bin") if n.startswith(".cowlink-")]

    result = cowlink(home, "split", "--json", str(a))

    assert result.exit_code == 0, result.stderr
    assert same_inode(a / "usr/bin/tool", a / "usr/bin/tool-alias")
    assert not linked_to_store(home, a / "usr/bin/tool")
    assert not [n for n in os.listdir(a / "usr/bin") if n.startswith(".cowlink-")]
    assert_same_manifest(before, a)


def test_a_path_that_does_not_exist_is_a_usage_error(home: Path) -> None:
    a, _b = unified(home)
    result = cowlink(home, "split", str(a), "/no/such/path")
    assert result.exit_code == 2
    assert "no such path" in result.stderr


def test_make_private_is_the_shared_copy_routine(home: Path) -> None:
    """What the FUSE layer calls on a guest's first write: one copy per link group."""
    from cowlink._copy import NameRef, make_private
    from cowlink._home import Home
    from cowlink._store import TempNames

    a, b = unified(home)
    obj = os.lstat(b / "usr/bin/tool")
    blocks = os.lstat(a / "var-lib/sparse.img").st_blocks
    temp_names = TempNames(Home(home).secret())
    bin_fd = os.open(a / "usr/bin", os.O_RDONLY | os.O_DIRECTORY)
    share_fd = os.open(a / "usr/share", os.O_RDONLY | os.O_DIRECTORY)
    lib_fd = os.open(a / "var-lib", os.O_RDONLY | os.O_DIRECTORY)
    try:
        copy = make_private(
            bin_fd,
            b"tool",
            # c2 is another file (another inode): not part of this group, so left alone.
            others=[NameRef(bin_fd, b"tool-alias"), NameRef(share_fd, b"c2")],
            temp_names=temp_names,
            fsync=True,
        )
        sparse = make_private(lib_fd, b"sparse.img", temp_names=temp_names)
    finally:
        for fd in (bin_fd, share_fd, lib_fd):
            os.close(fd)

    assert [r.name for r in copy.replaced] == [b"tool", b"tool-alias"]
    assert [r.name for r in copy.skipped] == [b"c2"]
    assert same_inode(a / "usr/bin/tool", a / "usr/bin/tool-alias")
    assert os.lstat(a / "usr/bin/tool").st_ino == copy.st.st_ino != obj.st_ino
    assert os.lstat(b / "usr/bin/tool").st_nlink == obj.st_nlink - 2
    assert immutable(b / "usr/bin/tool")
    assert not immutable(a / "usr/bin/tool")
    assert (a / "usr/bin/tool").read_bytes() == FILES["usr/bin/tool"]
    assert sparse.st.st_blocks == blocks
    with open(a / "usr/bin/tool", "ab") as f:  # the copy is the guest's own to write
        f.write(b"more")
    assert (b / "usr/bin/tool").read_bytes() == FILES["usr/bin/tool"]
