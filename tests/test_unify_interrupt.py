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

from tests._guests import MTIME_NS, write
from tests._util import assert_same_manifest, manifest, need_immutable

pytestmark = pytest.mark.privileged


def _corpus(home: Path, seed: int) -> list[Path]:
    """Three guests of a few hundred files, mostly shared, some hardlinked, some unique."""
    rng = random.Random(seed)
    shared = {f"usr/lib/f{i}": rng.randbytes(rng.choice([100, 3000, 50_000])) for i in range(300)}
    roots = []
    for guest in ("a", "b", "c"):
        root = home / "guests" / guest / "root"
        for rel, data in shared.items():
            write(root / rel, data)
        write(root / "usr/own", guest.encode() * 999)
        os.link(root / "usr/lib/f1", root / "usr/lib/f1-hardlink")
        roots.append(root)
    return roots


def _unify(home: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cowlink", "--home", str(home), "unify", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _leftover_temp_names(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names if ".cowlink-" in n]


@pytest.mark.parametrize("seed", range(6))
def test_kill_9_at_a_random_moment_then_rerun(home: Path, seed: int) -> None:
    need_immutable()
    roots = _corpus(home, seed)
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
        assert _leftover_temp_names(root) == []
        assert os.lstat(root / "usr/lib/f7").st_ino == os.lstat(roots[0] / "usr/lib/f7").st_ino
    for obj in (home / "store").glob("??/*"):
        assert os.lstat(obj).st_nlink > 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_stop_at_a_safe_point(home: Path, signum: int) -> None:
    need_immutable()
    roots = _corpus(home, 99)
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
        assert _leftover_temp_names(root) == []
    assert os.lstat(roots[0] / "usr/own").st_mtime_ns == MTIME_NS
