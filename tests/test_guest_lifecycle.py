"""`cowlink guest` start/stop/exec/enter/status/list on tiny busybox guests (root)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests._guest import cowlink, gname, guest_exec, make_guest, need_guests, running, traces
from tests._util import need

pytestmark = pytest.mark.privileged

SERVICES = """
hostname = "box1"
[init]
style = "services"
services = [{ start = "sleep 1000 &", stop = "echo stopping-sleep > /dev/console" }]
"""


@pytest.fixture(autouse=True)
def _gate() -> None:
    need_guests()


def test_start_exec_status_list_stop(home: Path) -> None:
    make_guest(home, gname("ct-life"), SERVICES)
    with running(home, gname("ct-life")):
        again = cowlink(home, "guest", "start", gname("ct-life"))
        assert again.returncode != 0
        assert "already running" in again.stderr

        result = guest_exec(
            home, gname("ct-life"), "sh", "-c", "echo $$; hostname; echo err >&2; exit 7"
        )
        assert result.returncode == 7
        pid, hostname = result.stdout.split()
        assert hostname == "box1"
        assert int(pid) > 1  # a process in the guest's own pid namespace
        assert result.stderr == "err\n"

        piped = cowlink(
            home, "guest", "exec", gname("ct-life"), "--", "cat", input="through stdin\n"
        )
        assert piped.stdout == "through stdin\n"

        ps = guest_exec(home, gname("ct-life"), "sh", "-c", "ls /proc | grep -c '^[0-9]'")
        assert int(ps.stdout) <= 5  # init, sleep, sh, ls, grep: no host processes

        status = cowlink(home, "guest", "status", gname("ct-life"), "--json")
        assert status.returncode == 0
        data = json.loads(status.stdout)
        assert data["running"] is True
        assert data["processes"] == 2  # init and the sleep service
        assert any("sleep 1000" in p["command"] for p in data["process_list"])
        assert data["memory_bytes"] > 0
        assert data["monitor_alive"] is True

        listed = json.loads(cowlink(home, "guest", "list", "--json").stdout)
        assert [(g["name"], g["running"]) for g in listed] == [(gname("ct-life"), True)]

        stop = cowlink(home, "guest", "stop", gname("ct-life"))
        assert stop.returncode == 0, stop.stderr
    status = cowlink(home, "guest", "status", gname("ct-life"))
    assert status.returncode == 3
    assert "stopped" in status.stdout
    assert traces(home, gname("ct-life")) == []
    log = (home / "log" / f"{gname('ct-life')}.console").read_text()
    assert "stopping-sleep" in log  # the stop command ran, on the console


def test_stop_kills_ignoring_init_and_double_forked_daemons(home: Path) -> None:
    # A plain init that ignores SIGTERM (pid 1 has no default action) plus a setsid'd
    # daemon that also ignores it: only the kill after the timeout ends them.
    make_guest(
        home,
        gname("ct-stub"),
        '[init]\nstyle = "plain"\ncommand = ["/bin/sh", "-c", "trap \'\' TERM; '
        'setsid sh -c \'trap \\"\\" TERM; sleep 1000\' & exec sleep 1000"]\n'
        "[stop]\ntimeout = 1\n",
    )
    with running(home, gname("ct-stub")):
        assert (
            len(
                json.loads(cowlink(home, "guest", "status", gname("ct-stub"), "--json").stdout)[
                    "process_list"
                ]
            )
            >= 2
        )
        t0 = time.monotonic()
        assert cowlink(home, "guest", "stop", gname("ct-stub")).returncode == 0
        assert 0.9 < time.monotonic() - t0 < 15
    assert traces(home, gname("ct-stub")) == []


def test_sysv_init_runs_rc_scripts(home: Path) -> None:
    gdir = make_guest(home, gname("ct-sysv"), "")
    root = gdir / "root"
    rc = root / "etc" / "rc3.d"
    rc.mkdir(parents=True)
    (root / "etc" / "init.d").mkdir()
    for name in ("alpha", "beta"):
        script = root / "etc" / "init.d" / name
        script.write_text(
            f"#!/bin/sh\necho {name}-$1 >> /var/log/rc.log\n"
            f'[ "$1" = start ] && (sleep 1000 &)\nexit 0\n'
        )
        script.chmod(0o755)
    (rc / "S01alpha").symlink_to("../init.d/alpha")
    (rc / "S02beta").symlink_to("../init.d/beta")
    with running(home, gname("ct-sysv")):
        assert (root / "var/log/rc.log").read_text() == "alpha-start\nbeta-start\n"
        assert cowlink(home, "guest", "stop", gname("ct-sysv")).returncode == 0
    assert (root / "var/log/rc.log").read_text().splitlines()[2:] == ["beta-stop", "alpha-stop"]
    assert traces(home, gname("ct-sysv")) == []


def test_rescue_ends_with_its_command(home: Path) -> None:
    make_guest(
        home, gname("ct-resc"), '[init]\nstyle = "rescue"\ncommand = "echo rescued; sleep 1"\n'
    )
    with running(home, gname("ct-resc")):
        deadline = time.monotonic() + 10
        while cowlink(home, "guest", "status", gname("ct-resc")).returncode == 0:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert "rescued" in (home / "log" / f"{gname('ct-resc')}.console").read_text()
    assert traces(home, gname("ct-resc")) == []


def test_systemd_init_is_refused(home: Path) -> None:
    gdir = make_guest(home, gname("ct-sysd"), 'init = "plain"\n')
    (gdir / "root" / "lib" / "systemd").mkdir(parents=True)
    (gdir / "root" / "lib" / "systemd" / "systemd").write_text("")
    (gdir / "root" / "sbin" / "init").unlink()
    (gdir / "root" / "sbin" / "init").symlink_to("/lib/systemd/systemd")
    result = cowlink(home, "guest", "start", gname("ct-sysd"))
    assert result.returncode == 2
    assert "systemd" in result.stderr
    assert "sysv" in result.stderr
    assert traces(home, gname("ct-sysd")) == []


def test_bad_config_is_refused_before_anything(home: Path) -> None:
    make_guest(home, gname("ct-bad"), "[limits]\nmemroy_max = 3\n")
    result = cowlink(home, "guest", "start", gname("ct-bad"))
    assert result.returncode == 2
    assert "limits.memroy_max" in result.stderr
    assert traces(home, gname("ct-bad")) == []


def test_failure_mid_start_leaves_nothing(home: Path) -> None:
    # The bind source does not exist: init fails after cgroups, root mount and the veth
    # were created; every one of them must be undone.
    make_guest(
        home,
        gname("ct-fail"),
        '[init]\nstyle = "services"\nservices = [{start = "true"}]\n'
        '[network]\nmode = "veth"\naddress = "198.51.100.2/30"\n'
        f'[[mount]]\nsource = "{home}/missing"\ntarget = "/mnt"\n',
    )
    result = cowlink(home, "guest", "start", gname("ct-fail"))
    assert result.returncode == 2
    assert "failed to start" in result.stderr
    assert "missing" in result.stderr
    assert traces(home, gname("ct-fail")) == []
    assert cowlink(home, "guest", "status", gname("ct-fail")).returncode == 3


def test_stale_state_after_monitor_crash_is_cleaned(home: Path) -> None:
    make_guest(home, gname("ct-crash"), SERVICES)
    with running(home, gname("ct-crash")):
        state = json.loads((home / "run" / gname("ct-crash") / "state.json").read_text())
        os.kill(state["monitor_pid"], 9)
        time.sleep(0.2)
        status = json.loads(cowlink(home, "guest", "status", gname("ct-crash"), "--json").stdout)
        assert status["running"] is True
        assert status["monitor_alive"] is False
        again = cowlink(home, "guest", "start", gname("ct-crash"))
        assert again.returncode == 2
        assert "without its monitor" in again.stderr
        assert cowlink(home, "guest", "stop", gname("ct-crash")).returncode == 0
    assert traces(home, gname("ct-crash")) == []


def test_enter_uses_a_new_pty(home: Path) -> None:
    make_guest(home, gname("ct-tty"), SERVICES)
    with running(home, gname("ct-tty")):
        result = cowlink(home, "guest", "enter", gname("ct-tty"), input="tty; exit 5\n", timeout=30)
        assert result.returncode == 5
        assert "/dev/pts/0" in result.stdout  # the guest's own devpts, not ours


def test_exec_and_status_of_a_stopped_guest(home: Path) -> None:
    make_guest(home, gname("ct-off"), SERVICES)
    assert guest_exec(home, gname("ct-off"), "true").returncode == 3
    assert cowlink(home, "guest", "stop", gname("ct-off")).returncode == 3
    listed = cowlink(home, "guest", "list")
    assert gname("ct-off") in listed.stdout
    assert "stopped" in listed.stdout


def test_restart(home: Path) -> None:
    make_guest(home, gname("ct-rest"), SERVICES)
    with running(home, gname("ct-rest")):
        before = json.loads(cowlink(home, "guest", "status", gname("ct-rest"), "--json").stdout)
        assert cowlink(home, "guest", "restart", gname("ct-rest")).returncode == 0
        after = json.loads(cowlink(home, "guest", "status", gname("ct-rest"), "--json").stdout)
        assert after["running"] is True
        assert after["init_pid"] != before["init_pid"]


def test_build_from_tree(home: Path, tmp_path: Path) -> None:
    src = make_guest(tmp_path / "src", "x") / "root"
    result = cowlink(home, "guest", "build", gname("ct-built"), "--from", str(src))
    assert result.returncode == 0, result.stderr
    assert (home / "guests" / gname("ct-built") / "root/bin/busybox").is_file()
    assert (
        f'hostname = "{gname("ct-built")}"'
        in (home / "guests" / gname("ct-built") / "guest.toml").read_text()
    )
    again = cowlink(home, "guest", "build", gname("ct-built"), "--from", str(src))
    assert again.returncode == 2
    assert "already exists" in again.stderr
    with running(home, gname("ct-built")):
        assert guest_exec(home, gname("ct-built"), "hostname").stdout == gname("ct-built") + "\n"


def test_start_that_hangs_is_undone_after_the_timeout(home: Path) -> None:
    make_guest(
        home,
        gname("ct-hang"),
        '[init]\nstyle = "services"\nservices = [{start = "sleep 1000"}]\n'
        '[network]\nmode = "none"\n',
    )
    t0 = time.monotonic()
    result = cowlink(home, "guest", "start", gname("ct-hang"), "--timeout", "1")
    assert result.returncode == 2
    assert "not up after 1 s" in result.stderr
    assert time.monotonic() - t0 < 20
    assert traces(home, gname("ct-hang")) == []


def test_console_log_is_capped(tmp_path: Path) -> None:
    from cowlink._monitor import ConsoleLog

    log = ConsoleLog(tmp_path / "g.console", cap=1000)
    for i in range(50):
        log.write(f"line {i:04d} ".encode() * 10)
    log.close()
    assert (tmp_path / "g.console").stat().st_size <= 1000
    assert (tmp_path / "g.console.1").stat().st_size <= 1000
    assert (tmp_path / "g.console").read_bytes().endswith(b"line 0049 ")


def test_console_log_captures_init_output(home: Path) -> None:
    make_guest(
        home,
        gname("ct-cons"),
        '[init]\nstyle = "services"\nservices = [{start = "echo hello-console; sleep 1000 &"}]\n',
    )
    with running(home, gname("ct-cons")):
        log = home / "log" / f"{gname('ct-cons')}.console"
        deadline = time.monotonic() + 5
        while "hello-console" not in log.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)


def _init_pid(home: Path, name: str) -> int | None:
    data = json.loads(cowlink(home, "guest", "status", name, "--json").stdout)
    pid = data["init_pid"]
    assert pid is None or isinstance(pid, int)
    return pid


def test_reboot_inside_restarts_the_guest(home: Path) -> None:
    make_guest(home, gname("ct-boot"), SERVICES)
    with running(home, gname("ct-boot")):
        first = _init_pid(home, gname("ct-boot"))
        guest_exec(home, gname("ct-boot"), "reboot", "-f")  # reboot(2): SIGHUP to the guest's init
        deadline = time.monotonic() + 15
        while _init_pid(home, gname("ct-boot")) in (first, None):
            assert time.monotonic() < deadline, "the guest did not come back"
            time.sleep(0.1)
        assert guest_exec(home, gname("ct-boot"), "true").returncode == 0
        assert cowlink(home, "guest", "stop", gname("ct-boot")).returncode == 0
        time.sleep(0.3)
        assert _init_pid(home, gname("ct-boot")) is None
    assert traces(home, gname("ct-boot")) == []


def test_busybox_init_as_plain_init_stops_for_good(home: Path) -> None:
    # busybox init answers SIGTERM by rebooting; `guest stop` must still end the guest.
    gdir = make_guest(home, gname("ct-bbinit"), 'init = "plain"\n[stop]\ntimeout = 3\n')
    (gdir / "root" / "etc" / "inittab").write_text(
        "::sysinit:/bin/echo booted-by-busybox\n::respawn:/bin/sleep 1000\n"
    )
    with running(home, gname("ct-bbinit")):
        assert _init_pid(home, gname("ct-bbinit")) is not None
        assert cowlink(home, "guest", "stop", gname("ct-bbinit")).returncode == 0
        time.sleep(0.3)
        assert _init_pid(home, gname("ct-bbinit")) is None
    assert traces(home, gname("ct-bbinit")) == []
    assert "booted-by-busybox" in (home / "log" / f"{gname('ct-bbinit')}.console").read_text()


def test_missing_init_fails_cleanly(home: Path) -> None:
    make_guest(
        home, gname("ct-noinit"), '[init]\nstyle = "plain"\ncommand = ["/sbin/nothing-here"]\n'
    )
    result = cowlink(home, "guest", "start", gname("ct-noinit"))
    assert result.returncode == 2
    assert "/sbin/nothing-here" in result.stderr
    assert traces(home, gname("ct-noinit")) == []


def test_build_arguments_and_failed_debootstrap(home: Path) -> None:
    both = cowlink(
        home, "guest", "build", gname("ct-db"), "--debootstrap", "bookworm", "--from", "/"
    )
    assert both.returncode == 2
    assert "exactly one" in both.stderr
    need(shutil.which("debootstrap") is not None, "needs debootstrap")
    failed = cowlink(
        home,
        "guest",
        "build",
        gname("ct-db"),
        "--debootstrap",
        "bookworm",
        "--mirror",
        f"file://{home}/no-mirror",
        "--variant",
        "minbase",
    )
    assert failed.returncode == 2
    assert "debootstrap" in failed.stderr
    assert not (home / "guests" / gname("ct-db")).exists()


def test_exec_passes_signals_on(home: Path) -> None:
    import subprocess
    import sys

    make_guest(home, gname("ct-sig"), SERVICES)
    with running(home, gname("ct-sig")):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cowlink",
                "--home",
                str(home),
                "guest",
                "exec",
                gname("ct-sig"),
                "--",
                "sleep",
                "30",
            ],
        )
        try:
            deadline = time.monotonic() + 10
            while "sleep 30" not in cowlink(home, "guest", "status", gname("ct-sig")).stdout:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            proc.terminate()
            assert proc.wait(timeout=10) == 128 + 15  # the sleep inside died of our SIGTERM
        finally:
            proc.kill()
            proc.wait()
        status = cowlink(home, "guest", "status", gname("ct-sig")).stdout
        assert "sleep 30" not in status


def test_interrupted_start_takes_the_guest_down(home: Path) -> None:
    import subprocess
    import sys

    make_guest(
        home, gname("ct-intr"), '[init]\nstyle = "services"\nservices = [{start = "sleep 1000"}]\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "cowlink", "--home", str(home), "guest", "start", gname("ct-intr")],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while "sleep 1000" not in cowlink(home, "guest", "status", gname("ct-intr")).stdout:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.terminate()
        assert proc.wait(timeout=20) == 128 + 15
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert traces(home, gname("ct-intr")) == []
