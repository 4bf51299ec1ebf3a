"""Seeded synthetic many-guest trees: shared, upgraded, private and near-duplicate files.

The model, per guest of `files_per_guest` regular-file names:

- about 91 % come from one shared base image (same content and metadata in every guest),
  with a Debian-like size mix: median about 2 KiB, a long tail up to 4 MiB, some empty
  files and one sparse file;
- every fourth guest runs a newer release: 8 % of its base files have other content (half
  of those differ only in one byte in the middle, like a version string);
- 3 % of base names repeat another base file's content inside the guest (licence files);
- 0.5 % of base names are a second hardlink of another base file (perl / perl5.36.0);
- 1 % of base files carry a `user.bench` xattr, whose value differs in some guests;
- in each guest, 1 % of base files differ only in mode, 1 % only in mtime;
- the rest (6 %) is private to the guest: its etc/, var/log, home.

Everything derives from the seed, so the same spec always gives the same bytes. A tree
is generated once into a cache directory and copied per run (see _corpus.fresh_copy).
"""

from __future__ import annotations

import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from ._corpus import Dataset

CACHE_DIR = Path(os.environ.get("COWLINK_BENCH_CACHE", "/var/cache/cowlink-bench"))
FORMAT = 1  # bump whenever generation changes, so that no stale cache is reused

_EPOCH_NS = 1_700_000_000 * 10**9
_MAX_SIZE = 4 * 1024 * 1024
_SPARSE_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True)
class Spec:
    """Which synthetic tree: its shape and its seed."""

    guests: int = 40
    files_per_guest: int = 5000
    seed: int = 1

    @property
    def name(self) -> str:
        return f"synthetic-v{FORMAT}-s{self.seed}-{self.guests}x{self.files_per_guest}"

    def guest_names(self) -> tuple[str, ...]:
        return tuple(f"guest{i:03d}" for i in range(self.guests))


@dataclass
class _File:
    """One base file: where it lives and what it is; `content` seeds its bytes."""

    path: str
    content: int
    size: int
    mode: int
    uid: int
    mtime_ns: int
    link_to: str | None = None  # a second name of that path (same inode)
    xattr: bytes | None = None
    sparse: bool = False
    # the newer release's content, when it differs; `middle` keeps size and all bytes but one
    upgrade: tuple[int, int, bool] | None = None  # (content, mtime offset, middle)


def _dirs(rng: random.Random) -> list[str]:
    """Directory layout of a Debian-like root; weights roughly follow a real minbase guest."""
    pkgs = [f"pkg{i:03d}" for i in range(160)]
    dirs = ["usr/bin", "usr/sbin", "usr/lib/x86_64-linux-gnu"]
    dirs += [f"usr/lib/{p}" for p in pkgs[:60]]
    dirs += [f"usr/share/doc/{p}" for p in pkgs]
    dirs += [f"usr/share/{p}" for p in pkgs[60:120]]
    dirs += [f"usr/share/locale/{lang}/LC_MESSAGES" for lang in ("de", "fr", "es", "ja", "pt")]
    dirs += [f"usr/lib/python3/dist-packages/{p}" for p in pkgs[120:]]
    dirs += ["etc", "etc/default", "etc/init.d"] + [f"etc/{p}" for p in pkgs[:30]]
    dirs += ["var/lib/dpkg/info", "var/cache/debconf"]
    rng.shuffle(dirs)
    return dirs


def _size(rng: random.Random) -> int:
    if rng.random() < 0.005:
        return 0
    # log-normal around 2.2 KiB; sigma 1.7 puts p90 near 20 KiB and p99 near 120 KiB
    return min(_MAX_SIZE, max(1, int(math.exp(rng.gauss(math.log(2200), 1.7)))))


