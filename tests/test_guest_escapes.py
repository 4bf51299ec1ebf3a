"""The escape suite: root inside a guest tries the known ways out; each must fail."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests._guest import gname, guest_exec, make_guest, need_guests, running
from tests._util import can_set_immutable, clear_immutable_tree, need

pytestmark = pytest.mark.privileged

PROBE = Path(__file__).with_name("guest_probe.py")
ATTEMPTS = (
    "chroot_twice",
    "host_marker_visible",
    "open_by_handle_at",
    "mount_tmpfs",
    "remount_proc_sys_rw",
    "mount_cgroup_release_agent",
    "write_proc_sys",
    "write_sysrq_trigger",
    "write_sysfs",
    "init_module",
    "finit_module",
    "keyctl",
    "bpf",
    "unshare_user",
    "mknod_host_disk",
    "kill_host_process",
    "ptrace_init",
    "read_init_exe",
    "see_host_processes",
    "reach_store",
    "write_shared_file",
    "set_hostname",
    "tiocsti_console",
    "raw_disk_via_sys",
    "mknod_host_console",
    "mknod_host_pty",
    "open_dev_tty",
    "net_admin_on_host_network",
)


@pytest.fixture(scope="module")
def escapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Run the probe once in guest A (sharing an immutable file with guest B); the results."""
    need_guests()
    need(can_set_immutable(), "needs immutable-flag support")
    home = tmp_path_factory.mktemp("escapes") / "home"
    toml = '[init]\nstyle = "services"\nservices = [{start = "sleep 1000 &"}]\n'
    a = make_guest(home, gname("ct-esc-a"), toml, with_usr=True) / "root"
    b = make_guest(home, gname("ct-esc-b"), toml, with_usr=True) / "root"
    # A unified file as `cowlink unify` leaves it: one immutable inode in both guests.
    (b / "etc" / "shared").write_text("original\n")
    os.link(b / "etc" / "shared", a / "etc" / "shared")
    subprocess.run(["chattr", "+i", str(b / "etc" / "shared")], check=True)
    (home / "store").mkdir()
    store_marker = home / "store" / "cowlink-store-object-7f3a"
    store_marker.write_text("object")
    shutil.copy(PROBE, a / "root" / "probe.py")
    host_marker = home / "host-only-marker"
    host_marker.write_text("host")
    tag = "cowlink-host-tag-91c2"
    sleeper = subprocess.Popen(["sh", "-c", f"sleep 60; : {tag}"])
    disk = os.stat("/")
    hostname = socket.gethostname()
    probe_args = {
        "host_marker": str(host_marker),
        "host_pid": sleeper.pid,
        "host_tag": tag,
        "disk_major": os.major(disk.st_dev),
        "disk_minor": os.minor(disk.st_dev),
        "store": str(home / "store"),
        "store_marker": str(store_marker),
    }
    try:
        with running(home, gname("ct-esc-a")), running(home, gname("ct-esc-b")):
            result = guest_exec(
                home,
                gname("ct-esc-a"),
                "/usr/bin/python3",
                "/root/probe.py",
                json.dumps(probe_args),
            )
            assert result.returncode == 0, result.stderr
            found: dict[str, str] = json.loads(result.stdout)
            found["host_unharmed"] = (
                "blocked"
                if sleeper.poll() is None and socket.gethostname() == hostname
                else "ESCAPED: host process killed or hostname changed"
            )
            b_view = guest_exec(home, gname("ct-esc-b"), "cat", "/etc/shared").stdout
            found["b_sees_change"] = (
                "blocked" if b_view == "original\n" else f"ESCAPED: B sees {b_view!r}"
            )
            return found
    finally:
        sleeper.kill()
        sleeper.wait()
        clear_immutable_tree(home)


@pytest.mark.parametrize("name", [*ATTEMPTS, "host_unharmed", "b_sees_change"])
def test_escape_fails(escapes: dict[str, str], name: str) -> None:
    assert name in escapes, f"probe did not run {name}"
    assert escapes[name].startswith("blocked"), escapes[name]
