"""Run one command as a child and measure it: wall time, peak memory, the disk trees use."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Measurement:
    """What one command run cost.

    Attributes:
        argv: the command that ran.
        wall_s: elapsed wall-clock seconds, from spawn to reaped.
        peak_rss: the peak resident set in bytes of the command's largest process
            (ru_maxrss; see `run`).
        rss_exact: False when peak_rss is only an upper bound (no GNU time).
        peak_pss: the peak of the Pss summed over the command and all its descendants, in
            bytes: what a command that forks workers sharing pages costs in all (see
            `TreeMemory`).
        returncode: the exit code, or -N for signal N.
        stdout: the file holding what it printed.
    """

    argv: tuple[str, ...]
    wall_s: float
    peak_rss: int
    rss_exact: bool
    peak_pss: int
    returncode: int
    stdout: Path
    stderr: Path


def drop_caches() -> None:
    """Write back dirty pages, then drop the page, dentry and inode caches (needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


GNU_TIME = "/usr/bin/time"


def descendants(pid: int) -> list[int]:
    """The live descendants of `pid`, not `pid` itself, from /proc's children lists."""
    found = [pid]
    for parent in found:
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                found.extend(int(child) for child in f.read().split())
        except OSError:
            continue
    return found[1:]


def pss_and_rss(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of one process in bytes, from smaps_rollup; zeros once it is gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, rss


class TreeMemory:
    """Samples a process tree's memory in a thread until stopped, keeping the peaks.

    Pss counts a page shared by several processes once, split among them, so its sum
    over a tree is what the tree costs in all; the summed Rss counts shared pages in every
    process. GNU time's `%M` only gives the largest single process.
    """

    def __init__(self, pid: int, *, with_root: bool = True, every: float = 0.1) -> None:
        self.peak_pss = self.peak_rss = self.most = 0
        self._pid = pid
        self._with_root = with_root
        self._every = every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            pids = descendants(self._pid) + ([self._pid] if self._with_root else [])
            sums = [pss_and_rss(pid) for pid in pids]
            self.peak_pss = max(self.peak_pss, sum(p for p, _ in sums))
            self.peak_rss = max(self.peak_rss, sum(r for _, r in sums))
            self.most = max(self.most, len(pids))
            if self._done.wait(self._every):
                return


def run(
    argv: Sequence[str],
    log_dir: Path,
    name: str,
    *,
    cold: bool = False,
    cwd: Path | None = None,
) -> Measurement:
    """Run `argv` to completion with its output in `log_dir/name.{out,err}`, and measure it.

    Output goes to files, not pipes: a tool that lists every link it makes (jdupes) must
    not be slowed by the reader. With `cold`, caches are dropped just before the spawn.

    Peak RSS: a child's ru_maxrss includes the RSS it had before exec, which after a fork
    from this (large) Python process is this process's own. So when GNU time is there, it
    runs the command and reports the grandchild's ru_maxrss, with only its own ~2 MB
    before exec. Otherwise the wait4 figure is used, an upper bound (`rss_exact` False).
    The summed Pss of the command's process tree (GNU time itself left out) is sampled
    every 0.1 s meanwhile.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path = log_dir / f"{name}.out"
    err_path = log_dir / f"{name}.err"
    rss_path = log_dir / f"{name}.rss"
    exact = os.access(GNU_TIME, os.X_OK)
    full = [GNU_TIME, "-f", "%M", "-o", str(rss_path), "--", *argv] if exact else list(argv)
    if cold:
        drop_caches()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd)
        with TreeMemory(proc.pid, with_root=not exact) as tree:
            # wait4 rather than Popen.wait: the only way to get this child's own rusage.
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_kb = usage.ru_maxrss  # Linux reports kilobytes
    if exact:
        # the last line is %M; a line before it may say "Command exited with non-zero status"
        peak_kb = int(rss_path.read_text().split()[-1])
    return Measurement(
        argv=tuple(argv),
        wall_s=wall,
        peak_rss=peak_kb * 1024,
        rss_exact=exact,
        peak_pss=tree.peak_pss,
        returncode=proc.returncode,
        stdout=out_path,
        stderr=err_path,
    )


@dataclass(frozen=True)
class Usage:
    """Disk use of a set of trees, each inode counted once however many names it has.

    Attributes:
        allocated: sum of st_blocks * 512 over the distinct inodes (directories included).
        inodes: distinct inodes seen.
        file_names: names of regular files (what the trees look like to their users).
        file_inodes: distinct regular-file inodes.
    """

    allocated: int
    inodes: int
    file_names: int
    file_inodes: int


def disk_usage(paths: Iterable[Path], extra: Iterable[Path] = ()) -> Usage:
    """Walk every path without following symlinks or crossing mounts, counting each inode once.

    Inodes under `extra` (a tool's own store) count towards `allocated` and `inodes`, but
    their names do not count as file names: only the trees' users see those.

    Our own walk rather than `du`: it gives allocated bytes, name counts and inode counts
    in one pass, and it counts an inode shared by two of the paths once, as the disk does.
    """
    seen: set[tuple[int, int]] = set()
    allocated = names = file_inodes = 0
    tops = [(p, True) for p in paths] + [(p, False) for p in extra]
    for top, counted in tops:
        try:
            st = os.lstat(top)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        allocated += st.st_blocks * 512
        if stat.S_ISREG(st.st_mode):
            names += counted
            file_inodes += 1
        if not stat.S_ISDIR(st.st_mode):
            continue
        root_dev = st.st_dev
        stack = [os.fsencode(top)]
        while stack:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    is_dir = entry.is_dir(follow_symlinks=False)
                    is_file = entry.is_file(follow_symlinks=False)
                    if is_file and counted:
                        names += 1
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                    allocated += st.st_blocks * 512
                    if is_file:
                        file_inodes += 1
                    if is_dir and st.st_dev == root_dev:
                        stack.append(entry.path)
    return Usage(allocated=allocated, inodes=len(seen), file_names=names, file_inodes=file_inodes)


#: What a name shows besides its content: mode, uid, gid, mtime in ns.
Meta = tuple[int, int, int, int]


def file_metadata(paths: Iterable[Path]) -> dict[bytes, tuple[int, int, Meta]]:
    """Every regular file under `paths`: path -> (inode, allocated bytes, metadata)."""
    files: dict[bytes, tuple[int, int, Meta]] = {}
    for top in paths:
        stack = [os.fsencode(top)]
        root_dev = os.lstat(top).st_dev
        while stack:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode):
                        meta = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
                        files[entry.path] = (st.st_ino, st.st_blocks * 512, meta)
                    elif stat.S_ISDIR(st.st_mode) and st.st_dev == root_dev:
                        stack.append(entry.path)
    return files


@dataclass(frozen=True)
class MetadataChanges:
    """What a deduplicating tool changed besides sharing data.

    Attributes:
        names: file names whose mode, owner or mtime (to the ns) is not what it was.
        saved: allocated bytes saved by links that joined names of different metadata
            (the links that changed those names).
    """

    names: int
    saved: int


def metadata_changes(
    before: dict[bytes, tuple[int, int, Meta]], paths: Iterable[Path]
) -> MetadataChanges:
    """Compare the files under `paths` now with `before` (from `file_metadata`)."""
    after = file_metadata(paths)
    changed = sum(
        1 for path, (_, _, meta) in after.items() if before.get(path, (0, 0, meta))[2] != meta
    )
    groups: dict[int, list[bytes]] = {}
    for path, (ino, _, _) in after.items():
        groups.setdefault(ino, []).append(path)
    saved = 0
    for ino, names in groups.items():
        old = {before[p][0]: before[p] for p in names if p in before}
        if len({meta for _, _, meta in old.values()}) > 1:
            blocks = [b for i, b, _ in old.values() if i != ino]
            saved += sum(blocks)
    return MetadataChanges(names=changed, saved=saved)


def dir_allocated(top: Path) -> int:
    """Allocated bytes of the directories (not the files) under `top`, `top` included."""
    if not top.is_dir():
        return 0
    total = 0
    for dirpath, _, _ in os.walk(top):
        total += os.lstat(dirpath).st_blocks * 512
    return total


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-markdown table; numbers right-aligned, so it reads well in a terminal too."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(_is_number(row[i]) for row in cells[1:]) and len(cells) > 1 for i in range(len(widths))
    ]

    def line(row: list[str]) -> str:
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    rule = (
        "| "
        + " | ".join(
            ("-" * (w - 1) + ":") if n else "-" * w for w, n in zip(widths, numeric, strict=True)
        )
        + " |"
    )
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _is_number(text: str) -> bool:
    stripped = text.rstrip("x%").replace(",", "")
    if stripped in {"-", ""}:
        return True
    try:
        float(stripped)
    except ValueError:
        return False
    return True
