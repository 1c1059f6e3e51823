"""NTMobile messages and their versioned binary codec.

Wire form of every message (network byte order)::

    version u8 | type u8 | body length u16 | body

The body is the message's fields in declared order; each field kind below encodes itself
with an explicit length or family, so the decoder checks every byte: a wrong version, an
unknown type, a length that disagrees with the body, a field out of range and trailing
bytes are all typed `DecodeError`s. Control-plane messages travel one per QUIC stream;
tunnel messages (Tunnel Request/Response, keepalive, probe) travel inside encrypted tunnel
packets (`ntm_proto.packet`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import ipaddress
import struct
from typing import Any, ClassVar, TypeVar, cast

from .errors import (
    DecodeError,
    FieldError,
    LengthError,
    LocalProtocolError,
    UnknownMessageType,
    UnsupportedVersion,
)

VERSION = 1
HEADER = struct.Struct("!BBH")
MAX_BODY = 4096
MAX_FQDN = 253
MAX_ENDPOINTS = 16
MAX_REASON = 512
MAX_ALTERNATIVES = 8  # other gateways a Route Direction names

Endpoint = tuple[str, int]  # (IP address as text, UDP port)


class MsgType(enum.IntEnum):
    REGISTRATION_REQUEST = 1
    REGISTRATION_RESPONSE = 2
    DIRECTION_REQUEST = 3
    ROUTE_DIRECTION = 4
    ROUTE_DIRECTION_ACK = 5
    ERROR = 6
    RELAY_DIRECTION = 7
    RELAY_DIRECTION_ACK = 8
    NODE_INFORMATION_REQUEST = 9
    GATEWAY_REPORT = 10
    GATEWAY_REPORT_ACK = 11
    TUNNEL_REQUEST = 16
    TUNNEL_RESPONSE = 17
    KEEPALIVE = 18
    PROBE = 19
    PROBE_ACK = 20
    STANDBY_PROBE = 21
    STANDBY_PROBE_ACK = 22


class RouteKind(enum.IntEnum):
    DIRECT = 1  # the initiator reaches the responder's address
    REVERSE = 2  # the responder is behind NAT: it opens the tunnel toward the initiator
    RELAY = 3  # both ends talk to a Relay Server


class PathRole(enum.IntEnum):
    INITIATOR = 1  # sends the Tunnel Request
    RESPONDER = 2


class ErrorCode(enum.IntEnum):
    BAD_MESSAGE = 1
    UNSUPPORTED_VERSION = 2
    NOT_AUTHORIZED = 3  # e.g. an FQDN the certificate does not name
    NOT_REGISTERED = 4  # the requester must register first
    UNKNOWN_TARGET = 5  # no such node in the DC's zone
    PEER_UNREACHABLE = 6  # the peer's control connection is gone or did not answer
    POOL_EXHAUSTED = 7
    UNEXPECTED = 8  # a valid message in the wrong place
    INTERNAL = 9


# --- field kinds -------------------------------------------------------------------------


class Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, field: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise FieldError(field, f"truncated: need {n} bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk


class Kind:
    """How one field is written and read. Subclasses validate on both sides."""

    def encode(self, value: Any, field: str, out: bytearray) -> None:
        raise NotImplementedError

    def decode(self, r: Reader, field: str) -> Any:
        raise NotImplementedError


class UInt(Kind):
    def __init__(self, size: int) -> None:
        self.size = size
        self.fmt = struct.Struct({1: "!B", 2: "!H", 4: "!I", 8: "!Q"}[size])

    def encode(self, value: Any, field: str, out: bytearray) -> None:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or not 0 <= value < 1 << (8 * self.size):
            raise LocalProtocolError(f"{field}: {value!r} is not a u{8 * self.size}")
        out += self.fmt.pack(value)

    def decode(self, r: Reader, field: str) -> Any:
        return self.fmt.unpack(r.take(self.size, field))[0]


class BoundedUInt(UInt):
    """An unsigned integer with a smaller maximum than its size allows."""

    def __init__(self, size: int, maximum: int) -> None:
        super().__init__(size)
        self.maximum = maximum

    def encode(self, value: Any, field: str, out: bytearray) -> None:
        if isinstance(value, int) and value > self.maximum:
            raise LocalProtocolError(f"{field}: {value} exceeds {self.maximum}")
        super().encode(value, field, out)

    def decode(self, r: Reader, field: str) -> Any:
        value = super().decode(r, field)
        if value > self.maximum:
            raise FieldError(field, f"{value} exceeds {self.maximum}")
        return value


class Bool(Kind):
    def encode(self, value: Any, field: str, out: bytearray) -> None:
        if not isinstance(value, bool):
            raise LocalProtocolError(f"{field}: {value!r} is not a bool")
        out.append(1 if value else 0)

    def decode(self, r: Reader, field: str) -> Any:
        b = r.take(1, field)[0]
        if b > 1:
            raise FieldError(field, f"boolean byte {b} is neither 0 nor 1")
        return b == 1


class Enum(Kind):
    def __init__(self, enum_type: type[enum.IntEnum]) -> None:
        self.enum_type = enum_type

    def encode(self, value: Any, field: str, out: bytearray) -> None:
        if not isinstance(value, self.enum_type):
            raise LocalProtocolError(f"{field}: {value!r} is not a {self.enum_type.__name__}")
        out.append(int(value))

    def decode(self, r: Reader, field: str) -> Any:
        b = r.take(1, field)[0]
        try:
            return self.enum_type(b)
        except ValueError:
            raise FieldError(field, f"{b} is not a valid {self.enum_type.__name__}") from None


class U16Enum(Enum):
    def encode(self, value: Any, field: str, out: bytearray) -> None:
        if not isinstance(value, self.enum_type):
            raise LocalProtocolError(f"{field}: {value!r} is not a {self.enum_type.__name__}")
        out += struct.pack("!H", int(value))

    def decode(self, r: Reader, field: str) -> Any:
        (v,) = struct.unpack("!H", r.take(2, field))
        try:
            return self.enum_type(v)
        except ValueError:
            raise FieldError(field, f"{v} is not a valid {self.enum_type.__name__}") from None


class FixedBytes(Kind):
    def __init__(self, size: int) -> None:
        self.size = size

    def encode(self, value: Any, field: str, out: bytearray) -> None:
        if not isinstance(value, bytes) or len(value) != self.size:
            raise LocalProtocolError(f"{field}: need exactly {self.size} bytes")
        out += value

    def decode(self, r: Reader, field: str) -> Any:
        return r.take(self.size, field)


class Text(Kind):
    """UTF-8 text with a u16 length prefix and a maximum length."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len

    def encode(self, value: Any, field: str, out: bytearray) -> None:
        if not isinstance(value, str):
            raise LocalProtocolError(f"{field}: {value!r} is not text")
        raw = value.encode()
        if len(raw) > self.max_len:
            raise LocalProtocolError(f"{field}: longer than {self.max_len} bytes")
        out += struct.pack("!H", len(raw)) + raw

    def decode(self, r: Reader, field: str) -> Any:
        (n,) = struct.unpack("!H", r.take(2, field))
        if n > self.max_len:
            raise FieldError(field, f"length {n} exceeds the maximum {self.max_len}")
        try:
            return r.take(n, field).decode()
        except UnicodeDecodeError:
            raise FieldError(field, "not UTF-8") from None


