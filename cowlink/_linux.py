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

from ._mountinfo import mount_point_of as mount_point_of
from ._mountinfo import mount_points as mount_points

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


# -- copy-on-write support (cowlink_fuse) ----------------------------------------------

FICLONE = 0x40049409


def clone_file(src_fd: int, dst_fd: int) -> None:
    """Make `dst_fd` share `src_fd`'s data blocks (a reflink); OSError where unsupported."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def lock_inode(fd: int) -> None:
    """Take an exclusive flock on the inode behind `fd` (any open mode), waiting for it.

    cowlink processes that clear and set an object's immutable flag serialise on this,
    so one never sets the flag again while another still needs it cleared.
    """
    fcntl.flock(fd, fcntl.LOCK_EX)


def unlock_inode(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


def try_lock_inode(fd: int) -> bool:
    """Take an exclusive flock without waiting; False when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


# --- Context launcher: namespaces, mounts, capabilities, seccomp (used by _context) ---------
#
# Python 3.11 lacks os.unshare/os.setns (new in 3.12), so these go through libc; pivot_root
# has no libc wrapper at all and is a raw syscall whose number differs per architecture.

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# <linux/capability.h>
CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_FOWNER = 3
CAP_FSETID = 4
CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_LINUX_IMMUTABLE = 9
CAP_NET_BIND_SERVICE = 10
CAP_NET_BROADCAST = 11
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SYS_MODULE = 16
CAP_SYS_RAWIO = 17
CAP_SYS_CHROOT = 18
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_SYS_BOOT = 22
CAP_SYS_TIME = 25
CAP_MKNOD = 27
CAP_AUDIT_WRITE = 29
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _SyscallTable:
    """Per-architecture numbers: the raw syscalls we call and the ones seccomp denies."""

    def __init__(self, audit_arch: int, numbers: dict[str, int]) -> None:
        self.audit_arch = audit_arch
        self.numbers = numbers


_SYSCALLS = {
    "x86_64": _SyscallTable(
        0xC000003E,  # AUDIT_ARCH_X86_64
        {
            "ioctl": 16,
            "clone": 56,
            "pivot_root": 155,
            "init_module": 175,
            "delete_module": 176,
            "kexec_load": 246,
            "add_key": 248,
            "request_key": 249,
            "keyctl": 250,
            "unshare": 272,
            "perf_event_open": 298,
            "open_by_handle_at": 304,
            "finit_module": 313,
            "kexec_file_load": 320,
            "bpf": 321,
            "userfaultfd": 323,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
            "clone3": 435,
        },
    ),
    "aarch64": _SyscallTable(
        0xC00000B7,  # AUDIT_ARCH_AARCH64
        {
            "ioctl": 29,
            "pivot_root": 41,
            "unshare": 97,
            "kexec_load": 104,
            "init_module": 105,
            "delete_module": 106,
            "add_key": 217,
            "request_key": 218,
            "keyctl": 219,
            "clone": 220,
            "perf_event_open": 241,
            "open_by_handle_at": 265,
            "finit_module": 273,
            "bpf": 280,
            "userfaultfd": 282,
            "kexec_file_load": 294,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
            "clone3": 435,
        },
    ),
}

#: Syscalls no guest may make: each reaches host state that no namespace covers.
SECCOMP_DENIED = (
    "open_by_handle_at",  # "shocker": opens host inodes by handle
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "keyctl",  # the keyring is not namespaced
    "add_key",
    "request_key",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
)
_TIOCSTI = 0x5412  # pushes bytes into a terminal's input: the guest must not type for us
_TIOCLINUX = 0x541C

_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_libc.syscall.restype = ctypes.c_long


def _table(machine: str | None = None) -> _SyscallTable:
    """The syscall numbers of `machine` (uname's name; default: this one)."""
    machine = machine or os.uname().machine
    try:
        return _SYSCALLS[machine]
    except KeyError:
        raise OSError(errno.ENOSYS, f"no syscall table for {machine}") from None


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(
    source: str | None,
    target: str,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    _check(
        _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
        f"mount {target}",
    )


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    nr = _table().numbers["pivot_root"]
    result = _libc.syscall(
        ctypes.c_long(nr),
        ctypes.c_char_p(os.fsencode(new_root)),
        ctypes.c_char_p(os.fsencode(put_old)),
    )
    _check(result, "pivot_root")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def cap_last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop_bounding_set(keep: frozenset[int]) -> None:
    """Remove every capability not in `keep` from the bounding set (needs CAP_SETPCAP)."""
    for cap in range(cap_last_cap() + 1):
        if cap not in keep and prctl(PR_CAPBSET_READ, cap) == 1:
            prctl(PR_CAPBSET_DROP, cap)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc.capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]


