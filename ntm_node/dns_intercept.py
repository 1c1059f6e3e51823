"""DNS interception for an NTM node, sans-IO (no sockets, no asyncio, no clock).

The node is its host's stub resolver. It forwards each application query unchanged to the
real resolver and inspects the answer:

* If the question name, or a name reached by following the CNAME chain in the answer section
  from the question name, is an NTMobile-marked FQDN (see :mod:`ntm_proto.marker`), and the
  query is ``IN A``, the node asks its DC for directions and answers the application with
  :func:`synthesize_answer`: same id, question and flags, the CNAME chain kept up to the marked
  name, then ``<marked name> A <peer vIP>`` with a short TTL (default 5 s), because the tunnel
  may go away and the application must come back to us soon.
* ``IN AAAA`` for a marked name is answered NOERROR with the CNAME chain and no AAAA record
  (NODATA). vIPs are IPv4 (100.64.0.0/10), so a dual-stack application gets no IPv6 address
  to prefer over the tunnel and falls back to the A answer, i.e. the IPv4 vIP. The NODATA
  answer carries no SOA, so resolvers and libraries do not cache it negatively (RFC 2308).
  The caller only synthesizes this once directions succeeded; when they fail, the resolver's
  own AAAA answer is passed through, so the application still reaches the peer (without
  mobility) even on an IPv6-only access network.
* Every other type for a marked name (MX, TXT, ...), every other class, and every answer whose
  rcode is not NOERROR passes through unchanged: NXDOMAIN for a marked name means the DC does
  not know the node, so there is nothing to direct.
* Names without the mark pass through untouched, byte for byte (the caller returns the
  upstream bytes; nothing here re-encodes them).

Parsing is strict and total: :func:`parse_query` and :func:`parse_response` raise only
:class:`DnsParseError` whatever the bytes (dnslib raises several exception types, and deep
compression pointers can even hit the recursion limit, so everything is wrapped).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from dnslib import CLASS, EDNS0, QTYPE, RCODE, RR, A, DNSHeader, DNSLabel, DNSRecord

from ntm_proto.errors import DecodeError
from ntm_proto.marker import MarkerError, MarkerRule, normalize_fqdn

__all__ = [
    "DEFAULT_SYNTH_TTL",
    "MAX_CHAIN",
    "Chain",
    "DnsParseError",
    "Interception",
    "Matched",
    "RejectReason",
    "Rejected",
    "cname_chain",
    "find_marked_target",
    "formerr_for",
    "match_response",
    "parse_query",
    "parse_response",
    "plan_interception",
    "servfail_for",
    "synthesize_answer",
    "udp_payload_limit",
]

MAX_CHAIN = 16  # CNAME hops we follow; real chains are 1-3, loops must not spin us
DEFAULT_SYNTH_TTL = 5
EDNS_UDP_SIZE = 1232  # what we advertise in answers we build (DNS flag day 2020 value)
_OPCODE_QUERY = 0


class DnsParseError(DecodeError):
    """The bytes are not an acceptable DNS message of the expected kind (query or response).

    A RemoteProtocolError: drop the message and count it (``reason`` is "malformed").
    """


def _parse(data: bytes) -> DNSRecord:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DnsParseError(f"expected bytes, got {type(data).__name__}")
    if len(data) < 12:
        raise DnsParseError(f"{len(data)} bytes is shorter than a DNS header")
    try:
        return DNSRecord.parse(bytes(data))
    except Exception as exc:  # dnslib raises many types; callers need one
        raise DnsParseError(f"not a valid DNS message: {exc}") from None


def parse_query(data: bytes) -> DNSRecord:
    """Parse a client query: QR=0, opcode QUERY, exactly one question."""
    rec = _parse(data)
    if rec.header.qr:
        raise DnsParseError("QR=1: this is a response, not a query")
    if rec.header.opcode != _OPCODE_QUERY:
        raise DnsParseError(f"opcode {rec.header.opcode} is not QUERY")
    if len(rec.questions) != 1:
        raise DnsParseError(f"{len(rec.questions)} questions; a query has exactly one")
    return rec


def parse_response(data: bytes) -> DNSRecord:
    """Parse an upstream response: QR=1, exactly one question."""
    rec = _parse(data)
    if not rec.header.qr:
        raise DnsParseError("QR=0: this is a query, not a response")
    if len(rec.questions) != 1:
        raise DnsParseError(f"{len(rec.questions)} questions; expected the query's one")
    return rec


class RejectReason(enum.Enum):
    MALFORMED = "malformed"
    WRONG_ID = "wrong id"
    WRONG_QUESTION = "wrong question"


@dataclass(frozen=True, slots=True)
class Matched:
    """The response answers the outstanding query.

    ``complete`` is False when only the header and question could be parsed (dnslib rejected a
    record further on, e.g. an exotic rdata): the bytes are still the upstream's answer and are
    passed through unchanged, but nothing in them may be intercepted.
    """

    response: DNSRecord
    complete: bool = True


@dataclass(frozen=True, slots=True)
class Rejected:
    """The response must be ignored (and counted); waiting for the right one may continue."""

    reason: RejectReason
    detail: str


def _same_question(a: DNSRecord, b: DNSRecord) -> bool:
    qa, qb = a.questions[0], b.questions[0]
    # DNSLabel equality is case-insensitive, which is right for DNS names.
    return bool(qa.qname == qb.qname and qa.qtype == qb.qtype and qa.qclass == qb.qclass)


def match_response(query: DNSRecord | bytes, response: bytes) -> Matched | Rejected:
    """Check that ``response`` answers ``query``: same id AND same question name/type/class."""
    q = query if isinstance(query, DNSRecord) else parse_query(query)
    complete = True
    try:
        r = parse_response(response)
    except DnsParseError as exc:
        try:
            r = parse_response(_header_and_question(response))
        except DnsParseError:
            return Rejected(RejectReason.MALFORMED, str(exc))
        complete = False
    if r.header.id != q.header.id:
        return Rejected(RejectReason.WRONG_ID, f"id {r.header.id} != {q.header.id}")
    if not _same_question(q, r):
        return Rejected(
            RejectReason.WRONG_QUESTION, f"question {r.questions[0]!r} != {q.questions[0]!r}"
        )
    return Matched(r, complete)


def _header_and_question(data: bytes) -> bytes:
    # The same message with the record counts zeroed: dnslib then stops after the question.
    if len(data) < 12:
        return data
    return bytes(data[:6]) + b"\x00" * 6 + bytes(data[12:])


def _label_text(label: DNSLabel) -> str:
    return str(label).rstrip(".")


@dataclass(frozen=True, slots=True)
class Chain:
    """The CNAME chain from the question name through the answer section.

    ``names[0]`` is the question name; ``records[i]`` is the CNAME from ``names[i]`` to
    ``names[i + 1]``. ``broken`` is set when a loop or more than MAX_CHAIN hops cut it short.
    """

    names: tuple[str, ...]
    records: tuple[RR, ...]
    broken: bool


def cname_chain(response: DNSRecord | bytes) -> Chain:
    """Follow CNAMEs (class IN) from the question name through the answer section."""
    r = response if isinstance(response, DNSRecord) else parse_response(response)
    current: DNSLabel = r.questions[0].qname
    names = [_label_text(current)]
    records: list[RR] = []
    seen = {current}
    while True:
        nxt = next(
            (
                rr
                for rr in r.rr
                if rr.rtype == QTYPE.CNAME and rr.rclass == CLASS.IN and rr.rname == current
            ),
            None,
        )
        if nxt is None:
            return Chain(tuple(names), tuple(records), broken=False)
        target: DNSLabel = nxt.rdata.label
        if target in seen or len(records) >= MAX_CHAIN:
            return Chain(tuple(names), tuple(records), broken=True)
        records.append(nxt)
        names.append(_label_text(target))
        seen.add(target)
        current = target


def _marked(marker: MarkerRule, name: str) -> bool:
    try:
        return marker.is_marked(name)
    except MarkerError:
        return False  # not a valid hostname: certainly not one of ours


def find_marked_target(response: DNSRecord | bytes, marker: MarkerRule | None = None) -> str | None:
    """The first marked FQDN on the CNAME chain (the question name itself counts), normalised.

    None when no name on the chain is marked, including when a loop or an overlong chain
    cut the chain short before a marked name.
    """
    rule = marker or MarkerRule()
    for name in cname_chain(response).names:
        if _marked(rule, name):
            return normalize_fqdn(name)
    return None


@dataclass(frozen=True, slots=True)
class Interception:
    """The node should ask for directions to ``target`` and synthesize a ``qtype`` answer."""

    target: str
    qtype: int  # QTYPE.A or QTYPE.AAAA


def plan_interception(
    query: DNSRecord, response: DNSRecord, marker: MarkerRule
) -> Interception | None:
    """Decide whether the answer to ``query`` is intercepted; None means pass through."""
    q = query.questions[0]
    if q.qclass != CLASS.IN or q.qtype not in (QTYPE.A, QTYPE.AAAA):
        return None
    if response.header.rcode != RCODE.NOERROR:
        return None
    target = find_marked_target(response, marker)
    if target is None:
        return None
    return Interception(target, int(q.qtype))


def _has_edns(rec: DNSRecord) -> bool:
    return any(rr.rtype == QTYPE.OPT for rr in rec.ar)


def udp_payload_limit(query: DNSRecord) -> int:
    """Largest UDP answer the client accepts: 512, or its EDNS size (never below 512)."""
    for rr in query.ar:
        if rr.rtype == QTYPE.OPT:
            return max(512, int(rr.edns_len))
    return 512


def _reply_header(q: DNSRecord, *, ra: int, rcode: int) -> DNSHeader:
    h = q.header
    # AD is never set: what we synthesize was not validated by anyone.
    return DNSHeader(
        id=h.id, qr=1, opcode=h.opcode, aa=0, tc=0, rd=h.rd, ra=ra, ad=0, cd=h.cd, rcode=rcode
    )


def _finish(reply: DNSRecord, query: DNSRecord, max_size: int | None) -> bytes:
    if _has_edns(query):
        reply.add_ar(EDNS0(udp_len=EDNS_UDP_SIZE))
    data = bytes(reply.pack())
    if max_size is not None and len(data) > max_size:
        # Too big for the client's UDP limit: header + question with TC, it retries over TCP.
        short = DNSRecord(reply.header, questions=list(query.questions))
        short.header.tc = 1
        if _has_edns(query):
            short.add_ar(EDNS0(udp_len=EDNS_UDP_SIZE))
        data = bytes(short.pack())
    return data


def synthesize_answer(
    query: DNSRecord | bytes,
    upstream_response: DNSRecord | bytes,
    target_fqdn: str,
    vip: str,
    ttl: int = DEFAULT_SYNTH_TTL,
    *,
    max_size: int | None = None,
) -> bytes:
    """The application's answer for a marked name (see the module docstring).

    A query: CNAME chain up to ``target_fqdn`` + ``target A vip`` (TTL ``ttl``).
    AAAA query: CNAME chain only (NODATA). Any other type raises ValueError (pass those
    through instead), as does a ``vip`` that is not IPv4 or a target not on the chain.
    With ``max_size`` (the client's UDP limit) an oversized answer becomes TC=1.
    """
    q = query if isinstance(query, DNSRecord) else parse_query(query)
    r = (
        upstream_response
        if isinstance(upstream_response, DNSRecord)
        else parse_response(upstream_response)
    )
    qtype = q.questions[0].qtype
    if qtype not in (QTYPE.A, QTYPE.AAAA):
        raise ValueError(f"only A and AAAA answers are synthesized, not {QTYPE.get(qtype)}")
    try:
        addr = ipaddress.IPv4Address(vip)
    except ValueError:
        raise ValueError(f"vIP {vip!r} is not an IPv4 address") from None
    want = normalize_fqdn(target_fqdn)
    chain = cname_chain(r)
    keep: list[RR] = []
    owner: str | None = None
    for i, name in enumerate(chain.names):
        if _norm_or_none(name) == want:
            owner = name
            break
        if i < len(chain.records):
            keep.append(chain.records[i])
    if owner is None:
        raise ValueError(f"{target_fqdn} is not on the CNAME chain of the response")

    fast = _pack_answer(q, r.header.ra, keep, addr.packed if qtype == QTYPE.A else None, ttl)
    if max_size is None or len(fast) <= max_size:
        return fast
    # Too big uncompressed: dnslib compresses names, and sets TC if even that does not fit.
    reply = DNSRecord(
        _reply_header(q, ra=r.header.ra, rcode=RCODE.NOERROR), questions=list(q.questions)
    )
    for rr in keep:
        reply.add_answer(RR(rr.rname, QTYPE.CNAME, CLASS.IN, rr.ttl, rr.rdata))
    if qtype == QTYPE.A:
        reply.add_answer(RR(owner + ".", QTYPE.A, CLASS.IN, ttl, A(str(addr))))
    return _finish(reply, q, max_size)


def _wire_name(label: DNSLabel) -> bytes:
    return b"".join(bytes((len(part),)) + part for part in label.label) + b"\x00"


def _pack_answer(q: DNSRecord, ra: int, chain: list[RR], vip: bytes | None, ttl: int) -> bytes:
    """The synthesized answer packed by hand, names uncompressed: dnslib's record objects
    and packer cost ~0.4 ms here, on the way from the tunnel being up to the answer."""
    h = q.header
    question = q.questions[0]
    flags = 0x8000 | (h.opcode << 11) | (h.rd << 8) | (ra << 7) | (h.cd << 4)  # rcode 0
    edns = _has_edns(q)
    out = [
        struct.pack("!6H", h.id, flags, 1, len(chain) + (vip is not None), 0, int(edns)),
        _wire_name(question.qname),
        struct.pack("!HH", question.qtype, question.qclass),
    ]
    for rr in chain:
        target = _wire_name(rr.rdata.label)
        out += (
            _wire_name(rr.rname),
            struct.pack("!HHIH", QTYPE.CNAME, CLASS.IN, rr.ttl, len(target)),
            target,
        )
    if vip is not None:
        owner = chain[-1].rdata.label if chain else question.qname
        out += (_wire_name(owner), struct.pack("!HHIH", QTYPE.A, CLASS.IN, ttl, 4), vip)
    if edns:  # OPT: root name, class = our UDP size, TTL 0 (no extended rcode, no DO)
        out.append(struct.pack("!BHHIH", 0, QTYPE.OPT, EDNS_UDP_SIZE, 0, 0))
    return b"".join(out)


def _norm_or_none(name: str) -> str | None:
    try:
        return normalize_fqdn(name)
    except MarkerError:
        return None


def servfail_for(query: DNSRecord | bytes) -> bytes:
    """SERVFAIL echoing the query's id and question (raises DnsParseError if unparseable)."""
    q = query if isinstance(query, DNSRecord) else parse_query(query)
    reply = DNSRecord(_reply_header(q, ra=1, rcode=RCODE.SERVFAIL), questions=list(q.questions))
    return _finish(reply, q, None)


def formerr_for(data: bytes) -> bytes | None:
    """An error reply for a query that failed :func:`parse_query`, or None to drop it silently.

    Needs at least a 12-byte header with QR=0 (we never answer responses: no reflection loops).
    Opcode other than QUERY gets NOTIMP, anything else FORMERR; no question is echoed.
    """
    if len(data) < 12:
        return None
    ident, flags = struct.unpack("!HH", data[:4])
    if flags & 0x8000:
        return None
    opcode = (flags >> 11) & 0xF
    rcode = RCODE.FORMERR if opcode == _OPCODE_QUERY else RCODE.NOTIMP
    out_flags = 0x8000 | (opcode << 11) | (flags & 0x0100) | 0x0080 | rcode  # QR, RD echo, RA
    return struct.pack("!HHHHHH", ident, out_flags, 0, 0, 0, 0)
