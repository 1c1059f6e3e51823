"""ntm_node.dns_server.StubResolver against fake upstreams on loopback, and ntm dns check
end to end against a fake resolver plus a real dc.dns_server (no lab, no root)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
from dnslib import AAAA, CNAME, EDNS0, NS, QTYPE, RCODE, RR, A, DNSRecord

from dc.dns_server import ZoneServer, serve_zone
from dc.dns_zone import NtmZone
from ntm_io.config import ConfigError
from ntm_node import dns_cli
from ntm_node.dns_check import check_name, default_resolver, format_text, parse_address
from ntm_node.dns_server import StubResolver
from ntm_proto.marker import MarkerRule

T = TypeVar("T")
LOOP = "127.0.0.1"
HANG_GUARD = 10.0  # only protects the suite from a hang; never a performance claim


@pytest.fixture(autouse=True)
def _no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Any:
    """Leaked tasks or unretrieved exceptions show up as asyncio ERROR logs: fail on them."""
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        yield
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# A handler gets (query bytes, "udp" | "tcp") and returns the messages to send back.
Handler = Callable[[bytes, str], list[bytes]]


class FakeServer:
    """A DNS server on UDP+TCP loopback whose answers come from a handler; records queries."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.received: list[tuple[str, bytes]] = []
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    async def start(self) -> FakeServer:
        loop = asyncio.get_running_loop()
        outer = self

        class Proto(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                outer.received.append(("udp", data))
                for out in outer.handler(data, "udp"):
                    self.transport.sendto(out, addr)

        self._udp, _ = await loop.create_datagram_endpoint(Proto, local_addr=(LOOP, 0))
        self.port = self._udp.get_extra_info("sockname")[1]
        self._tcp = await asyncio.start_server(self._serve_tcp, LOOP, self.port)
        return self

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(size)
                self.received.append(("tcp", data))
                for out in self.handler(data, "tcp"):
                    writer.write(len(out).to_bytes(2, "big") + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def address(self) -> tuple[str, int]:
        return (LOOP, self.port)

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()


def reply_to(
    data: bytes,
    *records: RR,
    rcode: int = RCODE.NOERROR,
    tc: bool = False,
    ident: int | None = None,
    qname: str | None = None,
) -> bytes:
    q = DNSRecord.parse(data)
    r = q.reply()
    r.header.aa = 0
    r.header.rcode = rcode
    r.header.tc = int(tc)
    if ident is not None:
        r.header.id = ident
    if qname is not None:
        r.questions[0].qname = qname
    for rr in records:
        r.add_answer(rr)
    return bytes(r.pack())


def cname(owner: str, target: str) -> RR:
    return RR(owner, QTYPE.CNAME, ttl=300, rdata=CNAME(target))


def a(owner: str, addr: str) -> RR:
    return RR(owner, QTYPE.A, ttl=300, rdata=A(addr))


def aaaa(owner: str, addr: str) -> RR:
    return RR(owner, QTYPE.AAAA, ttl=300, rdata=AAAA(addr))


def lab_upstream(data: bytes, transport: str) -> list[bytes]:
    """The lab's names: www -> cn2.ntm (marked), plain (unmarked)."""
    q = DNSRecord.parse(data)
    name = str(q.q.qname).lower().rstrip(".")
    qtype = q.q.qtype
    if name == "www.example.com":
        chain = [cname("www.example.com", "cn2.ntm.example.com")]
        if qtype == QTYPE.A:
            chain.append(a("cn2.ntm.example.com", "198.51.100.30"))
        elif qtype == QTYPE.AAAA:
            chain.append(aaaa("cn2.ntm.example.com", "2001:db8:100::30"))
        return [reply_to(data, *chain)]
    if name == "plain.example.com" and qtype == QTYPE.A:
        return [raw_plain_answer(q.header.id, data)]
    return [reply_to(data, rcode=RCODE.NXDOMAIN)]


def raw_plain_answer(ident: int, query: bytes) -> bytes:
    """An answer written by hand, without name compression and with an odd TTL: dnslib would
    encode it differently, so equality proves the bytes were passed through untouched."""
    question = query[12:]  # the query has no other sections
    owner = b"\x05plain\x07example\x03com\x00"
    answer = owner + struct.pack("!HHIH", 1, 1, 12345, 4) + bytes([198, 51, 100, 40])
    header = struct.pack("!HHHHHH", ident, 0x8180, 1, 1, 0, 0)
    return header + question + answer


async def udp_ask(addr: tuple[str, int], data: bytes, timeout: float = HANG_GUARD) -> bytes:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, reply: bytes, src: Any) -> None:
            if not got.done():
                got.set_result(reply)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=addr)
    try:
        transport.sendto(data)
        return await asyncio.wait_for(got, timeout)
    finally:
        transport.close()