@functools.lru_cache(maxsize=4096)  # a DC checks the same few names on every message
def check_fqdn(name: str) -> str | None:
    """Why `name` is not an acceptable FQDN, or None. Lower-case, no trailing dot."""
    if not name or len(name) > MAX_FQDN:
        return "empty or longer than 253 characters"
    if name != name.lower() or name.endswith("."):
        return "must be lower-case without a trailing dot"
    for label in name.split("."):
        if not 1 <= len(label) <= 63:
            return f"label {label!r} must be 1..63 characters"
        if not all(c.isascii() and (c.isalnum() or c in "-_") for c in label):
            return f"label {label!r} has characters other than letters, digits, '-' and '_'"
        if label.startswith("-") or label.endswith("-"):
            return f"label {label!r} starts or ends with '-'"
    return None


class Fqdn(Text):
    def __init__(self) -> None:
        super().__init__(MAX_FQDN)

    def encode(self, value: Any, field: str, out: bytearray) -> None:
        if not isinstance(value, str) or check_fqdn(value):
            raise LocalProtocolError(f"{field}: {value!r} is not an FQDN")
        super().encode(value, field, out)

    def decode(self, r: Reader, field: str) -> Any:
        name = cast(str, super().decode(r, field))
        if why := check_fqdn(name):
            raise FieldError(field, f"{name!r}: {why}")
        return name


