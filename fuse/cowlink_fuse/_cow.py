"""Copy-on-write: give a guest a private copy of a shared file, and change shared names safely.

Blocking code, run in worker threads (trio.to_thread.run_sync); nothing here touches
the inode table or the catalogue.

A shared file is a store object: immutable, linked from the store and from guests.
It is never opened for writing. A break is `cowlink._copy`'s: a copy under a temporary
name beside the guest's first name (data by reflink or copy_file_range, keeping holes;
then owner, mode, every xattr, times), linked beside each other name of the guest's
link group, each temporary renamed over its name. Renaming over, renaming or unlinking a
name of an immutable inode needs its flag cleared for that moment: `cowlink._store.thawed`
does that under a read lease, so nobody can have it open for writing meanwhile, and an
flock on the object keeps two cowlink processes from thawing it at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from cowlink import _linux
from cowlink._copy import NameRef, copy_to_temp, move_names
from cowlink._store import thawed

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_SHARED = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME | os.O_CLOEXEC


#: A name as a directory fd (borrowed, not closed here) and a name in it.
Where = NameRef


def open_dir(root_fd: int, path: bytes) -> int:
    """An O_PATH fd of the guest directory `path` (b"" or b"/a/b"), never following symlinks."""
    fd = os.open(".", _DIR, dir_fd=root_fd)
    try:
        for part in path.split(b"/"):
            if not part:
                continue
            nxt = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_shared(where: Where, ino: int) -> int:
    """A read-only fd of the shared inode that `where` names; ESTALE if it names another."""
    fd = os.open(where.name, _READ_SHARED, dir_fd=where.dir_fd)
    if os.fstat(fd).st_ino != ino:
        os.close(fd)
        raise OSError(errno.ESTALE, "the name no longer leads to the shared file")
    return fd


@contextlib.contextmanager
def names_changeable(fds: list[int]) -> Iterator[None]:
    """Let names of these immutable inodes be added, renamed or removed, never their data."""
    with contextlib.ExitStack() as stack:
        # Always in inode order, so two cowlink processes cannot deadlock on a pair.
        for fd in sorted(fds, key=lambda f: os.fstat(f).st_ino):
            stack.enter_context(thawed(fd))
        yield


def break_links(
    root_fd: int, paths: list[bytes], ino: int, temps: list[bytes], *, keep_data: bool = True
) -> os.stat_result:
    """Move every name in `paths` that still leads to inode `ino` to one private copy.

    Args:
        root_fd: the guest root's directory fd.
        paths: the guest's link group: names that are one file to the guest.
        ino: the shared (store object) inode.
        temps: one temporary name per path (TempNames: recognisable as cowlink's later).
        keep_data: False when the caller truncates to zero anyway.

    Returns:
        The stat of the private copy.

    Raises:
        OSError: nothing was changed, or (after a partial rename) some names moved and
            the rest still lead to the shared file, which is consistent for the reader.
    """
    with contextlib.ExitStack() as stack:
        names: list[Where] = []
        for path in paths:
            parent, _, name = path.rpartition(b"/")
            try:
                dir_fd = open_dir(root_fd, parent)
            except OSError:
                continue
            stack.callback(os.close, dir_fd)
            try:
                if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino == ino:
                    names.append(Where(dir_fd, name))
            except FileNotFoundError:
                continue
        if not names:
            raise OSError(errno.ESTALE, "no name of the group leads to the shared file")
        src = open_shared(names[0], ino)
        stack.callback(os.close, src)
        first = Where(names[0].dir_fd, temps[0])
        copy = copy_to_temp(src, os.fstat(src), first.dir_fd, first.name, keep_data=keep_data)
        stack.callback(os.close, copy)
        return move_names(src, copy, names, make_temp=iter(temps[1:]).__next__, first_temp=first).st


def remove_leftovers(dir_fd: int, names: list[bytes]) -> None:
    """Remove private copies a killed daemon left half made (never a link to the store:
    those are immutable, and `cowlink unify` removes them)."""
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)


def unlink_shared(where: Where, ino: int) -> None:
    """Remove one guest name of a shared file; the store and other guests keep theirs."""
    fd = open_shared(where, ino)
    try:
        with names_changeable([fd]):
            os.unlink(where.name, dir_fd=where.dir_fd)
    finally:
        os.close(fd)


def rename_shared(
    src: Where, dst: Where, flags: int, shared_inodes: list[tuple[Where, int]]
) -> None:
    """renameat2 where one or both names lead to shared files (listed in `shared_inodes`)."""
    with contextlib.ExitStack() as stack:
        fds = []
        for where, ino in shared_inodes:
            fd = open_shared(where, ino)
            stack.callback(os.close, fd)
            fds.append(fd)
        with names_changeable(fds):
            _linux.rename_at(src.dir_fd, src.name, dst.dir_fd, dst.name, flags)
