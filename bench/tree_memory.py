"""Peak memory of a command and all its descendants together, sampled from smaps_rollup.

GNU time's `%M` is the largest single process; a command that forks workers sharing
pages copy-on-write needs the sum: Pss counts each shared page once, split among its
users; Rss counts it in every process.

    .venv/bin/python -m bench.tree_memory -- cowlink --home H unify ROOT...
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def _descendants(pid: int) -> list[int]:
    found = [pid]
    for parent in found:
        children = Path(f"/proc/{parent}/task/{parent}/children")
        try:
            found.extend(int(c) for c in children.read_text().split())
        except OSError:
            continue
    return found


def _rollup(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of one process in KiB; zeros once it is gone."""
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=0.1, help="seconds between samples")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    proc = subprocess.Popen(args.command)
    peak_pss = peak_rss = most = 0
    while proc.poll() is None:
        pids = _descendants(proc.pid)
        sums = [_rollup(pid) for pid in pids]
        peak_pss = max(peak_pss, sum(p for p, _ in sums))
        peak_rss = max(peak_rss, sum(r for _, r in sums))
        most = max(most, len(pids))
        time.sleep(args.every)
    print(
        f"exit {proc.returncode} after {time.perf_counter() - started:.2f} s; "
        f"peak summed Pss {peak_pss / 1024:.1f} MiB, Rss {peak_rss / 1024:.1f} MiB, "
        f"up to {most} processes",
        file=sys.stderr,
    )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
