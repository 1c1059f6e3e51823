"""The IPVS lane: a client, an LB and three web servers in network namespaces, real IPVS.

These tests need a kernel with IPVS, i.e. they run inside User-Mode Linux
(tests/integration/test_uml_ipvs.py boots it and runs this directory there, in one pytest
process). On a host without /proc/net/ip_vs they are skipped with the reason.

Topology (names carry a random suffix; everything lives only inside the UML instance):

    client ns  10.71.0.2, .3 / fd71::2 --- 10.71.0.1 / fd71::1   lb ns (VIPs on lo:
                                                                  10.72.0.10, fd72::10)
    web{i} ns  10.73.i.2 / fd73:i::2   --- 10.73.i.1 / fd73:i::1  (i = 1, 2, 3)

The webs route back through the LB (NAT forwarding needs that). Servers run as threads of the
test process with sockets opened inside each namespace (setns on this thread), which saves a
~2 s Python start-up per server in UML: HTTP is the lab's own `ntm lab httpd` handler
(answers `server=<name> client=<ip>`), UDP is an echo on 9000 answering the same text.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

IPVS_PROC = Path("/proc/net/ip_vs")
CLONE_NEWNET = 0x40000000
VIP4, VIP6 = "10.72.0.10", "fd72::10"
CLIENT4, CLIENT4_B, CLIENT6 = "10.71.0.2", "10.71.0.3", "fd71::2"
WEBS = ("web1", "web2", "web3")
_libc = ctypes.CDLL(None, use_errno=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ipvs: needs real IPVS (runs inside User-Mode Linux)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IPVS_PROC.exists() and os.geteuid() == 0:
        return
    reason = (
        "needs real IPVS as root (/proc/net/ip_vs missing): this lane runs inside UML via "
        "tests/integration/test_uml_ipvs.py"
    )
    for item in items:
        if item.get_closest_marker("ipvs"):
            item.add_marker(pytest.mark.skip(reason=reason))


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """This thread inside /run/netns/<name>; sockets opened here stay in that namespace."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(home)


def sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Topo:
    client: str
    lb: str
    webs: dict[str, str]  # web name -> namespace
    web4: dict[str, str]  # web name -> IPv4 address
    web6: dict[str, str]

    def ipvsadm(self, *args: str) -> str:
        return sh("ip", "netns", "exec", self.lb, "ipvsadm", *args)

    def ipvsadm_lines(self) -> list[str]:
        """`ipvsadm -Ln` with runs of spaces squeezed, for exact line matches."""
        return [" ".join(line.split()) for line in self.ipvsadm("-Ln").splitlines()]

    def connect(self, vip: str, port: int, source: str | None = None) -> socket.socket:
        with in_netns(self.client):
            return socket.create_connection(
                (vip, port), timeout=5, source_address=(source, 0) if source else None
            )

    def get(self, vip: str, port: int, source: str | None = None) -> tuple[str, str]:
        """One new TCP connection, GET /; returns (server, client address it saw)."""
        with self.connect(vip, port, source) as conn:
            conn.sendall(b"GET /whoami HTTP/1.0\r\nHost: lane\r\n\r\n")
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
        return parse_whoami(data.decode().split("\r\n\r\n", 1)[-1])

    def udp_socket(self, family: int = socket.AF_INET) -> socket.socket:
        with in_netns(self.client):
            s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(1.0)
        return s


def parse_whoami(body: str) -> tuple[str, str]:
    fields = dict(part.split("=", 1) for part in body.split())
    return fields["server"], fields["client"]


def _serve_udp(sock: socket.socket, name: str, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            _data, peer = sock.recvfrom(2048)
        except TimeoutError:
            continue
        client = peer[0].removeprefix("::ffff:")
        sock.sendto(f"server={name} client={client}".encode(), peer)


def ip_batch(commands: list[str], netns: str | None = None) -> None:
    """Many `ip` commands in one process (each process start costs tens of ms in UML)."""
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    done = subprocess.run(
        argv, input="\n".join(commands) + "\n", capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def _build(sfx: str) -> Topo:
    client, lb = f"c{sfx}", f"lb{sfx}"
    webs = {w: f"{w}{sfx}" for w in WEBS}
    ip_batch([f"netns add {ns}" for ns in (client, lb, *webs.values())])
    # veth pairs, created in the root namespace straight into their namespaces (real
    # names: `ip link add a type veth` fails, `a` parses as `address`)
    root = [f"link add c{sfx}e netns {client} type veth peer name l{sfx}c netns {lb}"]
    for i, ns in enumerate(webs.values(), start=1):
        root.append(f"link add w{sfx}{i}e netns {ns} type veth peer name l{sfx}w{i} netns {lb}")
    ip_batch(root)
    ce = f"c{sfx}e"
    ip_batch(
        [
            "link set lo up",
            f"addr add {CLIENT4}/24 dev {ce}",
            f"addr add {CLIENT4_B}/24 dev {ce}",
            f"addr add {CLIENT6}/64 dev {ce} nodad",
            f"link set {ce} up",
            "route add default via 10.71.0.1",
            "route add default via fd71::1",
        ],
        client,
    )
    lb_cmds = [
        "link set lo up",
        f"addr add {VIP4}/32 dev lo",
        f"addr add {VIP6}/128 dev lo nodad",
        f"addr add 10.71.0.1/24 dev l{sfx}c",
        f"addr add fd71::1/64 dev l{sfx}c nodad",
        f"link set l{sfx}c up",
    ]
    web4, web6 = {}, {}
    for i, (web, ns) in enumerate(webs.items(), start=1):
        lb_if, web_if = f"l{sfx}w{i}", f"w{sfx}{i}e"
        lb_cmds += [
            f"addr add 10.73.{i}.1/24 dev {lb_if}",
            f"addr add fd73:{i}::1/64 dev {lb_if} nodad",
            f"link set {lb_if} up",
        ]
        web4[web], web6[web] = f"10.73.{i}.2", f"fd73:{i}::2"
        ip_batch(
            [
                "link set lo up",
                f"addr add {web4[web]}/24 dev {web_if}",
                f"addr add {web6[web]}/64 dev {web_if} nodad",
                f"link set {web_if} up",
                f"route add default via 10.73.{i}.1",
                f"route add default via fd73:{i}::1",
            ],
            ns,
        )
    ip_batch(lb_cmds, lb)
    with in_netns(lb):
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        Path("/proc/sys/net/ipv6/conf/all/forwarding").write_text("1\n")
    return Topo(client, lb, webs, web4, web6)


def _start_servers(topo: Topo, stop: threading.Event) -> list[ThreadingHTTPServer]:
    from lab.httpd import DualStackServer, make_handler

    servers: list[ThreadingHTTPServer] = []
    for web, ns in topo.webs.items():
        with in_netns(ns):
            httpd = DualStackServer(("::", 80), make_handler(web))
            udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            udp.bind(("::", 9000))
        servers.append(httpd)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        threading.Thread(target=_serve_udp, args=(udp, web, stop), daemon=True).start()
    return servers


@pytest.fixture(scope="session")
def topo() -> Iterator[Topo]:
    if not IPVS_PROC.exists():
        pytest.skip("no IPVS here")
    sfx = secrets.token_hex(2)
    namespaces = [f"c{sfx}", f"lb{sfx}", *(f"{w}{sfx}" for w in WEBS)]
    stop = threading.Event()
    servers: list[ThreadingHTTPServer] = []
    try:
        built = _build(sfx)
        servers = _start_servers(built, stop)
        yield built
    finally:
        stop.set()
        for server in servers:
            server.shutdown()
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
