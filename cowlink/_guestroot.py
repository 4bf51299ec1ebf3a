"""The guest's root for `guest start`: its tree as the copy-on-write mount shows it.

The monitor starts a `cowlink mount` daemon on HOME/run/NAME/root (in the host's mount
namespace, outside the guest's cgroups, so the guest can neither kill nor starve it);
the guest's init receives a copy of that mount in its own namespace and pivots onto it.
A write to a shared file therefore gives the guest a private copy, as VServer's kernel
did, instead of failing on the immutable flag.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from ._home import Home
from ._mounting import MountRequest, is_mounted, mount_background, unmount


def mount_guest_root(home: Home, name: str, mount_point: Path) -> Callable[[], None]:
    """Mount guest `name`'s root at `mount_point` through the FUSE layer; returns the teardown.

    Raises:
        MountFailed: the daemon could not mount it (its log says why).
    """
    mount_point.mkdir(mode=0o700, exist_ok=True)
    request = MountRequest(root=str(home.guest_root(name)), mountpoint=str(mount_point), name=name)
    mount_background(home, request)

    return lambda: unmount_guest_root(home, mount_point)


def unmount_guest_root(home: Home, mount_point: Path) -> None:
    """Unmount a guest's root and let its daemon go; idempotent, also after a crash."""
    if is_mounted(str(mount_point)):
        with contextlib.suppress(Exception):
            unmount(home, str(mount_point))
    with contextlib.suppress(OSError):
        mount_point.rmdir()
