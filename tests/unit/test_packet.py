"""Tunnel packet framing: layout, strict parsing, MTU arithmetic."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntm_proto.errors import FieldError, LengthError, RemoteProtocolError, UnknownMessageType
from ntm_proto.packet import (
    HANDSHAKE_SIZE,
    HEADER_SIZE,
    PREFIX_SIZE,
    TUNNEL_OVERHEAD,
    HandshakePacket,
    PacketType,
    TransportPacket,
    build_prefix,
    parse,
    peek_path_id,
    recommended_mtu,
)

PID = bytes.fromhex("0102030405060708")


def test_constants() -> None:
    assert PREFIX_SIZE == 12
    assert HEADER_SIZE == 20
    assert TUNNEL_OVERHEAD == 36
    assert HANDSHAKE_SIZE == 108


def test_recommended_mtu() -> None:
    assert recommended_mtu() == 1500 - 40 - 8 - 36 == 1416
    assert recommended_mtu(1500, ipv6=False) == 1436
    assert recommended_mtu(1280 + 84) == 1280
    with pytest.raises(ValueError):
        recommended_mtu(600)


def test_prefix_layout() -> None:
    prefix = build_prefix(PacketType.DATA, 257, PID)
    assert prefix == b"\x03\x01\x00\x00" + PID  # epoch travels mod 256
    with pytest.raises(ValueError):
        build_prefix(PacketType.DATA, 0, b"short")


def test_parse_transport() -> None:
    data = build_prefix(PacketType.CONTROL, 2, PID) + struct.pack("!Q", 99) + bytes(16)
    pkt = parse(data)
    assert isinstance(pkt, TransportPacket)
    assert (pkt.type, pkt.epoch, pkt.path_id, pkt.counter) == (PacketType.CONTROL, 2, PID, 99)
    assert pkt.header == data[:20]
    assert pkt.sealed == bytes(16)
    assert peek_path_id(data) == PID


def test_parse_handshake() -> None:
    eph = bytes(range(32))
    data = build_prefix(PacketType.HANDSHAKE_INIT, 0, PID) + eph + bytes(64)
    pkt = parse(data)
    assert isinstance(pkt, HandshakePacket)
    assert pkt.ephemeral == eph
    assert pkt.aad == data[:44]
    assert len(pkt.sealed) == 64


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", LengthError),
        (b"\x03" * 11, LengthError),
        (b"\x09\x00\x00\x00" + PID + bytes(30), UnknownMessageType),
        (b"\x00\x00\x00\x00" + PID + bytes(30), UnknownMessageType),
        (b"\x03\x00\x00\x01" + PID + bytes(30), FieldError),  # reserved must be 0
        (b"\x03\x00\x00\x00" + PID + bytes(24), LengthError),  # DATA needs >= 1 byte
        (b"\x04\x00\x00\x00" + PID + bytes(23), LengthError),
        (b"\x01\x00\x00\x00" + PID + bytes(95), LengthError),  # handshake is 108 exactly
        (b"\x02\x00\x00\x00" + PID + bytes(97), LengthError),
    ],
)
def test_parse_rejects(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse(data)


def test_empty_control_allowed_but_not_empty_data() -> None:
    control = b"\x04\x00\x00\x00" + PID + bytes(24)
    assert isinstance(parse(control), TransportPacket)


def test_peek_short() -> None:
    with pytest.raises(LengthError):
        peek_path_id(b"\x03" * 11)


@given(st.binary(max_size=200))
def test_parse_random_bytes_only_raises_remote_errors(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse(data)


@given(st.sampled_from([1, 2, 3, 4]), st.binary(min_size=0, max_size=150))
def test_parse_random_bodies(ptype: int, body: bytes) -> None:
    data = bytes([ptype, 0, 0, 0]) + PID + body
    try:
        pkt = parse(data)
    except RemoteProtocolError:
        return
    assert pkt.path_id == PID
