"""cowlink mount against native ext4 and fuse-overlayfs, on the same data in the same run.

    .venv/bin/python -m bench.bench_mount [--corpus DIR] [--size-mib N] [--workdir DIR]

Workloads: sequential read of a cached file, sequential write with fsync, a stat walk
of a Debian guest tree (cold: caches dropped and filesystems remounted; warm: again at
once), and untar of that tree. cowlink mounts a guest unified with a second copy of the
tree; fuse-overlayfs has a plain copy as lowerdir. Each measurement runs `--repeat`
times, the three trees in turn (the order reversed every other run). Prints min and
median seconds, cowlink's ratios against fuse-overlayfs, each daemon's CPU time (user +
system, median per run), its peak RSS, and the load average before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

CHUNK = 1 << 20


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def cowlink(home: Path, *args: str) -> None:
    run(sys.executable, "-m", "cowlink", "--home", str(home), *args)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_file(path: Path) -> None:
    buf = bytearray(CHUNK)
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)


def write_file(path: Path, size: int) -> None:
    data = os.urandom(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // CHUNK):
            os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def stat_walk(root: Path) -> int:
    count = 0
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                count += 1
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                del st
    return count


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pid_of_mount(home: Path) -> int:
    return int(next((home / "run").glob("mount-*.pid")).read_text())


class Setup:
    """The three trees: native ext4, cowlink's mount, fuse-overlayfs's mount."""

    def __init__(self, work: Path, corpus: Path, size: int) -> None:
        self.work = work
        self.home = work / "home"
        self.guest = work / "g1"
        self.twin = work / "g2"
        self.lower = work / "lower"
        self.native = work / "native"
        self.cow_mnt = work / "cow"
        self.ovl_mnt = work / "ovl"
        for d in (self.cow_mnt, self.ovl_mnt, work / "upper", work / "ovlwork"):
            d.mkdir()
        for d in (self.guest, self.twin, self.lower, self.native):
            run("cp", "-a", str(corpus), str(d))
            write_file(d / "big", size)
        run("cp", "-a", "--reflink=never", str(self.guest / "big"), str(self.twin / "big"))
        cowlink(self.home, "unify", "--no-default-excludes", str(self.guest), str(self.twin))
        self.ovl_pid = 0

    def mount(self) -> None:
        cowlink(self.home, "mount", str(self.guest), str(self.cow_mnt))
        ovl = subprocess.Popen(
            [
                "fuse-overlayfs",
                "-f",
                "-o",
                f"lowerdir={self.lower},upperdir={self.work / 'upper'},"
                f"workdir={self.work / 'ovlwork'},allow_other",
                str(self.ovl_mnt),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.ovl_pid = ovl.pid
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.ovl_mnt) and time.monotonic() < deadline:
            time.sleep(0.05)

    def umount(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            cowlink(self.home, "umount", str(self.cow_mnt))
        subprocess.run(["fusermount3", "-u", str(self.ovl_mnt)], check=False)
        if self.ovl_pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.ovl_pid, 0)

    def trees(self) -> dict[str, Path]:
        return {"ext4": self.native, "cowlink": self.cow_mnt, "fuse-overlayfs": self.ovl_mnt}

    def daemons(self) -> dict[str, int]:
        return {"cowlink": pid_of_mount(self.home), "fuse-overlayfs": self.ovl_pid}


@contextlib.contextmanager
def mounted(setup: Setup) -> Iterator[None]:
    setup.mount()
    try:
        yield
    finally:
        setup.umount()


class Results:
    """Every run's wall time, and the daemons' CPU time for it, by workload and tree."""

    def __init__(self) -> None:
        self.wall: dict[str, dict[str, list[float]]] = {}
        self.cpu: dict[str, dict[str, list[float]]] = {}

    def timed(
        self, workload: str, name: str, fn: Callable[[], object], daemons: dict[str, int]
    ) -> None:
        pid = daemons.get(name)
        cpu = cpu_seconds(pid) if pid else 0.0
        self.wall.setdefault(workload, {}).setdefault(name, []).append(timed(fn))
        if pid:
            used = cpu_seconds(pid) - cpu
            self.cpu.setdefault(workload, {}).setdefault(name, []).append(used)

    def render(self) -> list[str]:
        med = statistics.median
        head = f"{'workload':<20}{'tree':<16}{'min s':>9}{'median s':>10}{'daemon CPU s':>14}"
        lines = [head]
        for workload, by in self.wall.items():
            for name, times in by.items():
                cpu = self.cpu.get(workload, {}).get(name)
                cpu_text = f"{med(cpu):>14.3f}" if cpu else f"{'-':>14}"
                lines.append(
                    f"{workload:<20}{name:<16}{min(times):>9.3f}{med(times):>10.3f}{cpu_text}"
                )
            cow, ovl = by["cowlink"], by["fuse-overlayfs"]
            lines.append(
                f"{'':<20}{'cow/ovl':<16}{min(cow) / min(ovl):>8.2f}x{med(cow) / med(ovl):>9.2f}x"
            )
        return lines


def in_turn(trees: dict[str, Path], run: int) -> list[tuple[str, Path]]:
    """The trees in turn, the order reversed every other run (neither goes first always)."""
    items = list(trees.items())
    return items if run % 2 == 0 else items[::-1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default="/var/cache/cowlink-corpus/g1")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement")
    args = parser.parse_args()
    size = args.size_mib * CHUNK
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-mount-", dir=args.workdir))
    results = Results()
    rss: dict[str, int] = {}
    try:
        setup = Setup(work, Path(args.corpus), size)
        tarball = work / "guest.tar"
        run("tar", "-C", args.corpus, "-cf", str(tarball), ".")

        with mounted(setup):
            daemons = setup.daemons()
            for i in range(args.repeat):
                for name, tree in in_turn(setup.trees(), i):
                    read_file(tree / "big")  # warm the caches
                    fn = partial(read_file, tree / "big")
                    results.timed("seq read, cached", name, fn, daemons)
                for name, tree in in_turn(setup.trees(), i):
                    fn = partial(write_file, tree / "written", size)
                    results.timed("seq write + fsync", name, fn, daemons)
                    (tree / "written").unlink()
        for i, mode in enumerate(["cold", "warm"] * args.repeat):
            with mounted(setup):
                daemons = setup.daemons()
                if mode == "cold":
                    drop_caches()
                else:
                    for tree in setup.trees().values():
                        stat_walk(tree)
                for name, tree in in_turn(setup.trees(), i // 2):
                    if mode == "cold":
                        drop_caches()
                    results.timed(f"stat walk, {mode}", name, partial(stat_walk, tree), daemons)
                rss = {k: max(rss.get(k, 0), peak_rss_kib(v)) for k, v in daemons.items()}
        with mounted(setup):
            daemons = setup.daemons()
            for i in range(args.repeat):
                for name, tree in in_turn(setup.trees(), i):
                    dest = tree / f"untarred{i}"
                    dest.mkdir()
                    fn = partial(run, "tar", "-C", str(dest), "-xf", str(tarball))
                    results.timed("untar guest tree", name, fn, daemons)
            rss = {k: max(rss.get(k, 0), peak_rss_kib(v)) for k, v in daemons.items()}
        files = stat_walk(Path(args.corpus))
    finally:
        subprocess.run(["chattr", "-R", "-f", "-i", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    print(
        f"corpus {args.corpus}: {files} entries; big file {args.size_mib} MiB;"
        f" {args.repeat} runs each"
    )
    print("\n".join(results.render()))
    print("cow/ovl is a time ratio (min, median): throughput ratio is its inverse")
    print(
        f"peak RSS: cowlink {rss.get('cowlink', 0)} KiB,"
        f" fuse-overlayfs {rss.get('fuse-overlayfs', 0)} KiB"
    )
    print(
        "load average (1, 5, 15 min): before "
        + " ".join(f"{x:.2f}" for x in load_before)
        + ", after "
        + " ".join(f"{x:.2f}" for x in load_after)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
