"""Binding to a Relay Server: the BIND / BIND_ACK packets and the node's side of it (sans-IO).

A relayed path has two sides, the initiator's and the responder's. The DC draws a random
32-byte `binding_key` per path and hands it to the Relay Server (RS) in a Relay Direction;
each end gets only the key of its own side, `side_key(binding_key, role)`. An end proves
its right to a side by sending a BIND from its tunnel socket; the RS binds that side to the
datagram's source (ip, port) and answers a BIND_ACK to the same address. From then on the
RS forwards the path's tunnel packets (`ntm_proto.packet` types 1-4) between the two bound
addresses, unchanged (it never decrypts).

Why one key per side: with a single shared key either end could bind the *other* side to
any address it can spoof, and so aim the peer's traffic at a third party through the RS.
With per-side keys an end can only move its own side.

BIND and BIND_ACK, always exactly 36 bytes, big-endian. The layout keeps the path id at
offset 4, like every tunnel packet (`packet.peek_path_id` works on both)::

    offset  size  field
    0       1     type       5 BIND (end -> RS) or 6 BIND_ACK (RS -> end)
    1       1     side       1 initiator or 2 responder (`messages.PathRole`)
    2       2     reserved   0; anything else is rejected
    4       8     path_id
    12      8     timestamp  BIND: the end's wall clock in ns, strictly growing per side
                             (the RS drops a BIND not above the last one it accepted);
                             BIND_ACK: echo of the BIND's timestamp
    20      16    mac        HMAC-SHA256(side key, bytes 0..19) truncated to 16 bytes

A BIND_ACK is the same size as the BIND that caused it (no amplification) and tells the end
only that its binding holds: it carries no address. It is MAC'd under the same side key, so
only the RS that knows the path's key can produce it.

The node's side is `RelayBinder`, a sans-IO state machine in the style of `path.TunnelPath`:
`bind()` queues BINDs, `receive_ack()` consumes BIND_ACKs, `handle_timer()` retries until
acknowledged (backing off) and then refreshes the binding every `refresh` seconds, which
also keeps the NAT mapping toward the RS alive and heals a NAT rebinding the end cannot see.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import os
import struct

from .errors import FieldError, LengthError, UnknownMessageType
from .messages import Endpoint, PathRole
from .packet import PATH_ID_SIZE, PacketType

BINDING_KEY_SIZE = 32
MAC_SIZE = 16
HEADER = struct.Struct("!BBH8sQ")  # type, side, reserved, path_id, timestamp
HEADER_SIZE = HEADER.size  # 20
BIND_SIZE = HEADER_SIZE + MAC_SIZE  # 36
_SIDE_LABEL = b"ntm relay side key v1 "
LOST_AFTER = 4  # unanswered refresh BINDs before the binder reports itself unbound


class BindingType(enum.IntEnum):
    """Relay packet types; they continue `packet.PacketType` (1-4) without colliding."""

    BIND = 5
    BIND_ACK = 6


assert not {int(t) for t in BindingType} & {int(t) for t in PacketType}

BINDING_TYPES = frozenset(int(t) for t in BindingType)
# Plain dict lookups: enum construction costs more than the whole parse otherwise.
_TYPES = {int(t): t for t in BindingType}
_SIDES = {int(r): r for r in PathRole}


def new_binding_key() -> bytes:
    """For the DC: a fresh random key per Relay Direction."""
    return os.urandom(BINDING_KEY_SIZE)


def side_key(binding_key: bytes, side: PathRole) -> bytes:
    """The key of one side, derived from the path's binding key (DC and RS compute it)."""
    if len(binding_key) != BINDING_KEY_SIZE:
        raise ValueError(f"binding_key must be {BINDING_KEY_SIZE} bytes")
    return hmac.digest(binding_key, _SIDE_LABEL + bytes([int(side)]), "sha256")


def _mac(key: bytes, header: bytes) -> bytes:
    return hmac.digest(key, header, "sha256")[:MAC_SIZE]


def build(ptype: BindingType, side: PathRole, path_id: bytes, timestamp: int, key: bytes) -> bytes:
    """One BIND or BIND_ACK, MAC'd under the side's key."""
    if len(path_id) != PATH_ID_SIZE:
        raise ValueError("path_id must be 8 bytes")
    if not 0 <= timestamp < 1 << 64:
        raise ValueError("timestamp must be a u64")
    header = HEADER.pack(ptype, side, 0, path_id, timestamp)
    return header + _mac(key, header)


def build_bind(side: PathRole, path_id: bytes, timestamp: int, key: bytes) -> bytes:
    return build(BindingType.BIND, side, path_id, timestamp, key)


def build_bind_ack(side: PathRole, path_id: bytes, timestamp: int, key: bytes) -> bytes:
    return build(BindingType.BIND_ACK, side, path_id, timestamp, key)


@dataclasses.dataclass(frozen=True, slots=True)
class BindingPacket:
    type: BindingType
    side: PathRole
    path_id: bytes
    timestamp: int
    header: bytes  # the 20 bytes the MAC covers
    mac: bytes

    def verify(self, key: bytes) -> bool:
        """Constant-time check of the MAC under `key` (the side's key)."""
        return hmac.compare_digest(self.mac, _mac(key, self.header))


