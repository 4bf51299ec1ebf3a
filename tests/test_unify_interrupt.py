"""`cowlink unify` stopped by signals: nothing missing, nothing changed, a rerun finishes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._guests import MTIME_NS, generated, temp_names
from tests._util import assert_same_manifest, manifest, need_immutable

pytestmark = pytest.mark.privileged


def _unify(home: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cowlink", "--home", str(home), "unify", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("seed", range(6))
def test_kill_9_at_a_random_moment_then_rerun(home: Path, seed: int) -> None:
    need_immutable()
    roots = generated(home, seed, guests=("a", "b", "c"))
    before = {r: manifest(r) for r in roots}
    proc = _unify(home)
    time.sleep(random.Random(seed).uniform(0.3, 0.75))
    proc.kill()
    proc.communicate()
    for root in roots:
        assert_same_manifest(before[root], root, allow_temp_names=True)

    rerun = subprocess.run(
        [sys.executable, "-m", "cowlink", "--home", str(home), "unify", "--json"],
        capture_output=True,
        check=False,
    )

    assert rerun.returncode == 0, rerun.stderr
    for root in roots:
        assert_same_manifest(before[root], root)
        assert temp_names(root) == []
        assert (
            os.lstat(root / "usr/lib/d0/f7").st_ino == os.lstat(roots[0] / "usr/lib/d0/f7").st_ino
        )
    for obj in (home / "store").glob("??/*"):
        assert os.lstat(obj).st_nlink > 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_stop_at_a_safe_point(home: Path, signum: int) -> None:
    need_immutable()
    roots = generated(home, 99, guests=("a", "b", "c"))
    before = {r: manifest(r) for r in roots}
    proc = _unify(home)
    lock = home / "lock"
    deadline = time.monotonic() + 30
    while str(proc.pid) not in (lock.read_text() if lock.exists() else ""):
        assert time.monotonic() < deadline, "unify never took the lock"
        time.sleep(0.01)
    time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode in (0, 128 + signum), err
    if proc.returncode:
        assert b"interrupted" in err
    for root in roots:
        assert_same_manifest(before[root], root)
        assert temp_names(root) == []
    assert os.lstat(roots[0] / "usr/own").st_mtime_ns == MTIME_NS
