"""dc.dns_zone (sans-IO authoritative answers) and dc.dns_server on loopback."""

from __future__ import annotations

import asyncio
import struct

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from dc.dns_server import serve_zone
from dc.dns_zone import NtmZone

REGISTERED = {
    "cn2.ntm.example.com": ["198.51.100.30", "2001:db8:100::30"],
    "v4only.ntm.example.com": ["198.51.100.31"],
    "many.ntm.example.com": [f"198.51.100.{i}" for i in range(1, 60)],
}


def make_zone() -> NtmZone:
    return NtmZone(
        zone="ntm.example.com",
        ns_name="dc1.ntm.example.com",
        ns_addresses=["198.51.100.20", "2001:db8:100::20"],
        lookup=lambda name: list(REGISTERED.get(name, [])),
        soa_serial=7,
        ttl=30,
    )


def ask(
    zone: NtmZone, name: str, qtype: str = "A", *, udp: bool = True, edns: int | None = None
) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    q.header.id = 999
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    out = zone.handle(bytes(q.pack()), udp=udp)
    assert out is not None
    rec = DNSRecord.parse(out)
    assert rec.header.id == 999 and rec.header.qr == 1
    return rec


def rdatas(rec: DNSRecord, qtype: str) -> list[str]:
    return [str(rr.rdata) for rr in rec.rr if rr.rtype == getattr(QTYPE, qtype)]


def test_apex_soa_and_ns_with_glue() -> None:
    z = make_zone()
    soa = ask(z, "ntm.example.com", "SOA")
    assert soa.header.aa == 1 and soa.header.rcode == RCODE.NOERROR
    assert soa.rr[0].rdata.times[0] == 7
    assert str(soa.rr[0].rdata.mname) == "dc1.ntm.example.com."
    ns = ask(z, "NTM.example.com.", "NS")
    assert rdatas(ns, "NS") == ["dc1.ntm.example.com."]
    assert sorted(str(rr.rdata) for rr in ns.ar) == ["198.51.100.20", "2001:db8:100::20"]


def test_ns_name_addresses() -> None:
    z = make_zone()
    assert rdatas(ask(z, "dc1.ntm.example.com", "A"), "A") == ["198.51.100.20"]
    assert rdatas(ask(z, "dc1.ntm.example.com", "AAAA"), "AAAA") == ["2001:db8:100::20"]


def test_registered_names() -> None:
    z = make_zone()
    r = ask(z, "cn2.ntm.example.com", "A")
    assert r.header.aa == 1 and rdatas(r, "A") == ["198.51.100.30"]
    assert rdatas(ask(z, "CN2.ntm.example.com", "AAAA"), "AAAA") == ["2001:db8:100::30"]
    both = ask(z, "cn2.ntm.example.com", "ANY")
    assert rdatas(both, "A") and rdatas(both, "AAAA")


def test_nodata_for_missing_type() -> None:
    z = make_zone()
    for name, qtype in [
        ("v4only.ntm.example.com", "AAAA"),
        ("cn2.ntm.example.com", "MX"),
        ("ntm.example.com", "A"),
    ]:
        r = ask(z, name, qtype)
        assert r.header.rcode == RCODE.NOERROR and r.header.aa == 1 and not r.rr
        assert [QTYPE[rr.rtype] for rr in r.auth] == ["SOA"]
    assert z.counters["nodata"] == 3


def test_nxdomain_with_soa() -> None:
    z = make_zone()
    r = ask(z, "unknown.ntm.example.com")
    assert r.header.rcode == RCODE.NXDOMAIN and r.header.aa == 1
    assert [QTYPE[rr.rtype] for rr in r.auth] == ["SOA"]
    assert z.counters["nxdomain"] == 1


@pytest.mark.parametrize(
    "name", ["www.example.com", "example.com", "xntm.example.com", "cn2.ntm.example.org"]
)
def test_refused_outside_zone(name: str) -> None:
    z = make_zone()
    r = ask(z, name)
    assert r.header.rcode == RCODE.REFUSED and r.header.aa == 0 and not r.rr


