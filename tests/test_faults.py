"""Faults: kill -9 at random moments, a full disk, a disk gone read-only, two commands at once.

Whatever happens, every guest path keeps its content and metadata, no half-written copy
or temporary name stays behind, and a rerun finishes the job.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests._guests import (
    MTIME_NS,
    cowlink,
    generated,
    same_inode,
    store_objects,
    temp_names,
    write,
)
from tests._util import assert_same_manifest, loop_ext4, manifest, need_immutable, need_loop

pytestmark = pytest.mark.privileged


@pytest.fixture(autouse=True)
def _privileged() -> None:
    need_immutable()


def linked_to_store(home: Path, path: Path) -> bool:
    return os.lstat(path).st_ino in {os.lstat(o).st_ino for o in store_objects(home)}


def command(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cowlink", "--home", str(home), *args]


# -- kill -9 -------------------------------------------------------------------------------


@pytest.mark.parametrize("trial", range(22))
def test_kill_9_during_unify_or_split_then_rerun(home: Path, trial: int) -> None:
    """Half the trials kill unify, half split; each trial is a real kill mid-run."""
    rng = random.Random(trial)
    delay = rng.uniform(0.25, 0.7)
    for attempt in range(6):
        # A run that finished before the kill is no trial: again, killing sooner.
        trial_home = home / f"try{attempt}"
        roots = generated(trial_home, trial)
        before = {r: manifest(r) for r in roots}
        if trial % 2:
            assert cowlink(trial_home, "unify").exit_code == 0
            args = ["split", "-q", str(roots[0])]
        else:
            args = ["unify", "-q"]
        proc = subprocess.Popen(command(trial_home, *args), stderr=subprocess.PIPE)
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        if proc.returncode == -9:
            break
        delay /= 2
    assert proc.returncode == -9, "every run finished before it could be killed"
    for root in roots:
        # Temporary names (links to whole objects or whole copies) go on the rerun.
        after = {p: v for p, v in manifest(root).items() if b".cowlink-" not in p}
        assert after == before[root]

    rerun = subprocess.run(command(trial_home, *args), capture_output=True, check=False)

    assert rerun.returncode == 0, rerun.stderr
    for root in roots:
        assert_same_manifest(before[root], root)
        assert temp_names(root) == []
    if args[0] == "split":
        assert not linked_to_store(trial_home, roots[0] / "usr/lib/d3/f3")
        assert linked_to_store(trial_home, roots[1] / "usr/lib/d3/f3")
        assert same_inode(roots[0] / "usr/lib/d1/f1", roots[0] / "usr/lib/d1/f1-hardlink")
    else:
        assert same_inode(roots[0] / "usr/lib/d3/f3", roots[1] / "usr/lib/d3/f3")
    assert cowlink(trial_home, "verify", "--quick").exit_code == 0


# -- a full filesystem ---------------------------------------------------------------------


def fill(mnt: Path, leave: int = 0, *, inodes: bool = False) -> Path:
    """Fill the filesystem's blocks (root's reserve included), then free `leave` bytes;
    with `inodes`, take every free inode too. Returns the directory to delete to undo it.
    """
    filler = mnt / "filler"
    filler.mkdir()
    (filler / "data").touch()
    if inodes:  # first: a full disk has no block left for the directory's entries
        take_inodes(filler)
    with open(filler / "data", "r+b") as f:
        for size in (1 << 20, 1 << 16, 4096):
            try:
                while True:
                    f.write(b"\xff" * size)
                    f.flush()
            except OSError:
                pass
    if leave:
        os.truncate(filler / "data", max(0, os.path.getsize(filler / "data") - leave))
    return filler


def take_inodes(filler: Path) -> None:
    """Create empty files until no inode is left."""
    try:
        while True:
            fd, _ = tempfile.mkstemp(dir=filler)
            os.close(fd)
    except OSError:
        pass


@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    need_loop()
    work = tmp_path / "loop"
    work.mkdir()
    with loop_ext4(48, work) as mnt:
        yield mnt


def big_guests(home: Path) -> list[Path]:
    rng = random.Random(5)
    files = {f"usr/lib/big{i}": rng.randbytes(1 << 20) for i in range(6)}
    files |= {f"usr/share/s{i}": rng.randbytes(2000) for i in range(40)}
    roots = []
    for guest in ("a", "b"):
        root = home / "guests" / guest / "root"
        for rel, data in files.items():
            write(root / rel, data)
        roots.append(root)
    return roots


def test_split_on_a_full_filesystem_refuses_or_stops_cleanly(
    small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = small_fs / "home"
    a, b = big_guests(home)
    assert cowlink(home, "unify").exit_code == 0
    before = {r: manifest(r) for r in (a, b)}
    filler = fill(small_fs, leave=2_500_000)

    refused = cowlink(home, "split", str(a))

    assert refused.exit_code == 2
    assert "not enough free space" in refused.stderr
    assert all(linked_to_store(home, a / f"usr/lib/big{i}") for i in range(6))

    # Space that vanishes after the check (another writer): the split stops at ENOSPC.
    monkeypatch.setattr("cowlink._split.ensure_space", lambda fd, need, inodes: None)
    stopped = cowlink(home, "split", str(a))

    assert stopped.exit_code == 2
    assert "is full" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    for root in (a, b):
        assert_same_manifest(before[root], root)
        assert temp_names(root) == []
    assert any(linked_to_store(home, a / f"usr/lib/big{i}") for i in range(6))

    shutil.rmtree(filler)
    finished = cowlink(home, "split", str(a))
    assert finished.exit_code == 0, finished.stderr
    assert not any(linked_to_store(home, a / f"usr/lib/big{i}") for i in range(6))
    for root in (a, b):
        assert_same_manifest(before[root], root)


@pytest.mark.parametrize("jobs", ["1", "2"])
@pytest.mark.parametrize("when", ["before", "during"])
def test_unify_on_a_full_filesystem_stops_cleanly(
    small_fs: Path, monkeypatch: pytest.MonkeyPatch, when: str, jobs: str
) -> None:
    from cowlink import _hashing

    home = small_fs / "home"
    write(home / "guests/z/root/x", b"z" * 100)
    assert cowlink(home, "unify").exit_code == 0  # the home, store and catalogue exist
    a, b = big_guests(home)
    before = {r: manifest(r) for r in (a, b)}
    filler = small_fs / "filler"
    if when == "before":
        fill(small_fs)
    else:
        # Another writer fills the disk while unify links the fifth file, and takes every
        # inode that replaced files free afterwards. The disk tells whether it is full
        # yet: with --jobs, the hooks run in forked lanes.
        def fill_up() -> None:
            if filler.exists():
                take_inodes(filler)
            elif len(calls) >= 5:
                fill(small_fs, inodes=True)

        calls: list[int] = []

        def comparing(fd_a: int, fd_b: int, size: int) -> bool:
            calls.append(1)
            fill_up()
            return _hashing.same_content(fd_a, fd_b, size)

        from cowlink._linker import Linker

        real_adopt = Linker._adopt

        def adopting(self: Linker, *args: Any) -> Any:
            fill_up()
            return real_adopt(self, *args)

        monkeypatch.setattr("cowlink._linker.same_content", comparing)
        monkeypatch.setattr(Linker, "_adopt", adopting)

    result = cowlink(home, "unify", "--jobs", jobs)

    assert filler.exists()
    assert result.exit_code in (1, 2), result.stderr
    assert "No space left on device" in result.stderr or "is full" in result.stderr
    assert "Traceback" not in result.stderr
    for root in (a, b):
        after = {p: v for p, v in manifest(root).items() if b".cowlink-" not in p}
        assert after == before[root]

    monkeypatch.undo()
    shutil.rmtree(filler)
    rerun = cowlink(home, "unify", "--json")
    assert rerun.exit_code == 0, rerun.stderr
    assert same_inode(a / "usr/lib/big3", b / "usr/lib/big3")
    for root in (a, b):
        assert_same_manifest(before[root], root)
        assert temp_names(root) == []
    assert cowlink(home, "verify").exit_code == 0


# -- a filesystem that turns read-only mid-run ----------------------------------------------


def go_read_only(mnt: Path) -> None:
    """What ext4 does on an I/O error with errors=remount-ro, triggered on purpose."""
    source = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", str(mnt)], capture_output=True, text=True, check=True
    ).stdout.strip()
    Path(f"/sys/fs/ext4/{os.path.basename(source)}/trigger_fs_error").write_text("1")


def recover(mnt: Path) -> None:
    """Unmount, fsck and mount the image again, as an operator would after the error."""
    image = mnt.parent / "fs.img"
    subprocess.run(["umount", str(mnt)], check=True)
    subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, check=False)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)


def after_calls(n: int, real: Callable[..., Any], then: Callable[[], None]) -> Callable[..., Any]:
    calls = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == n:
            then()
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("command_name", ["unify", "unify --jobs 1", "split"])
def test_filesystem_turning_read_only_mid_run(
    small_fs: Path, monkeypatch: pytest.MonkeyPatch, command_name: str
) -> None:
    from cowlink import _copy, _hashing

    home = small_fs / "home"
    a, b = big_guests(home)
    subprocess.run(["mount", "-o", "remount,errors=remount-ro", str(small_fs)], check=True)
    if command_name == "split":
        assert cowlink(home, "unify").exit_code == 0
        target = "cowlink._split.copy_to_temp"
        real: Callable[..., Any] = _copy.copy_to_temp
        args = ["split", str(a)]
    else:
        target = "cowlink._linker.same_content"
        real = _hashing.same_content
        args = command_name.split()
    before = {r: manifest(r) for r in (a, b)}
    os.sync()  # the guests' own data is on disk before the fault
    monkeypatch.setattr(target, after_calls(5, real, lambda: go_read_only(small_fs)))

    result = cowlink(home, *args)

    assert result.exit_code == 2, result.stderr
    assert "read-only" in result.stderr.lower()
    assert "Traceback" not in result.stderr
    for root in (a, b):
        # Temporary names the read-only disk kept us from removing go on the rerun.
        after = {p: v for p, v in manifest(root).items() if b".cowlink-" not in p}
        assert after == before[root]
    monkeypatch.undo()
    recover(small_fs)
    rerun = cowlink(home, *args)
    assert rerun.exit_code == 0, rerun.stderr
    for root in (a, b):
        assert_same_manifest(before[root], root)
        assert temp_names(root) == []


# -- two commands at once ------------------------------------------------------------------


def test_unify_and_split_on_one_home_take_turns(home: Path) -> None:
    """Split of guest a and unify of every guest undo each other: run in turn, guest a ends
    wholly private (unify, then split) or wholly linked (split, then unify), never a mix."""
    roots = generated(home, 7, files=400)
    before = {r: manifest(r) for r in roots}
    assert cowlink(home, "unify").exit_code == 0
    shared = [p for p in roots[0].rglob("f*") if linked_to_store(home, p)]
    assert len(shared) > 300

    split = subprocess.Popen(command(home, "split", "--wait", "-q", str(roots[0])))
    unify = subprocess.Popen(command(home, "unify", "--wait", "-q"))
    assert split.wait(timeout=120) == 0
    assert unify.wait(timeout=120) == 0

    linked = sum(linked_to_store(home, p) for p in shared)
    assert linked in (0, len(shared)), f"{linked} of {len(shared)} linked: the runs interleaved"
    for root in roots:
        assert_same_manifest(before[root], root)
        assert temp_names(root) == []
    assert os.lstat(roots[0] / "usr/own").st_mtime_ns == MTIME_NS
