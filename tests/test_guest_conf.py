"""guest.toml validation, the seccomp program and other pure parts of the launcher (no root)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from cowlink import _context, _guestconf, _guestnet, _linux
from cowlink._errors import UsageError


def parse(text: str, name: str = "web") -> _guestconf.GuestConfig:
    import tomllib

    return _guestconf.parse(tomllib.loads(text), name)


def test_defaults() -> None:
    cfg = parse("")
    assert cfg.hostname == "web"
    assert cfg.init.style == "sysv"
    assert cfg.init.runlevel == 3
    assert (cfg.stop.signal, cfg.stop.timeout, cfg.stop.kill_signal) == (15, 5.0, 9)
    assert cfg.network.mode == "host"
    assert cfg.limits == _guestconf.Limits()
    assert cfg.mounts == ()


def test_full_config() -> None:
    cfg = parse(
        """
        hostname = "web1.example"
        [init]
        style = "services"
        services = [{ start = "httpd", stop = "killall httpd" }, { start = "crond" }]
        [stop]
        signal = "SIGPWR"
        timeout = 2.5
        kill_signal = "KILL"
        [limits]
        memory_max = "256M"
        cpu_quota = 20
        cpu_shares = 512
        pids_max = 64
        [network]
        mode = "veth"
        address = "192.0.2.2/24"
        host_address = "192.0.2.1/24"
        gateway = "192.0.2.1"
        [[mount]]
        source = "/srv"
        target = "/srv/data/"
        readonly = false
        """
    )
    assert cfg.hostname == "web1.example"
    assert cfg.init.services[1] == _guestconf.Service("crond", None)
    assert cfg.stop.signal == signal.SIGPWR
    assert cfg.stop.kill_signal == signal.SIGKILL
    assert cfg.limits == _guestconf.Limits(256 << 20, 20.0, 512, 64)
    assert cfg.network.gateway == "192.0.2.1"
    assert cfg.mounts == (_guestconf.BindMount("/srv", "/srv/data", False),)


def test_init_shorthand_and_plain_default_command() -> None:
    cfg = parse('init = "plain"')
    assert cfg.init.style == "plain"
    assert cfg.init.command == ("/sbin/init",)
    assert parse('[init]\nstyle = "rescue"\ncommand = "echo hi"').init.command == (
        "/bin/sh",
        "-c",
        "echo hi",
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 1", "colour"),
        ("[init]\nstlye = 'sysv'", "init.stlye"),
        ("[limits]\nmemory = '1G'", "limits.memory"),
        ("[network]\nmode = 'veth'\naddress = '192.0.2.2/24'\nbridge = 'br0'", "network.bridge"),
        ("[[mount]]\nsource = '/a'\ntarget = '/b'\nro = true", "mount[0].ro"),
        (
            "[init]\nstyle = 'services'\nservices = [{start = 'a', halt = 'b'}]",
            "init.services[0].halt",
        ),
    ],
)
def test_unknown_keys_are_named(text: str, key: str) -> None:
    with pytest.raises(
        UsageError, match=f"unknown key '{key}'".replace("[", r"\[").replace("]", r"\]")
    ):
        parse(text)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("hostname = 'bad name!'", "hostname"),
        ("hostname = 3", "hostname"),
        ("[init]\nstyle = 'upstart'", "init.style"),
        ("[init]\nstyle = 'rescue'", "init.command"),
        ("[init]\nstyle = 'services'", "init.services"),
        ("[init]\nrunlevel = 9", "init.runlevel"),
        ("[stop]\nsignal = 'SIGNOPE'", "stop.signal"),
        ("[stop]\ntimeout = -1", "stop.timeout"),
        ("[stop]\ntimeout = true", "stop.timeout"),
        ("[limits]\nmemory_max = 'lots'", "limits.memory_max"),
        ("[limits]\npids_max = 0", "limits.pids_max"),
        ("[limits]\ncpu_quota = '20%'", "limits.cpu_quota"),
        ("[network]\nmode = 'bridge'", "network.mode"),
        ("[network]\nmode = 'veth'", "network.address"),
        ("[network]\nmode = 'veth'\naddress = '300.1.1.1/24'", "network.address"),
        ("[network]\naddress = '192.0.2.2/24'", "network.address"),
        ("[[mount]]\nsource = 'rel'\ntarget = '/b'", "mount[0].source"),
        ("[[mount]]\nsource = '/a'\ntarget = '/../etc'", "mount[0].target"),
        ("limits = 3", "limits"),
        ("[init]\nstyle = 'sysv'\nservices = [{start = 'a'}]", "init.services"),
        ("[init]\nstyle = 'services'\nservices = [{start = 'a'}]\ncommand = 'x'", "init.command"),
        ("[init]\nstyle = 'plain'\nrunlevel = 2", "init.runlevel"),
    ],
)
def test_bad_values_are_named(text: str, key: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(text)
    assert f"'{key}'" in info.value.message


def test_load_reports_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "guest.toml"
    path.write_text("hostname = \n")
    with pytest.raises(UsageError, match="not valid TOML"):
        _guestconf.load(path, "g", tmp_path)


def test_default_style_follows_the_tree(tmp_path: Path) -> None:
    assert _guestconf.load(tmp_path / "none.toml", "g", tmp_path).init.style == "plain"
    (tmp_path / "etc" / "rc3.d").mkdir(parents=True)
    assert _guestconf.load(tmp_path / "none.toml", "g", tmp_path).init.style == "sysv"
    rendered = _guestconf.render_default("g", tmp_path)
    import tomllib

    assert _guestconf.parse(tomllib.loads(rendered), "g").init.style == "sysv"


def test_capability_sets() -> None:
    host = _context.capabilities(own_netns=False, devices_cgroup=False)
    for cap in (
        _linux.CAP_SYS_ADMIN,
        _linux.CAP_SYS_MODULE,
        _linux.CAP_SYS_RAWIO,
        _linux.CAP_SYS_PTRACE,
        _linux.CAP_SYS_TIME,
        _linux.CAP_DAC_READ_SEARCH,
        _linux.CAP_LINUX_IMMUTABLE,
        _linux.CAP_MKNOD,
        _linux.CAP_NET_ADMIN,
    ):
        assert cap not in host
    assert _linux.CAP_CHOWN in host
    assert _linux.CAP_NET_ADMIN in _context.capabilities(own_netns=True, devices_cgroup=False)
    assert _linux.CAP_MKNOD in _context.capabilities(own_netns=False, devices_cgroup=True)


def _run_bpf(prog: list[tuple[int, int, int, int]], nr: int, arch: int, args: list[int]) -> int:
    """A tiny interpreter for the instructions seccomp_program emits."""
    data = {0: nr, 4: arch}
    for i, a in enumerate(args):
        data[16 + 8 * i] = a & 0xFFFFFFFF
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20:
            acc = data.get(k, 0)
        elif code == 0x06:
            return k
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        pc += 1


def test_seccomp_program_denies_the_list() -> None:
    # The x86_64 filter, whatever the host: the raw numbers below are x86_64's.
    prog = _linux.seccomp_program(machine="x86_64")
    table = _linux._SYSCALLS["x86_64"]
    arch = table.audit_arch
    eperm = _linux.SECCOMP_RET_ERRNO | 1
    for name in _linux.SECCOMP_DENIED:
        assert _run_bpf(prog, table.numbers[name], arch, []) == eperm, name
    allow = _linux.SECCOMP_RET_ALLOW
    assert _run_bpf(prog, 0, arch, []) == allow  # read
    assert _run_bpf(prog, 16, arch, [0, 0x5401]) == allow  # ioctl TCGETS
    assert _run_bpf(prog, 16, arch, [0, 0x5412]) == eperm  # ioctl TIOCSTI
    assert _run_bpf(prog, 272, arch, [_linux.CLONE_NEWUSER]) == eperm
    assert _run_bpf(prog, 272, arch, [_linux.CLONE_NEWNS]) == allow
    assert _run_bpf(prog, 56, arch, [_linux.CLONE_NEWUSER | 17]) == eperm
    assert _run_bpf(prog, 435, arch, []) == _linux.SECCOMP_RET_ERRNO | 38
    assert _run_bpf(prog, 0x40000000 + 1, arch, []) == _linux.SECCOMP_RET_ERRNO | 38  # x32
    assert _run_bpf(prog, 1, 0x40000003, []) == _linux.SECCOMP_RET_ERRNO | 38  # i386


def test_resolve_in_root_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "abs").symlink_to("/etc")
    (root / "up").symlink_to("../../../../..")
    (root / "loop").symlink_to("loop")
    r = str(root)
    assert _context.resolve_in_root(r, "/abs/x") == f"{r}/etc/x"
    assert _context.resolve_in_root(r, "/up/etc") == f"{r}/etc"
    assert _context.resolve_in_root(r, "/../../proc") == f"{r}/proc"
    with pytest.raises(OSError, match="too many symlinks"):
        _context.resolve_in_root(r, "/loop/x")


def test_veth_names_fit_an_interface_name() -> None:
    assert _guestnet.host_veth_name("web") == "cl-web"
    long = _guestnet.host_veth_name("a-very-long-guest-name")
    assert len(long) <= 15
    assert long.startswith("cl-")
    assert long != _guestnet.host_veth_name("a-very-long-guest-nam3")


def test_process_identity_of_self() -> None:
    import os

    assert _linux.process_start_time(os.getpid()) is not None
    assert _linux.process_start_time(2**22 + 12345) is None
    assert _linux.namespace_inode(os.getpid(), "pid") is not None


def test_state_identity_survives_pid_reuse() -> None:
    import os

    from cowlink._gueststate import GuestState

    me = os.getpid()
    start = _linux.process_start_time(me)
    assert start is not None
    ns = _linux.namespace_inode(me, "pid")
    assert ns is not None
    alive = GuestState("g", me, start, init_pid=me, init_start=start, pidns=ns)
    assert alive.init_alive()
    assert alive.monitor_alive()
    # Same pid, but a process that started at another time: a reused pid, not our guest.
    assert not GuestState(
        "g", me, start + 1, init_pid=me, init_start=start + 1, pidns=ns
    ).init_alive()
    assert not GuestState("g", me, start, init_pid=me, init_start=start, pidns=ns + 1).init_alive()
    assert not GuestState("g", me, start + 1).monitor_alive()


def test_cgroup_limits_are_written_for_v1_and_v2(tmp_path: Path) -> None:
    from cowlink._cgroups import DEVICE_ALLOW, GuestCgroups
    from cowlink._guestconf import Limits

    limits = Limits(memory_max=64 << 20, cpu_quota=20.0, cpu_shares=512, pids_max=16)
    v2 = tmp_path / "v2"
    v2.mkdir()
    GuestCgroups({"unified": str(v2)})._apply(limits)
    assert (v2 / "memory.max").read_text() == str(64 << 20)
    assert (v2 / "cpu.max").read_text() == "20000 100000"
    assert (v2 / "cpu.weight").read_text() == "50"
    assert (v2 / "pids.max").read_text() == "16"

    paths = {c: tmp_path / c for c in ("cpu", "memory", "pids", "devices")}
    for p in paths.values():
        p.mkdir()
    v1 = GuestCgroups({c: str(p) for c, p in paths.items()})
    # The kernel's devices.allow takes one rule per write; a plain file keeps the last.
    v1._apply(limits)
    assert (paths["memory"] / "memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (paths["cpu"] / "cpu.cfs_quota_us").read_text() == "20000"
    assert (paths["cpu"] / "cpu.cfs_period_us").read_text() == "100000"
    assert (paths["cpu"] / "cpu.shares").read_text() == "512"
    assert (paths["pids"] / "pids.max").read_text() == "16"
    assert (paths["devices"] / "devices.deny").read_text() == "a"
    assert (paths["devices"] / "devices.allow").read_text() == DEVICE_ALLOW[-1]
    assert v1.has_devices
    assert not GuestCgroups({"unified": str(v2)}).has_devices


def test_own_init_refuses_to_run_outside_a_pid_namespace() -> None:
    from cowlink import _guestinit

    with pytest.raises(RuntimeError, match="pid 1"):
        _guestinit.main(_guestconf.InitConfig(style="rescue", command=("true",)), {}, -1)


def test_state_pointing_elsewhere_is_ignored(tmp_path: Path) -> None:
    import json

    from cowlink._gueststate import GuestState, read_state, state_dir, write_state
    from cowlink._home import Home

    home = Home(tmp_path)
    state_dir(home, "g").mkdir(parents=True)
    good = GuestState(
        "g",
        1,
        1,
        cgroups={"pids": "/sys/fs/cgroup/pids/cowlink/g"},
        rootfs=str(state_dir(home, "g") / "root"),
    )
    write_state(home, good)
    assert read_state(home, "g") == good
    for bad in (
        {"cgroups": {"pids": "/sys/fs/cgroup/pids"}},
        {"rootfs": "/"},
        {"name": "other"},
        {"veth": "eth0"},
    ):
        data = json.loads(good.as_json()) | bad
        (state_dir(home, "g") / "state.json").write_text(json.dumps(data))
        assert read_state(home, "g") is None, bad
