"""Escape attempts, run as root inside a guest by tests/test_guest_escapes.py.

Prints one JSON object: attempt name -> "blocked: ..." or "ESCAPED: ...". Plain python
with ctypes only, as it runs on the host's /usr bound read-only into the guest.
"""

import ctypes
import errno
import fcntl
import json
import os
import socket
import stat
import sys
from collections.abc import Callable
from typing import Any

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
args: dict[str, Any] = json.loads(sys.argv[1])
results: dict[str, str] = {}


def attempt(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def wrap(fn: Callable[[], str]) -> Callable[[], str]:
        try:
            detail = fn()
            results[name] = f"ESCAPED: {detail}" if detail else "blocked"
        except OSError as exc:
            results[name] = f"blocked: {errno.errorcode.get(exc.errno or 0, exc.errno)}"
        return fn

    return wrap


def syscall(nr: int, *a: int) -> int:
    result: int = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(x) for x in a])
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


@attempt("chroot_twice")
def _() -> str:
    pid = os.fork()
    if pid == 0:
        try:
            os.makedirs("/tmp/jail", exist_ok=True)
            os.chroot("/tmp/jail")
            for _ in range(64):
                os.chdir("..")
            os.chroot(".")
            os._exit(3 if os.path.exists(args["host_marker"]) else 0)
        except OSError:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return "host marker visible after chroot" if os.waitstatus_to_exitcode(status) == 3 else ""


@attempt("host_marker_visible")
def _() -> str:
    return "host path visible" if os.path.exists(args["host_marker"]) else ""


@attempt("open_by_handle_at")
def _() -> str:
    # struct file_handle { u32 handle_bytes; int handle_type; u8 f_handle[8] }: ext4 inode 2.
    handle = (ctypes.c_char * 16).from_buffer_copy(
        (8).to_bytes(4, "little") + (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + bytes(4)
    )
    root = os.open("/", os.O_RDONLY)
    fd = syscall(304, root, ctypes.addressof(handle), os.O_RDONLY | os.O_DIRECTORY)
    return f"opened host inode 2: {os.listdir(fd)[:5]}"


@attempt("mount_tmpfs")
def _() -> str:
    if libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) < 0:
        raise OSError(ctypes.get_errno(), "mount")
    return "mounted tmpfs"


@attempt("remount_proc_sys_rw")
def _() -> str:
    if libc.mount(None, b"/proc/sys", None, 32 | 4096, None) < 0:  # MS_REMOUNT|MS_BIND
        raise OSError(ctypes.get_errno(), "mount")
    return "remounted /proc/sys"


@attempt("mount_cgroup_release_agent")
def _() -> str:
    os.makedirs("/tmp/cg", exist_ok=True)
    if libc.mount(b"cgroup", b"/tmp/cg", b"cgroup", 0, b"memory") < 0:
        raise OSError(ctypes.get_errno(), "mount")
    return "mounted a cgroup hierarchy"


@attempt("write_proc_sys")
def _() -> str:
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write("pwned")
    return "wrote /proc/sys/kernel/hostname"


@attempt("write_sysrq_trigger")
def _() -> str:
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("h")  # 'h' only prints help: harmless even if this ever succeeded
    return "wrote /proc/sysrq-trigger"


@attempt("write_sysfs")
def _() -> str:
    with open("/sys/kernel/uevent_helper", "w") as f:
        f.write("/pwn")
    return "wrote /sys"


@attempt("init_module")
def _() -> str:
    syscall(175, 0, 0, 0)
    return "init_module accepted"


@attempt("finit_module")
def _() -> str:
    fd = os.open("/dev/null", os.O_RDONLY)
    syscall(313, fd, 0, 0)
    return "finit_module accepted"


@attempt("keyctl")
def _() -> str:
    syscall(250, 0, 0, 0, 0, 0)  # KEYCTL_GET_KEYRING_ID
    return "keyctl works"


@attempt("bpf")
def _() -> str:
    syscall(321, 0, 0, 0)
    return "bpf works"


@attempt("unshare_user")
def _() -> str:
    syscall(272, 0x10000000)
    return "got a user namespace"


