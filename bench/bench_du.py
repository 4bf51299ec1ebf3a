"""`cowlink du` against `du -s` on a unified copy of the real guest corpus, warm, same run.

Usage (as root, from the repository):

    .venv/bin/python -m bench.bench_du [--runs N] [--keep DIR | --reuse DIR]

It copies /var/cache/cowlink-corpus/g1..g4 into a home under /var/tmp (the same
filesystem as the corpus), unifies it with `cowlink unify` (falling back to util-linux
`hardlink` plus a fake store when unify is unavailable), warms the caches, then times,
alternating: `du -s --total -B1` over the guest roots, the same plus the store (what
`cowlink du` walks), `cowlink du` as a process (the installed `cowlink` script, as an
operator runs it), its start-up alone (`python -c pass`, `cowlink --version`), and the
in-process measurement alone. Wall times are the minimum and median of N runs; peak RSS
comes from GNU time.

cowlink's modules are byte-compiled first, as `pip install` does: with an editable
install and PYTHONDONTWRITEBYTECODE set, every run would otherwise compile them again.
"""

from __future__ import annotations

import argparse
import compileall
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CORPUS = Path("/var/cache/cowlink-corpus")
GUESTS = ("g1", "g2", "g3", "g4")


def _cpu() -> float:
    """CPU seconds (user + system) used so far by this process and its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _run(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one process, its output discarded."""
    cpu = _cpu()
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.decode()}")
    return wall, _cpu() - cpu


def _peak_rss_kib(cmd: list[str]) -> int:
    """Peak RSS through GNU time: wait4() on our own child would also count the memory
    the forked Python child had before exec."""
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    return int(proc.stderr.decode().strip().splitlines()[-1])


def _prepare(home: Path) -> str:
    """Copy the corpus into `home` and unify it; returns how it was unified."""
    for g in GUESTS:
        if not (CORPUS / f".done-{g}").exists():
            raise SystemExit(f"corpus guest {g} is not ready ({CORPUS}/.done-{g} missing)")
        (home / "guests" / g).mkdir(parents=True)
        subprocess.run(["cp", "-a", str(CORPUS / g), str(home / "guests" / g / "root")], check=True)
    unify = subprocess.run(
        [sys.executable, "-m", "cowlink", "--home", str(home), "unify", "-q"],
        capture_output=True,
        text=True,
    )
    if unify.returncode in (0, 1):
        return "cowlink unify"
    # Fallback: hardlink the duplicates, then give each multiply-linked inode a store name.
    roots = [str(home / "guests" / g / "root") for g in GUESTS]
    subprocess.run(["hardlink", "-q", "-X", *roots], check=True)
    store = home / "store"
    seen: set[int] = set()
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if st.st_nlink > 1 and st.st_ino not in seen and os.path.isfile(path):
                    seen.add(st.st_ino)
                    h = f"{st.st_ino:08x}"
                    obj = store / h[:2] / h[2:4] / h
                    obj.parent.mkdir(parents=True, exist_ok=True)
                    os.link(path, obj)
    return "hardlink -X + fake store"


def _fmt(samples: list[float]) -> str:
    return f"min {min(samples) * 1000:7.1f} ms  median {statistics.median(samples) * 1000:7.1f} ms"


