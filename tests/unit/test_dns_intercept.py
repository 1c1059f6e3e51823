"""ntm_node.dns_intercept: sans-IO parsing, matching, chain following, synthesized answers."""

from __future__ import annotations

import contextlib
import struct

import pytest
from dnslib import AAAA, CNAME, EDNS0, QTYPE, RCODE, RR, A, DNSHeader, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from ntm_node.dns_intercept import (
    MAX_CHAIN,
    DnsParseError,
    Interception,
    Matched,
    Rejected,
    RejectReason,
    cname_chain,
    find_marked_target,
    formerr_for,
    match_response,
    parse_query,
    parse_response,
    plan_interception,
    servfail_for,
    synthesize_answer,
    udp_payload_limit,
)
from ntm_proto.errors import RemoteProtocolError
from ntm_proto.marker import MarkerRule

RULE = MarkerRule()


def query(
    name: str = "www.example.com", qtype: str = "A", ident: int = 4242, edns: bool = False
) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    q.header.id = ident
    if edns:
        q.add_ar(EDNS0(udp_len=4096))
    return q


def response(q: DNSRecord, *records: RR, rcode: int = RCODE.NOERROR) -> DNSRecord:
    r = q.reply()
    r.header.aa = 0
    r.header.rcode = rcode
    for rr in records:
        r.add_answer(rr)
    return r


def cname(owner: str, target: str, ttl: int = 300) -> RR:
    return RR(owner, QTYPE.CNAME, ttl=ttl, rdata=CNAME(target))


def a(owner: str, addr: str, ttl: int = 300) -> RR:
    return RR(owner, QTYPE.A, ttl=ttl, rdata=A(addr))


def aaaa(owner: str, addr: str, ttl: int = 300) -> RR:
    return RR(owner, QTYPE.AAAA, ttl=ttl, rdata=AAAA(addr))


def marked_response(qtype: str = "A", ident: int = 4242) -> tuple[DNSRecord, DNSRecord]:
    q = query(qtype=qtype, ident=ident)
    extra = (
        a("cn2.ntm.example.com", "198.51.100.30")
        if qtype == "A"
        else aaaa("cn2.ntm.example.com", "2001:db8:100::30")
    )
    return q, response(q, cname("www.example.com", "cn2.ntm.example.com"), extra)


# ---- parsing -----------------------------------------------------------------------------


def test_parse_query_accepts_query_and_rejects_response() -> None:
    q = query()
    assert parse_query(bytes(q.pack())).header.id == 4242
    with pytest.raises(DnsParseError):
        parse_query(bytes(response(q).pack()))
    with pytest.raises(DnsParseError):
        parse_response(bytes(q.pack()))


def test_parse_rejects_short_and_junk() -> None:
    for junk in (b"", b"\x00" * 11, b"\xff" * 40):
        with pytest.raises(DnsParseError):
            parse_query(junk)
        with pytest.raises(DnsParseError):
            parse_response(junk)


def test_parse_error_is_a_remote_protocol_error() -> None:
    assert issubclass(DnsParseError, RemoteProtocolError)
    with pytest.raises(DnsParseError) as info:
        parse_query(b"\x01")
    assert info.value.reason == "malformed"


def test_query_must_have_one_question_and_opcode_query() -> None:
    q = query()
    q.questions.append(q.questions[0])
    with pytest.raises(DnsParseError):
        parse_query(bytes(q.pack()))
    q = query()
    q.header.opcode = 4  # NOTIFY
    with pytest.raises(DnsParseError):
        parse_query(bytes(q.pack()))


# ---- matching ----------------------------------------------------------------------------


def test_match_ok_and_case_insensitive() -> None:
    q = query("WwW.ExAmPlE.cOm")
    r = response(query("www.example.com"), a("www.example.com", "192.0.2.1"))
    m = match_response(q, bytes(r.pack()))
    assert isinstance(m, Matched) and m.complete


def test_match_rejects_wrong_id() -> None:
    q = query()
    r = response(query(ident=1))
    m = match_response(q, bytes(r.pack()))
    assert isinstance(m, Rejected) and m.reason is RejectReason.WRONG_ID


@pytest.mark.parametrize(
    "other", [query("evil.example.com"), query(qtype="AAAA"), query(qtype="A")]
)
def test_match_rejects_wrong_question(other: DNSRecord) -> None:
    if other.q.qtype == QTYPE.A and str(other.q.qname) == "www.example.com.":
        other.questions[0].qclass = 3  # CHAOS: same name and type, wrong class
    m = match_response(query(), bytes(response(other).pack()))
    assert isinstance(m, Rejected) and m.reason is RejectReason.WRONG_QUESTION


