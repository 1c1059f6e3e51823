"""Tunnel wire format: the UDP payload exchanged by two tunnel endpoints.

Every packet starts with the same 12-byte prefix, so a receiver finds the path before it
knows anything else (`peek_path_id`); outer addresses play no part in identifying a path,
which is what lets a tunnel survive a change of address (handover). All integers are
big-endian.

Transport packets (DATA, CONTROL), 20-byte header then AES-256-GCM output::

    offset  size  field
    0       1     type       3 DATA (plaintext = one IP packet) or
                             4 CONTROL (plaintext = one `ntm_proto.messages` message)
    1       1     epoch      key generation mod 256 that sealed the packet
    2       2     reserved   0; anything else is rejected
    4       8     path_id    assigned by the DC
    12      8     counter    per-direction, per-epoch packet number (also the nonce)
    20      n     ciphertext AES-256-GCM(plaintext), AAD = bytes 0..19,
                             nonce = 4 zero bytes | counter
    20+n    16    tag

Handshake packets (HANDSHAKE_INIT, HANDSHAKE_RESP), always exactly 108 bytes, so a
response is never larger than the request that caused it::

    offset  size  field
    0       1     type       1 HANDSHAKE_INIT or 2 HANDSHAKE_RESP
    1       1     epoch      the key generation this handshake establishes (mod 256)
    2       2     reserved   0
    4       8     path_id
    12      32    ephemeral  sender's ephemeral X25519 public key
    44      48    payload    AES-256-GCM(TunnelRequest or TunnelResponse, zero-padded to 48
                             bytes), nonce = 12 zero bytes (each key seals exactly once),
                             AAD = bytes 0..43
    92      16    tag

`ntm_proto.crypto` documents the key schedule. A transport packet costs `TUNNEL_OVERHEAD`
(36) bytes on top of the IP packet it carries; `recommended_mtu` turns an outer link MTU
into the TUN MTU that avoids fragmenting tunnel datagrams.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from .errors import FieldError, LengthError, UnknownMessageType

PATH_ID_SIZE = 8
KEY_SIZE = 32
TAG_SIZE = 16

PREFIX = struct.Struct("!BBH8s")  # type, epoch, reserved, path_id
PREFIX_SIZE = PREFIX.size  # 12
HEADER = struct.Struct("!BBH8sQ")  # PREFIX + counter
HEADER_SIZE = HEADER.size  # 20
COUNTER = struct.Struct("!Q")

TUNNEL_OVERHEAD = HEADER_SIZE + TAG_SIZE  # 36 bytes per transport packet

HANDSHAKE_PAYLOAD_SIZE = 48  # padded plaintext: TunnelRequest/Response are at most 29 bytes
HANDSHAKE_SIZE = PREFIX_SIZE + KEY_SIZE + HANDSHAKE_PAYLOAD_SIZE + TAG_SIZE  # 108
HANDSHAKE_AAD_SIZE = PREFIX_SIZE + KEY_SIZE  # 44

IPV4_HEADER_SIZE = 20
IPV6_HEADER_SIZE = 40
UDP_HEADER_SIZE = 8
MIN_INNER_MTU = 576  # below this the tunnel is not worth running (IPv4 minimum datagram)


class PacketType(enum.IntEnum):
    HANDSHAKE_INIT = 1
    HANDSHAKE_RESP = 2
    DATA = 3
    CONTROL = 4


HANDSHAKE_TYPES = frozenset({PacketType.HANDSHAKE_INIT, PacketType.HANDSHAKE_RESP})


def recommended_mtu(outer_mtu: int = 1500, ipv6: bool = True) -> int:
    """The TUN MTU for tunnels over a link of `outer_mtu` (IPv6 or IPv4 outer headers).

    1500 over IPv6 gives 1500 - 40 - 8 - 36 = 1416.
    """
    inner = outer_mtu - (IPV6_HEADER_SIZE if ipv6 else IPV4_HEADER_SIZE) - UDP_HEADER_SIZE
    inner -= TUNNEL_OVERHEAD
    if inner < MIN_INNER_MTU:
        raise ValueError(f"outer MTU {outer_mtu} leaves {inner} bytes, below {MIN_INNER_MTU}")
    return inner


def peek_path_id(data: bytes) -> bytes:
    """The path id of any tunnel packet, without validating the rest (for demultiplexing)."""
    if len(data) < PREFIX_SIZE:
        raise LengthError(f"{len(data)} bytes is shorter than the {PREFIX_SIZE}-byte prefix")
    return data[4:12]


def build_prefix(ptype: PacketType, epoch: int, path_id: bytes) -> bytes:
    """The 12 bytes every packet of this type, epoch and path starts with."""
    if len(path_id) != PATH_ID_SIZE:
        raise ValueError("path_id must be 8 bytes")
    return PREFIX.pack(ptype, epoch & 0xFF, 0, path_id)


@dataclasses.dataclass(frozen=True, slots=True)
class TransportPacket:
    type: PacketType  # DATA or CONTROL
    epoch: int
    path_id: bytes
    counter: int
    header: bytes  # the 20 bytes authenticated as AAD
    sealed: bytes  # ciphertext and tag


@dataclasses.dataclass(frozen=True, slots=True)
class HandshakePacket:
    type: PacketType  # HANDSHAKE_INIT or HANDSHAKE_RESP
    epoch: int
    path_id: bytes
    ephemeral: bytes
    aad: bytes  # the 44 bytes authenticated as AAD
    sealed: bytes  # padded payload ciphertext and tag


def parse(data: bytes) -> TransportPacket | HandshakePacket:
    """Strictly parse one tunnel packet's framing (not its encryption).

    Raises a `DecodeError` subclass: `LengthError` for a wrong size, `UnknownMessageType`
    for an unknown type byte, `FieldError` for a non-zero reserved field.
    """
    if len(data) < PREFIX_SIZE:
        raise LengthError(f"{len(data)} bytes is shorter than the {PREFIX_SIZE}-byte prefix")
    ptype, epoch, reserved, path_id = PREFIX.unpack_from(data)
    try:
        kind = PacketType(ptype)
    except ValueError:
        raise UnknownMessageType(f"tunnel packet type {ptype}") from None
    if reserved:
        raise FieldError("reserved", f"must be 0, got {reserved}")
    if kind in HANDSHAKE_TYPES:
        if len(data) != HANDSHAKE_SIZE:
            raise LengthError(f"handshake of {len(data)} bytes, expected {HANDSHAKE_SIZE}")
        return HandshakePacket(
            kind,
            epoch,
            path_id,
            data[PREFIX_SIZE:HANDSHAKE_AAD_SIZE],
            data[:HANDSHAKE_AAD_SIZE],
            data[HANDSHAKE_AAD_SIZE:],
        )
    minimum = TUNNEL_OVERHEAD + (1 if kind is PacketType.DATA else 0)
    if len(data) < minimum:
        raise LengthError(f"{kind.name} packet of {len(data)} bytes, minimum {minimum}")
    (counter,) = COUNTER.unpack_from(data, PREFIX_SIZE)
    return TransportPacket(kind, epoch, path_id, counter, data[:HEADER_SIZE], data[HEADER_SIZE:])


__all__ = [
    "HANDSHAKE_SIZE",
    "HEADER_SIZE",
    "PREFIX_SIZE",
    "TAG_SIZE",
    "TUNNEL_OVERHEAD",
    "HandshakePacket",
    "PacketType",
    "TransportPacket",
    "build_prefix",
    "parse",
    "peek_path_id",
    "recommended_mtu",
]
