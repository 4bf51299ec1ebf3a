"""Fault soak: kill `cowlink unify` or `cowlink split` at random moments on real guest trees.

Each trial gets a fresh ext4 filesystem (a loop image on a private tmpfs, so set-up and
tear-down cost nothing on disk) holding a fresh `cp -a` copy of the corpus guests, then:

1. takes a manifest of every guest path (type, content digest, mode, owner, mtime, xattrs);
2. for a split trial, unifies the guests to the end first;
3. starts `cowlink unify` (or `cowlink split` of the first guest), SIGKILLs it after a
   random delay drawn from the command's measured duration, and checks the manifest
   (cowlink's MAC-named temporary names are counted apart: the rerun removes them);
4. reruns the command to the end and checks again: the manifest, that no cowlink
   temporary name is left, and that the command did its job (split: no name of the
   guest still leads to a store object; unify: the guests share their store objects), and
   that `cowlink verify --quick` finds every store object immutable and as its name says.

    .venv/bin/python -m bench.soak --trials 200 --workers 2

The originals under /var/cache/cowlink-corpus are only read.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import xxhash

Manifest = dict[bytes, tuple[object, ...]]
TEMP_PREFIX = b".cowlink-"


@dataclass
class Trial:
    index: int
    kind: str
    delay_s: float
    killed: bool = False
    kill_rc: int = 0
    differences_after_kill: int = 0
    #: Left by the kill (each a link to a whole object or a whole copy); the rerun removes them.
    temp_names_after_kill: int = 0
    rerun_rc: int = 0
    rerun_s: float = 0.0
    differences_after_rerun: int = 0
    temp_names_left: int = 0
    not_done: int = 0
    #: `cowlink verify --quick` problems after the rerun (flags, mode, owner, xattrs).
    store_problems: int = 0
    examples: list[str] = field(default_factory=list)


def manifest(root: Path) -> Manifest:
    """What a guest sees of each path; inode numbers and link counts are left out."""
    out: Manifest = {}
    root_b = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(root_b):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                h = xxhash.xxh3_128()
                with open(full, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                content = h.hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                content = st.st_rdev
            try:
                names = os.listxattr(full, follow_symlinks=False)
                xattrs = tuple(
                    sorted((n, os.getxattr(full, n, follow_symlinks=False)) for n in names)
                )
            except OSError:
                xattrs = ()
            out[os.path.relpath(full, root_b)] = (
                stat.S_IFMT(st.st_mode),
                content,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns,
                xattrs,
            )
    return out


def differences(before: Manifest, root: Path) -> list[str]:
    """Paths lost, added or changed; cowlink's temporary names are counted apart."""
    after = manifest(root)
    out = [f"missing {p!r}" for p in sorted(set(before) - set(after))]
    out += [
        f"added {p!r}"
        for p in sorted(set(after) - set(before))
        if not os.path.basename(p).startswith(TEMP_PREFIX)
    ]
    out += [f"changed {p!r}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return out


def temp_names(root: Path) -> list[bytes]:
    return [
        os.path.join(d, n)
        for d, dirs, files in os.walk(os.fsencode(root))
        for n in dirs + files
        if n.startswith(TEMP_PREFIX)
    ]


def store_inodes(home: Path) -> set[int]:
    return {p.lstat().st_ino for p in (home / "store").glob("??/*")}


def cowlink(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cowlink", "--home", str(home), *args]


def run_trial(index: int, kind: str, delay_s: float, corpus: Path, guests: list[str]) -> Trial:
    trial = Trial(index, kind, round(delay_s, 3))
    work = Path(tempfile.mkdtemp(prefix=f"soak-{index}-", dir=os.environ.get("SOAK_DIR")))
    image, mnt = work / "fs.img", work / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(3 << 30)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        home = mnt / "home"
        roots = []
        for g in guests:
            root = home / "guests" / g / "root"
            root.parent.mkdir(parents=True)
            subprocess.run(["cp", "-a", str(corpus / g), str(root)], check=True)
            roots.append(root)
        before = {r: manifest(r) for r in roots}
        if kind == "split":
            subprocess.run(cowlink(home, "unify", "-q"), check=True)
            args = ["split", "-q", str(roots[0])]
        else:
            args = ["unify", "-q"]
        proc = subprocess.Popen(cowlink(home, *args), stderr=subprocess.DEVNULL)
        time.sleep(delay_s)
        proc.send_signal(signal.SIGKILL)
        trial.kill_rc = proc.wait()
        trial.killed = trial.kill_rc == -signal.SIGKILL
        diffs = [d for r in roots for d in differences(before[r], r)]
        trial.differences_after_kill = len(diffs)
        trial.temp_names_after_kill = sum(len(temp_names(r)) for r in roots)
        started = time.monotonic()
        trial.rerun_rc = subprocess.run(cowlink(home, *args), check=False).returncode
        trial.rerun_s = round(time.monotonic() - started, 2)
        after = [d for r in roots for d in differences(before[r], r)]
        trial.differences_after_rerun = len(after)
        trial.temp_names_left = sum(len(temp_names(r)) for r in roots)
        trial.examples = (diffs + after)[:5]
        verify = subprocess.run(cowlink(home, "verify", "--quick", "--json"), capture_output=True)
        trial.store_problems = len(json.loads(verify.stdout)["problems"])
        objects = store_inodes(home)
        if kind == "split":
            trial.not_done = sum(
                1
                for d, _, files in os.walk(roots[0])
                for n in files
                if os.lstat(os.path.join(d, n)).st_ino in objects
            )
        else:
            # Every store object must be linked from at least one guest name.
            trial.not_done = sum(1 for p in (home / "store").glob("??/*") if p.lstat().st_nlink < 2)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return trial


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--corpus", type=Path, default=Path("/var/cache/cowlink-corpus"))
    parser.add_argument("--guests", nargs="+", default=["g1", "g2"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--unify-s", type=float, default=9.0, help="a full unify's duration")
    parser.add_argument("--split-s", type=float, default=6.0, help="a full split's duration")
    parser.add_argument("--out", type=Path, help="write one JSON line per trial here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (immutable flags, loop devices)")
    rng = random.Random(args.seed)
    # A private tmpfs for the loop images: a trial's filesystem costs only memory.
    tmpfs = Path(tempfile.mkdtemp(prefix="cowlink-soak-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8g", "tmpfs", str(tmpfs)], check=True)
    os.environ["SOAK_DIR"] = str(tmpfs)
    started = time.monotonic()
    totals = {
        "trials": 0,
        "killed": 0,
        "differences": 0,
        "temp_names_after_kill": 0,
        "temp_names_left": 0,
        "not_done": 0,
        "store_problems": 0,
    }
    out = open(args.out, "w") if args.out else None  # noqa: SIM115
    try:
        with ProcessPoolExecutor(args.workers) as pool:
            jobs = []
            for i in range(args.trials):
                kind = "unify" if i % 2 == 0 else "split"
                full = args.unify_s if kind == "unify" else args.split_s
                delay = rng.uniform(0.05, full)
                jobs.append(pool.submit(run_trial, i, kind, delay, args.corpus, list(args.guests)))
            for job in jobs:
                t = job.result()
                totals["trials"] += 1
                totals["killed"] += t.killed
                totals["differences"] += t.differences_after_kill + t.differences_after_rerun
                totals["temp_names_left"] += t.temp_names_left
                totals["not_done"] += t.not_done
                totals["store_problems"] += t.store_problems
                totals["temp_names_after_kill"] += t.temp_names_after_kill
                line = json.dumps(asdict(t))
                print(line, flush=True)
                if out:
                    out.write(line + "\n")
                    out.flush()
    finally:
        if out:
            out.close()
        subprocess.run(["umount", str(tmpfs)], check=False)
        os.rmdir(tmpfs)
    totals["time_s"] = round(time.monotonic() - started)
    print(json.dumps({"totals": totals}), flush=True)
    bad = ("differences", "temp_names_left", "not_done", "store_problems")
    return 1 if any(totals[k] for k in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
