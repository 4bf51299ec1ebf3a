"""Peak memory of a command and all its descendants together, sampled from smaps_rollup.

GNU time's `%M` is the largest single process; a command that forks workers sharing
pages copy-on-write needs the sum (see _measure.TreeMemory).

    .venv/bin/python -m bench.tree_memory -- cowlink --home H unify ROOT...
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from ._measure import TreeMemory

MIB = 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=0.1, help="seconds between samples")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    proc = subprocess.Popen(args.command)
    with TreeMemory(proc.pid, every=args.every) as tree:
        proc.wait()
    print(
        f"exit {proc.returncode} after {time.perf_counter() - started:.2f} s; "
        f"peak summed Pss {tree.peak_pss / MIB:.1f} MiB, Rss {tree.peak_rss / MIB:.1f} MiB, "
        f"up to {tree.most} processes",
        file=sys.stderr,
    )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
