"""veth networking: a guest serves a page to a network namespace the test created.

Everything runs inside that namespace (`nsenter --net`), so the host side of the veth
never touches the machine's real network; addresses are from TEST-NET (RFC 5737).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests._guest import cowlink, cowlink_ns, gname, in_ns, make_guest, need_guests, netns, running

pytestmark = pytest.mark.privileged
__all__ = ["netns"]  # the fixture, used by name

HTTPD = """
[init]
style = "services"
services = [{ start = "httpd -p 80 -h /www", stop = "kill $(pidof httpd)" }]
[network]
mode = "veth"
address = "192.0.2.2/24"
host_address = "192.0.2.1/24"
"""


FETCH = """
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=5)
s.sendall(b"GET /index.html HTTP/1.0\\r\\n\\r\\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.decode(errors="replace"))
"""


def test_veth_guest_serves_and_leaves_nothing(home: Path, netns: int) -> None:
    gdir = make_guest(home, gname("ct-net"), HTTPD)
    (gdir / "root" / "www").mkdir()
    (gdir / "root" / "www" / "index.html").write_text("hello from the guest\n")
    (gdir / "root" / "bin" / "pidof").symlink_to("busybox")
    start = cowlink_ns(netns, home, "guest", "start", gname("ct-net"))
    try:
        assert start.returncode == 0, start.stderr
        page = in_ns(netns, sys.executable, "-c", FETCH, "192.0.2.2")
        assert "hello from the guest" in page.stdout, page.stderr

        routes = cowlink_ns(netns, home, "guest", "exec", gname("ct-net"), "--", "ip", "route")
        assert "192.0.2.0/24 dev eth0" in routes.stdout
        links = cowlink_ns(netns, home, "guest", "exec", gname("ct-net"), "--", "ip", "-o", "link")
        assert [line.split(":")[1].strip().split("@")[0] for line in links.stdout.splitlines()] == [
            "lo",
            "eth0",
        ]
        host_side = in_ns(netns, "ip", "-o", "addr", "show", "dev", "cl-" + gname("ct-net"))
        assert "192.0.2.1/24" in host_side.stdout
        # The guest's namespace is not the test's: it holds no cl-* link of its own.
        assert "cl-" + gname("ct-net") not in links.stdout
        # The machine's own namespace never saw the veth.
        assert subprocess.run(
            ["ip", "link", "show", "cl-" + gname("ct-net")], capture_output=True
        ).returncode
    finally:
        stop = cowlink_ns(netns, home, "guest", "stop", gname("ct-net"), "--timeout", "2")
    assert stop.returncode == 0, stop.stderr
    assert in_ns(netns, "ip", "link", "show", "cl-" + gname("ct-net")).returncode != 0
    refused = in_ns(netns, sys.executable, "-c", FETCH, "192.0.2.2", timeout=30)
    assert refused.returncode != 0


def test_network_none_has_only_loopback(home: Path) -> None:
    need_guests()
    make_guest(
        home,
        gname("ct-nonet"),
        '[init]\nstyle = "services"\nservices = [{start = "sleep 1000 &"}]\n'
        '[network]\nmode = "none"\n',
    )
    with running(home, gname("ct-nonet")):
        links = cowlink(home, "guest", "exec", gname("ct-nonet"), "--", "ip", "-o", "link")
        assert [line.split(":")[1].strip() for line in links.stdout.splitlines()] == ["lo"]
        assert "state UNKNOWN" in links.stdout or "UP" in links.stdout
