"""The message codec: round trips, strict decoding, and garbage never escapes as a crash."""

from __future__ import annotations

import contextlib
import dataclasses
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntm_proto import messages as m
from ntm_proto.errors import DecodeError, LocalProtocolError

KEY = bytes(range(32))

SAMPLES: list[m.Message] = [
    m.RegistrationRequest(
        fqdn="mn1.ntm.example.com",
        static_key=KEY,
        tunnel_port=7400,
        endpoints=(("10.10.1.100", 7400), ("2001:db8:b::100", 7400)),
    ),
    m.RegistrationResponse(
        vip="100.64.3.4",
        vip_prefix_len=10,
        vip_network="100.64.0.0",
        seen=("198.51.100.2", 40123),
        behind_nat=True,
        lifetime=300,
    ),
    m.DirectionRequest(source="mn1.ntm.example.com", target="cn2.ntm.example.com"),
    m.RouteDirection(
        path_id=b"\x01" * 8,
        kind=m.RouteKind.DIRECT,
        role=m.PathRole.INITIATOR,
        peer_fqdn="cn2.ntm.example.com",
        peer_vip="100.64.0.9",
        peer_key=KEY,
        peer_endpoints=(("198.51.100.30", 7400),),
        relay=None,
        lifetime=3600,
        relay_key=bytes(32),
    ),
    m.RegistrationRequest(
        fqdn="www.ntm.example.com",
        static_key=KEY,
        tunnel_port=7400,
        endpoints=(("198.51.100.60", 7400),),
        gateway="ntma1.ntm.example.com",
        weight=0,
        ordinary_clients=False,
    ),
    m.DirectionRequest(
        source="mn1.ntm.example.com",
        target="www.ntm.example.com",
        gateway="ntma2.ntm.example.com",
    ),
    m.RouteDirection(
        path_id=b"\x03" * 8,
        kind=m.RouteKind.DIRECT,
        role=m.PathRole.INITIATOR,
        peer_fqdn="www.ntm.example.com",
        peer_vip="100.64.0.10",
        peer_key=KEY,
        peer_endpoints=(("198.51.100.60", 7400),),
        relay=None,
        lifetime=3600,
        relay_key=bytes(32),
        gateway="ntma1.ntm.example.com",
        alternatives=("ntma2.ntm.example.com", "ntma3.ntm.example.com"),
    ),
    m.GatewayReport(
        fqdn="www.ntm.example.com",
        gateway="ntma1.ntm.example.com",
        tunnels=3,
        rtt_us=1500,
        jitter_us=200,
        loss_ppm=1_000_000,
    ),
    m.GatewayReportAck(gateway="ntma1.ntm.example.com"),
    m.RouteDirectionAck(path_id=b"\x02" * 8),
    m.ErrorMessage(m.ErrorCode.NOT_AUTHORIZED, "not in your certificate"),
    m.TunnelRequest(timestamp=2**63, initiator_vip="100.64.0.1"),
    m.TunnelResponse(timestamp=1, responder_vip="100.64.0.2"),
    m.Keepalive(),
    m.Probe(seq=7, sent_us=123456),
    m.ProbeAck(seq=7, sent_us=123456),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip(msg: m.Message) -> None:
    data = m.encode(msg)
    assert data[0] == m.VERSION and data[1] == msg.TYPE
    assert struct.unpack("!H", data[2:4])[0] == len(data) - 4
    assert m.decode(data) == msg


def test_wrong_version_is_typed() -> None:
    data = bytearray(m.encode(SAMPLES[2]))
    data[0] = 9
    with pytest.raises(m.DecodeError) as exc:
        m.decode(bytes(data))
    assert exc.value.reason == "bad_version"


def test_unknown_type_is_typed() -> None:
    with pytest.raises(DecodeError) as exc:
        m.decode(bytes([1, 99, 0, 0]))
    assert exc.value.reason == "bad_type"


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_every_truncation_is_rejected(msg: m.Message) -> None:
    data = m.encode(msg)
    for cut in range(len(data)):
        with pytest.raises(DecodeError):
            m.decode(data[:cut])


def test_trailing_bytes_rejected() -> None:
    data = m.encode(SAMPLES[2])
    fixed = data[:2] + struct.pack("!H", len(data) - 4 + 1) + data[4:] + b"x"
    with pytest.raises(DecodeError) as exc:
        m.decode(fixed)
    assert exc.value.reason == "bad_length"


def test_oversized_field_rejected() -> None:
    body = struct.pack("!H", 5000) + b"a" * 10
    with pytest.raises(DecodeError):
        m.decode(bytes([1, m.MsgType.ERROR, 0, 0]) + body)


def test_bad_fqdn_rejected_on_decode() -> None:
    good = m.encode(m.DirectionRequest(source="a.ntm.example.com", target="b.ntm.example.com"))
    bad = good.replace(b"b.ntm", b"B.ntm")
    with pytest.raises(DecodeError) as exc:
        m.decode(bad)
    assert exc.value.reason == "bad_field"


def test_bad_enum_and_family_rejected() -> None:
    rd = bytearray(m.encode(SAMPLES[3]))
    rd[4 + 8] = 77  # kind
    with pytest.raises(DecodeError):
        m.decode(bytes(rd))


def test_encoding_invalid_values_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        m.encode(m.DirectionRequest(source="UPPER.example.com", target="x.ntm.example.com"))
    with pytest.raises(LocalProtocolError):
        m.encode(m.Probe(seq=-1, sent_us=0))
    with pytest.raises(LocalProtocolError):
        m.encode(m.RouteDirectionAck(path_id=b"short"))


def test_decode_as_insists_on_type() -> None:
    with pytest.raises(m.UnexpectedMessage):
        m.decode_as(m.encode(m.Keepalive()), m.Probe)


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        m.decode(data)


@given(st.sampled_from(SAMPLES), st.data())
def test_mutated_messages_decode_or_raise_typed(msg: m.Message, data: st.DataObject) -> None:
    raw = bytearray(m.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        out = m.decode(bytes(raw))
    except DecodeError:
        return
    # Whatever decodes must encode back to the same bytes: no silent normalisation.
    assert m.encode(out) == bytes(raw)


@given(
    st.lists(st.tuples(st.ip_addresses().map(str), st.integers(1, 65535)), max_size=16),
    st.integers(0, 65535),
)
def test_endpoint_lists_round_trip(eps: list[tuple[str, int]], port: int) -> None:
    msg = m.RegistrationRequest("n.ntm.example.com", KEY, port, tuple(eps))
    assert m.decode(m.encode(msg)) == msg


def test_new_fields_default_to_single_gateway_behaviour() -> None:
    req = m.RegistrationRequest("n.ntm.example.com", KEY, 7400, ())
    assert (req.gateway, req.weight, req.ordinary_clients) == ("", 100, True)
    assert m.DirectionRequest("a.ntm.example.com", "b.ntm.example.com").gateway == ""
    rd = SAMPLES[3]
    assert isinstance(rd, m.RouteDirection)
    assert (rd.gateway, rd.alternatives) == ("", ())
    # Defaults are encoded too: the empty gateway is a zero-length text.
    assert m.encode(req).endswith(b"\x00\x00" + struct.pack("!H", 100) + b"\x01")


def test_gateway_fields_are_checked() -> None:
    with pytest.raises(LocalProtocolError):
        m.encode(m.DirectionRequest("a.ntm.example.com", "b.ntm.example.com", gateway="Bad."))
    with pytest.raises(LocalProtocolError):
        m.encode(m.RegistrationRequest("n.ntm.example.com", KEY, 7400, (), weight=70000))
    rd = SAMPLES[3]
    assert isinstance(rd, m.RouteDirection)
    too_many = tuple(f"g{i}.ntm.example.com" for i in range(m.MAX_ALTERNATIVES + 1))
    with pytest.raises(LocalProtocolError):
        m.encode(dataclasses.replace(rd, alternatives=too_many))
    with pytest.raises(LocalProtocolError):
        m.encode(dataclasses.replace(rd, alternatives=("g.ntm.example.com",) * 2))


def test_repeated_alternatives_rejected_on_decode() -> None:
    rd = SAMPLES[3]
    assert isinstance(rd, m.RouteDirection)
    one = m.encode(dataclasses.replace(rd, alternatives=("g.ntm.example.com", "h.ntm.example.com")))
    twice = one.replace(b"h.ntm", b"g.ntm")
    with pytest.raises(DecodeError) as exc:
        m.decode(twice)
    assert exc.value.reason == "bad_field"


def test_loss_above_one_million_ppm_rejected() -> None:
    report = m.GatewayReport("www.ntm.example.com", "g.ntm.example.com", 0, 0, 0, 1_000_000)
    with pytest.raises(LocalProtocolError):
        m.encode(dataclasses.replace(report, loss_ppm=1_000_001))
    raw = m.encode(report)
    bad = raw[:-4] + struct.pack("!I", 1_000_001)
    with pytest.raises(DecodeError) as exc:
        m.decode(bad)
    assert exc.value.reason == "bad_field"