def question(name: str, qtype: str = "A", ident: int = 0x1234) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = ident
    return bytes(q.pack())


class Directions:
    """A fake DC client: returns a vIP, raises, or hangs; counts calls."""

    def __init__(
        self,
        vip: str = "100.64.0.7",
        *,
        fail: bool = False,
        hang: bool = False,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.vip, self.fail, self.hang, self.gate = vip, fail, hang, gate
        self.calls: list[str] = []

    async def __call__(self, fqdn: str) -> str:
        self.calls.append(fqdn)
        if self.gate is not None:
            await self.gate.wait()
        if self.hang:
            await asyncio.Event().wait()
        if self.fail:
            raise ConnectionError("DC unreachable")
        return self.vip


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, HANG_GUARD * 2))


async def with_stub(
    upstream_handler: Handler,
    directions: Callable[[str], Awaitable[str]],
    body: Callable[[StubResolver, FakeServer], Awaitable[None]],
    *,
    direction_timeout: float = 2.0,
    upstream_timeout: float = 2.0,
    extra_upstreams: list[tuple[str, int]] | None = None,
) -> None:
    up = await FakeServer(upstream_handler).start()
    upstreams = [*(extra_upstreams or []), up.address]
    stub = StubResolver(
        (LOOP, 0),
        upstreams,
        MarkerRule(),
        directions,
        direction_timeout=direction_timeout,
        upstream_timeout=upstream_timeout,
    )
    await stub.start()
    try:
        await body(stub, up)
    finally:
        await stub.close()
        await up.close()


def addr_of(stub: StubResolver) -> tuple[str, int]:
    assert stub.address is not None
    return stub.address


# ---- pass-through ------------------------------------------------------------------------


def test_unmarked_answer_passes_through_byte_for_byte() -> None:
    d = Directions()

    async def body(stub: StubResolver, up: FakeServer) -> None:
        data = question("plain.example.com", ident=0xBEEF)
        reply = await udp_ask(addr_of(stub), data)
        assert reply == raw_plain_answer(0xBEEF, data)
        assert up.received == [("udp", data)]  # the query went upstream as-is
        assert stub.counters["passed_through"] == 1 and stub.counters["queries"] == 1

    run(with_stub(lab_upstream, d, body))
    assert d.calls == []


def test_mismatched_responses_are_ignored_and_counted() -> None:
    def sneaky(data: bytes, transport: str) -> list[bytes]:
        ident = DNSRecord.parse(data).header.id
        return [
            reply_to(data, a("plain.example.com", "203.0.113.66"), ident=(ident + 1) % 65536),
            reply_to(data, a("evil.example.com", "203.0.113.66"), qname="evil.example.com"),
            b"\x00\x01garbage",
            raw_plain_answer(ident, data),
        ]

    async def body(stub: StubResolver, up: FakeServer) -> None:
        data = question("plain.example.com", ident=7)
        assert await udp_ask(addr_of(stub), data) == raw_plain_answer(7, data)
        assert stub.counters["mismatched_responses"] == 3

    run(with_stub(sneaky, Directions(), body))


def test_all_upstreams_down_servfail_within_bound() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        # Two black holes: bound sockets that never answer (no ICMP, so only the clock helps).
        holes = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        for s in holes:
            s.bind((LOOP, 0))
        stub = StubResolver(
            (LOOP, 0),
            [s.getsockname() for s in holes],
            MarkerRule(),
            Directions(),
            upstream_timeout=0.4,
        )
        await stub.start()
        try:
            data = question("plain.example.com", ident=99)
            started = loop.time()
            reply = DNSRecord.parse(await udp_ask(addr_of(stub), data, timeout=HANG_GUARD))
            assert loop.time() - started < HANG_GUARD  # answered; the bound is the resolver's
            assert reply.header.rcode == RCODE.SERVFAIL and reply.header.id == 99
            assert str(reply.q.qname) == "plain.example.com."
            assert stub.counters["servfail"] == 1
        finally:
            await stub.close()
            for s in holes:
                s.close()

    run(main())