@attempt("mknod_host_disk")
def _() -> str:
    path = "/tmp/disk"
    os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(args["disk_major"], args["disk_minor"]))
    fd = os.open(path, os.O_RDONLY)
    return f"read the host disk: {len(os.read(fd, 512))} bytes"


@attempt("kill_host_process")
def _() -> str:
    os.kill(args["host_pid"], 9)
    return "signalled the host pid"


@attempt("ptrace_init")
def _() -> str:
    syscall(101, 16, 1, 0, 0)  # PTRACE_ATTACH to pid 1 (cowlink's init)
    return "attached to pid 1"


@attempt("read_init_exe")
def _() -> str:
    os.open("/proc/1/exe", os.O_RDONLY)
    return "opened /proc/1/exe (the host's binary)"


@attempt("see_host_processes")
def _() -> str:
    seen = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():  # our own argv carries the tag
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if args["host_tag"].encode() in f.read():
                        seen.append(pid)
            except OSError:
                pass
    return f"host process visible as {seen}" if seen else ""


@attempt("reach_store")
def _() -> str:
    for path in (args["store"], args["store_marker"]):
        if os.path.exists(path):
            return f"{path} exists"
    for dirpath, dirnames, filenames in os.walk("/"):
        dirnames[:] = [d for d in dirnames if d not in ("proc", "sys", "usr")]
        if os.path.basename(args["store_marker"]) in filenames:
            return f"store object found in {dirpath}"
    return ""


@attempt("write_shared_file")
def _() -> str:
    try:
        with open("/etc/shared", "a") as f:
            f.write("from A\n")
        return "appended to the shared file"
    except OSError:
        pass
    fd = os.open("/etc/shared", os.O_RDONLY)
    flags = ctypes.c_int(0)
    fcntl.ioctl(fd, 0x80086601, flags)  # FS_IOC_GETFLAGS
    fcntl.ioctl(fd, 0x40086602, ctypes.c_int(flags.value & ~0x10))  # clear immutable
    return "cleared the immutable flag"


@attempt("set_hostname")
def _() -> str:
    socket.sethostname("pwned")
    return "changed the hostname"


@attempt("tiocsti_console")
def _() -> str:
    fd = os.open("/dev/console", os.O_RDWR | os.O_NOCTTY)
    fcntl.ioctl(fd, 0x5412, b"x")
    return "TIOCSTI on the console"


@attempt("raw_disk_via_sys")
def _() -> str:
    for dev in os.listdir("/sys/class/block"):
        with open(f"/sys/class/block/{dev}/dev") as f:
            major, minor = f.read().strip().split(":")
        os.mknod(f"/tmp/b{dev}", stat.S_IFBLK | 0o600, os.makedev(int(major), int(minor)))
        os.open(f"/tmp/b{dev}", os.O_RDONLY)
        return f"opened block device {dev}"
    return ""


@attempt("mknod_host_console")
def _() -> str:
    os.mknod("/tmp/hostconsole", stat.S_IFCHR | 0o600, os.makedev(5, 1))
    os.open("/tmp/hostconsole", os.O_RDWR | os.O_NOCTTY)
    return "opened the host's console"


@attempt("mknod_host_pty")
def _() -> str:
    for n in range(8):  # host ptys (the operator's terminal among them) are 136:N too
        path = f"/tmp/hostpts{n}"
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(136, n))
        try:
            os.open(path, os.O_RDWR | os.O_NOCTTY)
            return f"opened 136:{n} outside the guest's devpts"
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
    raise OSError(errno.EIO, "no pty opened")


@attempt("open_dev_tty")
def _() -> str:
    os.open("/dev/tty", os.O_RDWR)
    return "opened a controlling terminal from exec"


@attempt("net_admin_on_host_network")
def _() -> str:
    # The guest shares the host's network (mode "host"): without NET_ADMIN it cannot
    # reconfigure it. Setting lo's MTU to its current value would change nothing anyway.
    import struct

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    req = struct.pack("16si12x", b"lo", 0)
    mtu = struct.unpack("16si12x", fcntl.ioctl(s, 0x8921, req))[1]  # SIOCGIFMTU
    fcntl.ioctl(s, 0x8922, struct.pack("16si12x", b"lo", mtu))  # SIOCSIFMTU
    return "reconfigured the host's loopback"


json.dump(results, sys.stdout)