def test_match_rejects_junk_and_queries() -> None:
    q = query()
    for bad in (b"junk", bytes(q.pack())):
        m = match_response(q, bad)
        assert isinstance(m, Rejected) and m.reason is RejectReason.MALFORMED


def test_match_with_unparseable_records_is_incomplete() -> None:
    q = query()
    good = bytes(response(q, a("www.example.com", "192.0.2.1")).pack())
    broken = good[:-3]  # the A record's rdata is cut short
    m = match_response(q, broken)
    assert isinstance(m, Matched) and not m.complete


# ---- chains ------------------------------------------------------------------------------


def test_find_marked_target_follows_chain() -> None:
    q = query()
    r = response(
        q,
        cname("www.example.com", "alias.example.net"),
        cname("alias.example.net", "CN2.ntm.example.com"),
        a("cn2.ntm.example.com", "198.51.100.30"),
    )
    assert find_marked_target(r) == "cn2.ntm.example.com"
    assert find_marked_target(bytes(r.pack()), RULE) == "cn2.ntm.example.com"
    chain = cname_chain(r)
    assert chain.names == ("www.example.com", "alias.example.net", "CN2.ntm.example.com")
    assert not chain.broken


def test_question_name_itself_marked() -> None:
    q = query("cn2.ntm.example.com")
    r = response(q, a("cn2.ntm.example.com", "198.51.100.30"))
    assert find_marked_target(r) == "cn2.ntm.example.com"


def test_unmarked_and_apex() -> None:
    q = query()
    assert find_marked_target(response(q, a("www.example.com", "192.0.2.1"))) is None
    q = query("ntm.example.com")
    assert find_marked_target(response(q)) is None


def test_first_marked_name_wins() -> None:
    q = query()
    r = response(
        q,
        cname("www.example.com", "a.ntm.example.com"),
        cname("a.ntm.example.com", "b.ntm.example.org"),
    )
    assert find_marked_target(r) == "a.ntm.example.com"


def test_unrelated_cname_is_not_followed() -> None:
    q = query()
    r = response(
        q, cname("other.example.com", "cn2.ntm.example.com"), a("www.example.com", "192.0.2.1")
    )
    assert find_marked_target(r) is None


def test_loop_is_guarded() -> None:
    q = query()
    r = response(
        q, cname("www.example.com", "b.example.com"), cname("b.example.com", "www.example.com")
    )
    chain = cname_chain(r)
    assert chain.broken
    assert find_marked_target(r) is None


def test_overlong_chain_is_guarded() -> None:
    q = query("n0.example.com")
    recs = [cname(f"n{i}.example.com", f"n{i + 1}.example.com") for i in range(MAX_CHAIN + 5)]
    recs.append(cname(f"n{MAX_CHAIN + 5}.example.com", "cn2.ntm.example.com"))
    r = response(q, *recs)
    assert cname_chain(r).broken
    assert find_marked_target(r) is None


def test_plan_interception() -> None:
    q, r = marked_response("A")
    assert plan_interception(q, r, RULE) == Interception("cn2.ntm.example.com", QTYPE.A)
    q, r = marked_response("AAAA")
    assert plan_interception(q, r, RULE) == Interception("cn2.ntm.example.com", QTYPE.AAAA)
    q = query(qtype="MX")
    assert (
        plan_interception(q, response(q, cname("www.example.com", "cn2.ntm.example.com")), RULE)
        is None
    )
    q = query()
    nx = response(q, cname("www.example.com", "cn2.ntm.example.com"), rcode=RCODE.NXDOMAIN)
    assert plan_interception(q, nx, RULE) is None


# ---- synthesized answers -----------------------------------------------------------------


def test_synthesize_a() -> None:
    q, r = marked_response("A")
    q.header.cd = 1
    out = DNSRecord.parse(
        synthesize_answer(bytes(q.pack()), bytes(r.pack()), "cn2.ntm.example.com", "100.64.0.7")
    )
    assert out.header.id == q.header.id and out.header.qr == 1
    assert out.header.rd == 1 and out.header.cd == 1 and out.header.ad == 0
    assert out.header.rcode == RCODE.NOERROR
    assert out.questions == q.questions
    assert [(QTYPE[rr.rtype], str(rr.rname), str(rr.rdata), rr.ttl) for rr in out.rr] == [
        ("CNAME", "www.example.com.", "cn2.ntm.example.com.", 300),
        ("A", "cn2.ntm.example.com.", "100.64.0.7", 5),
    ]


