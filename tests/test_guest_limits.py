"""Limits hold inside the guest and nowhere else: pids.max, memory, CPU quota."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests._guest import cowlink, gname, guest_exec, make_guest, need_guests, running

pytestmark = pytest.mark.privileged

SERVICES = '[init]\nstyle = "services"\nservices = [{start = "sleep 1000 &"}]\n'


@pytest.fixture(autouse=True)
def _gate() -> None:
    need_guests()


def _status(home: Path, name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(cowlink(home, "guest", "status", name, "--json").stdout)
    return data


def test_fork_bomb_is_capped_by_pids_max(home: Path) -> None:
    make_guest(home, gname("ct-pids"), SERVICES + "[limits]\npids_max = 16\n")
    with running(home, gname("ct-pids")):
        result = guest_exec(
            home,
            gname("ct-pids"),
            "sh",
            "-c",
            "for i in $(seq 40); do sleep 30 >/dev/null 2>&1 & done",
            timeout=60,
        )
        assert result.returncode != 0
        assert "fork" in result.stderr
        processes = _status(home, gname("ct-pids"))["processes"]
        assert isinstance(processes, int)
        assert 10 < processes <= 16, (result, _status(home, gname("ct-pids")))
        assert _status(home, gname("ct-pids"))["running"] is True
        # The host (and this test) can still fork, and the monitor still stops the guest.
        assert cowlink(home, "guest", "stop", gname("ct-pids")).returncode == 0


def test_memory_limit_kills_inside_the_guest_only(home: Path) -> None:
    make_guest(home, gname("ct-mem"), SERVICES + '[limits]\nmemory_max = "48M"\n')
    with running(home, gname("ct-mem")):
        # dd touches its whole 256 MiB buffer while reading /dev/zero into it.
        result = guest_exec(
            home, gname("ct-mem"), "dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"
        )
        assert result.returncode == 128 + 9  # SIGKILL by the OOM killer
        small = guest_exec(
            home, gname("ct-mem"), "dd", "if=/dev/zero", "of=/dev/null", "bs=8M", "count=1"
        )
        assert small.returncode == 0
        status = _status(home, gname("ct-mem"))
        assert status["running"] is True  # init and the service survived
        assert status["processes"] == 2


def test_cpu_quota_holds_over_a_second(home: Path) -> None:
    make_guest(home, gname("ct-cpu"), SERVICES + "[limits]\ncpu_quota = 20\n")
    with running(home, gname("ct-cpu")):
        before = _status(home, gname("ct-cpu"))["cpu_seconds"]
        t0 = time.monotonic()
        guest_exec(
            home,
            gname("ct-cpu"),
            "sh",
            "-c",
            "for i in 1 2; do timeout 1.5 sh -c 'while :; do :; done' & done; wait",
            timeout=30,
        )
        wall = time.monotonic() - t0
        used = _status(home, gname("ct-cpu"))["cpu_seconds"]
        assert isinstance(before, float)
        assert isinstance(used, float)
        share = (used - before) / wall
        assert 0.05 < share < 0.3, f"{share:.0%} of one CPU"