def test_next_upstream_after_refused_and_timeout() -> None:
    async def body(stub: StubResolver, up: FakeServer) -> None:
        data = question("plain.example.com", ident=5)
        assert await udp_ask(addr_of(stub), data) == raw_plain_answer(5, data)

    async def main() -> None:
        refused = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        refused.bind((LOOP, 0))
        dead = refused.getsockname()
        refused.close()  # nothing listens: ICMP port unreachable, fail fast
        hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        hole.bind((LOOP, 0))
        try:
            await with_stub(
                lab_upstream,
                Directions(),
                body,
                upstream_timeout=1.5,
                extra_upstreams=[dead, hole.getsockname()],
            )
        finally:
            hole.close()

    run(main())


# ---- interception ------------------------------------------------------------------------


def test_direction_success_answers_with_vip() -> None:
    d = Directions("100.64.3.4")

    async def body(stub: StubResolver, up: FakeServer) -> None:
        data = question("www.example.com", ident=321)
        reply = DNSRecord.parse(await udp_ask(addr_of(stub), data))
        assert reply.header.id == 321 and reply.questions == DNSRecord.parse(data).questions
        assert [(QTYPE[rr.rtype], str(rr.rdata)) for rr in reply.rr] == [
            ("CNAME", "cn2.ntm.example.com."),
            ("A", "100.64.3.4"),
        ]
        assert reply.rr[1].ttl == 5
        assert stub.counters["intercepted"] == 1

    run(with_stub(lab_upstream, d, body))
    assert d.calls == ["cn2.ntm.example.com"]


def test_direction_timeout_falls_back_to_ordinary_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body(stub: StubResolver, up: FakeServer) -> None:
        data = question("www.example.com", ident=11)
        reply = await udp_ask(addr_of(stub), data)
        assert reply == lab_upstream(data, "udp")[0]  # the resolver's answer, byte for byte
        assert stub.counters["fallbacks"] == 1 and stub.counters["intercepted"] == 0

    with caplog.at_level(logging.WARNING, logger="ntm.node.dns"):
        run(with_stub(lab_upstream, Directions(hang=True), body, direction_timeout=0.2))
    assert any(
        "cn2.ntm.example.com" in r.getMessage() and "no directions within" in r.getMessage()
        for r in caplog.records
    )


def test_direction_failure_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    async def body(stub: StubResolver, up: FakeServer) -> None:
        data = question("www.example.com", ident=12)
        assert await udp_ask(addr_of(stub), data) == lab_upstream(data, "udp")[0]
        data = question("www.example.com", "AAAA", ident=13)
        # AAAA too: without directions the app gets the real AAAA and works without mobility.
        assert await udp_ask(addr_of(stub), data) == lab_upstream(data, "udp")[0]
        assert stub.counters["fallbacks"] == 2

    with caplog.at_level(logging.WARNING, logger="ntm.node.dns"):
        run(with_stub(lab_upstream, Directions(fail=True), body))
    assert any("DC unreachable" in r.getMessage() for r in caplog.records)


def test_aaaa_for_marked_name_is_nodata() -> None:
    async def body(stub: StubResolver, up: FakeServer) -> None:
        reply = DNSRecord.parse(await udp_ask(addr_of(stub), question("www.example.com", "AAAA")))
        assert reply.header.rcode == RCODE.NOERROR
        assert [QTYPE[rr.rtype] for rr in reply.rr] == ["CNAME"]
        assert stub.counters["intercepted"] == 1

    run(with_stub(lab_upstream, Directions(), body))


