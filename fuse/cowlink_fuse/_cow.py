"""Copy-on-write: give a guest a private copy of a shared file, and change shared names safely.

Blocking code, run in worker threads (trio.to_thread.run_sync); nothing here touches
the inode table or the catalogue.

A shared file is a store object: immutable, linked from the store and from guests.
It is never opened for writing. A break copies it to a temporary name beside the
guest's first name (data by reflink or copy_file_range, keeping holes; then owner,
mode, every xattr, times), links the copy beside each other name of the guest's link
group, and renames each temporary over its name. Renaming over, renaming or unlinking a
name of an immutable inode needs its flag cleared for that moment: `cowlink._store.thawed`
does that under a read lease, so nobody can have it open for writing meanwhile, and an
flock on the object keeps two cowlink processes from thawing it at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from cowlink import _linux
from cowlink._store import thawed

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_SHARED = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME | os.O_CLOEXEC
_NO_CLONE = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS})
_CHUNK = 1 << 30


@dataclass(frozen=True)
class Where:
    """A name as a directory fd (borrowed, not closed here) and a name in it."""

    dir_fd: int
    name: bytes


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
            _linux.lock_inode(fd)
            stack.callback(_linux.unlock_inode, fd)
            stack.enter_context(thawed(fd))
        yield


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy `size` bytes: a reflink where the filesystem has them, else only the data extents."""
    try:
        _linux.clone_file(src, dst)
        return
    except OSError as exc:
        if exc.errno not in _NO_CLONE:
            raise
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        _copy_range(src, dst, start, end)
        offset = end
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(src, dst, min(end - pos, _CHUNK), pos, pos)
        except OSError as exc:
            if exc.errno not in _NO_CLONE:
                raise
            data = os.pread(src, min(end - pos, 1 << 20), pos)
            n = os.pwrite(dst, data, pos) if data else 0
        if n == 0:
            raise OSError(errno.EIO, "the shared file is shorter than it was")
        pos += n


def copy_metadata(src: int, dst: int, st: os.stat_result) -> None:
    """Owner, then mode (chown clears set-id bits), xattrs (chown drops capabilities), times."""
    os.fchown(dst, st.st_uid, st.st_gid)
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src):
        os.setxattr(dst, name, os.getxattr(src, name))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


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
        st = os.fstat(src)
        made: list[tuple[Where, bytes]] = []
        first = names[0]
        temp = temps[0]
        dst = os.open(
            temp,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=first.dir_fd,
        )
        stack.callback(os.close, dst)
        made.append((first, temp))
        try:
            if keep_data:
                copy_data(src, dst, st.st_size)
            copy_metadata(src, dst, st)
            for where, other in zip(names[1:], temps[1:], strict=False):
                os.link(temp, other, src_dir_fd=first.dir_fd, dst_dir_fd=where.dir_fd)
                made.append((where, other))
            with names_changeable([src]):
                while made:
                    where, name = made[0]
                    os.rename(name, where.name, src_dir_fd=where.dir_fd, dst_dir_fd=where.dir_fd)
                    made.pop(0)
        finally:
            for where, name in made:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=where.dir_fd)
        return os.fstat(dst)


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
