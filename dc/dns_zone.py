"""Authoritative answers for a DC's NTM zone, sans-IO (bytes in, bytes out).

What the zone holds (``zone`` = ``ntm.example.com``, ``ns_name`` = ``dc1.ntm.example.com``):

* apex: SOA and NS (NS answers carry the NS name's addresses as glue when it is in the zone);
* the NS name: A/AAAA from ``ns_addresses``;
* every other name: ``lookup(name)`` gives the registered node's public addresses (IPv4 and/or
  IPv6, empty if unknown). They are served as A/AAAA so an ordinary client that follows the
  CNAME still reaches the service, without a tunnel.

Answers: AA set on everything in the zone; NOERROR with an empty answer (NODATA, SOA in the
authority section) when the name exists but not with that type; NXDOMAIN (SOA in authority)
for unknown names; REFUSED, without AA, for names outside the zone or a class other than IN;
NOTIMP for opcodes other than QUERY; FORMERR for a query without exactly one question;
malformed bytes and responses are dropped (``None``) and counted. A UDP answer larger than the
client's limit (512, or its EDNS size) is replaced by a TC=1 header + question.

Empty non-terminals (``b`` when only ``a.b.ntm.example.com`` is registered) are not known to
``lookup`` and get NXDOMAIN; NTM node names are one label under the zone in practice.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence

from dnslib import AAAA, CLASS, EDNS0, NS, QTYPE, RCODE, RR, SOA, A, DNSHeader, DNSRecord

from ntm_proto.marker import MarkerError, normalize_fqdn

__all__ = ["COUNTER_KEYS", "NtmZone"]

log = logging.getLogger("ntm.dc.dns")

COUNTER_KEYS = (
    "queries",
    "answered",
    "nodata",
    "nxdomain",
    "refused",
    "malformed",
    "truncated",
    "servfail",
)
_EDNS_SIZE = 1232
_CLASS_ANY = 255  # dnslib names it "*", so CLASS.ANY does not exist
_UDP_CAP = 4096  # we never send more over UDP, whatever the client advertises


def _split(addresses: Sequence[str], where: str) -> tuple[list[str], list[str]]:
    v4: list[str] = []
    v6: list[str] = []
    for a in addresses:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            log.warning("%s: %r is not an IP address; not served", where, a)
            continue
        (v4 if ip.version == 4 else v6).append(str(ip))
    return v4, v6


class NtmZone:
    """One NTM zone served by a DC; :meth:`handle` turns a query into the answer bytes."""

    def __init__(
        self,
        zone: str,
        ns_name: str,
        ns_addresses: Sequence[str],
        lookup: Callable[[str], list[str]],
        soa_serial: int = 1,
        ttl: int = 30,
        *,
        hostmaster: str | None = None,
        counters: dict[str, int] | None = None,
    ) -> None:
        try:
            self.zone = normalize_fqdn(zone)
            self.ns_name = normalize_fqdn(ns_name)
            self.hostmaster = normalize_fqdn(hostmaster or f"hostmaster.{self.zone}")
        except MarkerError as exc:
            raise ValueError(f"NTM zone settings: {exc}") from None
        if not 0 <= soa_serial < 2**32:
            raise ValueError(f"soa_serial {soa_serial} must fit in 32 bits")
        if ttl < 0:
            raise ValueError(f"ttl {ttl} must not be negative")
        self.ns_v4, self.ns_v6 = _split(list(ns_addresses), f"NS {self.ns_name}")
        self.lookup = lookup
        self.soa_serial = soa_serial
        self.ttl = ttl
        self.counters: dict[str, int] = counters if counters is not None else {}
        for key in COUNTER_KEYS:
            self.counters.setdefault(key, 0)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def in_zone(self, name: str) -> bool:
        return name == self.zone or name.endswith("." + self.zone)

    def _soa(self) -> RR:
        # Negative answers are cached for min(SOA TTL, minimum): keep it short, nodes register
        # and move all the time.
        times = (self.soa_serial, 3600, 600, 86400, self.ttl)
        return RR(
            self.zone + ".",
            QTYPE.SOA,
            CLASS.IN,
            self.ttl,
            SOA(self.ns_name + ".", self.hostmaster + ".", times),
        )

    def _addresses(self, owner: str, v4: list[str], v6: list[str], qtype: int) -> list[RR]:
        out: list[RR] = []
        if qtype in (QTYPE.A, QTYPE.ANY):
            out += [RR(owner, QTYPE.A, CLASS.IN, self.ttl, A(a)) for a in v4]
        if qtype in (QTYPE.AAAA, QTYPE.ANY):
            out += [RR(owner, QTYPE.AAAA, CLASS.IN, self.ttl, AAAA(a)) for a in v6]
        return out

    def _glue(self) -> list[RR]:
        if not self.in_zone(self.ns_name):
            return []  # out-of-zone NS: its addresses are someone else's data
        return self._addresses(self.ns_name + ".", self.ns_v4, self.ns_v6, QTYPE.ANY)

    def handle(self, data: bytes, *, udp: bool = True) -> bytes | None:
        """The answer to one query, or None to drop it. Never raises."""
        self._count("queries")
        try:
            q = DNSRecord.parse(bytes(data))
        except Exception:  # dnslib raises several types on junk; all mean "drop"
            self._count("malformed")
            return None
        if q.header.qr:
            self._count("malformed")  # never answer a response: no reflection loops
            return None
        try:
            reply = self._answer(q)
        except Exception:  # a failing lookup costs one answer, not the server
            log.exception("answering %r failed", q.questions[:1])
            self._count("servfail")
            reply = self._reply(q, RCODE.SERVFAIL, aa=False)
        return self._pack(q, reply, udp)

    def _reply(self, q: DNSRecord, rcode: int, *, aa: bool) -> DNSRecord:
        h = q.header
        header = DNSHeader(id=h.id, qr=1, opcode=h.opcode, aa=int(aa), rd=h.rd, ra=0, rcode=rcode)
        return DNSRecord(header, questions=list(q.questions[:1]))

    def _answer(self, q: DNSRecord) -> DNSRecord:
        if q.header.opcode != 0:
            return self._reply(q, RCODE.NOTIMP, aa=False)
        if len(q.questions) != 1:
            self._count("malformed")
            r = self._reply(q, RCODE.FORMERR, aa=False)
            r.questions = []
            return r
        question = q.questions[0]
        try:
            name = normalize_fqdn(str(question.qname))
        except MarkerError:
            name = ""  # not a hostname: certainly not one of ours
        if question.qclass not in (CLASS.IN, _CLASS_ANY) or not self.in_zone(name):
            self._count("refused")
            return self._reply(q, RCODE.REFUSED, aa=False)

        qtype = question.qtype
        owner = str(question.qname)  # echo the asker's spelling (0x20)
        r = self._reply(q, RCODE.NOERROR, aa=True)
        answers: list[RR] = []
        exists = True
        if name == self.zone:
            if qtype in (QTYPE.SOA, QTYPE.ANY):
                answers.append(self._soa())
            if qtype in (QTYPE.NS, QTYPE.ANY):
                answers.append(RR(owner, QTYPE.NS, CLASS.IN, self.ttl, NS(self.ns_name + ".")))
                for rr in self._glue():
                    r.add_ar(rr)
        elif name == self.ns_name:
            answers = self._addresses(owner, self.ns_v4, self.ns_v6, qtype)
        else:
            v4, v6 = _split(self.lookup(name), f"registered name {name}")
            exists = bool(v4 or v6)
            answers = self._addresses(owner, v4, v6, qtype)

        if not exists:
            self._count("nxdomain")
            r.header.rcode = RCODE.NXDOMAIN
            r.add_auth(self._soa())
        elif not answers:
            self._count("nodata")
            r.add_auth(self._soa())
        else:
            self._count("answered")
            for rr in answers:
                r.add_answer(rr)
        return r

    def _pack(self, q: DNSRecord, reply: DNSRecord, udp: bool) -> bytes:
        edns = next((rr for rr in q.ar if rr.rtype == QTYPE.OPT), None)
        if edns is not None:
            reply.add_ar(EDNS0(udp_len=_EDNS_SIZE))
        data = bytes(reply.pack())
        if not udp:
            return data
        limit = 512 if edns is None else min(max(512, int(edns.edns_len)), _UDP_CAP)
        if len(data) <= limit:
            return data
        self._count("truncated")
        short = DNSRecord(reply.header, questions=list(reply.questions))
        short.header.tc = 1
        if edns is not None:
            short.add_ar(EDNS0(udp_len=_EDNS_SIZE))
        packed = bytes(short.pack())
        return packed
