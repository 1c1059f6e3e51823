"""loadtests.probes and bridge over loopback: DNS from a source address, HTTP keep-alive with
stalls, UDP echo, and the TCP <-> unix socket bridge. 127.0.0.2 plays the identity's vIP
(every 127/8 address is local on Linux), so the tests see that sockets bind to it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, RR, DNSRecord

from lab.httpd import make_handler
from lab.udpecho import reply_for
from loadtests import bridge
from loadtests.probes import (
    HttpSession,
    ProbeError,
    SessionBroken,
    UdpSession,
    answer_address,
    build_query,
    parse_echo,
    parse_whoami,
    resolve,
)
from ntm_io.config import ConfigError

VIP = "127.0.0.2"

# -- parsing -------------------------------------------------------------------------------


def reply_to(query: bytes, *records: str, rcode: int = RCODE.NOERROR) -> bytes:
    q = DNSRecord.parse(query)
    r = q.reply()
    r.header.rcode = rcode
    for text in records:
        r.add_answer(*RR.fromZone(text))
    return bytes(r.pack())


def test_answer_address_follows_the_cname_chain() -> None:
    q = build_query("www.example.com", 4242)
    data = reply_to(
        q,
        "www.example.com. 5 CNAME www.ntm.example.com.",
        "www.ntm.example.com. 5 A 100.64.148.252",
    )
    assert answer_address(data, 4242) == "100.64.148.252"
    with pytest.raises(ProbeError, match="another query"):
        answer_address(data, 1)
    with pytest.raises(ProbeError, match="NXDOMAIN"):
        answer_address(reply_to(q, rcode=RCODE.NXDOMAIN), 4242)
    with pytest.raises(ProbeError, match="without an A"):
        answer_address(reply_to(q), 4242)
    with pytest.raises(ProbeError, match="malformed"):
        answer_address(b"\x00\x01garbage", 4242)


def test_parse_whoami_and_echo() -> None:
    assert parse_whoami(b"server=web2 client=100.64.0.9\n") == ("web2", "100.64.0.9")
    assert parse_whoami(b"server=web2\n") == ("web2", None)
    with pytest.raises(ProbeError):
        parse_whoami(b"hello")
    assert parse_echo(reply_for("web3", b"u1 1 7"), b"u1 1 7") == "web3"
    assert parse_echo(b"web3 u1 1 6", b"u1 1 7") is None  # an earlier datagram's echo
    assert parse_echo(b"nospace", b"x") is None


# -- DNS from the vIP ----------------------------------------------------------------------


@pytest.fixture
def dns_server() -> Iterator[tuple[tuple[str, int], list[str]]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    sources: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(4096)
            except TimeoutError:
                continue
            sources.append(addr[0])
            q = DNSRecord.parse(data)
            assert QTYPE[q.q.qtype] == "A"
            sock.sendto(reply_to(data, f"{q.q.qname} 5 A 100.64.7.7"), addr)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield sock.getsockname(), sources
    stop.set()
    t.join(2)
    sock.close()


def test_resolve_sends_from_the_vip(dns_server: tuple[tuple[str, int], list[str]]) -> None:
    server, sources = dns_server
    assert resolve("www.example.com", VIP, server, timeout=2.0) == "100.64.7.7"
    assert sources == [VIP]


def test_resolve_gives_up_with_a_reason() -> None:
    quiet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    quiet.bind(("127.0.0.1", 0))
    with quiet, pytest.raises(ProbeError, match="no DNS answer"):
        resolve("www.example.com", VIP, quiet.getsockname(), timeout=0.2, tries=2)


def test_an_address_needs_no_lookup(dns_server: tuple[tuple[str, int], list[str]]) -> None:
    server, sources = dns_server
    assert resolve("10.30.0.100", VIP, server, timeout=2.0) == "10.30.0.100"
    assert sources == []  # the resolver was never asked


# -- HTTP ----------------------------------------------------------------------------------


class Server(ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture
def whoami() -> Iterator[int]:
    srv = Server(("127.0.0.1", 0), make_handler("web9"))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_http_keep_alive_session_from_the_vip(whoami: int) -> None:
    s = HttpSession("127.0.0.1", whoami, VIP, "www.example.com", timeout=2.0, abandon=5.0)
    try:
        answers = [s.request("/whoami") for _ in range(3)]
        port = s.conn.sock.getsockname()[1] if s.conn.sock else None
        assert s.request("/whoami") and s.conn.sock and s.conn.sock.getsockname()[1] == port
    finally:
        s.close()
    assert {(a.server, a.client, a.late) for a in answers} == {("web9", VIP, False)}


def slow_server(delay: float, close: bool = False) -> tuple[ThreadingHTTPServer, int]:
    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if close:
                self.close_connection = True
                return
            time.sleep(delay)
            body = b"server=slow client=x\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    srv = Server(("127.0.0.1", 0), Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


def test_stalled_answer_is_a_failure_but_the_connection_waits_for_it() -> None:
    srv, port = slow_server(0.5)
    stalls: list[float] = []
    s = HttpSession("127.0.0.1", port, VIP, "h", timeout=0.15, abandon=5.0)
    try:
        ans = s.request("/whoami", lambda: stalls.append(time.monotonic()))
    finally:
        s.close()
        srv.shutdown()
        srv.server_close()
    assert ans.server == "slow" and ans.late and len(stalls) == 1


def test_abandoned_and_closed_sessions_are_broken() -> None:
    srv, port = slow_server(1.0)
    s = HttpSession("127.0.0.1", port, VIP, "h", timeout=0.1, abandon=0.3)
    with pytest.raises(SessionBroken, match=r"no answer within 0\.3"):
        s.request("/")
    s.close()
    srv.shutdown()
    srv.server_close()
    srv, port = slow_server(0.0, close=True)
    s = HttpSession("127.0.0.1", port, VIP, "h", timeout=1.0, abandon=2.0)
    with pytest.raises(SessionBroken):
        s.request("/")
    s.close()
    srv.shutdown()
    srv.server_close()


# -- UDP echo ------------------------------------------------------------------------------


def test_udp_echo_names_the_server_and_skips_stale_echoes() -> None:
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(2.0)
    sources: list[str] = []

    def serve_two() -> None:
        for _ in range(2):
            data, addr = echo.recvfrom(2048)
            sources.append(addr[0])
            echo.sendto(b"web1 stale", addr)  # a late echo of something else first
            echo.sendto(reply_for("web1", data), addr)

    t = threading.Thread(target=serve_two, daemon=True)
    t.start()
    s = UdpSession("127.0.0.1", echo.getsockname()[1], VIP)
    try:
        assert s.exchange(b"u1 1 1", timeout=2.0) == "web1"
        assert s.exchange(b"u1 1 2", timeout=2.0) == "web1"
        t.join(2)
        with pytest.raises(ProbeError, match="no echo within"):
            s.exchange(b"u1 1 3", timeout=0.1)
    finally:
        s.close()
        echo.close()
    assert sources == [VIP, VIP]


# -- bridge --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_bridge_carries_a_tcp_stream_through_a_unix_socket(tmp_path: Path) -> None:
    async def main() -> bytes:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.read(100))
            await w.drain()
            w.close()

        target = await asyncio.start_server(echo, "127.0.0.1", 0)
        tport = target.sockets[0].getsockname()[1]
        path = str(tmp_path / "m.sock")
        entry = free_port()
        ready1, ready2 = asyncio.Event(), asyncio.Event()
        b1 = asyncio.create_task(
            bridge.serve(
                bridge.parse_endpoint(f"unix:{path}"),
                bridge.parse_endpoint(f"tcp:127.0.0.1:{tport}"),
                ready1,
            )
        )
        await ready1.wait()
        b2 = asyncio.create_task(
            bridge.serve(
                bridge.parse_endpoint(f"tcp:127.0.0.1:{entry}"),
                bridge.parse_endpoint(f"unix:{path}"),
                ready2,
            )
        )
        await ready2.wait()
        r, w = await asyncio.open_connection("127.0.0.1", entry)
        w.write(b"hello master")
        await w.drain()
        got = await asyncio.wait_for(r.read(100), 5)
        w.close()
        for task in (b1, b2):
            task.cancel()
        target.close()
        return got

    assert asyncio.run(main()) == b"hello master"


def test_bridge_endpoints() -> None:
    assert str(bridge.parse_endpoint("tcp:127.0.0.1:5557")) == "tcp:127.0.0.1:5557"
    assert bridge.parse_endpoint("unix:/x/y").path == "/x/y"
    assert bridge.parse_endpoint("tcp:[::1]:5557").host == "::1"
    for bad in ("udp:1:2", "tcp:host", "unix:", "5557"):
        with pytest.raises(ConfigError):
            bridge.parse_endpoint(bad)