def test_synthesize_aaaa_is_nodata_with_chain() -> None:
    q, r = marked_response("AAAA")
    out = DNSRecord.parse(synthesize_answer(q, r, "cn2.ntm.example.com", "100.64.0.7"))
    assert out.header.rcode == RCODE.NOERROR
    assert [QTYPE[rr.rtype] for rr in out.rr] == ["CNAME"]
    assert not out.auth  # no SOA: nobody caches the NODATA


def test_synthesize_keeps_chain_only_up_to_marked_name() -> None:
    q = query()
    r = response(
        q,
        cname("www.example.com", "cn2.ntm.example.com"),
        cname("cn2.ntm.example.com", "elsewhere.example.org"),
        a("elsewhere.example.org", "192.0.2.9"),
    )
    out = DNSRecord.parse(synthesize_answer(q, r, "cn2.ntm.example.com", "100.64.0.7", ttl=2))
    assert [(QTYPE[rr.rtype], str(rr.rdata)) for rr in out.rr] == [
        ("CNAME", "cn2.ntm.example.com."),
        ("A", "100.64.0.7"),
    ]
    assert out.rr[1].ttl == 2


def test_synthesize_echoes_edns() -> None:
    q = query("cn2.ntm.example.com", edns=True)
    out = DNSRecord.parse(synthesize_answer(q, response(q), "cn2.ntm.example.com", "100.64.0.1"))
    assert any(rr.rtype == QTYPE.OPT for rr in out.ar)
    plain = query("cn2.ntm.example.com")
    out = DNSRecord.parse(
        synthesize_answer(plain, response(plain), "cn2.ntm.example.com", "100.64.0.1")
    )
    assert not out.ar
    assert udp_payload_limit(q) == 4096 and udp_payload_limit(plain) == 512


@pytest.mark.parametrize("qtype", ["A", "AAAA"])
@pytest.mark.parametrize("edns", [False, True])
@pytest.mark.parametrize("hops", [0, 1, 3])
def test_synthesized_bytes_say_what_dnslib_would_build(qtype: str, edns: bool, hops: int) -> None:
    # The answer is packed by hand (names uncompressed); it must say what dnslib's would.
    target = "cn2.ntm.example.com"
    names = [f"N{i}.Example.com" for i in range(hops)] + [target]
    q = query(names[0], qtype=qtype, edns=edns)
    q.header.cd = 1
    chain = [cname(names[i], names[i + 1], ttl=60 + i) for i in range(hops)]
    r = response(q, *chain, a(target, "198.51.100.30"))
    out = synthesize_answer(q, r, target, "100.64.0.9", ttl=5, max_size=4096)
    expected = DNSRecord(
        DNSHeader(id=q.header.id, qr=1, rd=1, ra=r.header.ra, cd=1), questions=list(q.questions)
    )
    for rr in chain:
        expected.add_answer(rr)
    if qtype == "A":
        expected.add_answer(a(target, "100.64.0.9", ttl=5))
    if edns:
        expected.add_ar(EDNS0(udp_len=1232))
    assert str(DNSRecord.parse(out)) == str(DNSRecord.parse(bytes(expected.pack())))


def test_synthesize_truncates_to_max_size() -> None:
    q = query("n0.example.com")
    recs = [cname(f"n{i}.example.com", f"n{i + 1}.example.com") for i in range(12)]
    recs.append(cname("n12.example.com", "a-rather-long-node-name.ntm.example.com"))
    r = response(q, *recs)
    big = synthesize_answer(q, r, "a-rather-long-node-name.ntm.example.com", "100.64.0.1")
    small = synthesize_answer(
        q, r, "a-rather-long-node-name.ntm.example.com", "100.64.0.1", max_size=100
    )
    assert len(big) > 100 >= len(small)
    s = DNSRecord.parse(small)
    assert s.header.tc == 1 and s.questions == q.questions and not s.rr


@pytest.mark.parametrize(
    ("qtype", "target", "vip"),
    [
        ("MX", "cn2.ntm.example.com", "100.64.0.1"),
        ("A", "other.ntm.example.com", "100.64.0.1"),
        ("A", "cn2.ntm.example.com", "2001:db8::1"),
        ("A", "cn2.ntm.example.com", "not-an-ip"),
    ],
)
def test_synthesize_misuse_raises_value_error(qtype: str, target: str, vip: str) -> None:
    q = query(qtype=qtype)
    r = response(q, cname("www.example.com", "cn2.ntm.example.com"))
    with pytest.raises(ValueError):
        synthesize_answer(q, r, target, vip)


