"""Guest start and stop: `cowlink guest` against bwrap and unshare on the same busybox tree.

start = from launching until a command inside the guest has run; stop = from asking the
guest to end until every one of its processes is gone. "cowlink" runs the command line
(a fresh python each time); "cowlink-lib" calls the library, which isolates the
launcher's own cost from the interpreter's start-up. Each tool runs the same tree in
new pid, mount, uts, ipc and cgroup namespaces. Prints medians, ratios and peak RSS.

    python -m bench.bench_guest [--runs N]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ._measure import descendants

APPLETS = ("sh", "true", "sleep", "echo", "cat", "ls")


def busybox_tree(root: Path) -> None:
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")


def _peak_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except OSError:
        return True


def run_native(argv: list[str]) -> tuple[float, float, int]:
    """(start s, stop s, peak RSS KiB) of a launcher that runs `sh -c 'echo up; sleep'`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*argv, "/bin/sh", "-c", "echo up; exec sleep 1000"], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    started = time.perf_counter() - t0
    assert line == b"up\n", line
    inside = descendants(proc.pid)
    peak = sum(_peak_kib(p) for p in [proc.pid, *inside])
    t1 = time.perf_counter()
    # Both tools end their pid namespace when their own process dies (bwrap: its pid 1
    # is its child; unshare: --kill-child); SIGKILL is the one signal both act on.
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    while not all(_gone(p) for p in inside):
        time.sleep(0.0005)
    stopped = time.perf_counter() - t1
    proc.stdout.close()
    return started, stopped, peak


def run_cowlink(home: Path) -> tuple[float, float, int]:
    base = [sys.executable, "-m", "cowlink", "--home", str(home), "guest"]
    t0 = time.perf_counter()
    subprocess.run([*base, "start", "bench"], check=True, stdout=subprocess.DEVNULL)
    started = time.perf_counter() - t0
    data = json.loads((home / "run" / "bench" / "state.json").read_text())
    peak = _peak_kib(data["monitor_pid"]) + _peak_kib(data["init_pid"])
    t1 = time.perf_counter()
    subprocess.run([*base, "stop", "bench"], check=True, stdout=subprocess.DEVNULL)
    stopped = time.perf_counter() - t1
    return started, stopped, peak


def run_cowlink_library(home: Path) -> tuple[float, float, int]:
    """The same through the library, without the command line's interpreter start-up."""
    from cowlink import _guests
    from cowlink._home import Home

    h = Home(home)
    t0 = time.perf_counter()
    state = _guests.start(h, "bench")
    started = time.perf_counter() - t0
    peak = _peak_kib(state.monitor_pid) + _peak_kib(state.init_pid)
    t1 = time.perf_counter()
    _guests.stop(h, "bench")
    return started, time.perf_counter() - t1, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_guest needs root")
    # An installed package ships byte code; a checkout run with PYTHONDONTWRITEBYTECODE
    # would otherwise compile every module on every command and time that instead.
    import click

    import cowlink

    for package in (cowlink, click):
        compileall.compile_dir(os.path.dirname(package.__file__ or ""), quiet=1)
    with tempfile.TemporaryDirectory(prefix="cowlink-bench-") as tmp:
        home = Path(tmp) / "home"
        root = home / "guests" / "bench" / "root"
        busybox_tree(root)
        # services init: `start` returns once this command has run inside.
        (root.parent / "guest.toml").write_text(
            '[init]\nstyle = "services"\nservices = [{start = "echo up"}]\n[stop]\ntimeout = 5\n'
        )
        tools: dict[str, Callable[[], tuple[float, float, int]]] = {
            "cowlink": lambda: run_cowlink(home),
            "cowlink-lib": lambda: run_cowlink_library(home),
            "bwrap": lambda: run_native(
                [
                    "bwrap",
                    "--die-with-parent",
                    "--unshare-pid",
                    "--unshare-ipc",
                    "--unshare-uts",
                    "--unshare-cgroup",
                    "--bind",
                    str(root),
                    "/",
                    "--proc",
                    "/proc",
                    "--dev",
                    "/dev",
                ]
            ),
            "unshare": lambda: run_native(
                [
                    "unshare",
                    "--pid",
                    "--fork",
                    "--kill-child",
                    "--mount",
                    "--uts",
                    "--ipc",
                    "--cgroup",
                    "--root",
                    str(root),
                    "--mount-proc",
                ]
            ),
        }
        results: dict[str, list[tuple[float, float, int]]] = {t: [] for t in tools}
        for _ in range(args.runs):  # interleaved, so drift hits every tool alike
            for name, run in tools.items():
                results[name].append(run())
    med = {
        name: (
            statistics.median(r[0] for r in runs),
            statistics.median(r[1] for r in runs),
            max(r[2] for r in runs),
        )
        for name, runs in results.items()
    }
    print(f"runs: {args.runs} each, medians")
    print(f"{'tool':<12} {'start ms':>9} {'stop ms':>9} {'peak RSS MiB':>13}")
    for name, (start, stop, peak) in med.items():
        print(f"{name:<12} {start * 1000:>9.1f} {stop * 1000:>9.1f} {peak / 1024:>13.1f}")
    for mine in ("cowlink", "cowlink-lib"):
        for other in ("bwrap", "unshare"):
            c, o = med[mine], med[other]
            print(f"{mine}/{other}: start x{c[0] / o[0]:.1f}, stop x{c[1] / o[1]:.1f}")


if __name__ == "__main__":
    main()
