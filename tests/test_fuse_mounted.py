"""cowlink mount on the real kernel: every copy-on-write trigger, link groups, lifecycle."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cowlink import _linux
from tests._mounts import Guests, cowlink, make_guests, mounted, stat_view, write
from tests._util import file_digest, manifest, need_fuse, need_immutable

SHARED = b"shared content of a Debian file\n" * 100
FILES = {
    "usr/share/a": SHARED,
    "usr/share/doc/x/copyright": b"GPL\n" * 50,
    "usr/share/doc/y/copyright": b"GPL\n" * 50,
    "usr/bin/tool": b"#!/bin/sh\necho tool\n",
}


@pytest.fixture
def guests(tmp_path: Path) -> Guests:
    need_fuse()
    need_immutable()
    return make_guests(tmp_path, FILES, links=[("usr/share/a", "usr/share/a2")])


def _other_guest_view(g: Guests) -> dict[bytes, tuple[object, ...]]:
    return manifest(g.roots["g2"])


def _write_open(p: Path) -> None:
    with open(p, "r+b") as f:
        f.write(b"X")


def _rdwr_no_write(p: Path) -> None:
    os.close(os.open(p, os.O_RDWR))


def _trunc_rdonly(p: Path) -> None:
    os.close(os.open(p, os.O_RDONLY | os.O_TRUNC))


def _truncate(p: Path) -> None:
    os.truncate(p, 10)


def _ftruncate(p: Path) -> None:
    with open(p, "r+b") as f:
        os.ftruncate(f.fileno(), 5)


def _chmod(p: Path) -> None:
    os.chmod(p, 0o600)


def _fchmod(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o640)
    finally:
        os.close(fd)


def _chown(p: Path) -> None:
    os.chown(p, 1234, 1234)


def _fchown(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fchown(fd, 4321, -1)
    finally:
        os.close(fd)


def _utime(p: Path) -> None:
    os.utime(p, (1000, 2000))


def _setxattr(p: Path) -> None:
    os.setxattr(p, "user.new", b"v")


def _removexattr(p: Path) -> None:
    os.removexattr(p, "user.origin")


def _link(p: Path) -> None:
    os.link(p, p.with_name("a3"))


TRIGGERS: dict[str, Callable[[Path], None]] = {
    "open-write": _write_open,
    "open-rdwr-no-write": _rdwr_no_write,
    "open-rdonly-trunc": _trunc_rdonly,
    "truncate": _truncate,
    "ftruncate": _ftruncate,
    "chmod": _chmod,
    "fchmod": _fchmod,
    "chown": _chown,
    "fchown": _fchown,
    "utime": _utime,
    "setxattr": _setxattr,
    "removexattr": _removexattr,
    "link": _link,
}


@pytest.mark.parametrize("trigger", sorted(TRIGGERS))
def test_trigger_breaks_the_link_and_spares_the_store(
    guests: Guests, tmp_path: Path, trigger: str
) -> None:
    store = guests.store_state()
    other = _other_guest_view(guests)
    backing = guests.roots["g1"] / "usr/share/a"
    shared_ino = os.stat(backing).st_ino
    with mounted(guests.home, guests.roots["g1"], tmp_path / "mnt") as mnt:
        a, a2 = mnt / "usr/share/a", mnt / "usr/share/a2"
        fuse_ino = os.stat(a).st_ino
        assert os.stat(a).st_nlink == 2  # the guest's own two names, not the store's
        TRIGGERS[trigger](a)
        # The guest's link group moved together to one private copy.
        assert os.stat(a).st_ino == fuse_ino == os.stat(a2).st_ino
        assert os.stat(a).st_nlink == (3 if trigger == "link" else 2)
        with open(a, "rb") as f1, open(a2, "rb") as f2:
            assert f1.read() == f2.read()
        assert os.stat(backing).st_ino != shared_ino
        assert not _linux.is_immutable(os.open(backing, os.O_RDONLY))
    after = guests.store_state()
    for name, (digest, flagged, nlink) in store.items():
        assert after[name][0] == digest
        assert after[name][1] is flagged is True
        moved = 2 if after[name][0] == store[name][0] and nlink != after[name][2] else 0
        assert after[name][2] == nlink - moved
    assert _other_guest_view(guests) == other


def test_reading_exec_and_mmap_do_not_break(guests: Guests, tmp_path: Path) -> None:
    backing = guests.roots["g1"] / "usr/share/a"
    before = os.stat(backing).st_ino
    with mounted(guests.home, guests.roots["g1"], tmp_path / "mnt") as mnt:
        assert (mnt / "usr/share/a").read_bytes() == SHARED
        with open(mnt / "usr/share/a", "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            assert m[:6] == SHARED[:6]
            m.close()
        os.stat(mnt / "usr/share/a")
        os.listxattr(mnt / "usr/share/a")
        assert subprocess.run([str(mnt / "usr/bin/tool")], capture_output=True).stdout == b"tool\n"
    assert os.stat(backing).st_ino == before


def test_identical_files_of_one_guest_stay_separate(guests: Guests, tmp_path: Path) -> None:
    x = guests.roots["g1"] / "usr/share/doc/x/copyright"
    y = guests.roots["g1"] / "usr/share/doc/y/copyright"
    assert os.stat(x).st_ino == os.stat(y).st_ino  # unify merged them
    with mounted(guests.home, guests.roots["g1"], tmp_path / "mnt") as mnt:
        mx, my = mnt / "usr/share/doc/x/copyright", mnt / "usr/share/doc/y/copyright"
        assert os.stat(mx).st_ino != os.stat(my).st_ino
        assert os.stat(mx).st_nlink == os.stat(my).st_nlink == 1
        with open(mx, "ab") as f:
            f.write(b"changed\n")
        assert my.read_bytes() == b"GPL\n" * 50
        assert mx.read_bytes().endswith(b"changed\n")
        with open(my, "ab") as f:
            f.write(b"other\n")
        assert mx.read_bytes().endswith(b"changed\n")
    assert os.stat(x).st_ino != os.stat(y).st_ino


def test_handles_opened_before_a_break_read_the_new_content(guests: Guests, tmp_path: Path):
    with mounted(guests.home, guests.roots["g1"], tmp_path / "mnt") as mnt:
        reader = open(mnt / "usr/share/a2", "rb")  # noqa: SIM115
        try:
            with open(mnt / "usr/share/a", "r+b") as w:
                w.write(b"NEW")
                w.flush()
                os.fsync(w.fileno())
            assert os.pread(reader.fileno(), 3, 0) == b"NEW"
        finally:
            reader.close()


def test_unlink_and_rename_of_shared_names(guests: Guests, tmp_path: Path) -> None:
    store = guests.store_state()
    other = _other_guest_view(guests)
    with mounted(guests.home, guests.roots["g1"], tmp_path / "mnt") as mnt:
        share = mnt / "usr/share"
        os.rename(share / "a", share / "renamed")
        assert os.stat(share / "renamed").st_nlink == 2
        os.unlink(share / "a2")
        assert os.stat(share / "renamed").st_nlink == 1
        # dpkg's way: write a new file, rename it over the shared one.
        (share / "new").write_bytes(b"upgraded\n")
        os.rename(share / "new", share / "doc/x/copyright")
        assert (share / "doc/x/copyright").read_bytes() == b"upgraded\n"
        assert (share / "doc/y/copyright").read_bytes() == b"GPL\n" * 50
        # A shared name renamed over another shared name.
        os.rename(share / "doc/y/copyright", share / "renamed")
        assert (share / "renamed").read_bytes() == b"GPL\n" * 50
        os.unlink(share / "renamed")
        assert sorted(os.listdir(share)) == ["doc"]
    after = guests.store_state()
    assert {k: v[:2] for k, v in after.items()} == {k: v[:2] for k, v in store.items()}
    assert _other_guest_view(guests) == other


def _wait_unmounted(mnt: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while str(mnt) in _linux.mount_points() and time.monotonic() < deadline:
        time.sleep(0.05)
    return str(mnt) not in _linux.mount_points()


def _daemon_pid(home: Path, mnt: Path) -> int:
    for pid_file in (home / "run").glob("mount-*.pid"):
        pid = int(pid_file.read_text())
        if str(mnt) in Path(f"/proc/{pid}/cmdline").read_bytes().decode():
            return pid
    raise AssertionError("no daemon pid")


def test_sigterm_unmounts_cleanly(guests: Guests, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(guests.home, guests.roots["g1"], mnt):
        os.kill(_daemon_pid(guests.home, mnt), signal.SIGTERM)
        assert _wait_unmounted(mnt, 10)
    assert cowlink(guests.home, "umount", str(mnt), check=False).returncode == 39


def test_a_killed_daemon_leaves_no_hung_mount(guests: Guests, tmp_path: Path) -> None:
    mnt = tmp_path / "killed"
    with mounted(guests.home, guests.roots["g1"], mnt):
        os.kill(_daemon_pid(guests.home, mnt), signal.SIGKILL)
        if not _wait_unmounted(mnt, 5):  # fusermount3's auto_unmount watcher was slow
            with pytest.raises(OSError, match="not connected") as info:
                os.stat(mnt / "usr")  # fails at once instead of hanging
            assert info.value.errno == errno.ENOTCONN
            assert cowlink(guests.home, "umount", str(mnt), check=False).returncode == 0
        assert str(mnt) not in _linux.mount_points()


def test_permissions_for_a_non_root_user(guests: Guests, tmp_path: Path) -> None:
    os.chmod(guests.roots["g1"] / "usr/share", 0o1777)
    with mounted(guests.home, guests.roots["g1"], tmp_path / "mnt") as mnt:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            code = 0
            try:
                os.chdir(mnt / "usr/share")  # pytest's tmp dirs are closed to other users
                os.setgroups([])
                os.setresgid(1000, 1000, 1000)
                os.setresuid(1000, 1000, 1000)
                try:
                    open("a", "ab").close()
                    code = 10
                except PermissionError:
                    pass
                try:
                    os.chmod("a", 0o777)
                    code = 11
                except PermissionError:
                    pass
                (Path("mine")).write_bytes(b"x")
                st = os.stat(Path("mine"))
                if (st.st_uid, st.st_gid) != (1000, 1000):
                    code = 12
                try:
                    os.unlink("a")  # sticky directory, root's file
                    code = 13
                except PermissionError:
                    pass
            except BaseException as exc:
                os.write(2, f"child failed: {exc!r}\n".encode())
                code = 20
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert (mnt / "usr/share/a").read_bytes() == SHARED


def test_name_max_names_and_deep_paths(guests: Guests, tmp_path: Path) -> None:
    with mounted(guests.home, guests.roots["g1"], tmp_path / "mnt") as mnt:
        long = "n" * 255
        (mnt / long).write_bytes(b"long")
        assert (mnt / long).read_bytes() == b"long"
        fd = os.open(mnt, os.O_RDONLY)
        depth = 0
        try:
            # Walk down by fd: the full path ends up beyond PATH_MAX (4096).
            while depth < 30:
                os.mkdir(long[:200], dir_fd=fd)
                nxt = os.open(long[:200], os.O_RDONLY, dir_fd=fd)
                os.close(fd)
                fd = nxt
                depth += 1
            wfd = os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd)
            os.write(wfd, b"deep")
            os.close(wfd)
            assert os.stat("leaf", dir_fd=fd).st_size == 4
        finally:
            os.close(fd)
        with pytest.raises(OSError, match="too long") as info:
            (mnt / ("n" * 256)).write_bytes(b"")
        assert info.value.errno == errno.ENAMETOOLONG


def test_two_guests_write_concurrently(guests: Guests, tmp_path: Path) -> None:
    store = guests.store_state()
    with (
        mounted(guests.home, guests.roots["g1"], tmp_path / "m1") as m1,
        mounted(guests.home, guests.roots["g2"], tmp_path / "m2") as m2,
    ):
        procs = [
            subprocess.Popen(
                [
                    "sh",
                    "-c",
                    f"for i in $(seq 50); do echo $i-{tag} >> {m}/usr/share/a; "
                    f"chmod 600 {m}/usr/share/doc/x/copyright; "
                    f"mv {m}/usr/bin/tool {m}/usr/bin/tool2; mv {m}/usr/bin/tool2 {m}/usr/bin/tool;"
                    " done",
                ]
            )
            for m, tag in ((m1, "one"), (m2, "two"))
        ]
        assert [p.wait() for p in procs] == [0, 0]
        one = (m1 / "usr/share/a").read_bytes()
        two = (m2 / "usr/share/a").read_bytes()
        assert one == SHARED + b"".join(b"%d-one\n" % i for i in range(1, 51))
        assert two == SHARED + b"".join(b"%d-two\n" % i for i in range(1, 51))
        assert (m1 / "usr/share/a2").read_bytes() == one
    after = guests.store_state()
    assert {k: v[:2] for k, v in after.items()} == {k: v[:2] for k, v in store.items()}
    assert file_digest(guests.roots["g1"] / "usr/share/doc/y/copyright") == file_digest(
        guests.plain / "usr/share/doc/y/copyright"
    )


def test_mount_refuses_a_busy_mount_point_and_umount_clears_it(guests: Guests, tmp_path: Path):
    mnt = tmp_path / "mnt"
    with mounted(guests.home, guests.roots["g1"], mnt):
        again = cowlink(guests.home, "mount", str(guests.roots["g1"]), str(mnt), check=False)
        assert again.returncode == 2
        assert stat_view(mnt / "usr/share/a")[1] == 2
    assert str(mnt) not in _linux.mount_points()


def test_readdir_offsets_are_stable_with_hardlinks(guests: Guests, tmp_path: Path) -> None:
    with mounted(guests.home, guests.roots["g1"], tmp_path / "mnt") as mnt:
        d = mnt / "big"
        d.mkdir()
        for i in range(1500):
            (d / f"file-{i:04d}-{'x' * 40}").write_bytes(b"")
            if i % 3 == 0:
                os.link(d / f"file-{i:04d}-{'x' * 40}", d / f"link-{i:04d}")
        listed = os.listdir(d)
        assert len(listed) == len(set(listed)) == 2000
        assert sorted(listed) == sorted(os.listdir(guests.roots["g1"] / "big"))
        found = subprocess.run(["find", str(mnt), "-type", "f"], capture_output=True, text=True)
        assert found.returncode == 0
        assert len(found.stdout.splitlines()) == 2000 + len(FILES) + 1


def test_o_direct_reads_and_writes(guests: Guests, tmp_path: Path) -> None:
    with mounted(guests.home, guests.roots["g1"], tmp_path / "mnt") as mnt:
        buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
        buf.write(b"d" * 4096)
        fd = os.open(mnt / "direct", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
        try:
            assert os.pwritev(fd, [buf], 0) == 4096
            buf.seek(0)
            buf.write(b"\0" * 4096)
            assert os.preadv(fd, [buf], 0) == 4096
            assert buf[:4096] == b"d" * 4096
        finally:
            os.close(fd)
            buf.close()
        fd = os.open(mnt / "usr/share/a", os.O_RDONLY | os.O_DIRECT)
        try:
            out = mmap.mmap(-1, 8192)
            assert os.preadv(fd, [out], 0) == len(SHARED)
            assert out[: len(SHARED)] == SHARED
            out.close()
        finally:
            os.close(fd)


def _as_user(uid: int, cwd: Path, fn: Callable[[], None]) -> int:
    """Run `fn` in a forked child as `uid` inside `cwd`; its exit code (0: fn returned)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 0
        try:
            os.chdir(cwd)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            fn()
        except PermissionError:
            code = 13
        except BaseException:
            code = 20
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_posix_acls_grant_access(guests: Guests, tmp_path: Path) -> None:
    with mounted(guests.home, guests.roots["g1"], tmp_path / "mnt") as mnt:
        f = mnt / "usr/share/acl"
        f.write_bytes(b"")
        os.chmod(f, 0o600)

        def append() -> None:
            with open("acl", "ab") as out:
                out.write(b"by 1000\n")

        assert _as_user(1000, mnt / "usr/share", append) == 13
        subprocess.run(["setfacl", "-m", "u:1000:rw", str(f)], check=True)
        assert _as_user(1000, mnt / "usr/share", append) == 0
        assert f.read_bytes() == b"by 1000\n"
        os.chmod(f, 0o640)  # the ACL mask follows the group bits
        assert _as_user(1000, mnt / "usr/share", append) == 13


