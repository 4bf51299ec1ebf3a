"""A guest's security context, built inside its init: namespaces, root, /proc, /dev, caps, seccomp.

Contract: everything here runs in a freshly forked, single-threaded child, and most of
it only after that child has left the host's mount namespace; so this module imports
everything it needs up front (after pivot_root no host module can be imported), never
raises past `run_init` (errors travel back to the monitor as text on a pipe) and ends
the process with `os._exit`.
"""

from __future__ import annotations

import os
import signal
import stat
import traceback
from dataclasses import dataclass

from . import _guestinit, _linux
from ._guestconf import GuestConfig

GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "TERM": "linux",
    "container": "cowlink",
}

#: What a full OS guest needs (see the research note, section 3). Not in it: SYS_ADMIN,
#: SYS_MODULE, SYS_RAWIO, SYS_PTRACE, SYS_TIME, DAC_READ_SEARCH ("shocker"), LINUX_IMMUTABLE
#: (unified files stay immutable), and more.
BASE_CAPABILITIES = frozenset(
    {
        _linux.CAP_CHOWN,
        _linux.CAP_DAC_OVERRIDE,
        _linux.CAP_FOWNER,
        _linux.CAP_FSETID,
        _linux.CAP_KILL,
        _linux.CAP_SETGID,
        _linux.CAP_SETUID,
        _linux.CAP_SETPCAP,
        _linux.CAP_NET_BIND_SERVICE,
        _linux.CAP_NET_BROADCAST,
        _linux.CAP_NET_RAW,
        _linux.CAP_SYS_CHROOT,
        _linux.CAP_SYS_BOOT,  # reboot() in a pid namespace only ends the guest's init
        _linux.CAP_AUDIT_WRITE,
    }
)

INIT_NAME = "cowlink-init"  # comm of cowlink's own pid 1, as `guest status` shows it
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")


def capabilities(*, own_netns: bool, devices_cgroup: bool) -> frozenset[int]:
    """The guest's bounding set: NET_ADMIN only in its own netns, MKNOD only behind a devices
    cgroup that limits which nodes it can use."""
    caps = set(BASE_CAPABILITIES)
    if own_netns:
        caps.add(_linux.CAP_NET_ADMIN)
    if devices_cgroup:
        caps.add(_linux.CAP_MKNOD)
    return frozenset(caps)


def namespace_flags(network_mode: str) -> int:
    flags = _linux.CLONE_NEWNS | _linux.CLONE_NEWUTS | _linux.CLONE_NEWIPC
    flags |= _linux.CLONE_NEWCGROUP
    if network_mode != "host":
        flags |= _linux.CLONE_NEWNET
    return flags


@dataclass(frozen=True)
class ContextSpec:
    """What the init child needs to build the context; prepared by the monitor.

    Attributes:
        rootfs: the host directory to pivot onto (the guest's root as its mount shows it).
        console: host path of the pty slave that becomes /dev/console and init's stdio.
        keep: the capability bounding set.
        sync_fd: read end; one byte means "the host side is ready", EOF means "give up".
        report_fd: write end; init reports "unshared" here.
        ready_fd: write end (close-on-exec); "ok" or "error: ..." is written here.
    """

    name: str
    config: GuestConfig
    rootfs: str
    console: str
    keep: frozenset[int]
    sync_fd: int
    report_fd: int
    ready_fd: int


