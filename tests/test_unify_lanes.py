"""`cowlink unify --jobs N`: size classes linked in forked lanes, exactly as by one process."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from cowlink._lanes import can_fork
from tests._guests import cowlink, make_guests, same_inode, store_objects, write
from tests._util import assert_same_manifest, manifest, need_immutable

pytestmark = pytest.mark.privileged

#: Many size classes, duplicates within and across guests, and near-misses.
FILES = {
    **{f"usr/lib/lib{i}.so": bytes([i]) * (5000 + 97 * i) for i in range(24)},
    **{f"usr/share/doc/p{i}/copyright": b"GPL-2+\n" * 40 for i in range(6)},
    "usr/bin/tool": b"#!/bin/sh\necho tool\n" * 200,
}


@pytest.fixture(autouse=True)
def _privileged() -> None:
    need_immutable()


@pytest.fixture(autouse=True)
def _single_threaded() -> None:
    """Lanes fork only from a single-threaded process (see cowlink._lanes.can_fork); the
    idle worker threads earlier tests may leave (trio's thread cache) end within seconds."""
    deadline = time.monotonic() + 30
    while not can_fork() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert can_fork(), [t.name for t in threading.enumerate()]


def _guests(home: Path) -> list[Path]:
    roots = make_guests(home, FILES, guests=("a", "b", "c"))
    # Near-misses: same size, other bytes; same bytes, other mode.
    write(roots[2] / "usr/lib/lib3.so", bytes([99]) * (5000 + 97 * 3))
    write(roots[1] / "usr/bin/tool", FILES["usr/bin/tool"], mode=0o755)
    os.link(roots[0] / "usr/lib/lib5.so", roots[0] / "usr/lib/lib5.so.1")
    return roots


def _inode_classes(roots: list[Path]) -> set[frozenset[str]]:
    """Which guest paths share an inode, as sets of root-relative names."""
    by_inode: defaultdict[int, set[str]] = defaultdict(set)
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = Path(dirpath, name)
                by_inode[os.lstat(path).st_ino].add(f"{root.name}/{path.relative_to(root)}")
    return {frozenset(names) for names in by_inode.values()}


def test_lanes_link_exactly_what_one_process_links(tmp_path: Path) -> None:
    outcomes = {}
    for jobs in ("1", "3"):
        home = tmp_path / f"home-{jobs}"
        home.mkdir()
        roots = _guests(home)
        before = {root: manifest(root) for root in roots}

        result = cowlink(home, "unify", "--jobs", jobs, "-v")

        assert result.exit_code == 0, result.stderr
        for root in roots:
            assert_same_manifest(before[root], root)
        # Each lane's actions reach the parent's output.
        links = sorted(
            line.split(" (")[0].replace(f"/home-{jobs}/", "/")
            for line in result.stderr.splitlines()
            if line.startswith("link: ")
        )
        outcomes[jobs] = (_inode_classes(roots), len(store_objects(home)), links)
        assert cowlink(home, "unify", "--jobs", jobs, "--json").json["files_linked"] == 0
    assert outcomes["1"] == outcomes["3"]
    assert len(outcomes["3"][2]) > 40


def test_a_lane_that_dies_fails_the_run_and_leaves_every_path_whole(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cowlink._hashing import same_content as real

    roots = _guests(home)
    before = {root: manifest(root) for root in roots}
    parent = os.getpid()

    def dying(a: int, b: int, size: int) -> bool:
        if os.getpid() != parent and size == len(FILES["usr/bin/tool"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(a, b, size)

    monkeypatch.setattr("cowlink._linker.same_content", dying)
    result = cowlink(home, "unify", "--jobs", "2")

    assert result.exit_code == 2
    assert "killed by signal 9" in result.stderr
    for root in roots:
        assert_same_manifest(before[root], root, allow_temp_names=True)

    monkeypatch.undo()
    assert cowlink(home, "unify", "--jobs", "2").exit_code == 0
    assert same_inode(roots[0] / "usr/bin/tool", roots[2] / "usr/bin/tool")
    for root in roots:
        assert_same_manifest(before[root], root)
