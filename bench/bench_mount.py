"""cowlink mount against native ext4 and fuse-overlayfs, on the same data in the same run.

    .venv/bin/python -m bench.bench_mount [--corpus DIR] [--size-mib N] [--workdir DIR]

Workloads: sequential read of a cached file, sequential write with fsync, a stat walk
of a Debian guest tree (cold: caches dropped and filesystems remounted; warm: again at
once), and untar of that tree. cowlink mounts a guest unified with a second copy of the
tree; fuse-overlayfs has a plain copy as lowerdir. Prints seconds, ratios against
fuse-overlayfs, and each daemon's peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default="/var/cache/cowlink-corpus/g1")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--workdir", default=None)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per measurement; the best is kept"
    )
    args = parser.parse_args()
    size = args.size_mib * CHUNK
    work = Path(tempfile.mkdtemp(prefix="bench-mount-", dir=args.workdir))
    results: dict[str, dict[str, float]] = {}
    rss: dict[str, int] = {}
    try:
        setup = Setup(work, Path(args.corpus), size)
        tarball = work / "guest.tar"
        run("tar", "-C", args.corpus, "-cf", str(tarball), ".")

        def record(workload: str, name: str, seconds: float) -> None:
            # The best of the runs: the machine is shared, and noise only adds time.
            best = results.setdefault(workload, {}).get(name, seconds)
            results[workload][name] = min(best, seconds)

        with mounted(setup):
            for _ in range(args.repeat):
                for name, tree in setup.trees().items():
                    read_file(tree / "big")  # warm the caches
                    record("seq read, cached", name, timed(partial(read_file, tree / "big")))
                for name, tree in setup.trees().items():
                    t = timed(partial(write_file, tree / "written", size))
                    record("seq write + fsync", name, t)
                    (tree / "written").unlink()
        for mode in ["cold", "warm"] * args.repeat:
            with mounted(setup):
                if mode == "cold":
                    drop_caches()
                else:
                    for tree in setup.trees().values():
                        stat_walk(tree)
                for name, tree in setup.trees().items():
                    if mode == "cold":
                        drop_caches()
                    record(f"stat walk, {mode}", name, timed(partial(stat_walk, tree)))
                rss = {k: max(rss.get(k, 0), peak_rss_kib(v)) for k, v in setup.daemons().items()}
        with mounted(setup):
            for i in range(args.repeat):
                for name, tree in setup.trees().items():
                    dest = tree / f"untarred{i}"
                    dest.mkdir()
                    t = timed(partial(run, "tar", "-C", str(dest), "-xf", str(tarball)))
                    record("untar guest tree", name, t)
            rss = {k: max(rss.get(k, 0), peak_rss_kib(v)) for k, v in setup.daemons().items()}
        files = stat_walk(Path(args.corpus))
    finally:
        subprocess.run(["chattr", "-R", "-f", "-i", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"corpus {args.corpus}: {files} entries; big file {args.size_mib} MiB;"
        f" best of {args.repeat}"
    )
    print(f"{'workload':<22}{'ext4 s':>10}{'cowlink s':>11}{'overlay s':>11}{'cow/ovl':>10}")
    for workload, by in results.items():
        ratio = by["cowlink"] / by["fuse-overlayfs"]
        print(
            f"{workload:<22}{by['ext4']:>10.3f}{by['cowlink']:>11.3f}"
            f"{by['fuse-overlayfs']:>11.3f}{ratio:>9.2f}x"
        )
    print("time ratio cow/ovl: <1 means cowlink is faster; throughput ratio is its inverse")
    print(
        f"peak RSS: cowlink {rss.get('cowlink', 0)} KiB,"
        f" fuse-overlayfs {rss.get('fuse-overlayfs', 0)} KiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