def test_other_types_for_marked_name_pass_through() -> None:
    def mx(data: bytes, transport: str) -> list[bytes]:
        return [reply_to(data, cname("www.example.com", "cn2.ntm.example.com"))]

    d = Directions()

    async def body(stub: StubResolver, up: FakeServer) -> None:
        data = question("www.example.com", "MX")
        assert await udp_ask(addr_of(stub), data) == mx(data, "udp")[0]

    run(with_stub(mx, d, body))
    assert d.calls == []


def test_concurrent_questions_share_one_direction_call() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        d = Directions("100.64.9.9", gate=gate)

        async def body(stub: StubResolver, up: FakeServer) -> None:
            asks = [
                asyncio.ensure_future(
                    udp_ask(addr_of(stub), question("www.example.com", t, ident=i))
                )
                for i, t in enumerate(["A", "A", "AAAA", "A"])
            ]
            # Condition wait (not a readiness sleep): all four joined the call in flight.
            while stub.counters["direction_calls"] + stub.counters["direction_shared"] < 4:
                await asyncio.sleep(0.005)
            gate.set()
            replies = [DNSRecord.parse(r) for r in await asyncio.gather(*asks)]
            assert [str(rr.rdata) for r in replies for rr in r.rr if rr.rtype == QTYPE.A] == [
                "100.64.9.9"
            ] * 3
            assert stub.counters["direction_calls"] == 1 and stub.counters["intercepted"] == 4

        await with_stub(lab_upstream, d, body)
        assert d.calls == ["cn2.ntm.example.com"]

    run(main())


# ---- TCP, truncation, malformed ----------------------------------------------------------


def test_tcp_queries_pipelined_on_one_connection() -> None:
    async def body(stub: StubResolver, up: FakeServer) -> None:
        reader, writer = await asyncio.open_connection(*addr_of(stub))
        q1 = question("plain.example.com", ident=1)
        q2 = question("www.example.com", ident=2)
        for q in (q1, q2):
            writer.write(len(q).to_bytes(2, "big") + q)
        await writer.drain()
        replies: dict[int, bytes] = {}
        for _ in range(2):
            size = int.from_bytes(await reader.readexactly(2), "big")
            data = await reader.readexactly(size)
            replies[DNSRecord.parse(data).header.id] = data
        writer.close()
        assert replies[1] == raw_plain_answer(1, q1)
        vip = [str(rr.rdata) for rr in DNSRecord.parse(replies[2]).rr if rr.rtype == QTYPE.A]
        assert vip == ["100.64.0.7"]
        assert {t for t, _ in up.received} == {"tcp"}  # TCP clients are forwarded over TCP

    run(with_stub(lab_upstream, Directions(), body))


def test_idle_tcp_connection_is_closed() -> None:
    async def main() -> None:
        up = await FakeServer(lab_upstream).start()
        stub = StubResolver(
            (LOOP, 0), [up.address], MarkerRule(), Directions(), tcp_idle_timeout=0.2
        )
        await stub.start()
        try:
            reader, writer = await asyncio.open_connection(*addr_of(stub))
            q = question("plain.example.com", ident=4)
            writer.write(len(q).to_bytes(2, "big") + q)
            size = int.from_bytes(await reader.readexactly(2), "big")
            assert await reader.readexactly(size) == raw_plain_answer(4, q)
            assert await asyncio.wait_for(reader.read(), HANG_GUARD) == b""  # server closed it
            writer.close()
        finally:
            await stub.close()
            await up.close()

    run(main())


def test_truncated_udp_answer_is_retried_over_tcp() -> None:
    def truncating(data: bytes, transport: str) -> list[bytes]:
        if transport == "udp":
            return [reply_to(data, tc=True)]  # no records: the chain is only in the TCP answer
        return lab_upstream(data, transport)

    async def body(stub: StubResolver, up: FakeServer) -> None:
        reply = DNSRecord.parse(await udp_ask(addr_of(stub), question("www.example.com")))
        assert [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A] == ["100.64.0.7"]
        assert [t for t, _ in up.received] == ["udp", "tcp"]
        data = question("plain.example.com", ident=3)
        # Unmarked: the full answer fits the client's 512 bytes, so it gets the TCP bytes as-is.
        assert await udp_ask(addr_of(stub), data) == raw_plain_answer(3, data)

    run(with_stub(truncating, Directions(), body))


