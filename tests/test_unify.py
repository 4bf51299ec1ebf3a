"""`cowlink unify`: what may be linked, how, and that no guest's data ever changes."""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from cowlink import _linux
from tests._guests import MTIME_NS, cowlink, make_guests, same_inode, store_objects, write
from tests._util import assert_same_manifest, loop_ext4, manifest, need_immutable, need_loop

pytestmark = pytest.mark.privileged

BIN = {
    "usr/bin/tool": b"#!/bin/sh\necho tool\n" * 300,
    "usr/lib/libx.so": os.urandom(70_000),
    "usr/share/doc/x/copyright": b"GPL" * 1000,
}


def immutable(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _linux.is_immutable(fd)
    finally:
        os.close(fd)


@pytest.fixture(autouse=True)
def _privileged() -> None:
    need_immutable()


def test_identical_files_become_one_immutable_store_object(home: Path) -> None:
    a, b = make_guests(home, BIN)
    before = {r: manifest(r) for r in (a, b)}
    blocks = sum(os.lstat(b / rel).st_blocks for rel in BIN) * 512

    result = cowlink(home, "unify", "--json")

    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["files_linked"] == 3
    assert report["objects_created"] == 3
    assert report["bytes_saved"] == blocks
    assert report["errors"] == []
    objects = store_objects(home)
    assert len(objects) == 3
    for rel in BIN:
        assert same_inode(a / rel, b / rel)
        assert os.lstat(a / rel).st_nlink == 3  # two guests and the store
        assert immutable(a / rel)
    for root in (a, b):
        assert_same_manifest(before[root], root)
    assert stat.S_IMODE(os.stat(home / "store").st_mode) == 0o700


def test_rerun_changes_nothing_and_counts_links(home: Path) -> None:
    a, _b = make_guests(home, BIN)
    cowlink(home, "unify")
    before = manifest(a)

    report = cowlink(home, "unify", "--json").json

    assert report["files_linked"] == 0
    assert report["objects_created"] == 0
    assert report["already_linked"] == 6
    assert report["files_hashed"] == 0
    assert_same_manifest(before, a)


def test_rerun_trusts_recorded_digests_only_while_the_stat_is_unchanged(home: Path) -> None:
    a, b = make_guests(home, BIN)
    # Same size as a shared file, different bytes: hashed, never linked.
    lookalike = write(a / "usr/bin/other", b"#!/bin/sh\necho TOOL\n" * 300)
    time.sleep(2.2)  # digests of files changed in the last 2 s are not kept (racy)
    assert cowlink(home, "unify", "--json").json["files_linked"] == 3

    assert cowlink(home, "unify", "--json").json["files_hashed"] == 0

    write(lookalike, b"#!/bin/sh\necho tool\n" * 300)  # now a duplicate: hashed again
    report = cowlink(home, "unify", "--json").json
    assert report["files_hashed"] == 1
    assert report["files_linked"] == 1
    assert same_inode(lookalike, b / "usr/bin/tool")


def test_a_third_guest_links_to_the_existing_object(home: Path) -> None:
    a, _ = make_guests(home, BIN)
    cowlink(home, "unify")
    (c,) = make_guests(home, BIN, guests=("c",))

    report = cowlink(home, "unify", "--json").json

    assert report["objects_created"] == 0
    assert report["files_linked"] == 3
    for rel in BIN:
        assert same_inode(a / rel, c / rel)
        assert os.lstat(c / rel).st_nlink == 4


@pytest.mark.parametrize(
    "difference",
    ["mode", "owner", "group", "mtime", "user_xattr", "capability", "acl", "trusted_xattr"],
)
def test_files_that_differ_only_in_metadata_stay_apart(home: Path, difference: str) -> None:
    a, b = make_guests(home, {"usr/bin/prog": b"\x7fELF" + b"x" * 9000})
    target = b / "usr/bin/prog"
    if difference == "mode":
        os.chmod(target, 0o755)
    elif difference == "owner":
        os.chown(target, 1000, -1)
    elif difference == "group":
        os.chown(target, -1, 1000)
    elif difference == "mtime":
        os.utime(target, ns=(MTIME_NS, MTIME_NS + 1))
    elif difference == "user_xattr":
        os.setxattr(target, "user.note", b"b")
    elif difference == "trusted_xattr":
        os.setxattr(target, "trusted.note", b"b")
    elif difference == "capability":
        # `setcap cap_net_raw+ep`: VFS_CAP_REVISION_2, permitted+effective bit 13.
        cap = bytes.fromhex("01000002") + (1 << 13).to_bytes(4, "little") + bytes(12)
        os.setxattr(target, "security.capability", cap)
    elif difference == "acl":
        subprocess.run(["setfacl", "-m", "u:1234:r", str(target)], check=True)
    before = {r: manifest(r) for r in (a, b)}

    report = cowlink(home, "unify", "--json").json

    assert report["files_linked"] == 0
    assert not same_inode(a / "usr/bin/prog", target)
    for root in (a, b):
        assert_same_manifest(before[root], root)


def test_identical_xattrs_and_capabilities_are_linked(home: Path) -> None:
    a, b = make_guests(home, {"usr/bin/ping": b"ping" * 3000})
    cap = bytes.fromhex("01000002") + (1 << 13).to_bytes(4, "little") + bytes(12)
    for root in (a, b):
        os.setxattr(root / "usr/bin/ping", "security.capability", cap)
        os.setxattr(root / "usr/bin/ping", "user.origin", b"debian")

    cowlink(home, "unify")

    assert same_inode(a / "usr/bin/ping", b / "usr/bin/ping")
    assert os.getxattr(a / "usr/bin/ping", "security.capability") == cap


def test_ignore_mtime_links_files_whose_mtime_differs(home: Path) -> None:
    a, b = make_guests(home, {"usr/lib/data": b"d" * 5000})
    os.utime(b / "usr/lib/data", ns=(MTIME_NS, MTIME_NS + 10**9))

    cowlink(home, "unify", "--ignore-mtime")

    assert same_inode(a / "usr/lib/data", b / "usr/lib/data")


def test_special_files_and_symlinks_are_never_touched(home: Path) -> None:
    a, b = make_guests(home, BIN)
    for root in (a, b):
        os.mkfifo(root / "usr/fifo")
        os.mknod(root / "usr/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.symlink("bin/tool", root / "usr/tool-link")
        os.symlink("/etc/shadow", root / "usr/escape")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(root / "usr/sock"))
        sock.close()
    before = {r: manifest(r) for r in (a, b)}

    result = cowlink(home, "unify", "--json")

    assert result.exit_code == 0
    assert result.json["files_linked"] == 3
    for root in (a, b):
        assert_same_manifest(before[root], root)
        assert stat.S_ISFIFO(os.lstat(root / "usr/fifo").st_mode)
        assert os.lstat(root / "usr/null").st_nlink == 1
        assert os.readlink(root / "usr/escape") == "/etc/shadow"


def test_awkward_names_are_linked(home: Path) -> None:
    names = {
        "usr/share/new\nline": b"n" * 3000,
        "usr/share/-rf": b"r" * 3000,
        "usr/share/ünï": b"u" * 3000,
    }
    a, b = make_guests(home, names)
    for root in (a, b):
        write(Path(os.fsdecode(bytes(root / "usr/share") + b"/bad\xff\xfe")), b"x" * 3000)
    before = manifest(a)

    report = cowlink(home, "unify", "--json").json

    assert report["files_linked"] == 4
    bad = b"usr/share/bad\xff\xfe"
    assert os.lstat(bytes(a) + b"/" + bad).st_ino == os.lstat(bytes(b) + b"/" + bad).st_ino
    assert_same_manifest(before, a)


def test_files_differing_only_in_the_middle_stay_apart(home: Path) -> None:
    base = bytearray(os.urandom(1 << 20))
    a, b = make_guests(home, {"usr/lib/big": bytes(base)})
    base[len(base) // 2] ^= 1
    write(b / "usr/lib/big", bytes(base))

    report = cowlink(home, "unify", "--json").json

    assert report["files_linked"] == 0
    assert not same_inode(a / "usr/lib/big", b / "usr/lib/big")


def test_sparse_files_count_allocated_blocks_not_size(home: Path) -> None:
    a, b = make_guests(home, {})
    for root in (a, b):
        path = root / "var-lib/sparse.img"
        path.parent.mkdir(parents=True)
        with open(path, "wb") as f:
            f.truncate(64 << 20)
            f.seek(1 << 20)
            f.write(b"data" * 1024)
        os.utime(path, ns=(MTIME_NS, MTIME_NS))
    allocated = os.lstat(b / "var-lib/sparse.img").st_blocks * 512
    assert allocated < 1 << 20

    report = cowlink(home, "unify", "--json").json

    assert report["bytes_saved"] == allocated
    assert os.lstat(a / "var-lib/sparse.img").st_blocks * 512 == allocated


def test_guest_hardlinks_stay_one_group_and_copies_stay_apart(home: Path) -> None:
    from cowlink._catalogue import Catalogue

    a, b = make_guests(home, {"usr/bin/perl": b"perl" * 5000, "usr/share/c1": b"C" * 4000})
    for root in (a, b):
        os.link(root / "usr/bin/perl", root / "usr/bin/perl5.36.0")
        write(root / "usr/share/c2", b"C" * 4000)  # identical, but a separate file

    cowlink(home, "unify")

    assert same_inode(a / "usr/bin/perl", b / "usr/bin/perl5.36.0")
    assert same_inode(a / "usr/share/c1", a / "usr/share/c2")
    with Catalogue.open(home / "catalogue.sqlite") as cat:
        root_key = os.path.realpath(a)
        perl = cat.group_of(root_key, b"/usr/bin/perl")
        assert perl is not None
        assert cat.group_names(root_key, perl) == [b"/usr/bin/perl", b"/usr/bin/perl5.36.0"]
        c1, c2 = cat.group_of(root_key, b"/usr/share/c1"), cat.group_of(root_key, b"/usr/share/c2")
        assert c1 is not None
        assert c2 is not None
        assert c1 != c2
        assert cat.group_names(root_key, c1) == [b"/usr/share/c1"]


def test_identical_files_inside_one_guest_are_merged(home: Path) -> None:
    (a,) = make_guests(home, {"x/one": b"same" * 1000, "y/two": b"same" * 1000}, guests=("a",))

    report = cowlink(home, "unify", "--json").json

    assert report["files_linked"] == 1
    assert same_inode(a / "x/one", a / "y/two")


def test_default_excludes_follow_vserver(home: Path) -> None:
    files = {
        "etc/passwd": b"root:x:0:0\n" * 100,
        "etc/termcap": b"termcap" * 100,
        "etc/ssl/openssl.cnf": b"cnf" * 100,
        "var/lib/dpkg/status": b"status" * 100,
        "usr/share/texmf/ls-R": b"ls-R" * 100,
        "usr/bin/ls": b"ls" * 100,
    }
    a, b = make_guests(home, files)

    cowlink(home, "unify")

    linked = {rel for rel in files if same_inode(a / rel, b / rel)}
    assert linked == {"etc/termcap", "usr/bin/ls"}


def test_exclude_sources_and_no_default_excludes(home: Path, tmp_path: Path) -> None:
    files = {
        "etc/hosts": b"h" * 100,
        "usr/a.pyc": b"p" * 100,
        "usr/keep/a.pyc": b"k" * 100,
        "opt/x": b"x" * 100,
        "srv/y": b"y" * 100,
    }
    a, b = make_guests(home, files)
    (home / "guests/b/exclude").write_text("# guest b keeps /srv to itself\n/srv\n")
    rules = tmp_path / "rules"
    rules.write_text("/opt\n")

    cowlink(
        home,
        "unify",
        "--no-default-excludes",
        "--exclude",
        "+/usr/keep/*.pyc",
        "--exclude",
        "*.pyc",
        "--exclude-from",
        str(rules),
    )

    linked = {rel for rel in files if same_inode(a / rel, b / rel)}
    assert linked == {"etc/hosts", "usr/keep/a.pyc"}


def test_min_size(home: Path) -> None:
    a, b = make_guests(home, {"small": b"s" * 10, "large": b"l" * 100})

    cowlink(home, "unify", "--min-size", "50")

    assert not same_inode(a / "small", b / "small")
    assert same_inode(a / "large", b / "large")


def test_dry_run_changes_nothing(home: Path) -> None:
    a, b = make_guests(home, BIN)
    before = {r: manifest(r) for r in (a, b)}
    inodes = {os.lstat(r / rel).st_ino for r in (a, b) for rel in BIN}

    report = cowlink(home, "unify", "--dry-run", "--json").json

    assert report["files_linked"] == 3
    assert report["objects_created"] == 3
    assert report["bytes_saved"] > 0
    assert store_objects(home) == []
    assert {os.lstat(r / rel).st_ino for r in (a, b) for rel in BIN} == inodes
    for root in (a, b):
        assert_same_manifest(before[root], root)


def test_hand_set_immutable_file_is_left_alone(home: Path) -> None:
    a, b = make_guests(home, {"usr/lib/locked": b"L" * 5000})
    subprocess.run(["chattr", "+i", str(a / "usr/lib/locked")], check=True)
    subprocess.run(["chattr", "+a", str(b / "usr/lib/locked")], check=True)
    try:
        report = cowlink(home, "unify", "--json").json
        assert report["files_linked"] == 0
        assert report["objects_created"] == 0
        assert os.lstat(a / "usr/lib/locked").st_nlink == 1
    finally:
        subprocess.run(["chattr", "-i", "-a", str(a / "usr/lib/locked"), str(b / "usr/lib/locked")])


def test_a_file_open_for_writing_is_not_adopted(home: Path) -> None:
    a, b = make_guests(home, {"usr/lib/busy": b"B" * 5000})
    writer = os.open(a / "usr/lib/busy", os.O_WRONLY)
    try:
        cowlink(home, "unify")
        assert not same_inode(a / "usr/lib/busy", b / "usr/lib/busy")
        os.pwrite(writer, b"W", 0)  # the writer still writes its own file
    finally:
        os.close(writer)
    assert (a / "usr/lib/busy").read_bytes()[:2] == b"WB"
    assert (b / "usr/lib/busy").read_bytes()[:2] == b"BB"


def test_a_duplicate_open_for_writing_is_not_replaced(home: Path) -> None:
    a, b, c = make_guests(home, {"usr/lib/busy": b"B" * 5000}, guests=("a", "b", "c"))
    writer = os.open(c / "usr/lib/busy", os.O_WRONLY)
    try:
        report = cowlink(home, "unify", "--json").json
        assert report["files_linked"] == 1
        assert same_inode(a / "usr/lib/busy", b / "usr/lib/busy")
        assert not same_inode(a / "usr/lib/busy", c / "usr/lib/busy")
        os.pwrite(writer, b"W", 0)  # the write lands in the file c still sees
    finally:
        os.close(writer)
    assert (c / "usr/lib/busy").read_bytes()[:2] == b"WB"
    assert (a / "usr/lib/busy").read_bytes()[:2] == b"BB"


def test_file_changed_between_hashing_and_linking_is_kept(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cowlink._hashing import same_content as real

    a, b = make_guests(home, {"usr/lib/racy": b"R" * 9000})

    def compare_then_change(fd_a: int, fd_b: int, size: int) -> bool:
        equal = real(fd_a, fd_b, size)
        with open(b / "usr/lib/racy", "r+b") as f:  # the guest writes right after the check
            f.write(b"guest")
        return equal

    monkeypatch.setattr("cowlink._linker.same_content", compare_then_change)
    report = cowlink(home, "unify", "--json").json

    assert report["files_linked"] == 0
    assert (b / "usr/lib/racy").read_bytes() == b"guest" + b"R" * 8995
    assert (a / "usr/lib/racy").read_bytes() == b"R" * 9000


def test_directory_swapped_for_symlink_to_root_is_not_followed(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cowlink._walk import Tree
    from cowlink._walk import walk as real_walk

    outside = tmp_path / "outside"
    write(outside / "lib/payload", b"P" * 5000)
    _a, b = make_guests(home, {"usr/lib/payload": b"P" * 5000})
    before_outside = manifest(outside)

    def walk_then_swap(*args: object, **kwargs: object) -> Tree:
        tree = real_walk(*args, **kwargs)  # type: ignore[arg-type]
        if tree.root == os.path.realpath(b):
            os.rename(b / "usr", b / "usr.moved")
            os.symlink(str(outside), b / "usr")
        return tree

    monkeypatch.setattr("cowlink._unify.walk", walk_then_swap)
    result = cowlink(home, "unify", "--json")

    assert result.exit_code in (0, 1)
    assert os.lstat(outside / "lib/payload").st_nlink == 1
    assert not immutable(outside / "lib/payload")
    assert_same_manifest(before_outside, outside)
    assert os.readlink(b / "usr") == str(outside)
    assert os.lstat(b / "usr.moved/lib/payload").st_nlink == 1


def test_per_file_errors_are_listed_and_exit_1(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cowlink._hashing import head_and_full as real

    a, b = make_guests(home, {"usr/lib/ok": b"o" * 9000, "usr/lib/bad": b"b" * 8000})

    def failing(fd: int, size: int) -> tuple[bytes, bytes]:
        if size == 8000:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, size)

    monkeypatch.setattr("cowlink._unify.head_and_full", failing)
    result = cowlink(home, "unify", "--json")

    assert result.exit_code == 1
    errors = result.json["errors"]
    assert errors
    assert all(e["path"].endswith("usr/lib/bad") for e in errors)
    assert errors[0]["error"] == "Input/output error"
    assert same_inode(a / "usr/lib/ok", b / "usr/lib/ok")


def test_max_links_starts_a_new_slot(home: Path) -> None:
    roots = make_guests(home, {"usr/lib/common": b"c" * 3000}, guests=("a", "b", "c", "d", "e"))

    cowlink(home, "unify", "--max-links", "3")

    objects = store_objects(home)
    assert len(objects) >= 2
    assert all(os.lstat(o).st_nlink <= 3 for o in objects)
    assert sum(os.lstat(o).st_nlink - 1 for o in objects) == len(roots)
    assert {(r / "usr/lib/common").read_bytes() for r in roots} == {b"c" * 3000}


def test_lock_held_exits_75(home: Path) -> None:
    from cowlink._home import Home

    make_guests(home, BIN)
    with Home(home).lock("unify"):
        result = cowlink(home, "unify")
    assert result.exit_code == 75
    assert f"another cowlink unify is running (pid {os.getpid()})" in result.stderr


def test_missing_or_corrupt_catalogue_is_rebuilt(home: Path) -> None:
    a, _b = make_guests(home, BIN)
    cowlink(home, "unify")
    before = manifest(a)
    (home / "catalogue.sqlite").unlink()
    for suffix in ("-wal", "-shm"):
        (home / f"catalogue.sqlite{suffix}").unlink(missing_ok=True)

    report = cowlink(home, "unify", "--json").json
    assert report["already_linked"] == 6
    assert report["errors"] == []

    (home / "catalogue.sqlite").write_bytes(b"this is not a database" * 100)
    result = cowlink(home, "unify", "--json")
    assert result.exit_code == 0
    assert "catalogue was corrupt" in result.stderr
    assert result.json["already_linked"] == 6
    assert_same_manifest(before, a)
    with sqlite3.connect(home / "catalogue.sqlite") as db:
        assert db.execute("SELECT count(*) FROM objects").fetchone()[0] == 3


def test_root_on_another_filesystem_is_refused(home: Path, tmp_path: Path) -> None:
    need_loop()
    (a,) = make_guests(home, BIN, guests=("a",))
    work = tmp_path / "loop"
    work.mkdir()
    with loop_ext4(32, work) as mnt:
        other = mnt / "guest"
        for rel, data in BIN.items():
            write(other / rel, data)
        before = manifest(other)

        result = cowlink(home, "unify", str(a), str(other))

        assert result.exit_code == 2
        assert "another filesystem" in result.stderr
        assert_same_manifest(before, other)
        assert store_objects(home) == []


def test_emlink_on_a_real_ext4_link_limit(tmp_path: Path) -> None:
    need_loop()
    work = tmp_path / "loop"
    work.mkdir()
    with loop_ext4(200, work, inodes=70_000) as mnt:
        home = mnt / "home"
        root = home / "guests/a/root"
        count = 65_010  # ext4 allows 65,000 links to one inode
        for d in range(count // 1000 + 1):
            (root / f"d{d}").mkdir(parents=True)
        for i in range(count):
            fd = os.open(root / f"d{i // 1000}" / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"z")
            os.utime(fd, ns=(MTIME_NS, MTIME_NS))
            os.close(fd)

        result = cowlink(home, "unify", "--json")

        assert result.exit_code == 0, result.stderr[-2000:]
        objects = store_objects(home)
        assert len(objects) == 2
        assert sum(os.lstat(o).st_nlink - 1 for o in objects) == count
        assert result.json["files_linked"] == count - 2


def test_unify_named_roots_outside_the_home(tmp_path: Path) -> None:
    home = tmp_path / "h"
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    for root in (r1, r2):
        for rel, data in BIN.items():
            write(root / rel, data)

    result = cowlink(home, "unify", "--json", str(r1), str(r2))

    assert result.exit_code == 0
    assert all(same_inode(r1 / rel, r2 / rel) for rel in BIN)


def test_usage_errors_exit_2(home: Path, tmp_path: Path) -> None:
    assert cowlink(home, "unify").exit_code == 2  # no guests
    (tmp_path / "r").mkdir()
    assert cowlink(home, "unify", str(tmp_path / "r"), str(tmp_path / "r/..")).exit_code == 2
    assert cowlink(home, "unify", "--min-size", "-1").exit_code == 2


def _metrics(path: Path) -> dict[str, float]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_after_a_run_and_after_a_failure(home: Path, tmp_path: Path) -> None:
    make_guests(home, BIN)
    prom = tmp_path / "textfile" / "cowlink.prom"
    prom.parent.mkdir()

    report = cowlink(home, "unify", "--json", "--metrics", str(prom)).json

    values = _metrics(prom)
    assert values["cowlink_last_unify_errors"] == 0
    assert values["cowlink_last_unify_duration_seconds"] >= 0
    assert values["cowlink_store_objects"] == 3
    assert values["cowlink_saved_bytes"] >= report["bytes_saved"]
    assert [p.name for p in prom.parent.iterdir()] == ["cowlink.prom"]  # no temporary left

    result = cowlink(home, "unify", "--metrics", str(prom), "/nonexistent")
    assert result.exit_code == 2
    assert _metrics(prom)["cowlink_last_unify_errors"] == 1


def test_filesystem_without_flags_warns_and_links_nothing(tmp_path: Path) -> None:
    mnt = tmp_path / "ramfs"  # ramfs keeps no inode flags at all
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)
    try:
        home = mnt / "home"
        a, b = make_guests(home, {"usr/lib/x": b"x" * 3000})
        before = manifest(a)

        result = cowlink(home, "unify", "--json")

        assert result.exit_code == 1
        assert "does not support the immutable flag" in result.stderr
        assert result.json["files_linked"] == 0
        assert not same_inode(a / "usr/lib/x", b / "usr/lib/x")
        assert_same_manifest(before, a)

        result = cowlink(home, "unify", "--json", "--allow-mutable")

        assert result.exit_code == 0
        assert result.json["files_linked"] == 1
        assert same_inode(a / "usr/lib/x", b / "usr/lib/x")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_leftover_private_copy_is_removed_not_linked(home: Path) -> None:
    """A copy an interrupted split or mount left under cowlink's temporary name is no
    store object; the next run removes it instead of taking it for a guest file."""
    from cowlink._home import Home
    from cowlink._store import TempNames

    a, b = make_guests(home, BIN)
    assert cowlink(home, "unify").exit_code == 0
    before = manifest(a)
    leftover = a / "usr/bin" / os.fsdecode(TempNames(Home(home).secret()).make())
    write(leftover, BIN["usr/bin/tool"])  # a finished private copy, never renamed over

    result = cowlink(home, "unify", "--json", "-v")

    assert result.exit_code == 0, result.stderr
    assert not leftover.exists()
    assert result.json["files_linked"] == 0
    assert_same_manifest(before, a)
    assert same_inode(a / "usr/bin/tool", b / "usr/bin/tool")
