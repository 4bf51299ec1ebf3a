"""Linux system calls that the standard library lacks: the only module that uses ctypes or ioctl.

Everything here is a thin, typed wrapper that raises OSError with the kernel's errno;
callers decide what an errno means for them.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import os
import signal

# <linux/fs.h>. The ioctls are declared with `long`, but every filesystem reads an int.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_APPEND_FL = 0x00000020
FS_IMMUTABLE_FL = 0x00000010
#: Flags whose presence on a guest file means an operator chose them by hand.
FS_HAND_SET_FLAGS = FS_IMMUTABLE_FL | FS_APPEND_FL

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1

_UNSUPPORTED_ERRNOS = frozenset({errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})

_libc = ctypes.CDLL(None, use_errno=True)
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def flags_unsupported(exc: OSError) -> bool:
    """True when an ioctl failed because the filesystem has no inode flags at all."""
    return exc.errno in _UNSUPPORTED_ERRNOS


def get_flags(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    return buf[0]


def set_flags(fd: int, flags: int) -> None:
    buf = array.array("i", [flags])
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, buf, True)


def set_immutable(fd: int, immutable: bool) -> None:
    """Read-modify-write the immutable flag, keeping every other flag bit as it was."""
    flags = get_flags(fd)
    wanted = flags | FS_IMMUTABLE_FL if immutable else flags & ~FS_IMMUTABLE_FL
    if wanted != flags:
        set_flags(fd, wanted)


def is_immutable(fd: int) -> bool:
    return bool(get_flags(fd) & FS_IMMUTABLE_FL)


def link_fd(fd: int, dir_fd: int, name: bytes) -> None:
    """Give the inode open as `fd` a new name, whatever its old names became meanwhile.

    linkat(AT_EMPTY_PATH) links exactly the inode we hold, so a name swapped by someone
    else between our check and the link cannot redirect it (it needs CAP_DAC_READ_SEARCH).
    """
    _check(_libc.linkat(fd, b"", dir_fd, name, AT_EMPTY_PATH), "linkat")


def rename_at(src_dir_fd: int, src: bytes, dst_dir_fd: int, dst: bytes, flags: int = 0) -> None:
    """renameat2(2): with RENAME_NOREPLACE or RENAME_EXCHANGE where `flags` asks for them."""
    if flags == 0:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return
    _check(_libc.renameat2(src_dir_fd, src, dst_dir_fd, dst, flags), "renameat2")


def ignore_lease_breaks() -> None:
    """A broken lease is announced with SIGIO, whose default action kills the process.

    We only hold read leases for the short moments when we need "nobody writes this
    inode"; a writer that opens meanwhile waits for us and then meets the immutable flag,
    so the notice itself carries nothing we act on.
    """
    signal.signal(signal.SIGIO, signal.SIG_IGN)


def take_read_lease(fd: int) -> None:
    """Fail with EAGAIN unless no one has the file open for writing (or mapped writable).

    While the lease is held, an open for writing by anyone blocks until we release it.
    """
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)


def release_lease(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass  # the fd is about to be closed, which releases the lease anyway


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 1 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> list[str]:
    """Every mount point this process sees, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [_unescape_mountinfo(line.split()[4]) for line in f if line.strip()]


def mount_point_of(path: str) -> str:
    """The mount point whose mount holds `path` (longest matching prefix)."""
    real = os.path.realpath(path)
    best = "/"
    for mp in mount_points():
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) > len(best):
            best = mp
    return best