def test_truncation_over_udp_only() -> None:
    z = make_zone()
    r = ask(z, "many.ntm.example.com")
    assert r.header.tc == 1 and not r.rr
    full = ask(z, "many.ntm.example.com", udp=False)
    assert full.header.tc == 0 and len(rdatas(full, "A")) == 59
    big = ask(z, "many.ntm.example.com", edns=4096)
    assert big.header.tc == 0 and len(rdatas(big, "A")) == 59
    assert z.counters["truncated"] == 1


def test_malformed_dropped_and_counted() -> None:
    z = make_zone()
    assert z.handle(b"\x00\x01") is None
    q = DNSRecord.question("cn2.ntm.example.com")
    assert z.handle(bytes(q.reply().pack())) is None  # a response: never answered
    assert z.counters["malformed"] == 2


def test_formerr_and_notimp() -> None:
    z = make_zone()
    out = z.handle(struct.pack("!HHHHHH", 5, 0, 0, 0, 0, 0))
    assert out is not None and DNSRecord.parse(out).header.rcode == RCODE.FORMERR
    q = DNSRecord.question("ntm.example.com", "SOA")
    q.header.opcode = 4
    out = z.handle(bytes(q.pack()))
    assert out is not None and DNSRecord.parse(out).header.rcode == RCODE.NOTIMP


def test_lookup_failure_is_servfail() -> None:
    def boom(name: str) -> list[str]:
        raise RuntimeError("registry down")

    z = NtmZone("ntm.example.com", "dc1.ntm.example.com", [], boom)
    r = ask(z, "cn2.ntm.example.com")
    assert r.header.rcode == RCODE.SERVFAIL


def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        NtmZone("bad..zone", "dc1.ntm.example.com", [], lambda n: [])
    with pytest.raises(ValueError):
        NtmZone("ntm.example.com", "dc1.ntm.example.com", [], lambda n: [], soa_serial=-1)


@settings(max_examples=400)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    out = make_zone().handle(data)
    if out is not None:
        assert len(out) <= 512 or DNSRecord.parse(out).header.tc == 0


@settings(max_examples=400)
@given(st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_queries_never_raise(flips: list[tuple[int, int]]) -> None:
    q = DNSRecord.question("cn2.ntm.example.com", "A")
    q.add_ar(EDNS0(udp_len=1232))
    data = bytearray(q.pack())
    for pos, val in flips:
        data[pos % len(data)] = val
    out = make_zone().handle(bytes(data))
    if out is not None:
        DNSRecord.parse(out)  # whatever we send is a valid message


def test_server_udp_and_tcp() -> None:
    async def main() -> None:
        zone = make_zone()
        server = await serve_zone(zone, "127.0.0.1", 0)
        try:
            host, port = server.address
            q = DNSRecord.question("cn2.ntm.example.com", "A")
            loop = asyncio.get_running_loop()
            got: asyncio.Future[bytes] = loop.create_future()

            class Client(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: object) -> None:
                    if not got.done():
                        got.set_result(data)

            tr, _ = await loop.create_datagram_endpoint(Client, remote_addr=(host, port))
            tr.sendto(bytes(q.pack()))
            r = DNSRecord.parse(await asyncio.wait_for(got, 5))
            tr.close()
            assert rdatas(r, "A") == ["198.51.100.30"] and r.header.aa == 1

            reader, writer = await asyncio.open_connection(host, port)
            for name in ("many.ntm.example.com", "ntm.example.com"):
                data = bytes(DNSRecord.question(name, "A").pack())
                writer.write(len(data).to_bytes(2, "big") + data)
            answers = []
            for _ in range(2):
                size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 5), "big")
                answers.append(DNSRecord.parse(await reader.readexactly(size)))
            writer.close()
            assert len(rdatas(answers[0], "A")) == 59 and answers[0].header.tc == 0
            assert answers[1].header.rcode == RCODE.NOERROR and not answers[1].rr
            assert server.counters["queries"] == 3
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