class OptionalFqdn(Fqdn):
    """An FQDN or the empty text, which means 'none' (e.g. no particular gateway)."""

    def encode(self, value: Any, field: str, out: bytearray) -> None:
        if value == "":
            Text.encode(self, value, field, out)
        else:
            super().encode(value, field, out)

    def decode(self, r: Reader, field: str) -> Any:
        name = cast(str, Text.decode(self, r, field))
        if name and (why := check_fqdn(name)):
            raise FieldError(field, f"{name!r}: {why}")
        return name


class FqdnList(Kind):
    """A count u8 then that many FQDNs, at most `max_len`, no repeats."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len

    def encode(self, value: Any, field: str, out: bytearray) -> None:
        if not isinstance(value, tuple) or len(value) > self.max_len:
            raise LocalProtocolError(f"{field}: need a tuple of at most {self.max_len} names")
        if len(set(value)) != len(value):
            raise LocalProtocolError(f"{field}: names repeat")
        out.append(len(value))
        for name in value:
            Fqdn().encode(name, field, out)

    def decode(self, r: Reader, field: str) -> Any:
        n = r.take(1, field)[0]
        if n > self.max_len:
            raise FieldError(field, f"{n} names, at most {self.max_len} allowed")
        names = tuple(Fqdn().decode(r, field) for _ in range(n))
        if len(set(names)) != n:
            raise FieldError(field, "names repeat")
        return names


class IP(Kind):
    """family u8 (4 or 6; 0 only when optional) then 4 or 16 bytes."""

    def __init__(self, optional: bool = False) -> None:
        self.optional = optional

    def encode(self, value: Any, field: str, out: bytearray) -> None:
        if value is None and self.optional:
            out.append(0)
            return
        try:
            out += _ip_wire(value)
        except (ValueError, TypeError):
            raise LocalProtocolError(f"{field}: {value!r} is not an IP address") from None

    def decode(self, r: Reader, field: str) -> Any:
        family = r.take(1, field)[0]
        if family == 0 and self.optional:
            return None
        if family == 4:
            return _ip_text(r.take(4, field))
        if family == 6:
            return _ip_text(r.take(16, field))
        raise FieldError(field, f"address family {family} is neither 4 nor 6")


# Parsing and printing addresses was a tenth of a busy DC's work; the same few recur.
@functools.lru_cache(maxsize=4096)
def _ip_wire(value: Any) -> bytes:
    addr = ipaddress.ip_address(value)
    return bytes((addr.version,)) + addr.packed


@functools.lru_cache(maxsize=4096)
def _ip_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


class EndpointKind(Kind):
    def __init__(self, optional: bool = False) -> None:
        self.ip = IP(optional)
        self.optional = optional

    def encode(self, value: Any, field: str, out: bytearray) -> None:
        if value is None and self.optional:
            out.append(0)
            return
        if not (isinstance(value, tuple) and len(value) == 2):
            raise LocalProtocolError(f"{field}: {value!r} is not an (address, port) pair")
        self.ip.encode(value[0], field, out)
        UInt(2).encode(value[1], field, out)

    def decode(self, r: Reader, field: str) -> Any:
        addr = self.ip.decode(r, field)
        if addr is None:
            return None
        port = UInt(2).decode(r, field)
        if port == 0:
            raise FieldError(field, "port 0")
        return (addr, port)


class EndpointList(Kind):
    def encode(self, value: Any, field: str, out: bytearray) -> None:
        if not isinstance(value, tuple) or len(value) > MAX_ENDPOINTS:
            raise LocalProtocolError(f"{field}: need a tuple of at most {MAX_ENDPOINTS} endpoints")
        out.append(len(value))
        for ep in value:
            EndpointKind().encode(ep, field, out)

    def decode(self, r: Reader, field: str) -> Any:
        n = r.take(1, field)[0]
        if n > MAX_ENDPOINTS:
            raise FieldError(field, f"{n} endpoints, at most {MAX_ENDPOINTS} allowed")
        return tuple(EndpointKind().decode(r, field) for _ in range(n))


U8, U16, U32, U64 = UInt(1), UInt(2), UInt(4), UInt(8)
PATH_ID = FixedBytes(8)
PUBLIC_KEY = FixedBytes(32)


_NO_DEFAULT: Any = dataclasses.MISSING


def wire(kind: Kind, default: Any = _NO_DEFAULT) -> Any:
    """Declare a message field and how it travels.

    Fields added to a message later come last and have a default, so existing callers keep
    working; they are always encoded (version 1 has no optional fields on the wire).
    """
    return dataclasses.field(default=default, metadata={"wire": kind})


# --- messages ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    TYPE: ClassVar[MsgType]


@dataclasses.dataclass(frozen=True, slots=True)
class RegistrationRequest(Message):
    """Node -> its DC: 'I am fqdn, here is my static tunnel key and where I listen'."""

    TYPE = MsgType.REGISTRATION_REQUEST
    fqdn: str = wire(Fqdn())
    static_key: bytes = wire(PUBLIC_KEY)
    tunnel_port: int = wire(U16)
    endpoints: tuple[Endpoint, ...] = wire(EndpointList())  # local addresses as the node sees them
    # Multi-gateway services: this gateway's own name (one of the adaptor certificate's
    # DNS names); "" for a plain node or a single-gateway service.
    gateway: str = wire(OptionalFqdn(), "")
    weight: int = wire(U16, 100)  # share of new MNs relative to the other gateways; 0 = drain
    # Whether the DC's DNS may send ordinary (non-NTM) clients to this node's addresses; an
    # NTMA without public forwarding says no.
    ordinary_clients: bool = wire(Bool(), True)


@dataclasses.dataclass(frozen=True, slots=True)
class RegistrationResponse(Message):
    TYPE = MsgType.REGISTRATION_RESPONSE
    vip: str = wire(IP())
    vip_prefix_len: int = wire(U8)  # the route the node sends into its TUN (100.64.0.0/10)
    vip_network: str = wire(IP())
    seen: Endpoint = wire(EndpointKind())  # the control connection's source as the DC sees it
    behind_nat: bool = wire(Bool())
    lifetime: int = wire(U32)  # seconds until the node must register again


@dataclasses.dataclass(frozen=True, slots=True)
class DirectionRequest(Message):
    """MN -> DC_MN: 'I want a tunnel to target'."""

    TYPE = MsgType.DIRECTION_REQUEST
    source: str = wire(Fqdn())  # which of the requester's registered names speaks
    target: str = wire(Fqdn())
    gateway: str = wire(OptionalFqdn(), "")  # a path through this gateway; "" = DC's choice


@dataclasses.dataclass(frozen=True, slots=True)
class RouteDirection(Message):
    """DC -> each end: how to build one tunnel.

    The DC vouches for peer_key (a static X25519 public key); it never sees a tunnel key.
    """

    TYPE = MsgType.ROUTE_DIRECTION
    path_id: bytes = wire(PATH_ID)
    kind: RouteKind = wire(Enum(RouteKind))
    role: PathRole = wire(Enum(PathRole))
    peer_fqdn: str = wire(Fqdn())
    peer_vip: str = wire(IP())
    peer_key: bytes = wire(PUBLIC_KEY)
    peer_endpoints: tuple[Endpoint, ...] = wire(EndpointList())
    relay: Endpoint | None = wire(EndpointKind(optional=True))
    lifetime: int = wire(U32)
    # kind RELAY: this end's side key for binding at the relay (relay_binding.side_key);
    # 32 zero bytes otherwise. Each end gets only its own side's key.
    relay_key: bytes = wire(PUBLIC_KEY)
    # The gateway this path goes through ("" unless the peer is a multi-gateway service)
    # and, to the MN, the service's other usable gateways, best first.
    gateway: str = wire(OptionalFqdn(), "")
    alternatives: tuple[str, ...] = wire(FqdnList(MAX_ALTERNATIVES), ())


@dataclasses.dataclass(frozen=True, slots=True)
class RouteDirectionAck(Message):
    TYPE = MsgType.ROUTE_DIRECTION_ACK
    path_id: bytes = wire(PATH_ID)


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorMessage(Message):
    TYPE = MsgType.ERROR
    code: ErrorCode = wire(U16Enum(ErrorCode))
    reason: str = wire(Text(MAX_REASON))


@dataclasses.dataclass(frozen=True, slots=True)
class RelayDirection(Message):
    """DC -> Relay Server: forward path_id between the two ends that prove binding_key.

    Each end gets only its side's key (`ntm_proto.relay_binding.side_key`), never this one.
    lifetime 0 removes the path; for an unknown path id it only asks for the load.
    """

    TYPE = MsgType.RELAY_DIRECTION
    path_id: bytes = wire(PATH_ID)
    binding_key: bytes = wire(FixedBytes(32))  # random, fresh per Relay Direction
    lifetime: int = wire(U32)  # seconds


@dataclasses.dataclass(frozen=True, slots=True)
class RelayDirectionAck(Message):
    """Relay Server -> DC: the path is installed (or removed); how busy the relay is now."""

    TYPE = MsgType.RELAY_DIRECTION_ACK
    path_id: bytes = wire(PATH_ID)
    active_paths: int = wire(U32)
    load: int = wire(U16)  # permille of capacity (paths or packet rate); may exceed 1000


@dataclasses.dataclass(frozen=True, slots=True)
class NodeInformationRequest(Message):
    """DC_MN -> DC_CN (found through the NS delegation of the target's zone).

    It carries what DC_MN knows of the requesting node, so DC_CN can decide the route with
    both ends in view, push a Route Direction to its node and answer with the requester's.
    The requester's FQDN must lie in `requester_zone`, and DC_MN's certificate must name a
    host in that zone: one DC cannot speak for another's nodes.
    """

    TYPE = MsgType.NODE_INFORMATION_REQUEST
    requester_zone: str = wire(Fqdn())
    target: str = wire(Fqdn())
    source_fqdn: str = wire(Fqdn())
    source_vip: str = wire(IP())
    source_key: bytes = wire(PUBLIC_KEY)
    source_endpoints: tuple[Endpoint, ...] = wire(EndpointList())  # where it can be reached
    source_families: int = wire(U8)  # bit 0: IPv4, bit 1: IPv6
    source_behind_nat: bool = wire(Bool())
    source_seen: Endpoint = wire(EndpointKind())
    gateway: str = wire(OptionalFqdn(), "")  # the requester's DirectionRequest.gateway


@dataclasses.dataclass(frozen=True, slots=True)
class GatewayReport(Message):
    """Gateway (NTMA) -> its DC: how it is doing, for the DC's gateway choice and status.

    Sent on the connection that registered `gateway` for the service `fqdn`.
    """

    TYPE = MsgType.GATEWAY_REPORT
    fqdn: str = wire(Fqdn())  # the service
    gateway: str = wire(Fqdn())
    tunnels: int = wire(U32)  # established tunnels now
    rtt_us: int = wire(U32)  # smoothed round-trip time of its tunnel probes
    jitter_us: int = wire(U32)  # interarrival jitter of those RTTs (RFC 3550 style)
    loss_ppm: int = wire(BoundedUInt(4, 1_000_000))  # unanswered probes per million, recently


@dataclasses.dataclass(frozen=True, slots=True)
class GatewayReportAck(Message):
    TYPE = MsgType.GATEWAY_REPORT_ACK
    gateway: str = wire(Fqdn())


@dataclasses.dataclass(frozen=True, slots=True)
class TunnelRequest(Message):
    """Initiator -> responder inside the handshake: a timestamp against replayed handshakes."""

    TYPE = MsgType.TUNNEL_REQUEST
    timestamp: int = wire(U64)  # initiator's wall clock in ns; must grow per path
    initiator_vip: str = wire(IP())


@dataclasses.dataclass(frozen=True, slots=True)
class TunnelResponse(Message):
    TYPE = MsgType.TUNNEL_RESPONSE
    timestamp: int = wire(U64)  # echo of the request's
    responder_vip: str = wire(IP())


@dataclasses.dataclass(frozen=True, slots=True)
class Keepalive(Message):
    """Sent on a quiet path to hold NAT bindings open; proves liveness when it decrypts."""

    TYPE = MsgType.KEEPALIVE


@dataclasses.dataclass(frozen=True, slots=True)
class Probe(Message):
    TYPE = MsgType.PROBE
    seq: int = wire(U32)
    sent_us: int = wire(U64)  # sender's monotonic clock in microseconds, echoed back


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeAck(Message):
    TYPE = MsgType.PROBE_ACK
    seq: int = wire(U32)
    sent_us: int = wire(U64)


@dataclasses.dataclass(frozen=True, slots=True)
class StandbyProbe(Message):
    """A Probe on a standby leg (a node with two uplinks): answered to where it came from,
    and never moves the path there (tunnel roaming ignores it)."""

    TYPE = MsgType.STANDBY_PROBE
    seq: int = wire(U32)
    sent_us: int = wire(U64)


@dataclasses.dataclass(frozen=True, slots=True)
class StandbyProbeAck(Message):
    TYPE = MsgType.STANDBY_PROBE_ACK
    seq: int = wire(U32)
    sent_us: int = wire(U64)


M = TypeVar("M", bound=Message)

MESSAGE_TYPES: dict[MsgType, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        RegistrationRequest,
        RegistrationResponse,
        DirectionRequest,
        RouteDirection,
        RouteDirectionAck,
        ErrorMessage,
        RelayDirection,
        RelayDirectionAck,
        NodeInformationRequest,
        GatewayReport,
        GatewayReportAck,
        TunnelRequest,
        TunnelResponse,
        Keepalive,
        Probe,
        ProbeAck,
        StandbyProbe,
        StandbyProbeAck,
    )
}

# (attribute, wire kind, "Class.attribute" for error messages) of every field, in order.
_FIELDS: dict[type[Message], tuple[tuple[str, Kind, str], ...]] = {
    cls: tuple(
        (f.name, f.metadata["wire"], f"{cls.__name__}.{f.name}") for f in dataclasses.fields(cls)
    )
    for cls in MESSAGE_TYPES.values()
}


def encode(msg: Message) -> bytes:
    body = bytearray()
    for name, kind, label in _FIELDS[type(msg)]:
        kind.encode(getattr(msg, name), label, body)
    if len(body) > MAX_BODY:
        raise LocalProtocolError(f"{type(msg).__name__} body of {len(body)} bytes is too large")
    return HEADER.pack(VERSION, msg.TYPE, len(body)) + body


def decode(data: bytes) -> Message:
    """Decode exactly one message; any defect raises a DecodeError subclass."""
    if len(data) < HEADER.size:
        raise LengthError(f"{len(data)} bytes is shorter than the {HEADER.size}-byte header")
    version, mtype, length = HEADER.unpack_from(data)
    if version != VERSION:
        raise UnsupportedVersion(f"version {version}, this node speaks {VERSION}")
    try:
        cls = MESSAGE_TYPES[MsgType(mtype)]
    except ValueError:
        raise UnknownMessageType(f"message type {mtype}") from None
    if length > MAX_BODY:
        raise LengthError(f"body length {length} exceeds {MAX_BODY}")
    if len(data) - HEADER.size != length:
        raise LengthError(f"header says {length} body bytes, got {len(data) - HEADER.size}")
    reader = Reader(data[HEADER.size :])
    values = {name: kind.decode(reader, label) for name, kind, label in _FIELDS[cls]}
    if reader.pos != length:
        raise LengthError(f"{length - reader.pos} trailing bytes after {cls.__name__}")
    return cls(**values)


def decode_as(data: bytes, expected: type[M]) -> M:
    """Decode and insist on one message type (an ErrorMessage is returned as-is by `decode`)."""
    msg = decode(data)
    if not isinstance(msg, expected):
        raise UnexpectedMessage(msg, expected)
    return msg


class UnexpectedMessage(DecodeError):
    """A well-formed message of the wrong type for this exchange."""

    reason = "unexpected"

    def __init__(self, msg: Message, expected: type[Message]) -> None:
        super().__init__(f"expected {expected.__name__}, got {type(msg).__name__}")
        self.message = msg


__all__ = [
    "VERSION",
    "DecodeError",
    "DirectionRequest",
    "Endpoint",
    "ErrorCode",
    "ErrorMessage",
    "GatewayReport",
    "GatewayReportAck",
    "Keepalive",
    "Message",
    "MsgType",
    "NodeInformationRequest",
    "PathRole",
    "Probe",
    "ProbeAck",
    "RegistrationRequest",
    "RegistrationResponse",
    "RelayDirection",
    "RelayDirectionAck",
    "RouteDirection",
    "RouteDirectionAck",
    "RouteKind",
    "StandbyProbe",
    "StandbyProbeAck",
    "TunnelRequest",
    "TunnelResponse",
    "decode",
    "decode_as",
    "encode",
]