def _lanes_study(home: Path, seconds: float) -> None:
    """When does the second lane pay? Paired runs, in random order, against the host's state."""
    import random

    from cowlink._du import measure_home
    from cowlink._home import Home

    h = Home(home)
    runs: list[tuple[float, int, float, float]] = []  # load1, runnable, one lane, two lanes
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        fields = Path("/proc/loadavg").read_text().split()
        wall: dict[bool, float] = {}
        for parallel in random.sample([False, True], 2):
            start = time.perf_counter()
            measure_home(h, parallel=parallel)
            wall[parallel] = time.perf_counter() - start
        runs.append((float(fields[0]), int(fields[3].split("/")[0]), wall[False], wall[True]))
        time.sleep(0.2)

    def row(label: str, sample: list[tuple[float, int, float, float]]) -> None:
        if sample:
            one = statistics.median(r[2] for r in sample) * 1000
            two = statistics.median(r[3] for r in sample) * 1000
            wins = sum(r[3] < r[2] for r in sample)
            print(
                f"{label:28s} n={len(sample):4d}  median one lane {one:6.1f} ms,"
                f" two lanes {two:6.1f} ms; two won {wins}/{len(sample)}"
            )

    row("all", runs)
    for n in sorted({r[1] for r in runs}):
        row(f"runnable (this one incl.) {n}", [r for r in runs if r[1] == n])
    for lo in sorted({int(r[0] * 2) / 2 for r in runs}):
        row(f"load1 in [{lo}, {lo + 0.5})", [r for r in runs if lo <= r[0] < lo + 0.5])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--keep", metavar="DIR", help="build the unified home in DIR and keep it")
    group.add_argument("--reuse", metavar="DIR", help="a home built earlier with --keep")
    parser.add_argument(
        "--lanes-study",
        type=float,
        metavar="SECONDS",
        help="instead: for SECONDS, pair one-lane and two-lane measure_home() runs and"
        " tabulate who won by what /proc/loadavg said just before",
    )
    args = parser.parse_args()
    if args.lanes_study:
        if not args.reuse:
            parser.error("--lanes-study needs --reuse DIR")
        _lanes_study(Path(args.reuse), args.lanes_study)
        return

    if args.reuse:
        home, how, cleanup = Path(args.reuse), "reused", False
    else:
        home = Path(args.keep or tempfile.mkdtemp(prefix="bench-du-", dir="/var/tmp"))
        home.mkdir(parents=True, exist_ok=True)
        cleanup = not args.keep
        how = _prepare(home)
    try:
        roots = [str(home / "guests" / g / "root") for g in GUESTS]
        store = str(home / "store")
        script = Path(sys.executable).with_name("cowlink")
        cowlink = [str(script)] if script.exists() else [sys.executable, "-m", "cowlink"]
        commands = {
            "du -s --total (guest roots)": ["du", "-s", "--total", "-B1", *roots],
            "du -s --total (roots + store)": ["du", "-s", "--total", "-B1", *roots, store],
            "cowlink du": [*cowlink, "--home", str(home), "du", "--bytes"],
            "  python -c pass": [sys.executable, "-c", "pass"],
            "  cowlink --version": [*cowlink, "--version"],
        }
        import cowlink as package
        from cowlink._du import measure_home
        from cowlink._home import Home

        compileall.compile_dir(os.path.dirname(package.__file__), quiet=1)
        print(f"load average at the start: {os.getloadavg()[0]:.2f}")

        h = Home(home)
        for cmd in commands.values():
            _run(cmd)  # warm the dentry and inode caches and the .pyc files
        walls: dict[str, list[float]] = {name: [] for name in commands}
        cpus: dict[str, list[float]] = {name: [] for name in commands}
        lanes: dict[str, bool | None] = {
            "measure_home() in process": None,
            "  forced into one process": False,
            "  forced into two processes": True,
        }
        for name in lanes:
            walls[name] = []
            cpus[name] = []
        for _ in range(args.runs):
            for name, cmd in commands.items():
                wall, cpu = _run(cmd)
                walls[name].append(wall)
                cpus[name].append(cpu)
            for name, parallel in lanes.items():
                cpu = _cpu()
                start = time.perf_counter()
                report = measure_home(h, parallel=parallel)
                walls[name].append(time.perf_counter() - start)
                cpus[name].append(_cpu() - cpu)
        rss = {name: _peak_rss_kib(cmd) for name, cmd in commands.items()}

        t = report.totals
        du_total = subprocess.run(
            ["du", "-s", "-x", "--total", "-B1", *roots], capture_output=True, text=True, check=True
        ).stdout.splitlines()[-1]
        agree = "agree" if int(du_total.split()[0]) == t.allocated_bytes else "DISAGREE"
        print(f"corpus: {len(roots)} guests, {t.files} files, {t.dirs} dirs, unified by {how}")
        print(
            f"allocated {t.allocated_bytes} B, saved {t.saved_bytes} B ({t.saved_ratio:.1%}),"
            f" store {t.store_objects} objects; totals and `du -sx --total` {agree}"
        )
        base = min(walls["du -s --total (guest roots)"])
        base_cpu = min(cpus["du -s --total (guest roots)"])
        for name, samples in walls.items():
            rss_text = f"  peak RSS {rss[name] / 1024:5.1f} MiB" if name in rss else ""
            print(
                f"{name:30s} wall {_fmt(samples)}  ratio {min(samples) / base:4.2f}"
                f"  CPU min {min(cpus[name]) * 1000:6.1f} ms"
                f" ratio {min(cpus[name]) / base_cpu:4.2f}{rss_text}"
            )
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    finally:
        if cleanup:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