def _base(rng: random.Random, count: int) -> list[_File]:
    dirs = _dirs(rng)
    files: list[_File] = []
    for i in range(count):
        d = (
            dirs[min(len(dirs) - 1, int(rng.paretovariate(0.9)) - 1)]
            if rng.random() < 0.3
            else rng.choice(dirs)
        )
        path = f"{d}/f{i:05d}{rng.choice(('', '.so', '.py', '.gz', '.mo', '.txt'))}"
        is_bin = d.startswith(("usr/bin", "usr/sbin"))
        f = _File(
            path=path,
            content=rng.getrandbits(63),
            size=_size(rng),
            mode=0o755 if is_bin else rng.choice((0o644,) * 9 + (0o600,)),
            uid=0 if rng.random() < 0.98 else 33,
            mtime_ns=_EPOCH_NS + rng.randrange(10**6) * 10**9,
        )
        files.append(f)
    # names sharing another file's content and metadata (a licence text in every doc dir)
    for f in rng.sample(files, len(files) * 3 // 100):
        other = rng.choice(files)
        f.content, f.size, f.mode, f.uid, f.mtime_ns = (
            other.content,
            other.size,
            other.mode,
            other.uid,
            other.mtime_ns,
        )
    # second hardlinks: point a name at an earlier file (earlier: written first)
    for idx in rng.sample(range(1, len(files)), len(files) // 200):
        files[idx].link_to = files[rng.randrange(idx)].path
    for f in rng.sample(files, len(files) // 100):
        f.xattr = b"a"
    sparse = files[0]
    sparse.sparse, sparse.size, sparse.link_to = True, _SPARSE_SIZE, None
    for f in rng.sample(files[1:], len(files) * 8 // 100):
        if f.link_to is None:
            f.upgrade = (rng.getrandbits(63), rng.randrange(1, 10**5) * 10**9, rng.random() < 0.5)
    return files


def _bytes(content: int, size: int) -> bytes:
    return random.Random(content).randbytes(size)


def _upgraded(f: _File) -> tuple[bytes, int]:
    assert f.upgrade is not None
    content, offset, middle = f.upgrade
    data = _bytes(f.content, f.size) if middle else _bytes(content, _size(random.Random(content)))
    if middle and data:
        mid = len(data) // 2
        data = data[:mid] + bytes([data[mid] ^ 0x5A]) + data[mid + 1 :]
    return data, f.mtime_ns + offset


def _write(
    path: Path,
    data: bytes,
    *,
    mode: int,
    uid: int,
    mtime_ns: int,
    sparse: bool = False,
    xattr: bytes | None = None,
) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if sparse:
            # a 4 MiB file with one data block at each end and a hole between
            os.pwrite(fd, data[:4096], 0)
            os.pwrite(fd, data[:4096], _SPARSE_SIZE - 4096)
        elif data:
            os.write(fd, data)
        os.fchown(fd, uid, uid)
        os.fchmod(fd, mode)
        if xattr is not None:
            os.setxattr(fd, "user.bench", xattr)
    finally:
        os.close(fd)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def generate(spec: Spec, dest: Path) -> None:
    """Write the tree for `spec` into `dest` (which must not exist): one dir per guest."""
    rng = random.Random(spec.seed)
    n_base = spec.files_per_guest * 94 // 100
    base = _base(rng, n_base)
    guests = spec.guest_names()
    roots = [dest / g for g in guests]
    for root in roots:
        root.mkdir(parents=True)
    # per-guest deviations, drawn up front so the write loop can go file by file
    per_guest: list[dict[str, str]] = []
    for _ in guests:
        dev: dict[str, str] = {}
        picks = rng.sample(
            [f.path for f in base if f.link_to is None and not f.sparse], len(base) * 3 // 100
        )
        third = len(picks) // 3
        for p in picks[:third]:
            dev[p] = "mode"
        for p in picks[third : 2 * third]:
            dev[p] = "mtime"
        for p in picks[2 * third :]:
            dev[p] = "xattr"
        per_guest.append(dev)
    made_dirs: set[str] = set()
    for f in base:
        parent = os.path.dirname(f.path)
        if parent not in made_dirs:
            for root in roots:
                (root / parent).mkdir(parents=True, exist_ok=True)
            made_dirs.add(parent)
        if f.link_to is not None:
            for root in roots:
                os.link(root / f.link_to, root / f.path)
            continue
        data = _bytes(f.content, f.size if not f.sparse else 4096)
        new = _upgraded(f) if f.upgrade else None
        for gi, root in enumerate(roots):
            blob, mtime_ns = new if (new is not None and gi % 4 == 3) else (data, f.mtime_ns)
            mode, xattr = f.mode, f.xattr
            kind = per_guest[gi].get(f.path)
            if kind == "mode":
                mode = 0o600 if mode != 0o600 else 0o644
            elif kind == "mtime":
                mtime_ns += 3600 * 10**9
            elif kind == "xattr":
                xattr = b"b" if xattr is not None else b"a"
            _write(
                root / f.path,
                blob,
                mode=mode,
                uid=f.uid,
                mtime_ns=mtime_ns,
                sparse=f.sparse,
                xattr=xattr,
            )
    # private files: each guest's own etc/, logs and home
    n_private = spec.files_per_guest - n_base
    for gi, root in enumerate(roots):
        grng = random.Random(spec.seed * 1_000_003 + gi)
        for sub in ("etc/local", "var/log", "home/user", "usr/local/bin"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n_private):
            sub = ("etc/local", "var/log", "home/user", "usr/local/bin")[i % 4]
            size = _size(grng)
            _write(
                root / sub / f"p{i:05d}",
                grng.randbytes(size),
                mode=0o644,
                uid=1000 if sub == "home/user" else 0,
                mtime_ns=_EPOCH_NS + grng.randrange(10**7) * 10**9,
            )


def synthetic(spec: Spec | None = None, cache_dir: Path = CACHE_DIR) -> Dataset:
    """The synthetic data set for `spec`, generated into the cache on first use."""
    spec = spec or Spec()
    final = cache_dir / spec.name
    if not (final / ".done").exists():
        tmp = cache_dir / f"{spec.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        generate(spec, tmp)
        (tmp / ".done").touch()
        os.sync()
        tmp.rename(final)
    return Dataset(
        name=f"synthetic {spec.guests}x{spec.files_per_guest}",
        source=final,
        guests=spec.guest_names(),
    )
