"""Helpers for the guest tests: tiny busybox guest roots, a home, and leak checks."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._util import need, need_root

BUSYBOX = "/bin/busybox"
APPLETS = (
    "sh",
    "ash",
    "ls",
    "cat",
    "echo",
    "sleep",
    "mount",
    "umount",
    "chroot",
    "hostname",
    "mknod",
    "kill",
    "ps",
    "id",
    "true",
    "false",
    "mkdir",
    "touch",
    "rm",
    "sync",
    "halt",
    "poweroff",
    "reboot",
    "head",
    "grep",
    "wc",
    "dd",
    "yes",
    "seq",
    "env",
    "test",
    "readlink",
    "uname",
    "ip",
    "ifconfig",
    "nc",
    "httpd",
    "setsid",
    "nohup",
    "timeout",
    "cut",
    "tr",
    "sed",
    "awk",
    "stat",
    "tail",
    "printf",
    "pwd",
    "ln",
    "chmod",
    "sysctl",
    "dmesg",
    "nsenter",
    "unshare",
)


# Guest names are host-wide (cgroups, veth names): a per-run suffix keeps two test runs
# on one machine (two worktrees, say) apart.
_RUN = os.getpid() % 1000


def gname(base: str) -> str:
    return f"{base}-{_RUN}"


def need_guests() -> None:
    need_root()
    need(os.path.exists(BUSYBOX), "needs busybox-static (/bin/busybox)")
    need(shutil.which("ip") is not None, "needs iproute2")


def busybox_root(root: Path, *, with_usr: bool = False) -> Path:
    """A guest root of one static busybox; with_usr adds lib links for a bound host /usr."""
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run", "var/log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "sbin" / "init").symlink_to("../bin/busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\ntty:x:5:\n")
    if with_usr:
        (root / "usr").mkdir()
        (root / "lib").symlink_to("usr/lib")
        (root / "lib64").symlink_to("usr/lib64")
    return root


def make_guest(home: Path, name: str, toml: str = "", *, with_usr: bool = False) -> Path:
    gdir = home / "guests" / name
    busybox_root(gdir / "root", with_usr=with_usr)
    if with_usr:
        toml += '\n[[mount]]\nsource = "/usr"\ntarget = "/usr"\nreadonly = true\n'
    (gdir / "guest.toml").write_text(toml)
    return gdir


def cowlink(
    home: Path, *args: str, input: str | None = None, timeout: float = 60, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a subprocess, as an operator would."""
    result = subprocess.run(
        [sys.executable, "-m", "cowlink", "--home", str(home), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"cowlink {' '.join(args)}: {result.returncode}\n{result.stderr}")
    return result


def guest_exec(
    home: Path, name: str, *argv: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return cowlink(home, "guest", "exec", name, "--", *argv, timeout=timeout)


def force_stop(home: Path, name: str) -> None:
    """Best-effort teardown for a test that failed with its guest still up."""
    with contextlib.suppress(Exception):
        cowlink(home, "guest", "stop", name, "--timeout", "1", timeout=60)


@contextlib.contextmanager
def running(home: Path, name: str) -> Iterator[None]:
    result = cowlink(home, "guest", "start", name, "--timeout", "30")
    try:
        assert result.returncode == 0, result.stderr
        yield
    finally:
        force_stop(home, name)


def traces(home: Path, name: str) -> list[str]:
    """Everything a guest may leave on the host: mounts, cgroups, veth, state, processes."""
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        found += [line.split()[4] for line in f if str(home) in line.split()[4]]
    for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup"):
        if os.path.basename(dirpath) == name and "cowlink" in dirpath:
            found.append(dirpath)
        if dirpath.count("/") > 8:
            dirnames[:] = []
    veth = f"cl-{name}"[:15]
    if subprocess.run(["ip", "link", "show", veth], capture_output=True).returncode == 0:
        found.append(f"veth {veth}")
    run = home / "run"
    if run.exists():
        found += [str(p) for p in run.iterdir()]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                groups = Path(f"/proc/{pid}/cgroup").read_text()
                if f"/cowlink/{name}\n" in groups:
                    found.append(f"process {pid} in the guest's cgroups")
    return found


@pytest.fixture
def netns() -> Iterator[int]:
    need_guests()
    holder = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    try:
        deadline = time.monotonic() + 5
        while (
            Path(f"/proc/{holder.pid}/ns/net").stat().st_ino
            == Path("/proc/self/ns/net").stat().st_ino
        ):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def in_ns(pid: int, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cowlink_ns(pid: int, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return in_ns(pid, sys.executable, "-m", "cowlink", "--home", str(home), *args)