def test_servfail_and_formerr() -> None:
    q = query(edns=True)
    sf = DNSRecord.parse(servfail_for(bytes(q.pack())))
    assert sf.header.id == 4242 and sf.header.rcode == RCODE.SERVFAIL
    assert sf.questions == q.questions
    with pytest.raises(DnsParseError):
        servfail_for(b"junk")

    header_only = struct.pack("!HHHHHH", 77, 0x0100, 0, 0, 0, 0)
    fe = formerr_for(header_only)
    assert fe is not None
    rec = DNSRecord.parse(fe)
    assert rec.header.id == 77 and rec.header.rcode == RCODE.FORMERR and rec.header.qr == 1
    notify = struct.pack("!HHHHHH", 78, 4 << 11, 0, 0, 0, 0)
    fe = formerr_for(notify)
    assert fe is not None and DNSRecord.parse(fe).header.rcode == RCODE.NOTIMP
    assert formerr_for(b"short") is None
    assert formerr_for(struct.pack("!HHHHHH", 1, 0x8000, 0, 0, 0, 0)) is None  # a response


# ---- properties --------------------------------------------------------------------------


@settings(max_examples=400)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_the_typed_error(data: bytes) -> None:
    q = query()
    for parse in (parse_query, parse_response, find_marked_target, cname_chain):
        with contextlib.suppress(DnsParseError):
            parse(data)
    assert isinstance(match_response(q, data), Matched | Rejected)
    fe = formerr_for(data)
    assert fe is None or len(fe) == 12


def _valid_response_bytes() -> bytes:
    _q, r = marked_response("A")
    r.add_ar(EDNS0(udp_len=1232))
    return bytes(r.pack())


@settings(max_examples=600)
@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 120),
)
def test_mutated_responses_raise_only_the_typed_error(
    flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(_valid_response_bytes())
    for pos, val in flips:
        data[pos % len(data)] = val
    mutated = bytes(data[: len(data) - cut]) if cut < len(data) else bytes(data)
    q, _ = marked_response("A")
    verdict = match_response(q, mutated)
    assert isinstance(verdict, Matched | Rejected)
    try:
        target = find_marked_target(mutated, RULE)
    except DnsParseError:
        return
    if isinstance(verdict, Matched) and verdict.complete and target is not None:
        plan = plan_interception(q, verdict.response, RULE)
        if plan is not None:
            out = DNSRecord.parse(synthesize_answer(q, verdict.response, plan.target, "100.64.1.2"))
            assert out.header.id == q.header.id and out.questions == q.questions


_label = st.from_regex(r"[a-z0-9-]{1,15}", fullmatch=True)


@given(
    ident=st.integers(0, 65535),
    owner=st.lists(_label, min_size=1, max_size=4),
    hops=st.lists(st.lists(_label, min_size=1, max_size=3), max_size=4),
    node=_label,
    vip=st.integers(0, 2**22 - 1),
    qtype=st.sampled_from(["A", "AAAA"]),
    edns=st.booleans(),
)
def test_synthesized_answers_parse_and_keep_id_and_question(
    ident: int,
    owner: list[str],
    hops: list[list[str]],
    node: str,
    vip: int,
    qtype: str,
    edns: bool,
) -> None:
    qname = ".".join([*owner, "example"])
    names = [qname] + [".".join([*h, "example", "net"]) for h in hops]
    target = f"{node}.ntm.example.com"
    q = query(qname, qtype, ident, edns)
    recs = [cname(x, y) for x, y in zip(names, [*names[1:], target], strict=True)]
    r = response(q, *recs)
    vip_text = f"100.{64 + (vip >> 16)}.{(vip >> 8) & 255}.{vip & 255}"
    found = find_marked_target(r)
    if found is None:  # a random owner may loop back on itself; nothing to synthesize
        assert cname_chain(r).broken
        return
    out = DNSRecord.parse(synthesize_answer(bytes(q.pack()), bytes(r.pack()), found, vip_text))
    assert out.header.id == ident
    assert out.questions == q.questions
    addrs = [str(rr.rdata) for rr in out.rr if rr.rtype == QTYPE.A]
    assert addrs == ([vip_text] if qtype == "A" else [])
    assert not any(rr.rtype == QTYPE.AAAA for rr in out.rr)