def test_malformed_queries_never_crash() -> None:
    async def body(stub: StubResolver, up: FakeServer) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect(addr_of(stub))
        try:
            for junk in (
                b"\x01",
                b"\xff" * 30,
                bytes(DNSRecord.question("x.example").reply().pack()),
            ):
                await loop.sock_sendall(sock, junk)
            # A header-only query: parseable enough for FORMERR with its id.
            await loop.sock_sendall(sock, struct.pack("!HHHHHH", 0xABCD, 0x0100, 0, 0, 0, 0))
            fe = DNSRecord.parse(await asyncio.wait_for(loop.sock_recv(sock, 4096), HANG_GUARD))
            assert fe.header.id == 0xABCD and fe.header.rcode == RCODE.FORMERR
        finally:
            sock.close()
        # And the resolver still works.
        data = question("plain.example.com", ident=8)
        assert await udp_ask(addr_of(stub), data) == raw_plain_answer(8, data)
        assert stub.counters["malformed"] == 4 and stub.counters["queries"] == 5
        assert up.received == [("udp", data)]

    run(with_stub(lab_upstream, Directions(), body))


# ---- ntm dns check -----------------------------------------------------------------------


class Lab:
    """A fake recursive resolver plus a real DC zone server, both on loopback."""

    def __init__(self, registered: dict[str, list[str]], delegated: bool = True) -> None:
        self.registered = registered
        self.delegated = delegated
        self.dc: ZoneServer | None = None
        self.resolver: FakeServer | None = None

    async def start(self) -> Lab:
        zone = NtmZone(
            "ntm.example.com",
            "dc1.ntm.example.com",
            [LOOP],
            lambda n: list(self.registered.get(n, [])),
        )
        self.dc = await serve_zone(zone, LOOP, 0)
        self.resolver = await FakeServer(self._recursive).start()
        return self

    def _recursive(self, data: bytes, transport: str) -> list[bytes]:
        q = DNSRecord.parse(data)
        name = str(q.q.qname).lower().rstrip(".")
        if name == "ntm.example.com" and q.q.qtype == QTYPE.NS:
            if not self.delegated:
                return [reply_to(data)]
            return [
                reply_to(
                    data, RR("ntm.example.com", QTYPE.NS, ttl=60, rdata=NS("dc1.ntm.example.com"))
                )
            ]
        if name == "dc1.ntm.example.com" and self.delegated:
            return [reply_to(data, *([a(name, LOOP)] if q.q.qtype == QTYPE.A else []))]
        chain: list[RR] = []
        if name in ("www.example.com", "ghost.example.com"):
            target = "cn2.ntm.example.com" if name == "www.example.com" else "gone.ntm.example.com"
            chain.append(cname(name, target))
            name = target
        if name.endswith(".ntm.example.com"):
            addrs = self.registered.get(name)
            if addrs is None:
                return [reply_to(data, *chain, rcode=RCODE.NXDOMAIN)]
            return [reply_to(data, *chain, *[a(name, x) for x in addrs if ":" not in x])]
        if name == "plain.example.com":
            return [reply_to(data, a(name, "198.51.100.40"))]
        return [reply_to(data, rcode=RCODE.NXDOMAIN)]

    @property
    def dc_port(self) -> int:
        assert self.dc is not None
        return self.dc.address[1]

    @property
    def resolver_address(self) -> tuple[str, int]:
        assert self.resolver is not None
        return self.resolver.address

    async def close(self) -> None:
        if self.dc is not None:
            self.dc.close()
            await self.dc.wait_closed()
        if self.resolver is not None:
            await self.resolver.close()


REG = {"cn2.ntm.example.com": ["198.51.100.30", "2001:db8:100::30"]}


def check(name: str, registered: dict[str, list[str]] = REG, delegated: bool = True) -> Any:
    async def main() -> Any:
        lab = await Lab(registered, delegated).start()
        try:
            return await check_name(
                name, lab.resolver_address, MarkerRule(), dc_port=lab.dc_port, timeout=1.0
            )
        finally:
            await lab.close()

    return run(main())


