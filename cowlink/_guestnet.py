"""A guest's network: a veth pair into its own namespace, or a namespace with loopback only.

All host-side work runs `ip` from the monitor, which stays in the host's pid namespace,
so the guest's netns is reachable as /proc/INIT/ns/net.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable

from ._errors import NetworkError
from ._guestconf import Network


def host_veth_name(guest: str) -> str:
    """cl-NAME, or cl- plus a digest when NAME is too long for a 15-byte interface name."""
    name = f"cl-{guest}"
    if len(name) <= 15:
        return name
    return "cl-" + hashlib.sha256(guest.encode()).hexdigest()[:12]


def _ip(*args: str, netns_pid: int | None = None) -> None:
    argv = ["ip", *args]
    if netns_pid is not None:
        argv = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {result.stderr.strip()}")


def link_exists(name: str) -> bool:
    return (
        subprocess.run(
            ["ip", "link", "show", "dev", name], capture_output=True, check=False
        ).returncode
        == 0
    )


def delete_veth(name: str) -> None:
    """Delete the host end (the guest end goes with it); a missing link is fine."""
    if link_exists(name):
        subprocess.run(["ip", "link", "del", "dev", name], capture_output=True, check=False)


def set_up(guest: str, init_pid: int, net: Network) -> Callable[[], None]:
    """Configure the guest's netns (already created by its init); returns the teardown.

    Raises:
        NetworkError: an `ip` call failed; whatever was created is removed again.
    """
    if net.mode == "host":
        return lambda: None
    _ip("link", "set", "lo", "up", netns_pid=init_pid)
    if net.mode == "none":
        return lambda: None
    host = host_veth_name(guest)
    delete_veth(host)  # a leftover from a guest whose monitor was killed
    _ip("link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", str(init_pid))
    try:
        if net.host_address:
            _ip("addr", "add", net.host_address, "dev", host)
        _ip("link", "set", host, "up")
        assert net.address is not None
        _ip("addr", "add", net.address, "dev", "eth0", netns_pid=init_pid)
        _ip("link", "set", "eth0", "up", netns_pid=init_pid)
        if net.gateway:
            _ip("route", "add", "default", "via", net.gateway, netns_pid=init_pid)
    except BaseException:
        delete_veth(host)
        raise
    return lambda: delete_veth(host)
