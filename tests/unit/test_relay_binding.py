"""BIND / BIND_ACK wire format, per-side keys, and the node's RelayBinder (sans-IO)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntm_proto import messages as m
from ntm_proto import relay_binding as rb
from ntm_proto.errors import (
    DecodeError,
    FieldError,
    LengthError,
    LocalProtocolError,
    UnknownMessageType,
)
from ntm_proto.messages import PathRole
from ntm_proto.packet import PacketType, peek_path_id

PID = bytes.fromhex("0102030405060708")
MASTER = bytes(range(32))
I_KEY = rb.side_key(MASTER, PathRole.INITIATOR)
R_KEY = rb.side_key(MASTER, PathRole.RESPONDER)
RS = ("198.51.100.50", 7500)


def test_layout() -> None:
    data = rb.build_bind(PathRole.RESPONDER, PID, 0x1122334455667788, R_KEY)
    assert len(data) == rb.BIND_SIZE == 36
    assert data[0] == 5 and data[1] == 2 and data[2:4] == b"\0\0"
    assert data[4:12] == PID == peek_path_id(data)
    assert data[12:20] == bytes.fromhex("1122334455667788")
    pkt = rb.parse(data)
    assert (pkt.type, pkt.side, pkt.path_id, pkt.timestamp) == (
        rb.BindingType.BIND,
        PathRole.RESPONDER,
        PID,
        0x1122334455667788,
    )
    assert pkt.verify(R_KEY) and not pkt.verify(I_KEY)
    ack = rb.parse(rb.build_bind_ack(PathRole.RESPONDER, PID, 5, R_KEY))
    assert ack.type is rb.BindingType.BIND_ACK and ack.verify(R_KEY)


def test_types_do_not_collide_with_tunnel_packets() -> None:
    assert {int(t) for t in rb.BindingType} == {5, 6}
    assert not {int(t) for t in rb.BindingType} & {int(t) for t in PacketType}
    assert rb.is_binding_packet(b"\x05") and not rb.is_binding_packet(b"\x03")
    assert not rb.is_binding_packet(b"")


def test_side_keys_differ_and_depend_on_the_master() -> None:
    assert I_KEY != R_KEY and len(I_KEY) == 32
    assert rb.side_key(bytes(32), PathRole.INITIATOR) != I_KEY
    assert len(rb.new_binding_key()) == 32 and rb.new_binding_key() != rb.new_binding_key()
    with pytest.raises(ValueError):
        rb.side_key(b"short", PathRole.INITIATOR)


def test_mac_covers_every_header_byte() -> None:
    data = rb.build_bind(PathRole.INITIATOR, PID, 1000, I_KEY)
    for i in range(rb.HEADER_SIZE):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with contextlib.suppress(DecodeError):
            pkt = rb.parse(bytes(tampered))
            assert not pkt.verify(I_KEY), f"byte {i}"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", LengthError),
        (rb.build_bind(PathRole.INITIATOR, PID, 1, I_KEY) + b"x", LengthError),
        (b"\x07" + rb.build_bind(PathRole.INITIATOR, PID, 1, I_KEY)[1:], UnknownMessageType),
        (b"\x05\x03" + rb.build_bind(PathRole.INITIATOR, PID, 1, I_KEY)[2:], FieldError),
        (b"\x05\x01\x00\x01" + rb.build_bind(PathRole.INITIATOR, PID, 1, I_KEY)[4:], FieldError),
    ],
)
def test_parse_rejects(data: bytes, error: type[DecodeError]) -> None:
    with pytest.raises(error):
        rb.parse(data)


@given(st.binary(max_size=80))
def test_parse_garbage_raises_only_decode_errors(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        pkt = rb.parse(data)
        assert not pkt.verify(I_KEY)  # random bytes never carry a valid MAC


def test_relay_direction_messages_round_trip() -> None:
    for msg in (
        m.RelayDirection(path_id=PID, binding_key=MASTER, lifetime=3600),
        m.RelayDirectionAck(path_id=PID, active_paths=12, load=250),
    ):
        data = m.encode(msg)
        assert data[1] == msg.TYPE and m.decode(data) == msg
    assert (int(m.MsgType.RELAY_DIRECTION), int(m.MsgType.RELAY_DIRECTION_ACK)) == (7, 8)
    with pytest.raises(LocalProtocolError):
        m.encode(m.RelayDirection(path_id=PID, binding_key=b"short", lifetime=1))
    data = m.encode(m.RelayDirection(path_id=PID, binding_key=MASTER, lifetime=1))
    with pytest.raises(DecodeError):
        m.decode(data[:-1])


# --- RelayBinder -------------------------------------------------------------------------


def ack_for(datagram: bytes, key: bytes = I_KEY) -> bytes:
    pkt = rb.parse(datagram)
    return rb.build_bind_ack(pkt.side, pkt.path_id, pkt.timestamp, key)


def test_binder_binds_retries_and_refreshes() -> None:
    b = rb.RelayBinder(PID, PathRole.INITIATOR, I_KEY, RS, retry=0.5, max_retry=2.0, refresh=20)
    assert b.get_timer() is None and not b.bound
    b.bind(now=0.0, wall_ns=10)
    [(first, to)] = b.datagrams_to_send(0.0)
    assert to == RS and rb.parse(first).verify(I_KEY) and rb.parse(first).timestamp == 10
    # No answer: retries back off 0.5, 1, 2, 2 and every BIND carries a newer timestamp.
    times, stamps, now = [], [10], 0.0
    for _ in range(4):
        now = b.get_timer() or 0.0
        times.append(now)
        b.handle_timer(now, wall_ns=5)  # a clock stepping back must not repeat a timestamp
        [(d, _)] = b.datagrams_to_send(now)
        stamps.append(rb.parse(d).timestamp)
    assert times == [0.5, 1.5, 3.5, 5.5]
    assert stamps == sorted(set(stamps))
    # An ACK for any BIND of this round counts (a late ACK of an earlier retry too).
    assert b.receive_ack(ack_for(first), RS, now)
    assert b.bound and b.acked_at == now and b.get_timer() == now + 20
    # Refresh: a new BIND; the binding stays reported as held meanwhile.
    b.handle_timer(now + 20, wall_ns=10**12)
    [(refresh, _)] = b.datagrams_to_send(now + 20)
    assert rb.parse(refresh).timestamp == 10**12 and b.bound
    assert b.receive_ack(ack_for(refresh), RS, now + 20.1)
    assert b.counters["acks"] == 2 and b.counters["binds_sent"] == 6


def test_binder_reports_loss_after_unanswered_refreshes() -> None:
    b = rb.RelayBinder(PID, PathRole.INITIATOR, I_KEY, RS, retry=1, max_retry=1, refresh=5)
    b.bind(0.0, 1)
    [(d, _)] = b.datagrams_to_send(0.0)
    b.receive_ack(ack_for(d), RS, 0.0)
    now = 0.0
    while b.bound:
        now = b.get_timer() or 0.0
        b.handle_timer(now, 2)
        assert now < 60
    assert b.counters["lost"] == 1 and b.get_timer() is not None  # keeps trying


def test_binder_refuses_bad_acks() -> None:
    b = rb.RelayBinder(PID, PathRole.INITIATOR, I_KEY, RS)
    b.bind(0.0, 100)
    [(d, _)] = b.datagrams_to_send(0.0)
    pkt = rb.parse(d)
    bad = [
        b"\x06garbage",
        rb.build_bind_ack(PathRole.INITIATOR, PID, pkt.timestamp, R_KEY),  # wrong key
        rb.build_bind_ack(PathRole.RESPONDER, PID, pkt.timestamp, I_KEY),  # wrong side
        rb.build_bind_ack(PathRole.INITIATOR, b"x" * 8, pkt.timestamp, I_KEY),  # wrong path
        rb.build_bind_ack(PathRole.INITIATOR, PID, pkt.timestamp + 1, I_KEY),  # never sent
        rb.build_bind(PathRole.INITIATOR, PID, pkt.timestamp, I_KEY),  # a BIND, not an ACK
    ]
    for data in bad:
        assert not b.receive_ack(data, RS, 0.1)
    assert not b.bound and b.counters["drop_ack"] == len(bad)
    # After an address change (bind() again) an ACK of the old round proves nothing.
    b.bind(1.0, 200)
    [(d2, _)] = b.datagrams_to_send(1.0)
    assert not b.receive_ack(ack_for(d), RS, 1.1)
    assert b.receive_ack(ack_for(d2), RS, 1.1) and b.bound


def test_binder_checks_arguments() -> None:
    with pytest.raises(ValueError):
        rb.RelayBinder(b"short", PathRole.INITIATOR, I_KEY, RS)
    with pytest.raises(ValueError):
        rb.RelayBinder(PID, PathRole.INITIATOR, b"k", RS)
    with pytest.raises(ValueError):
        rb.RelayBinder(PID, PathRole.INITIATOR, I_KEY, RS, refresh=0)
    b = rb.RelayBinder(PID, PathRole.INITIATOR, I_KEY, RS)
    b.set_relay(("2001:db8:100::50", 7500), 0.0, 1)
    assert b.datagrams_to_send(0.0)[0][1] == ("2001:db8:100::50", 7500)
    b.close()
    assert b.get_timer() is None and b.datagrams_to_send(0.0) == []
