"""Private copies of shared inodes: the one routine that breaks a link (split, copy-on-write).

A shared inode (usually an immutable store object) is never opened for writing. Its copy
is built beside it under a MAC-named temporary name, complete with data, owner, mode,
every xattr and timestamps, and only then renamed over each name of the link group, so
every name is at every moment either the shared inode or a finished copy. The store and
other guests keep their links; the shared inode's immutable flag is cleared only inside
`thawed` (under a read lease) for the renames, then restored.

Callers hold the home's lock when they change store-linked names; the FUSE layer calls
`copy_to_temp` and `move_names` from a worker thread (they block; they touch no global
state).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from . import _linux
from ._errors import NoSpace
from ._store import TempNames, read_xattrs, thawed

OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME
#: Allowance per copy for its inode's own blocks (extent tree, xattr block).
_OVERHEAD = 8192


@dataclass(frozen=True)
class NameRef:
    """One name of a link group: an open directory and an entry in it."""

    dir_fd: int
    name: bytes


@dataclass
class PrivateCopy:
    """What `make_private` did: the copy's stat and which names now lead to it."""

    st: os.stat_result
    replaced: list[NameRef]
    #: Names that no longer led to the shared inode when their turn came; left alone.
    skipped: list[NameRef]

    @property
    def bytes_added(self) -> int:
        return self.st.st_blocks * 512


def space_needed(st: os.stat_result) -> int:
    """Bytes a private copy of `st` may allocate (holes stay holes)."""
    return st.st_blocks * 512 + _OVERHEAD


def ensure_space(fd: int, need_bytes: int, need_inodes: int) -> None:
    """Refuse before anything changes when the filesystem of `fd` lacks room for the copies.

    Only the blocks an unprivileged user may take count (`f_bavail`): root may dip into the
    reserve, but a guest tree that fills it leaves the host no room to recover.

    Raises:
        NoSpace: not enough free blocks or inodes.
    """
    vfs = os.fstatvfs(fd)
    free = vfs.f_bavail * vfs.f_frsize
    if need_bytes > free:
        raise NoSpace(
            f"not enough free space: the copies need {need_bytes} bytes, "
            f"the filesystem has {free} free; nothing was changed"
        )
    if vfs.f_files and need_inodes > vfs.f_favail:
        raise NoSpace(
            f"not enough free inodes: the copies need {need_inodes}, "
            f"the filesystem has {vfs.f_favail} free; nothing was changed"
        )