def capget() -> tuple[int, int, int]:
    """This process's (effective, permitted, inheritable) capability masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    e, p, i = (
        int(getattr(data[0], f)) | (int(getattr(data[1], f)) << 32)
        for f in ("effective", "permitted", "inheritable")
    )
    return e, p, i


def capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def limit_capabilities(keep: frozenset[int]) -> None:
    """Shrink bounding, effective and permitted sets to `keep`; clear inheritable and ambient.

    Clearing the inheritable and ambient sets matters too (CVE-2022-27649): otherwise an
    exec could regain what the bounding set no longer lists.
    """
    drop_bounding_set(keep)
    mask = 0
    for cap in keep:
        mask |= 1 << cap
    effective, permitted, _ = capget()
    capset(effective & mask, permitted & mask, 0)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


# Classic BPF for seccomp (<linux/filter.h>, <linux/seccomp.h>).
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JGE_K = 0x35
_BPF_JSET_K = 0x45
_BPF_RET_K = 0x06
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
_X32_SYSCALL_BIT = 0x40000000
# struct seccomp_data: int nr; u32 arch; u64 ip; u64 args[6] (little-endian low words).
_OFF_NR = 0
_OFF_ARCH = 4


def _off_arg_low(n: int) -> int:
    return 16 + 8 * n


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(
    denied: tuple[str, ...] = SECCOMP_DENIED,
    *,
    deny_userns: bool = True,
    machine: str | None = None,
) -> list[tuple[int, int, int, int]]:
    """The deny-list filter as (code, jt, jf, k) instructions, for `machine`'s architecture
    (uname's name; default: this machine's).

    Other ABIs (i386 via int 0x80, x32) are refused outright: their numbers differ and a
    deny list written for one ABI would not cover them. A new user namespace would hand the
    guest a full capability set again, so unshare/clone with CLONE_NEWUSER are denied and
    clone3, whose flags seccomp cannot read, reports ENOSYS so that libc falls back to clone.
    """
    table = _table(machine)
    nrs = table.numbers
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    enosys = SECCOMP_RET_ERRNO | errno.ENOSYS
    # Each block is built to jump to "allow" by falling off its end; targets are relative.
    prog: list[tuple[int, int, int, int]] = [
        (_BPF_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_BPF_JEQ_K, 1, 0, table.audit_arch),
        (_BPF_RET_K, 0, 0, enosys),
        (_BPF_LD_W_ABS, 0, 0, _OFF_NR),
        (_BPF_JGE_K, 0, 1, _X32_SYSCALL_BIT),
        (_BPF_RET_K, 0, 0, enosys),
    ]
    for name in denied:
        prog += [(_BPF_JEQ_K, 0, 1, nrs[name]), (_BPF_RET_K, 0, 0, deny)]
    if deny_userns:
        prog += [(_BPF_JEQ_K, 0, 1, nrs["clone3"]), (_BPF_RET_K, 0, 0, enosys)]
        for name in ("unshare", "clone"):
            prog += [
                (_BPF_JEQ_K, 0, 4, nrs[name]),
                (_BPF_LD_W_ABS, 0, 0, _off_arg_low(0)),
                (_BPF_JSET_K, 0, 1, CLONE_NEWUSER),
                (_BPF_RET_K, 0, 0, deny),
                (_BPF_LD_W_ABS, 0, 0, _OFF_NR),
            ]
    prog += [
        (_BPF_JEQ_K, 0, 5, nrs["ioctl"]),
        (_BPF_LD_W_ABS, 0, 0, _off_arg_low(1)),
        (_BPF_JEQ_K, 1, 0, _TIOCSTI),
        (_BPF_JEQ_K, 0, 1, _TIOCLINUX),
        (_BPF_RET_K, 0, 0, deny),
        (_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        (_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    return prog


def install_seccomp(program: list[tuple[int, int, int, int]]) -> None:
    """Install a seccomp filter on this thread; it is inherited by children and across exec.

    Needs CAP_SYS_ADMIN or no_new_privs; call it before the capabilities are dropped.
    """
    filters = (_SockFilter * len(program))(*[_SockFilter(*ins) for ins in program])
    fprog = _SockFprog(len(program), filters)
    _check(
        _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0),
        "prctl(PR_SET_SECCOMP)",
    )


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot); None when no such process runs.

    Together with the pid it names one process for good: a reused pid starts later.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may hold spaces and parentheses; the fields after the last ')' are fixed.
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None  # a zombie has ended; only its parent has not noticed yet
    return int(fields[19])


def namespace_inode(pid: int, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except (FileNotFoundError, ProcessLookupError):
        return None


PR_SET_NAME = 15


def set_process_name(name: str) -> None:
    """Set this thread's comm (what ps shows; at most 15 bytes)."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _check(_libc.prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0), "prctl(PR_SET_NAME)")


#: Upper bound for closerange(): every fd a process can have open.
MAX_FD = max(os.sysconf("SC_OPEN_MAX"), 1024)


# -- private copies (split, copy-on-write) ---------------------------------------------


def clone_unsupported(exc: OSError) -> bool:
    """True when FICLONE failed because the filesystem (or this pair of files) cannot share."""
    return exc.errno in _UNSUPPORTED_ERRNOS | {errno.EXDEV, errno.EBADF, errno.EPERM}


def data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of each data segment below `size`, found with SEEK_DATA/SEEK_HOLE.

    A filesystem without hole support reports the whole file as one segment.
    """
    segments: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            segments.append((start, end - start))
        offset = end
    return segments


_libc.syncfs.argtypes = [ctypes.c_int]


def syncfs(fd: int) -> None:
    """Write out every dirty page and inode of the filesystem holding `fd`, and wait."""
    _check(_libc.syncfs(fd), "syncfs")
