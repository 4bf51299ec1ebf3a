"""The seam where a guest's root is mounted for `guest start`: the tree to pivot onto.

The design pivots onto the guest's root "as the copy-on-write mount shows it" (the FUSE
layer of `cowlink mount`). Until that is wired in, the root is a private bind mount of
HOME/guests/NAME/root; swapping the body of `mount_guest_root` is the whole change.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from . import _linux


def mount_guest_root(guest_root: Path, mount_point: Path) -> Callable[[], None]:
    """Show `guest_root` at `mount_point` (an empty directory); returns the teardown.

    Runs in the monitor, in the host's mount namespace; the init's own namespace later
    receives a copy of this mount and pivots onto it.
    """
    mount_point.mkdir(mode=0o700, exist_ok=True)
    target = os.fspath(mount_point)
    _linux.mount(os.fspath(guest_root), target, None, _linux.MS_BIND | _linux.MS_REC)
    try:
        _linux.mount(None, target, None, _linux.MS_REC | _linux.MS_PRIVATE)
    except BaseException:
        _linux.umount2(target, _linux.MNT_DETACH)
        raise

    def teardown() -> None:
        with contextlib.suppress(OSError):
            _linux.umount2(target, _linux.MNT_DETACH)
        with contextlib.suppress(OSError):
            mount_point.rmdir()

    return teardown
