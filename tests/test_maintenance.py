"""`cowlink remove`, `gc`, `verify` and `status`: what each shows, changes and never touches."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cowlink import _linux
from cowlink._store import thawed
from tests._guests import cowlink, make_guests, same_inode, store_objects, write
from tests._util import assert_same_manifest, manifest, need_immutable

pytestmark = pytest.mark.privileged

FILES = {
    "usr/bin/tool": b"#!/bin/sh\necho tool\n" * 300,
    "usr/lib/libx.so": os.urandom(70_000),
    "usr/share/doc/copyright": b"GPL" * 1000,
}


@pytest.fixture(autouse=True)
def _privileged() -> None:
    need_immutable()


def immutable(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _linux.is_immutable(fd)
    finally:
        os.close(fd)


def unified(home: Path, guests: tuple[str, ...] = ("a", "b")) -> list[Path]:
    roots = make_guests(home, FILES, guests=guests)
    assert cowlink(home, "unify").exit_code == 0
    return roots


def object_of(home: Path, path: Path) -> Path:
    ino = os.lstat(path).st_ino
    return next(o for o in store_objects(home) if os.lstat(o).st_ino == ino)


def link_outside(obj: Path, dest: Path) -> None:
    """A link to a store object from a path no guest knows (what an operator might make)."""
    fd = os.open(obj, os.O_RDONLY)
    try:
        with thawed(fd):
            os.link(obj, dest)
    finally:
        os.close(fd)


# -- remove --------------------------------------------------------------------------------


def test_remove_deletes_the_guest_and_leaves_the_store_and_others(
    home: Path, tmp_path: Path
) -> None:
    a, b = unified(home)
    outside = tmp_path / "outside"
    write(outside / "keep", b"k" * 100)
    os.symlink(outside, b / "escape")  # must be removed, never followed
    write(b / "own/private", b"p" * 100)
    write(b / "own/locked", b"l" * 100)
    subprocess.run(["chattr", "+i", str(b / "own/locked")], check=True)
    subprocess.run(["chattr", "+a", str(b / "own")], check=True)
    before = manifest(a)

    result = cowlink(home, "remove", "--json", str(b))

    assert result.exit_code == 0, result.stderr
    assert result.json["shared_names_removed"] == 3
    assert not (home / "guests/b").exists()
    assert (outside / "keep").read_bytes() == b"k" * 100
    assert_same_manifest(before, a)
    for rel in FILES:
        assert os.lstat(a / rel).st_nlink == 2  # guest a and the store
        assert immutable(a / rel)
    assert cowlink(home, "verify").exit_code == 0
    from cowlink._catalogue import Catalogue

    with Catalogue.open(home / "catalogue.sqlite") as cat:
        assert cat.names(os.path.realpath(b)) == {}
        assert len(cat.names(os.path.realpath(a))) == 3


def test_remove_refuses_a_running_guest(home: Path) -> None:
    from cowlink._gueststate import release_lock, try_lock
    from cowlink._home import Home

    _a, b = unified(home)
    monitor = try_lock(Home(home), "b")  # what a running guest's monitor holds
    assert monitor is not None
    try:
        result = cowlink(home, "remove", str(b))
    finally:
        release_lock(Home(home), "b", monitor)

    assert result.exit_code == 2
    assert "guest b is running" in result.stderr
    assert (b / "usr/bin/tool").exists()
    assert cowlink(home, "remove", str(b)).exit_code == 0
    assert not b.exists()


def test_remove_refuses_the_home_and_trees_with_mounts(home: Path, tmp_path: Path) -> None:
    _a, b = unified(home)
    assert cowlink(home, "remove", str(home)).exit_code == 2
    assert cowlink(home, "remove", str(home / "guests")).exit_code == 2
    (b / "proc").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(b / "proc")], check=True)
    try:
        result = cowlink(home, "remove", str(b))
    finally:
        subprocess.run(["umount", str(b / "proc")], check=True)
    assert result.exit_code == 2
    assert "mounted inside" in result.stderr
    assert (b / "usr/bin/tool").exists()


# -- gc ------------------------------------------------------------------------------------


def test_gc_removes_only_objects_nothing_links(home: Path, tmp_path: Path) -> None:
    a, b = unified(home)
    kept_outside = object_of(home, a / "usr/lib/libx.so")
    link_outside(kept_outside, tmp_path / "operator-copy")
    cowlink(home, "remove", str(b))

    assert cowlink(home, "gc", "--json").json["objects_removed"] == 0  # guest a links all

    cowlink(home, "remove", str(a))
    objects = store_objects(home)
    freed = sum(os.lstat(o).st_blocks * 512 for o in objects if o != kept_outside)

    dry = cowlink(home, "gc", "--dry-run", "--json").json
    assert dry["objects_removed"] == 2
    assert store_objects(home) == objects

    result = cowlink(home, "gc", "--json")

    assert result.exit_code == 0
    report = result.json
    assert report["objects_removed"] == 2
    assert report["bytes_freed"] == freed
    assert report["catalogue_rows_dropped"]["objects"] == 2
    assert store_objects(home) == [kept_outside]
    assert immutable(kept_outside)
    assert (tmp_path / "operator-copy").read_bytes() == FILES["usr/lib/libx.so"]
    plain = cowlink(home, "gc")
    assert "0 store objects removed" in plain.stdout


# -- verify --------------------------------------------------------------------------------


def test_verify_a_sound_store(home: Path) -> None:
    unified(home)
    for args in ((), ("--quick",)):
        result = cowlink(home, "verify", "--json", *args)
        assert result.exit_code == 0, result.stdout
        assert result.json["objects_checked"] == 3
        assert result.json["problems"] == []


def test_verify_lists_each_problem_with_the_paths_that_link_it(home: Path, tmp_path: Path) -> None:
    a, b = unified(home)
    flagless = object_of(home, a / "usr/bin/tool")
    corrupt = object_of(home, a / "usr/lib/libx.so")
    chmodded = object_of(home, a / "usr/share/doc/copyright")
    subprocess.run(["chattr", "-i", str(flagless)], check=True)
    link_outside(corrupt, tmp_path / "elsewhere")
    subprocess.run(["chattr", "-i", str(corrupt), str(chmodded)], check=True)
    st = os.lstat(corrupt)
    with open(corrupt, "r+b") as f:  # bit rot, or someone with root
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))  # always a change, whatever the random content
    os.utime(corrupt, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(chmodded, 0o600)
    subprocess.run(["chattr", "+i", str(corrupt), str(chmodded)], check=True)

    quick = cowlink(home, "verify", "--quick", "--json")
    full = cowlink(home, "verify", "--json")

    assert quick.exit_code == full.exit_code == 1
    by_name = {p["object"]: p for p in full.json["problems"]}
    assert set(by_name) == {
        str(o.relative_to(home / "store")) for o in (flagless, corrupt, chmodded)
    }
    rel = str(flagless.relative_to(home / "store"))
    assert by_name[rel]["problems"] == ["immutable flag not set"]
    assert by_name[rel]["linked_by"] == sorted(
        [str(os.path.realpath(a / "usr/bin/tool")), str(os.path.realpath(b / "usr/bin/tool"))]
    )
    rel = str(corrupt.relative_to(home / "store"))
    assert by_name[rel]["problems"] == ["content does not match the object's name"]
    assert by_name[rel]["unknown_links"] == 1
    rel = str(chmodded.relative_to(home / "store"))
    assert "differ from the object's name" in by_name[rel]["problems"][0]
    quick_names = {p["object"] for p in quick.json["problems"]}
    assert str(corrupt.relative_to(home / "store")) not in quick_names  # content not read
    text = cowlink(home, "verify")
    assert "linked by" in text.stdout
    assert "1 links outside" in text.stdout
    subprocess.run(["chattr", "+i", str(flagless)], check=True)


# -- status --------------------------------------------------------------------------------


def test_status_before_and_after_unify(home: Path) -> None:
    make_guests(home, FILES)
    empty = cowlink(home, "status", "--json").json
    assert empty["last_unify"] is None
    assert empty["store"]["objects"] == 0
    assert [g["name"] for g in empty["guests"]] == ["a", "b"]

    assert cowlink(home, "unify").exit_code == 0
    result = cowlink(home, "status", "--json")

    assert result.exit_code == 0
    status = result.json
    assert status["store"]["objects"] == 3
    assert status["store"]["links"] == 6
    assert status["store"]["apparent_bytes"] == sum(len(d) for d in FILES.values())
    assert status["store"]["bytes"] > 0
    assert [g["linked_names"] for g in status["guests"]] == [3, 3]
    assert status["guests"][0]["running_pid"] is None
    assert status["catalogue_age_s"] >= 0
    run = status["last_unify"]
    assert run["exit_code"] == 0
    assert run["files_linked"] == 3
    assert run["duration_s"] >= 0
    text = cowlink(home, "status").stdout
    assert "last unify:" in text
    assert "3 objects" in text


def test_unify_after_remove_and_gc_still_works(home: Path) -> None:
    a, b = unified(home)
    cowlink(home, "remove", str(b))
    cowlink(home, "gc")
    (c,) = make_guests(home, FILES, guests=("c",))

    report = cowlink(home, "unify", "--json").json

    assert report["objects_created"] == 0
    assert all(same_inode(a / rel, c / rel) for rel in FILES)


def test_remove_a_root_outside_the_home_only_when_unified(home: Path, tmp_path: Path) -> None:
    r1, r2, other = tmp_path / "r1", tmp_path / "r2", tmp_path / "other"
    for root in (r1, r2, other):
        for rel, data in FILES.items():
            write(root / rel, data)
    assert cowlink(home, "unify", str(r1), str(r2)).exit_code == 0

    refused = cowlink(home, "remove", str(other))
    removed = cowlink(home, "remove", str(r1))

    assert refused.exit_code == 2
    assert "neither a guest" in refused.stderr
    assert (other / "usr/bin/tool").exists()
    assert removed.exit_code == 0, removed.stderr
    assert not r1.exists()
    assert (r2 / "usr/bin/tool").read_bytes() == FILES["usr/bin/tool"]
    assert immutable(r2 / "usr/bin/tool")