def make_private(
    dir_fd: int,
    name: bytes,
    *,
    others: Sequence[NameRef] = (),
    temp_names: TempNames,
    fsync: bool = False,
) -> PrivateCopy:
    """Give the file `name` in `dir_fd`, and the other names of its link group, one private copy.

    Args:
        dir_fd: the directory holding `name`; the copy is made there.
        name: a name of the shared regular file.
        others: the other names of the same link group (names that are one file to the
            guest); each moves to the same copy. A name no longer leading to the shared
            inode is left alone.
        temp_names: makes MAC-named temporary names, so a leftover can be recognised.
        fsync: flush the copy's data before it replaces any name.

    Raises:
        OSError: the copy could not be made (ENOSPC, EROFS, EIO...). Nothing changed:
            the temporary file is gone and every name still leads to the shared inode.
        InUseForWriting: someone holds the shared inode open for writing.
    """
    src_fd = os.open(name, OPEN_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(src_fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        temp = temp_names.make()
        copy_fd = copy_to_temp(src_fd, st, dir_fd, temp, fsync=fsync)
        try:
            return move_names(
                src_fd,
                copy_fd,
                [NameRef(dir_fd, name), *others],
                make_temp=temp_names.make,
                first_temp=NameRef(dir_fd, temp),
            )
        finally:
            os.close(copy_fd)
    finally:
        os.close(src_fd)


def copy_to_temp(
    src_fd: int,
    st: os.stat_result,
    dir_fd: int,
    temp: bytes,
    *,
    fsync: bool = False,
    keep_data: bool = True,
) -> int:
    """A finished copy of `src_fd` made under the new name `temp` in `dir_fd`; its fd.

    Owner is set before mode (chown clears set-id bits) and xattrs after both (chown
    strips security.capability); timestamps come last, since each step changes them.
    `keep_data` False leaves the copy empty, for a caller about to truncate it anyway.

    Raises:
        OSError: nothing is left behind.
    """
    fd = os.open(
        temp,
        os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    try:
        if keep_data:
            copy_data(src_fd, fd, st.st_size)
        os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        for key, value in read_xattrs(src_fd):
            os.setxattr(fd, key, value)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(temp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    return fd


def copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy `size` bytes: a reflink where the filesystem shares extents, else only the data
    segments (copy_file_range, read/write as a last resort), so holes stay holes.

    Raises:
        OSError: ENOSPC and friends; also EIO when the source is shorter than `size`.
    """
    try:
        _linux.clone_file(src_fd, dst_fd)
        return
    except OSError as exc:
        if not _linux.clone_unsupported(exc):
            raise
    for offset, length in _linux.data_segments(src_fd, size):
        _copy_range(src_fd, dst_fd, offset, length)
    os.ftruncate(dst_fd, size)


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    done = 0
    while done < length:
        pos = offset + done
        try:
            n = os.copy_file_range(src_fd, dst_fd, length - done, pos, pos)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data = os.pread(src_fd, min(length - done, 1 << 20), pos)
            n = os.pwrite(dst_fd, data, pos) if data else 0
        if n == 0:
            raise OSError(errno.EIO, "the shared file is shorter than its size")
        done += n


def move_names(
    src_fd: int,
    copy_fd: int,
    names: Sequence[NameRef],
    *,
    make_temp: Callable[[], bytes],
    first_temp: NameRef | None = None,
) -> PrivateCopy:
    """Rename links to `copy_fd` over each of `names` that still leads to `src_fd`'s inode.

    `first_temp`, when given, is an existing temporary name of the copy, used for the name
    in the same directory before any new link is made. Fresh temporary links are made
    first; the renames then happen in one thaw of the shared inode.
    """
    src = os.fstat(src_fd)
    pending: list[tuple[NameRef, NameRef]] = []  # (name, temporary name of the copy)
    spare = first_temp
    skipped: list[NameRef] = []
    replaced: list[NameRef] = []
    try:
        for ref in names:
            if not _leads_to(ref, src):
                skipped.append(ref)
                continue
            if spare is not None and spare.dir_fd == ref.dir_fd:
                temp, spare = spare, None
            else:
                temp = NameRef(ref.dir_fd, make_temp())
                _linux.link_fd(copy_fd, temp.dir_fd, temp.name)
            pending.append((ref, temp))
        with _thawed_if_flagged(src_fd):
            while pending:
                ref, temp = pending[0]
                # Re-check just before the rename: a guest may have renamed or replaced
                # the name since; then its new file is its own business.
                if _leads_to(ref, src):
                    os.rename(temp.name, ref.name, src_dir_fd=temp.dir_fd, dst_dir_fd=ref.dir_fd)
                    replaced.append(ref)
                else:
                    os.unlink(temp.name, dir_fd=temp.dir_fd)
                    skipped.append(ref)
                pending.pop(0)
    finally:
        for _, temp in pending:
            _unlink_quietly(temp)
        if spare is not None:
            _unlink_quietly(spare)
    return PrivateCopy(os.fstat(copy_fd), replaced, skipped)


def remove_temp_name(dir_fd: int, name: str, ino: int) -> bool:
    """Remove a temporary name an interrupted run left, if it still names inode `ino`.

    Such a name never holds the only copy of anything: it is a link to a store object,
    or a private copy whose original names still stand. Its inode may be immutable (an
    object, or one taken out of the store): the flag is cleared only for the unlink.
    Returns False when the name leads to another inode now (left alone).
    """
    fd = os.open(name, OPEN_FLAGS, dir_fd=dir_fd)
    try:
        if os.fstat(fd).st_ino != ino:
            return False
        with _thawed_if_flagged(fd):
            os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(fd)
    return True


def _leads_to(ref: NameRef, st: os.stat_result) -> bool:
    try:
        now = os.lstat(ref.name, dir_fd=ref.dir_fd)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _unlink_quietly(ref: NameRef) -> None:
    try:
        os.unlink(ref.name, dir_fd=ref.dir_fd)
    except OSError:
        pass


@contextmanager
def _thawed_if_flagged(fd: int) -> Iterator[None]:
    """`thawed` on filesystems with inode flags; nothing to thaw on those without."""
    try:
        _linux.get_flags(fd)
    except OSError as exc:
        if not _linux.flags_unsupported(exc):
            raise
        with nullcontext():
            yield
        return
    with thawed(fd):
        yield
