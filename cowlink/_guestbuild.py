"""`guest build`: create HOME/guests/NAME/root with debootstrap or from a tree, plus guest.toml."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from . import _guestconf
from ._errors import GuestBuildFailed, UsageError
from ._home import Home


def _prepare(home: Home, name: str) -> tuple[Path, Path]:
    home.ensure()
    gdir = home.guest_dir(name)
    root = gdir / "root"
    if root.exists():
        raise UsageError(f"guest {name} already exists: {root}")
    gdir.mkdir(exist_ok=True)
    return gdir, root


def _finish(gdir: Path, name: str, root: Path) -> None:
    toml = gdir / "guest.toml"
    if not toml.exists():
        toml.write_text(_guestconf.render_default(name, root))
    for mount_point in ("proc", "sys", "dev"):
        (root / mount_point).mkdir(exist_ok=True)


def _run(argv: list[str], root: Path, gdir: Path) -> None:
    try:
        result = subprocess.run(argv, check=False)
    except FileNotFoundError as exc:
        raise GuestBuildFailed(f"{argv[0]} is not installed: {exc}") from None
    if result.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):
            gdir.rmdir()
        raise GuestBuildFailed(
            f"{' '.join(argv[:2])}... failed with exit status {result.returncode}"
        )


def build_debootstrap(
    home: Home,
    name: str,
    suite: str,
    *,
    mirror: str | None = None,
    variant: str | None = None,
    include: str | None = None,
) -> Path:
    """Bootstrap a Debian guest; returns its root.

    Raises:
        UsageError: the guest exists already.
        GuestBuildFailed: debootstrap failed (nothing is left behind).
        LockHeld: another cowlink command (`unify`, say) holds the home's lock.
    """
    with home.lock("guest build"):  # a half-built tree must not meet `cowlink unify`
        return _debootstrap(home, name, suite, mirror, variant, include)


def _debootstrap(
    home: Home,
    name: str,
    suite: str,
    mirror: str | None,
    variant: str | None,
    include: str | None,
) -> Path:
    gdir, root = _prepare(home, name)
    argv = ["debootstrap"]
    if variant:
        argv.append(f"--variant={variant}")
    if include:
        argv.append(f"--include={include}")
    argv += [suite, os.fspath(root)]
    if mirror:
        argv.append(mirror)
    _run(argv, root, gdir)
    _finish(gdir, name, root)
    return root


def build_from(home: Home, name: str, source: Path) -> Path:
    """Copy an existing tree (ownership, modes, links, xattrs kept); returns the new root."""
    if not source.is_dir():
        raise UsageError(f"{source} is not a directory")
    with home.lock("guest build"):
        return _copy(home, name, source)


def _copy(home: Home, name: str, source: Path) -> Path:
    gdir, root = _prepare(home, name)
    root.mkdir()
    _run(["cp", "-a", "--reflink=auto", f"{os.fspath(source)}/.", os.fspath(root)], root, gdir)
    _finish(gdir, name, root)
    return root
