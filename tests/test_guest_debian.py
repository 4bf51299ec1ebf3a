"""End to end: a Debian guest with nginx and ssh, booted by the sysv init on a veth network.

The guest is a copy of the corpus guest g3 (debootstrapped bookworm with nginx-light and
openssh-server), built with `guest build --from`; the corpus itself is never modified.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests._guest import cowlink, cowlink_ns, gname, in_ns, need_guests, netns, traces
from tests._util import need

pytestmark = pytest.mark.privileged
CORPUS = Path("/var/cache/cowlink-corpus")

__all__ = ["netns"]  # the fixture, imported for use here

PROBE = """
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=10)
s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
page = b""
while chunk := s.recv(4096):
    page += chunk
ssh = socket.create_connection((sys.argv[1], 22), timeout=10).recv(100)
print(page.decode(errors="replace"))
print(ssh.decode(errors="replace"))
"""


def test_debian_guest_serves_nginx_and_ssh(home: Path, netns: int) -> None:
    need_guests()
    need((CORPUS / ".done-g3").exists(), "needs the corpus guest g3")
    built = cowlink(
        home, "guest", "build", gname("ct-deb"), "--from", str(CORPUS / "g3"), timeout=300
    )
    assert built.returncode == 0, built.stderr
    toml = home / "guests" / gname("ct-deb") / "guest.toml"
    text = toml.read_text()
    assert 'style = "sysv"' in text  # chosen because the tree has /etc/rc3.d
    toml.write_text(
        text.replace(
            'mode = "host"',
            'mode = "veth"\naddress = "192.0.2.2/24"\nhost_address = "192.0.2.1/24"',
            1,
        )
    )
    start = cowlink_ns(netns, home, "guest", "start", gname("ct-deb"))
    try:
        assert start.returncode == 0, start.stderr
        fetched = in_ns(netns, sys.executable, "-c", PROBE, "192.0.2.2")
        assert "Welcome to nginx!" in fetched.stdout, fetched.stderr
        assert "SSH-2.0-OpenSSH" in fetched.stdout
        status = cowlink_ns(netns, home, "guest", "status", gname("ct-deb"))
        assert "/usr/sbin/sshd" in status.stdout
        assert "nginx: master process" in status.stdout
    finally:
        stop = cowlink_ns(netns, home, "guest", "stop", gname("ct-deb"))
    assert stop.returncode == 0, stop.stderr
    log = (home / "log" / f"{gname('ct-deb')}.console").read_text()
    assert "Starting nginx" in log
    assert "Stopping" in log  # the rc scripts ran again with `stop`
    assert traces(home, gname("ct-deb")) == []
    assert in_ns(netns, "ip", "link", "show", "cl-" + gname("ct-deb")).returncode != 0
    assert os.path.exists(CORPUS / "g3" / "etc" / "rc3.d" / "S01nginx")
