"""Builders for small guest trees in a scratch home, and a way to run the CLI on them."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from cowlink.cli import main

#: A fixed mtime, so files written at different moments still share a link key.
MTIME_NS = 1_600_000_000_000_000_000


def write(path: Path, data: bytes, *, mode: int = 0o644, mtime_ns: int = MTIME_NS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def make_guests(
    home: Path, files: Mapping[str, bytes], guests: tuple[str, ...] = ("a", "b")
) -> list[Path]:
    """Give every guest the same `files` (relative path -> content); return their roots."""
    roots = []
    for guest in guests:
        root = home / "guests" / guest / "root"
        root.mkdir(parents=True)
        for rel, data in files.items():
            write(root / rel, data)
        roots.append(root)
    return roots


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.stdout)
        return data


def cowlink(home: Path, *args: str) -> Result:
    """Run `cowlink --home HOME ARGS...` in-process, as a user would from a shell."""
    runner = CliRunner()
    result = runner.invoke(main, ["--home", str(home), *args], catch_exceptions=False)
    return Result(result.exit_code, result.stdout, result.stderr)


def store_objects(home: Path) -> list[Path]:
    store = home / "store"
    if not store.is_dir():
        return []
    return sorted(p for p in store.glob("??/*") if p.is_file())


def same_inode(a: Path, b: Path) -> bool:
    sa, sb = os.lstat(a), os.lstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def generated(
    home: Path,
    seed: int,
    *,
    files: int = 300,
    big: int = 50_000,
    guests: tuple[str, ...] = ("a", "b"),
) -> list[Path]:
    """Guests of mostly shared files, one guest hardlink each, one file of their own each."""
    rng = random.Random(seed)
    shared = {
        f"usr/lib/d{i % 7}/f{i}": rng.randbytes(rng.choice([100, 3000, big])) for i in range(files)
    }
    roots = []
    for guest in guests:
        root = home / "guests" / guest / "root"
        for rel, data in shared.items():
            write(root / rel, data)
        write(root / "usr/own", guest.encode() * 999)
        os.link(root / "usr/lib/d1/f1", root / "usr/lib/d1/f1-hardlink")
        roots.append(root)
    return roots


def temp_names(root: Path) -> list[str]:
    """cowlink's temporary names left under `root`."""
    return [os.path.join(d, n) for d, ds, fs in os.walk(root) for n in ds + fs if ".cowlink-" in n]