def test_one_daemon_per_root_and_leftover_copies_are_removed(
    guests: Guests, tmp_path: Path
) -> None:
    from cowlink._home import Home
    from cowlink._store import TempNames

    leftover = TempNames(Home(guests.home).secret()).make()
    (guests.roots["g1"] / "usr/share" / os.fsdecode(leftover)).write_bytes(b"half a copy")
    with mounted(guests.home, guests.roots["g1"], tmp_path / "mnt") as mnt:
        second = tmp_path / "second"
        second.mkdir()
        again = cowlink(guests.home, "mount", str(guests.roots["g1"]), str(second), check=False)
        assert again.returncode == 39
        assert "mounted by another cowlink daemon" in again.stderr
        assert sorted(os.listdir(mnt / "usr/share")) == ["a", "a2", "doc"]
    assert sorted(os.listdir(guests.roots["g1"] / "usr/share")) == ["a", "a2", "doc"]


def test_readers_during_a_break_see_no_errors(guests: Guests, tmp_path: Path) -> None:
    big = b"0123456789abcdef" * (1 << 18)  # 4 MiB: the copy takes a moment
    for root in guests.roots.values():
        (root / "usr/share/big").write_bytes(big)
        os.utime(root / "usr/share/big", (1, 1))
    cowlink(guests.home, "unify", "--no-default-excludes", *map(str, guests.roots.values()))
    with mounted(guests.home, guests.roots["g1"], tmp_path / "mnt") as mnt:
        target = mnt / "usr/share/big"
        readers = subprocess.Popen(
            ["sh", "-c", f"for i in $(seq 40); do stat -c %s {target} && head -c 16 {target}"
             f" && echo; done"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(0.05)
        with open(target, "r+b") as f:
            f.write(b"X")
        out, err = readers.communicate()
        assert readers.returncode == 0, err
        assert not err
        assert set(out.split()) <= {
            str(len(big)).encode(),
            b"0123456789abcdef",
            b"X123456789abcdef",
        }


@pytest.mark.parametrize("adopted", ["mounted guest", "other guest"])
def test_unify_while_mounted_is_seen_by_the_running_guest(tmp_path: Path, adopted: str) -> None:
    """The nightly unify runs while guests run: what it links must behave at once, whether
    the mounted guest's inodes became the store objects or its names were replaced."""
    need_fuse()
    need_immutable()
    home = tmp_path / "home"
    g1, g2 = tmp_path / "g1", tmp_path / "g2"
    for root in (g1, g2):
        for rel, data in FILES.items():
            write(root / rel, data)
    os.link(g1 / "usr/share/a", g1 / "usr/share/a2")
    with mounted(home, g1, tmp_path / "mnt") as mnt:
        # The guest has looked at everything before unify runs.
        before = {rel: (mnt / rel).read_bytes() for rel in FILES}
        assert os.stat(mnt / "usr/share/a").st_nlink == 2
        seen = {rel: os.stat(mnt / rel).st_ino for rel in FILES}
        order = [g1, g2] if adopted == "mounted guest" else [g2, g1]
        inode = os.stat(g1 / "usr/bin/tool").st_ino
        cowlink(home, "unify", "--no-default-excludes", *map(str, order))
        assert os.stat(g1 / "usr/share/a").st_ino == os.stat(g2 / "usr/share/a").st_ino
        assert (os.stat(g1 / "usr/bin/tool").st_ino == inode) == (adopted == "mounted guest")
        store = Guests(home, {"g1": g1, "g2": g2}, g1).store_state()

        assert {rel: (mnt / rel).read_bytes() for rel in FILES} == before
        assert {rel: os.stat(mnt / rel).st_ino for rel in FILES} == seen
        assert os.stat(mnt / "usr/share/a").st_nlink == 2
        with open(mnt / "usr/share/a", "ab") as f:
            f.write(b"guest change\n")
        # The guest's own hardlink follows; the other guest and the store do not.
        assert (mnt / "usr/share/a2").read_bytes() == SHARED + b"guest change\n"
        assert os.stat(mnt / "usr/share/a").st_ino == os.stat(mnt / "usr/share/a2").st_ino
        with open(mnt / "usr/bin/tool", "ab") as f:
            f.write(b"# local\n")
        assert (mnt / "usr/bin/tool").read_bytes() == FILES["usr/bin/tool"] + b"# local\n"
    assert (g1 / "usr/share/a2").read_bytes() == SHARED + b"guest change\n"
    assert (g1 / "usr/bin/tool").read_bytes().endswith(b"# local\n")
    assert (g2 / "usr/share/a").read_bytes() == SHARED
    assert (g2 / "usr/bin/tool").read_bytes() == FILES["usr/bin/tool"]
    after = Guests(home, {"g1": g1, "g2": g2}, g1).store_state()
    # Same bytes, still immutable; only g1's links to the objects it wrote are gone.
    assert {k: v[:2] for k, v in after.items()} == {k: v[:2] for k, v in store.items()}