def test_check_consistent_marked_name() -> None:
    rep = check("www.example.com")
    assert rep.ok, rep.problems
    assert rep.chain[0] == "www.example.com CNAME cn2.ntm.example.com"
    assert rep.marked == "cn2.ntm.example.com" and rep.zone == "ntm.example.com"
    assert rep.ns == {"dc1.ntm.example.com": [LOOP]}
    assert rep.dcs[0].authoritative and rep.dcs[0].a == ["198.51.100.30"]
    assert rep.dcs[0].aaaa == ["2001:db8:100::30"]
    assert rep.action.startswith("intercept: ask DC dc1.ntm.example.com for directions")
    assert "result:    OK" in format_text(rep)


def test_check_unmarked_name_passes_through() -> None:
    rep = check("plain.example.com")
    assert rep.ok and rep.marked is None
    assert rep.action == "pass through: not an NTMobile name"


def test_check_unregistered_node() -> None:
    rep = check("ghost.example.com")
    assert not rep.ok
    assert any("not registered" in p and "gone.ntm.example.com" in p for p in rep.problems)
    assert rep.dcs[0].rcode == "NXDOMAIN"


def test_check_missing_delegation() -> None:
    rep = check("www.example.com", delegated=False)
    assert not rep.ok
    assert any(
        "ntm.example.com has no NS records" in p and "delegate it to your DC" in p
        for p in rep.problems
    )


def test_check_nonexistent_name() -> None:
    rep = check("nope.example.com")
    assert not rep.ok and any("NXDOMAIN" in p for p in rep.problems)


def test_check_resolver_down() -> None:
    async def main() -> Any:
        hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        hole.bind((LOOP, 0))
        try:
            return await check_name("www.example.com", hole.getsockname(), timeout=0.3)
        finally:
            hole.close()

    rep = run(main())
    assert not rep.ok and "did not answer" in rep.problems[0]


class ThreadLab:
    """The Lab on its own loop in a thread, for the CLI (whose run() calls asyncio.run)."""

    def __enter__(self) -> Lab:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.lab = asyncio.run_coroutine_threadsafe(Lab(REG).start(), self.loop).result(HANG_GUARD)
        return self.lab

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.lab.close(), self.loop).result(HANG_GUARD)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(HANG_GUARD)
        self.loop.close()


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ntm dns")
    dns_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    with ThreadLab() as lab:
        host, port = lab.resolver_address
        common = ["--resolver", f"{host}:{port}", "--dc-port", str(lab.dc_port)]
        assert dns_cli.run(cli_args("check", "www.example.com", *common)) == 0
        out = capsys.readouterr().out
        assert "intercept: ask DC dc1.ntm.example.com for directions" in out
        assert dns_cli.run(cli_args("check", "ghost.example.com", "--json", *common)) == 1
        doc = json.loads(capsys.readouterr().out)
        assert doc["ok"] is False and doc["marked"] == "gone.ntm.example.com"
        assert doc["dcs"][0]["registered"] is False


def test_cli_user_errors_are_config_errors(tmp_path: Any) -> None:
    with pytest.raises(ConfigError):
        dns_cli.run(cli_args("check", "bad..name", "--resolver", "127.0.0.1"))
    with pytest.raises(ConfigError):
        dns_cli.run(cli_args("check", "www.example.com", "--mark", "a.b"))
    with pytest.raises(ConfigError):
        parse_address("not-an-ip")
    assert parse_address("[2001:db8::53]:5353") == ("2001:db8::53", 5353)
    assert parse_address("2001:db8::53") == ("2001:db8::53", 53)
    assert parse_address("192.0.2.1:5353") == ("192.0.2.1", 5353)
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example.com\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n")
    assert default_resolver(str(conf)) == ("192.0.2.53", 53)
    conf.write_text("search example.com\n")
    with pytest.raises(ConfigError):
        default_resolver(str(conf))


def test_edns_query_to_stub_gets_edns_answer() -> None:
    async def body(stub: StubResolver, up: FakeServer) -> None:
        q = DNSRecord.question("www.example.com")
        q.add_ar(EDNS0(udp_len=1232))
        reply = DNSRecord.parse(await udp_ask(addr_of(stub), bytes(q.pack())))
        assert any(rr.rtype == QTYPE.OPT for rr in reply.ar)

    run(with_stub(lab_upstream, Directions(), body))