def resolve_in_root(root: str, path: str) -> str:
    """The host path of guest path `path`, following symlinks as the guest would.

    An absolute symlink in the guest means the guest's root, never the host's; `..` stops
    at the root. So a guest cannot point a mount point at a host directory.
    """
    parts = [p for p in path.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                raise OSError(40, f"too many symlinks in {path}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _mount_point(root: str, guest_path: str, *, directory: bool = True) -> str:
    path = resolve_in_root(root, guest_path)
    if directory:
        os.makedirs(path, exist_ok=True)
    elif not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
    return path


def _bind(source: str, target: str, *, readonly: bool, recursive: bool = False) -> None:
    flags = _linux.MS_BIND | (_linux.MS_REC if recursive else 0)
    _linux.mount(source, target, None, flags)
    if readonly:
        # A bind cannot be made read-only in one step; the remount applies to this mount only.
        _linux.mount(None, target, None, _linux.MS_BIND | _linux.MS_REMOUNT | _linux.MS_RDONLY)


def build_root(spec: ContextSpec) -> None:
    """Mount the guest's filesystem view below spec.rootfs, then pivot onto it.

    Runs in the init's own mount namespace; nothing here is seen by the host.
    """
    # Receive mount events from the host (an unmount of the root there reaches us), but
    # never send ours back.
    _linux.mount(None, "/", None, _linux.MS_REC | _linux.MS_SLAVE)
    root = spec.rootfs
    _linux.mount(root, root, None, _linux.MS_BIND | _linux.MS_REC)

    for m in spec.config.mounts:
        if not os.path.exists(m.source):
            raise FileNotFoundError(f"bind mount source {m.source} does not exist")
        target = _mount_point(root, m.target, directory=os.path.isdir(m.source))
        _bind(m.source, target, readonly=m.readonly, recursive=True)

    proc = _mount_point(root, "/proc")
    _linux.mount("proc", proc, "proc", _linux.MS_NOSUID | _linux.MS_NODEV | _linux.MS_NOEXEC)
    for entry in _PROC_READ_ONLY:
        path = os.path.join(proc, entry)
        if os.path.exists(path):
            _bind(path, path, readonly=True)

    sys_dir = _mount_point(root, "/sys")
    ro = _linux.MS_RDONLY | _linux.MS_NOSUID | _linux.MS_NODEV | _linux.MS_NOEXEC
    _linux.mount("sysfs", sys_dir, "sysfs", ro)

    dev = _mount_point(root, "/dev")
    _linux.mount("tmpfs", dev, "tmpfs", _linux.MS_NOSUID | _linux.MS_NOEXEC, "mode=755,size=1m")
    for name in _DEVICES:
        node = os.path.join(dev, name)
        os.close(os.open(node, os.O_WRONLY | os.O_CREAT, 0o666))
        _bind(f"/dev/{name}", node, readonly=False)
    console = os.path.join(dev, "console")
    os.close(os.open(console, os.O_WRONLY | os.O_CREAT, 0o600))
    _bind(spec.console, console, readonly=False)
    os.mkdir(os.path.join(dev, "pts"), 0o755)
    _linux.mount(
        "devpts",
        os.path.join(dev, "pts"),
        "devpts",
        _linux.MS_NOSUID | _linux.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    os.chmod(os.path.join(dev, "shm"), 0o1777)
    for link, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, os.path.join(dev, link))

    # pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves
    # no path back to the host's tree (a chroot alone can be climbed out of).
    os.chdir(root)
    _linux.pivot_root(".", ".")
    _linux.umount2(".", _linux.MNT_DETACH)
    os.chdir("/")


def lock_down(keep: frozenset[int]) -> None:
    """Install the seccomp deny list (needs SYS_ADMIN, so first), then shrink capabilities."""
    _linux.install_seccomp(_linux.seccomp_program())
    _linux.limit_capabilities(keep)


def _console_stdio() -> None:
    # Not our controlling tty: the monitor holding the pty's master may die, and the
    # hangup must not take the guest down with it.
    fd = os.open("/dev/console", os.O_RDWR | os.O_NOCTTY)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


def run_init(spec: ContextSpec) -> None:
    """Body of the guest's init (pid 1 of a new pid namespace, already in the guest's cgroups).

    Never returns: it execs the guest's init or runs cowlink's own, then `os._exit`s.
    """
    try:
        os.setsid()
        _linux.unshare(namespace_flags(spec.config.network.mode))
        os.write(spec.report_fd, b"u")
        os.close(spec.report_fd)
        if os.read(spec.sync_fd, 1) != b"g":
            os._exit(1)  # the monitor gave up (or died) before the host side was ready
        os.close(spec.sync_fd)
        build_root(spec)
        _linux.sethostname(spec.config.hostname)
        _console_stdio()
        if spec.config.init.style != "plain":
            # Our init is the host's python: a guest that could ptrace it or open
            # /proc/1/exe would reach a host binary (CVE-2019-5736).
            _linux.prctl(_linux.PR_SET_DUMPABLE, 0)
            _linux.set_process_name(INIT_NAME)
        lock_down(spec.keep)
        os.closerange(3, spec.ready_fd)
        os.closerange(spec.ready_fd + 1, _linux.MAX_FD)
        os.chdir("/")
        os.umask(0o022)
        if spec.config.init.style == "plain":
            for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            command = list(spec.config.init.command)
            os.execve(command[0], command, GUEST_ENV)  # ready_fd is close-on-exec: EOF = ok
        _guestinit.main(spec.config.init, GUEST_ENV, spec.ready_fd)
    except BaseException as exc:
        message = f"error: {exc}" if isinstance(exc, OSError) else traceback.format_exc()
        try:
            os.write(spec.ready_fd, message.encode(errors="replace")[:4000])
        except OSError:
            pass
        os._exit(127)
    os._exit(0)
