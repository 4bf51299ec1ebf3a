"""A guest's `guest.toml`: parsing, validation and defaults for `cowlink guest`.

Example (every key is optional)::

    hostname = "web1"

    [init]
    style = "sysv"              # sysv | services | plain | rescue
    runlevel = 3                # sysv: runs /etc/rc3.d/S* start, and stop on halt
    command = ["/sbin/init"]    # plain: pid 1 (default /sbin/init); rescue: the one command
    services = [{ start = "/usr/sbin/sshd", stop = "kill $(cat /run/sshd.pid)" }]

    [stop]
    signal = "SIGTERM"          # or a number
    timeout = 5                 # seconds before the kill signal
    kill_signal = 9
    command = ["/sbin/halt"]    # optional: run inside instead of sending `signal`

    [limits]
    memory_max = "256M"
    cpu_quota = 50              # percent of one CPU
    cpu_shares = 1024
    pids_max = 512

    [network]
    mode = "veth"               # host | none | veth
    address = "192.0.2.2/24"    # the guest's eth0
    host_address = "192.0.2.1/24"
    gateway = "192.0.2.1"

    [[mount]]
    source = "/srv/shared"
    target = "/srv/shared"
    readonly = true

Every unknown key or bad value is a UsageError that names the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import UsageError

INIT_STYLES = ("sysv", "services", "plain", "rescue")
NETWORK_MODES = ("host", "none", "veth")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9-]{1,63})*")
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)i?B?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class Service:
    start: str
    stop: str | None = None


@dataclass(frozen=True)
class InitConfig:
    style: str = "sysv"
    runlevel: int = 3
    command: tuple[str, ...] = ()
    services: tuple[Service, ...] = ()


_SIGTERM = int(signal.SIGTERM)
_SIGKILL = int(signal.SIGKILL)


@dataclass(frozen=True)
class StopConfig:
    signal: int = _SIGTERM
    timeout: float = 5.0
    kill_signal: int = _SIGKILL
    command: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    memory_max: int | None = None
    cpu_quota: float | None = None  # percent of one CPU
    cpu_shares: int | None = None
    pids_max: int | None = None


@dataclass(frozen=True)
class Network:
    mode: str = "host"
    address: str | None = None
    host_address: str | None = None
    gateway: str | None = None


@dataclass(frozen=True)
class BindMount:
    source: str
    target: str
    readonly: bool = True


@dataclass(frozen=True)
class GuestConfig:
    hostname: str
    init: InitConfig = field(default_factory=InitConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    limits: Limits = field(default_factory=Limits)
    network: Network = field(default_factory=Network)
    mounts: tuple[BindMount, ...] = ()


class _Table:
    """A TOML table being consumed key by key, so that leftovers can be named as unknown."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = dict(data)
        self.where = where

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def take(self, name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
        if name not in self.data:
            return default
        value = self.data.pop(name)
        # bool is an int subclass; a `true` where a number belongs is still a mistake.
        if isinstance(value, bool) and bool not in (
            kinds if isinstance(kinds, tuple) else (kinds,)
        ):
            raise _bad(self.key(name), "has the wrong type")
        if not isinstance(value, kinds):
            raise _bad(self.key(name), "has the wrong type")
        return value

    def table(self, name: str) -> _Table:
        return _Table(self.take(name, dict, {}), self.key(name))

    def done(self) -> None:
        if self.data:
            unknown = sorted(self.data)[0]
            raise UsageError(f"guest.toml: unknown key {self.key(unknown)!r}")


def _bad(key: str, why: str) -> UsageError:
    return UsageError(f"guest.toml: {key!r} {why}")


def _signal(value: int | str, key: str) -> int:
    if isinstance(value, int):
        if 1 <= value < signal.NSIG:
            return value
        raise _bad(key, f"is not a signal number: {value}")
    name = value.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    match = re.fullmatch(r"SIGRTMIN\+(\d+)", name)
    if match:
        return int(signal.SIGRTMIN) + int(match.group(1))
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise _bad(key, f"is not a signal name: {value!r}") from None


def parse_size(value: int | str, key: str) -> int:
    if isinstance(value, int):
        if value <= 0:
            raise _bad(key, "must be positive")
        return value
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise _bad(key, f"is not a size like '256M': {value!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def _command(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        if not value.strip():
            raise _bad(key, "is empty")
        return ("/bin/sh", "-c", value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _bad(key, "must be a string or a non-empty list of strings")


def _positive(value: float | None, key: str) -> None:
    if value is not None and value <= 0:
        raise _bad(key, "must be positive")


def _parse_init(top: _Table, default_style: str) -> InitConfig:
    if isinstance(top.data.get("init"), str):
        raw = _Table({"style": top.data.pop("init")}, "init")
    else:
        raw = top.table("init")
    style = raw.take("style", str, default_style)
    if style not in INIT_STYLES:
        raise _bad("init.style", f"must be one of {', '.join(INIT_STYLES)}, not {style!r}")
    runlevel_given = "runlevel" in raw.data
    runlevel = raw.take("runlevel", int, 3)
    if not 1 <= runlevel <= 5:
        raise _bad("init.runlevel", "must be 1 to 5")
    command_raw = raw.take("command", (str, list))
    command = _command(command_raw, "init.command") if command_raw is not None else ()
    services: list[Service] = []
    for i, item in enumerate(raw.take("services", list, [])):
        if not isinstance(item, dict):
            raise _bad(f"init.services[{i}]", "must be a table with 'start' and 'stop'")
        svc = _Table(item, f"init.services[{i}]")
        start = svc.take("start", str)
        if not start:
            raise _bad(f"init.services[{i}].start", "is required")
        services.append(Service(start, svc.take("stop", str)))
        svc.done()
    raw.done()
    # Keys that exist but do not fit the chosen style would be silently ignored otherwise.
    if runlevel_given and style != "sysv":
        raise _bad("init.runlevel", f"is for style 'sysv', not {style!r}")
    if services and style != "services":
        raise _bad("init.services", f"is for style 'services', not {style!r}")
    if command and style in ("sysv", "services"):
        raise _bad("init.command", f"is for styles 'plain' and 'rescue', not {style!r}")
    if style == "rescue" and not command:
        raise _bad("init.command", "is required for the rescue style")
    if style == "services" and not services:
        raise _bad("init.services", "is required for the services style")
    if style == "plain" and not command:
        command = ("/sbin/init",)
    return InitConfig(style, runlevel, command, tuple(services))


def _parse_network(raw: _Table) -> Network:
    mode = raw.take("mode", str, "host")
    if mode not in NETWORK_MODES:
        raise _bad("network.mode", f"must be one of {', '.join(NETWORK_MODES)}, not {mode!r}")
    address = raw.take("address", str)
    host_address = raw.take("host_address", str)
    gateway = raw.take("gateway", str)
    raw.done()
    for key, value in (("address", address), ("host_address", host_address)):
        if value is not None:
            try:
                ipaddress.ip_interface(value)
            except ValueError:
                raise _bad(
                    f"network.{key}", f"is not an address like 192.0.2.2/24: {value!r}"
                ) from None
    if gateway is not None:
        try:
            ipaddress.ip_address(gateway)
        except ValueError:
            raise _bad("network.gateway", f"is not an address: {gateway!r}") from None
    if mode == "veth" and address is None:
        raise _bad("network.address", "is required for the veth mode")
    if mode != "veth" and (address or host_address or gateway):
        raise _bad("network.address", "needs mode = 'veth'")
    return Network(mode, address, host_address, gateway)


def parse(data: dict[str, Any], name: str, *, default_style: str = "sysv") -> GuestConfig:
    """Validate a parsed guest.toml document.

    Raises:
        UsageError: naming the first unknown key or bad value.
    """
    top = _Table(data, "")
    hostname = top.take("hostname", str, name)
    if not _HOSTNAME.fullmatch(hostname) or len(hostname) > 64:
        raise _bad("hostname", f"is not a valid host name: {hostname!r}")
    init = _parse_init(top, default_style)

    raw = top.table("stop")
    stop = StopConfig(
        signal=_signal(raw.take("signal", (int, str), 15), "stop.signal"),
        timeout=float(raw.take("timeout", (int, float), 5)),
        kill_signal=_signal(raw.take("kill_signal", (int, str), 9), "stop.kill_signal"),
        command=_command(raw.data.pop("command"), "stop.command") if "command" in raw.data else (),
    )
    raw.done()
    if stop.timeout < 0:
        raise _bad("stop.timeout", "must not be negative")

    raw = top.table("limits")
    memory = raw.take("memory_max", (int, str))
    cpu_quota = raw.take("cpu_quota", (int, float))
    limits = Limits(
        memory_max=None if memory is None else parse_size(memory, "limits.memory_max"),
        cpu_quota=None if cpu_quota is None else float(cpu_quota),
        cpu_shares=raw.take("cpu_shares", int),
        pids_max=raw.take("pids_max", int),
    )
    raw.done()
    _positive(limits.cpu_quota, "limits.cpu_quota")
    _positive(limits.cpu_shares, "limits.cpu_shares")
    _positive(limits.pids_max, "limits.pids_max")

    network = _parse_network(top.table("network"))

    mounts: list[BindMount] = []
    for i, item in enumerate(top.take("mount", list, [])):
        if not isinstance(item, dict):
            raise _bad(f"mount[{i}]", "must be a table with 'source' and 'target'")
        m = _Table(item, f"mount[{i}]")
        source = m.take("source", str)
        target = m.take("target", str)
        readonly = m.take("readonly", bool, True)
        m.done()
        if not source or not os.path.isabs(source):
            raise _bad(f"mount[{i}].source", "must be an absolute path")
        if not target or not os.path.isabs(target) or ".." in target.split("/"):
            raise _bad(f"mount[{i}].target", "must be an absolute path without '..'")
        mounts.append(BindMount(source, os.path.normpath(target), readonly))
    top.done()
    return GuestConfig(hostname, init, stop, limits, network, tuple(mounts))


def default_style(root: Path) -> str:
    """sysv for a guest that keeps /etc/rc<N>.d links, else its own /sbin/init (plain)."""
    return "sysv" if (root / "etc" / "rc3.d").is_dir() else "plain"


def load(path: Path, name: str, root: Path) -> GuestConfig:
    """Read `path` (a missing file means all defaults).

    Raises:
        UsageError: the file is not valid TOML or has a bad or unknown key.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        data = {}
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    return parse(data, name, default_style=default_style(root))


def render_default(name: str, root: Path) -> str:
    """The guest.toml that `guest build` writes: the defaults, spelled out for editing."""
    style = default_style(root)
    hostname = name if _HOSTNAME.fullmatch(name) else "guest"
    init = f'style = "{style}"\nrunlevel = 3\n' if style == "sysv" else f'style = "{style}"\n'
    return (
        f"# cowlink guest {name}: see `cowlink guest --help`.\n"
        f'hostname = "{hostname}"\n\n'
        f"[init]\n{init}\n"
        '[stop]\nsignal = "SIGTERM"\ntimeout = 5\nkill_signal = "SIGKILL"\n\n'
        '[limits]\n# memory_max = "512M"\n# cpu_quota = 100\n# cpu_shares = 1024\n'
        "pids_max = 4096\n\n"
        '[network]\nmode = "host"\n# mode = "veth"\n# address = "192.0.2.2/24"\n'
        '# host_address = "192.0.2.1/24"\n'
    )