def parse(data: bytes) -> BindingPacket:
    """Strictly parse a BIND or BIND_ACK (not its MAC: see `BindingPacket.verify`).

    Raises `LengthError` (not 36 bytes), `UnknownMessageType` (type not 5 or 6),
    `FieldError` (unknown side, non-zero reserved).
    """
    if len(data) != BIND_SIZE:
        raise LengthError(f"binding packet of {len(data)} bytes, expected {BIND_SIZE}")
    ptype, side, reserved, path_id, timestamp = HEADER.unpack_from(data)
    kind = _TYPES.get(ptype)
    if kind is None:
        raise UnknownMessageType(f"binding packet type {ptype}")
    if reserved:
        raise FieldError("reserved", f"must be 0, got {reserved}")
    role = _SIDES.get(side)
    if role is None:
        raise FieldError("side", f"{side} is neither 1 (initiator) nor 2 (responder)")
    return BindingPacket(kind, role, path_id, timestamp, data[:HEADER_SIZE], data[HEADER_SIZE:])


def verify_raw(data: bytes, key: bytes) -> bool:
    """MAC check straight on a 36-byte packet (the RS's path: no object is built)."""
    return hmac.compare_digest(data[HEADER_SIZE:BIND_SIZE], _mac(key, data[:HEADER_SIZE]))


def is_binding_packet(data: bytes) -> bool:
    """Cheap test for the demultiplexer: does this datagram claim to be a BIND/BIND_ACK?"""
    return len(data) > 0 and data[0] in BINDING_TYPES


# --- the node's side -------------------------------------------------------------------------


class RelayBinder:
    """One end's binding to a Relay Server for one path (sans-IO; see the module docstring).

    The owner sends what `datagrams_to_send` returns FROM ITS TUNNEL SOCKET (the RS binds
    the source address, so BINDs and tunnel packets must share it), hands every datagram
    of type 6 for this path to `receive_ack`, and runs `handle_timer` when `get_timer` is due.
    """

    def __init__(
        self,
        path_id: bytes,
        side: PathRole,
        key: bytes,
        relay: Endpoint,
        *,
        retry: float = 0.5,
        max_retry: float = 8.0,
        refresh: float = 20.0,
    ) -> None:
        if len(path_id) != PATH_ID_SIZE:
            raise ValueError("path_id must be 8 bytes")
        if len(key) != BINDING_KEY_SIZE:
            raise ValueError(f"key must be {BINDING_KEY_SIZE} bytes (the side key)")
        if min(retry, max_retry, refresh) <= 0:
            raise ValueError("timers must be positive")
        self.path_id = path_id
        self.side = side
        self.relay = relay
        self._key = key
        self._retry = retry
        self._max_retry = max_retry
        self._refresh = refresh
        self._last_timestamp = 0
        self._round_start = 0  # first timestamp of the current round of BINDs
        self._attempts = 0
        self._awaiting = False
        self._next_at: float | None = None
        self._out: list[tuple[bytes, Endpoint]] = []
        self.bound = False  # the RS acknowledged a BIND from our current address
        self.acked_at: float | None = None
        self.counters: dict[str, int] = {"binds_sent": 0, "acks": 0, "drop_ack": 0, "lost": 0}

    def bind(self, now: float, wall_ns: int) -> None:
        """(Re)bind now: at start, after a local address change, or when the path went quiet."""
        self.bound = False
        self._start_round(now, wall_ns)

    def set_relay(self, relay: Endpoint, now: float, wall_ns: int) -> None:
        """The DC moved the path to another RS endpoint: bind there."""
        self.relay = relay
        self.bind(now, wall_ns)

    def receive_ack(self, data: bytes, addr: Endpoint, now: float) -> bool:
        """True when `data` acknowledges our latest BIND; anything else is counted, never raised."""
        try:
            pkt = parse(data)
        except (LengthError, UnknownMessageType, FieldError):
            self.counters["drop_ack"] += 1
            return False
        if (
            pkt.type is not BindingType.BIND_ACK
            or pkt.side is not self.side
            or pkt.path_id != self.path_id
            # An ACK for a BIND of an earlier round (before an address change) proves nothing.
            or not self._round_start <= pkt.timestamp <= self._last_timestamp
            or not pkt.verify(self._key)
        ):
            self.counters["drop_ack"] += 1
            return False
        self.counters["acks"] += 1
        if self._awaiting:
            self._awaiting = False
            self.bound = True
            self.acked_at = now
            self._next_at = now + self._refresh
        return True

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return self._next_at

    def handle_timer(self, now: float, wall_ns: int) -> None:
        if self._next_at is None or now < self._next_at:
            return
        if not self._awaiting:
            # Refresh: proves the binding (or moves it after a NAT rebinding we cannot see).
            self._start_round(now, wall_ns)
            return
        if self.bound and self._attempts >= LOST_AFTER:
            self.bound = False  # refreshes went unanswered: the RS or the route is gone
            self.counters["lost"] += 1
        self._send(now, wall_ns)

    def close(self) -> None:
        self._next_at = None
        self._out.clear()

    def _start_round(self, now: float, wall_ns: int) -> None:
        self._attempts = 0
        self._awaiting = True
        self._round_start = max(wall_ns, self._last_timestamp + 1)
        self._send(now, wall_ns)

    def _send(self, now: float, wall_ns: int) -> None:
        timestamp = max(wall_ns, self._last_timestamp + 1)  # strictly growing per side
        self._last_timestamp = timestamp
        self._out.append((build_bind(self.side, self.path_id, timestamp, self._key), self.relay))
        self.counters["binds_sent"] += 1
        self._next_at = now + min(self._retry * 2**self._attempts, self._max_retry)
        self._attempts += 1


__all__ = [
    "BINDING_KEY_SIZE",
    "BINDING_TYPES",
    "BIND_SIZE",
    "BindingPacket",
    "BindingType",
    "RelayBinder",
    "build",
    "build_bind",
    "build_bind_ack",
    "is_binding_packet",
    "new_binding_key",
    "parse",
    "side_key",
    "verify_raw",
]
