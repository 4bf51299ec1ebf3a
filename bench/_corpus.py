"""Benchmark data sets: the real guest corpus, and fresh per-run copies of any data set."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CORPUS_DIR = Path(os.environ.get("COWLINK_CORPUS", "/var/cache/cowlink-corpus"))
CORPUS_GUESTS = ("g1", "g2", "g3", "g4")


@dataclass(frozen=True)
class Dataset:
    """A pristine set of guest roots, `source/NAME` for each name in `guests`. Never modified."""

    name: str
    source: Path
    guests: tuple[str, ...]


def _make_guests_script() -> Path:
    """Find shared/corpus/make-guests beside this checkout (main, a worktree, or a CI clone)."""
    override = os.environ.get("COWLINK_MAKE_GUESTS")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent
    for parent in here.parents:
        candidate = parent / "shared" / "corpus" / "make-guests"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("shared/corpus/make-guests not found; set COWLINK_MAKE_GUESTS")


def real_corpus() -> Dataset:
    """The four debootstrapped guests; builds the missing ones first (needs the mirror)."""
    if not all((CORPUS_DIR / f".done-{g}").exists() for g in CORPUS_GUESTS):
        script = _make_guests_script()
        print(f"bench: building the guest corpus with {script} (this downloads)", file=sys.stderr)
        subprocess.run(["bash", str(script), str(CORPUS_DIR)], check=True)
    return Dataset(name="real", source=CORPUS_DIR, guests=CORPUS_GUESTS)


def fresh_copy(dataset: Dataset, dest: Path) -> list[Path]:
    """Copy every guest of `dataset` into `dest/roots/` with `cp -a`; return the new roots.

    `cp -a` keeps modes, owners, times, xattrs, hardlinks inside the copy and holes, so
    each tool starts from the same data, unlinked across guests.
    """
    roots_dir = dest / "roots"
    roots_dir.mkdir(parents=True)
    roots = []
    for guest in dataset.guests:
        root = roots_dir / guest
        subprocess.run(["cp", "-a", str(dataset.source / guest), str(root)], check=True)
        roots.append(root)
    os.sync()  # so no tool pays for writing back the copy's dirty pages
    return roots


def remove_copy(dest: Path) -> None:
    """Remove a run's copy, store objects included (they carry the immutable flag)."""
    if not dest.exists():
        return
    subprocess.run(["chattr", "-R", "-f", "-i", str(dest)], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(dest)], check=True)
