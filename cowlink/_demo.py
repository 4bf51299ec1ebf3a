"""`make demo`: two small guests in a scratch home, unified, with what it saved, then mounted.

The guests are Debian minbase trees built with debootstrap when a Debian mirror is
reachable, or generated trees otherwise. Pristine trees are kept beside the scratch home
so that a second demo starts from the same point without building anything.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

DEMO_DIR = Path(os.environ.get("COWLINK_DEMO_DIR", "/var/tmp/cowlink-demo"))
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
GUESTS = ("web1", "web2")


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*args: str, check: bool = True) -> int:
    print("$ " + " ".join(args), flush=True)
    return subprocess.run(args, check=check).returncode


def cowlink(*args: str, check: bool = True) -> int:
    return run(
        sys.executable, "-m", "cowlink", "--home", str(DEMO_DIR / "home"), *args, check=check
    )


def mirror_reachable() -> bool:
    host = urllib.parse.urlparse(MIRROR).hostname or ""
    try:
        with socket.create_connection((host, 80), timeout=5):
            return True
    except OSError:
        return False


def build_debootstrap(dest: Path, cache: Path) -> bool:
    cache.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    code = run(
        "debootstrap",
        "--variant=minbase",
        f"--cache-dir={cache}",
        "bookworm",
        str(partial),
        MIRROR,
        check=False,
    )
    if code != 0:
        shutil.rmtree(partial, ignore_errors=True)
        return False
    partial.rename(dest)
    return True


def build_generated(dest: Path, seed: int) -> None:
    """A stand-in for a Debian tree: a shared 'distribution' plus a few files of its own."""
    common = random.Random(2026)
    own = random.Random(seed)
    for i in range(1500):
        size = int(common.lognormvariate(8, 1.6))
        path = dest / "usr" / ("lib", "bin", "share/doc")[i % 3] / f"pkg{i // 20}" / f"file{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(common.randbytes(size))
        os.utime(path, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    for i in range(50):
        path = dest / "var/lib/app" / f"data{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(own.randbytes(int(own.lognormvariate(8, 1))))
    (dest / "etc").mkdir(exist_ok=True)
    (dest / "etc/hostname").write_text(f"guest{seed}\n")


def pristine_trees() -> list[Path]:
    pristine = DEMO_DIR / "pristine"
    pristine.mkdir(parents=True, exist_ok=True)
    trees = [pristine / name for name in GUESTS]
    if all(t.is_dir() for t in trees):
        return trees
    if shutil.which("debootstrap") and mirror_reachable():
        say("building two Debian bookworm minbase guests with debootstrap (a few minutes, once)")
        if all(t.is_dir() or build_debootstrap(t, pristine / ".debs") for t in trees):
            return trees
    say("the Debian mirror is not reachable: generating two guest trees instead")
    for seed, tree in enumerate(trees):
        if not tree.is_dir():
            build_generated(tree, seed)
    return trees


def fresh_home(trees: list[Path]) -> None:
    home = DEMO_DIR / "home"
    if home.exists():
        subprocess.run(["chattr", "-R", "-f", "-i", str(home)], check=False)
        shutil.rmtree(home)
    for name, tree in zip(GUESTS, trees, strict=True):
        (home / "guests" / name).mkdir(parents=True)
        run("cp", "-a", "--reflink=auto", str(tree), str(home / "guests" / name / "root"))


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("make demo needs root (immutable flags, hardlinks across guests)")
    trees = pristine_trees()
    say(f"a scratch home in {DEMO_DIR / 'home'} with guests {', '.join(GUESTS)}")
    fresh_home(trees)
    run("du", "-sh", "--total", *(str(DEMO_DIR / "home/guests" / g / "root") for g in GUESTS))
    say("unify: identical files become one immutable object in the store")
    cowlink("unify")
    say("after unification (du counts each shared inode once)")
    run("du", "-sh", "--total", *(str(DEMO_DIR / "home/guests" / g / "root") for g in GUESTS))
    say("a rerun from cron finds nothing new to do")
    cowlink("unify")
    say("what each guest costs, and what unification saved")
    cowlink("du", "--top", "5", "--html", str(DEMO_DIR / "du.html"))
    print(f"(the same report as a web page: {DEMO_DIR / 'du.html'})")
    run_a_guest(GUESTS[0])
    demo_mount()


def shared_file(root: Path) -> Path | None:
    """A text file of the guest linked to the store and the other guest (3+ links)."""
    for pattern in ("usr/share/doc/*/copyright", "usr/*/*/*", "**/*"):
        for path in sorted(root.glob(pattern)):
            if path.is_file() and not path.is_symlink() and path.lstat().st_nlink > 2:
                return path
    return None


def demo_mount() -> None:
    home = DEMO_DIR / "home"
    guest, other = (home / "guests" / g / "root" for g in GUESTS)
    target = shared_file(guest)
    if target is None:
        return
    rel = target.relative_to(guest)
    mnt = DEMO_DIR / "mnt"
    mnt.mkdir(exist_ok=True)
    say(f"mount {GUESTS[0]} copy-on-write and append to a shared file through it")
    cowlink("mount", "--guest", GUESTS[0], str(mnt))
    try:
        run("stat", "-c", "%n: inode %i, %h links", str(target), str(other / rel))
        run("sh", "-c", f"echo 'changed in {GUESTS[0]}' >> '{mnt / rel}'")
        say("the guest has its own copy now; the other guest and the store are unchanged")
        run("tail", "-c", "40", str(mnt / rel))
        run("stat", "-c", "%n: inode %i, %h links", str(target), str(other / rel))
        run("cmp", str(other / rel), str(DEMO_DIR / "pristine" / GUESTS[1] / rel))
    finally:
        cowlink("umount", str(mnt))


GUEST_TOML = """\
hostname = "{name}"

[init]
style = "services"
services = [{{ start = "sleep infinity &" }}]

[limits]
memory_max = "256M"
pids_max = 256
cpu_quota = 50

[network]
mode = "none"
"""


def run_a_guest(name: str) -> None:
    root = DEMO_DIR / "home/guests" / name / "root"
    if not (root / "bin/sh").exists():
        say(f"{name} is a generated tree with no programs in it: not started")
        return
    (root.parent / "guest.toml").write_text(GUEST_TOML.format(name=name))
    say(f"start {name} in its own namespaces, with memory, CPU and process limits")
    cowlink("guest", "start", name)
    try:
        cowlink(
            "guest",
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "hostname; head -1 /etc/os-release; echo processes it sees: /proc/[0-9]*",
        )
        cowlink("guest", "status", name)
        cowlink("guest", "list")
    finally:
        cowlink("guest", "stop", name)


if __name__ == "__main__":
    main()
