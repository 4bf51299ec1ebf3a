"""The daemon: mount a guest root, serve requests until unmounted or signalled, clean up.

One `trio.run`, pyfuse3's request loop running on `_loop.RequestLoopTrio`. Resources are
acquired in order, each cleanup registered right after: the catalogue, the operations
(their fds), the FUSE session (unmounted on the way out). SIGTERM, SIGINT and SIGHUP end
the session cleanly; a daemon killed outright is unmounted by fusermount3's auto_unmount
watcher, so no hung mount is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import resource
import signal
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from cowlink import _linux
from cowlink._catalogue import Catalogue
from cowlink._store import TempNames

from ._groups import SharedIndex
from ._loop import RequestLoopTrio
from ._ops import CowlinkOperations

log = logging.getLogger(__name__)


@dataclass
class MountOptions:
    """What `cowlink mount` asks of the daemon."""

    root: str
    mountpoint: str
    catalogue: Path | None
    secret: bytes
    writeback: bool = True
    ready_fd: int | None = None
    run_dir: Path | None = None  # where the one-daemon-per-root lock lives


class RootBusy(Exception):
    """Another daemon serves this root: two would keep diverging views of its link groups."""


def _lock_root(stack: contextlib.ExitStack, run_dir: Path, root: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(os.fsencode(os.path.realpath(root))).hexdigest()[:16]
    path = run_dir / f"root-{tag}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not _linux.try_lock_inode(fd):
            os.close(fd)
            raise RootBusy(f"{root} is mounted by another cowlink daemon already")
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # a daemon that was leaving removed the file we locked: lock anew
    stack.callback(os.close, fd)
    # Removed while still locked, so a stopped daemon leaves nothing in HOME/run.
    stack.callback(path.unlink, missing_ok=True)


def fuse_options() -> set[str]:
    """Mount options: fuse-overlayfs and s3ql practice (see research/fuse.md §5)."""
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    opts |= {"fsname=cowlink", "subtype=cowlink", "allow_other", "auto_unmount"}
    # A guest boots on this mount: su, passwd and ping need their setuid bits. Device
    # nodes stay inert (nodev, libfuse's default); guests get their own /dev.
    opts.add("suid")
    return opts


def _prepare_process() -> None:
    os.umask(0)  # the kernel applied the caller's umask already
    _linux.ignore_lease_breaks()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # One O_PATH fd per directory the kernel holds, plus open files.
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))


def serve(options: MountOptions) -> None:
    """Mount, signal readiness on `ready_fd`, serve until unmounted; blocks."""
    _prepare_process()
    with contextlib.ExitStack() as stack:
        if options.run_dir is not None:
            _lock_root(stack, options.run_dir, options.root)
        index = None
        if options.catalogue is not None:
            catalogue = Catalogue.open(options.catalogue)
            index = SharedIndex(catalogue, os.path.realpath(options.root))
        ops = CowlinkOperations(
            options.root, index, TempNames(options.secret), writeback=options.writeback
        )
        stack.callback(ops.close)
        pyfuse3.init(ops, options.mountpoint, fuse_options())
        stack.callback(_close_session)
        loop = RequestLoopTrio()
        pyfuse3.trio = loop  # type: ignore[attr-defined]
        stack.callback(setattr, pyfuse3, "trio", trio)
        log.info("mounted %s on %s", options.root, options.mountpoint)
        if options.ready_fd is not None:
            os.write(options.ready_fd, b"ready\n")
            os.close(options.ready_fd)
        trio.run(_main)
        log.info(
            "unmounting %s: %d breaks, %d shared unlinks, %d shared renames",
            options.mountpoint,
            ops.stats.breaks,
            ops.stats.shared_unlinks,
            ops.stats.shared_renames,
        )
        log.info(
            "waits between requests: %d at once, %d in trio", loop.quick_waits, loop.trio_waits
        )


def _close_session() -> None:
    pyfuse3.close(unmount=True)


async def _main() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("signal %d: unmounting", signum)
                    pyfuse3.terminate()
                    return

            nursery.start_soon(stop_on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
