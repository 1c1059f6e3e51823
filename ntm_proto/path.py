"""One tunnel path as a sans-IO state machine (in the style of aioquic's QuicConnection).

The owner feeds datagrams in (`receive_datagram`), takes datagrams out
(`datagrams_to_send`), seals outbound IP packets (`seal`, the fast path), re-arms one timer
(`get_timer` / `handle_timer`) and drains events (`next_event`). Time is passed in:
`now` is monotonic seconds, `wall_ns` wall-clock nanoseconds (only used for handshake
timestamps). Nothing here touches a socket or a clock.

Lifecycle::

    NEW --connect()--> HANDSHAKING --RESP authenticates--> ESTABLISHED     (initiator)
    NEW --INIT authenticates--> HANDSHAKING --first packet under the new key--> ESTABLISHED
                                                                            (responder)
    any --handshake timeout / key expiry / close()--> CLOSED

Handshake. The initiator sends a HANDSHAKE_INIT to every candidate endpoint from the Route
Direction; the first authenticated HANDSHAKE_RESP fixes `peer_address`. It retries with a
fresh ephemeral key and timestamp after `handshake_retry`, doubling up to
`handshake_timeout`, and gives up (HandshakeFailed("timeout"), CLOSED) `handshake_timeout`
seconds after `connect`. As soon as it holds the new keys it sends a Keepalive under them,
because the responder may not use keys the initiator has not proved it has (key
confirmation, as in WireGuard); it repeats that Keepalive every `handshake_retry` until a
packet from the responder under the new key arrives (at most `handshake_timeout`). The
responder keeps no state for an INIT that does not authenticate, refuses an INIT whose
timestamp is not above the largest it accepted on this path (replay), answers with a RESP
of the same size as the INIT (no amplification), holds the new keys as "next" until a
packet under them arrives, then switches and answers with one Keepalive of its own. An
authenticated INIT for the epoch after "next" also proves the initiator switched.

Rekey. The initiator starts a handshake for epoch+1 when its current key has sent
`rekey_after_packets`, or when it has received a packet numbered `rekey_after_packets`
(the peer's send budget is spent), or `rekey_after_seconds` after the key was made. Data
keeps flowing on the current key while the handshake runs. Afterwards both sides keep the
previous epoch's receive key: the responder for `old_key_grace` seconds after it switched;
the initiator until `old_key_grace` seconds after the responder's first packet under the
new key (it resends its confirming Keepalive when old-key packets keep coming), so no
packet in flight is lost to the change. A rekey handshake is retried for as long as the
current key lives; a key older than `reject_after_seconds` is dead (HandshakeFailed
("expired"), CLOSED).

The responder never starts a handshake. If its own send budget runs out first (it sends
more than it receives), it keeps sending on the current key: the budget is a soft limit,
the hard limit is 2^60 packets (`crypto.REJECT_AFTER_MESSAGES`), and the initiator sees the
same budget run out on its receive side (the counters it receives) and rekeys.

Roaming. A DATA or CONTROL packet from an outer address other than `peer_address` moves
the path there only if it authenticates, passes the replay window and carries a counter
above every counter seen so far under the key the peer currently sends with, so neither a
spoofed packet nor a replayed or delayed one can take the tunnel away; PeerAddressChanged
is emitted. A StandbyProbe / StandbyProbeAck (CONTROL) is the exception: a node with
two uplinks keeps its unused one ready with them (`standby_probe`), so they move nothing,
and do not count as life either (`last_received` is the leg in use); the answer goes back
to the address the probe came from. `move_to` is a local move (the node switches uplink):
the peer follows on our next packet, and the address we left cannot move us back for a
while (packets the peer sent there before it learned). `set_local_address_changed` sends
an authenticated Keepalive at once so the peer learns our new address without waiting
for traffic.

Keepalives: an established path that has sent nothing for `keepalive_interval` sends a
Keepalive (holds NAT bindings). Probes: `send_probe` sends a Probe, the peer answers with a
ProbeAck, and a ProbeResult carries the round-trip time measured on our own clock.
`last_received` is when the last authenticated packet (handshake included) arrived: the
liveness monitor (`ntm_proto.liveness`) counts it as life.

Trying another peer address (a gateway with two uplinks): `try_peer_address` sends a Probe
to that address only. The path does not move there by itself: the peer's authenticated
answer from that address moves it by the roaming rule above, so an address that does not
answer (or an attacker who names one) takes nothing away.

Bad input raises a `RemoteProtocolError` subclass whose `reason` is a short counter key;
the path counts it in `counters` as `drop_<reason>` before raising.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections import deque

from .crypto import (
    REJECT_AFTER_MESSAGES,
    Ephemeral,
    EphemeralSource,
    HandshakeContext,
    Initiation,
    StaticKey,
    TransportKeys,
)
from .errors import (
    DecodeError,
    LengthError,
    LocalProtocolError,
    RemoteProtocolError,
    ReplayError,
    UnknownMessageType,
)
from .messages import (
    Endpoint,
    Keepalive,
    PathRole,
    Probe,
    ProbeAck,
    StandbyProbe,
    StandbyProbeAck,
    TunnelRequest,
    TunnelResponse,
    decode,
    encode,
)
from .packet import PREFIX_SIZE, TUNNEL_OVERHEAD, PacketType, parse

_DATA = int(PacketType.DATA)
_CONTROL = int(PacketType.CONTROL)
_INIT = int(PacketType.HANDSHAKE_INIT)
_RESP = int(PacketType.HANDSHAKE_RESP)
_KEEPALIVE = encode(Keepalive())
# CONTROL messages of a standby leg (byte 1 of the plaintext is the message type): they
# prove that leg works, but neither move the path nor count as its life.
_STANDBY = frozenset((int(StandbyProbe.TYPE), int(StandbyProbeAck.TYPE)))
MAX_OUTSTANDING_PROBES = 64


# --- errors --------------------------------------------------------------------------------


class WrongPath(DecodeError):
    reason = "wrong_path"


class NoSession(RemoteProtocolError):
    """A transport packet arrived before any key exists."""

    reason = "no_session"


class UnknownEpoch(RemoteProtocolError):
    """A packet for a key generation we do not hold (expired or never made)."""

    reason = "unknown_epoch"


class UnexpectedPacket(RemoteProtocolError):
    """A well-formed packet that has no place here (e.g. INIT sent to the initiator)."""

    reason = "unexpected"


class HandshakeReplayed(ReplayError):
    """An INIT whose timestamp is not above the largest accepted on this path."""

    reason = "handshake_replayed"


class PeerMismatch(RemoteProtocolError):
    """An authenticated handshake naming another vIP than the Route Direction did."""

    reason = "peer_mismatch"


class PathClosed(RemoteProtocolError):
    reason = "closed"


def error_reason(exc: RemoteProtocolError) -> str:
    """The counter key of a dropped input (every error class here defines `reason`)."""
    reason = getattr(exc, "reason", "protocol_error")
    return reason if isinstance(reason, str) else "protocol_error"


# --- configuration, state, events ----------------------------------------------------------


class PathState(enum.Enum):
    NEW = "new"
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True, slots=True)
class PathConfig:
    """One path as the Route Direction describes it, plus timers (seconds)."""

    path_id: bytes
    role: PathRole
    local_static: StaticKey
    peer_static_public: bytes
    local_vip: str
    peer_vip: str
    peer_endpoints: tuple[Endpoint, ...] = ()  # where the initiator sends its INIT
    rekey_after_packets: int = 2**20
    rekey_after_seconds: float = 120.0
    keepalive_interval: float = 15.0
    handshake_retry: float = 1.0  # first retry; doubles up to handshake_timeout
    handshake_timeout: float = 10.0  # initial handshake gives up after this
    old_key_grace: float = 10.0
    reject_after_seconds: float = 180.0  # a key is never used longer than this
    idle_timeout: float = 45.0  # PathIdle after this long without an authenticated packet
    # Ephemeral keys made ahead of need (the owner refills it when idle); None: each
    # handshake generates its own.
    ephemerals: EphemeralSource | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.path_id) != 8:
            raise LocalProtocolError("path_id must be 8 bytes")
        if len(self.peer_static_public) != 32:
            raise LocalProtocolError("peer_static_public must be 32 bytes")
        if not 1 <= self.rekey_after_packets < REJECT_AFTER_MESSAGES:
            raise LocalProtocolError("rekey_after_packets must be in 1 .. 2^60-1")
        for name in ("local_vip", "peer_vip"):
            try:
                canonical = str(ipaddress.ip_address(getattr(self, name)))
            except ValueError:
                raise LocalProtocolError(f"{name}: not an IP address") from None
            object.__setattr__(self, name, canonical)  # compare vIPs as canonical text
        timers = (
            self.rekey_after_seconds,
            self.keepalive_interval,
            self.handshake_retry,
            self.handshake_timeout,
            self.old_key_grace,
            self.idle_timeout,
        )
        if min(timers) <= 0:
            raise LocalProtocolError("timers must be positive")
        if self.reject_after_seconds <= self.rekey_after_seconds:
            raise LocalProtocolError("reject_after_seconds must exceed rekey_after_seconds")


@dataclasses.dataclass(frozen=True, slots=True)
class PathEvent:
    """Base class of everything `TunnelPath.next_event` returns."""


@dataclasses.dataclass(frozen=True, slots=True)
class PathEstablished(PathEvent):
    path_id: bytes
    peer_address: Endpoint


@dataclasses.dataclass(frozen=True, slots=True)
class PeerAddressChanged(PathEvent):
    old: Endpoint | None
    new: Endpoint


@dataclasses.dataclass(frozen=True, slots=True)
class Rekeyed(PathEvent):
    epoch: int  # key generation now in use (0 is the first handshake's)


@dataclasses.dataclass(frozen=True, slots=True)
class HandshakeFailed(PathEvent):
    reason: str  # "timeout" (initial handshake) or "expired" (no rekey in time)


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeResult(PathEvent):
    seq: int
    rtt: float  # seconds


@dataclasses.dataclass(frozen=True, slots=True)
class StandbyProbeResult(PathEvent):
    seq: int
    rtt: float  # seconds
    peer: Endpoint  # the peer address that answered (on the standby leg)


@dataclasses.dataclass(frozen=True, slots=True)
class PathIdle(PathEvent):
    path_id: bytes
    silent_for: float  # seconds since the last authenticated packet


# --- the state machine ---------------------------------------------------------------------


class _Session:
    """Keys of one epoch plus what the path tracks about them."""

    __slots__ = ("created", "epoch_byte", "generation", "peer_used", "recv", "send")

    def __init__(self, keys: TransportKeys, now: float) -> None:
        self.generation = keys.epoch
        self.epoch_byte = keys.epoch & 0xFF
        self.send = keys.send
        self.recv = keys.recv
        self.created = now
        self.peer_used = False  # a packet under this key arrived from the peer


class TunnelPath:
    """The sans-IO state machine of one tunnel (see the module docstring)."""

    def __init__(self, config: PathConfig, now: float) -> None:
        self.config = config
        self.path_id = config.path_id
        self._initiator = config.role is PathRole.INITIATOR
        self._ctx = HandshakeContext(
            config.local_static,
            config.peer_static_public,
            config.path_id,
            initiator=self._initiator,
        )
        self.state = PathState.NEW
        self.created = now
        self._current: _Session | None = None
        self._previous: _Session | None = None  # receive-only, until _previous_expires
        self._previous_expires = 0.0
        self._next: _Session | None = None  # responder: answered, not yet confirmed
        # initiator's handshake in progress
        self._pending: Initiation | None = None
        self._hs_started = 0.0
        self._hs_retry_at: float | None = None
        self._hs_attempts = 0
        self._rekey_due_at: float | None = None  # seal() found the budget spent
        # initiator: resend the key-confirming Keepalive until the responder answers
        self._confirm_sent_at = float("-inf")
        self._confirm_until = float("-inf")
        # initiator: last timestamp sent; responder: largest timestamp accepted
        self._last_timestamp = 0
        self._peer_address: Endpoint | None = None
        self._out: list[tuple[bytes, Endpoint]] = []
        self._events: deque[PathEvent] = deque()
        self._last_sent = now
        self._last_received = now
        self._idle_reported = False
        self._probe_seq = 0
        self._probes: dict[int, float] = {}
        # After a local move (`move_to`): the address we left may not move us back until
        # `_left_until` (packets the peer sent there before it learned of the move).
        self._left: Endpoint | None = None
        self._left_until = float("-inf")
        # The initiator rekeys when either direction's counter reaches the budget; the
        # responder only stops at the hard limit (see the module docstring).
        budget = config.rekey_after_packets if self._initiator else REJECT_AFTER_MESSAGES
        self._tx_budget = budget
        self._rx_budget = budget
        self._rx_packets = 0
        self._rx_bytes = 0
        self._tx_packets = 0
        self._tx_bytes = 0
        self._handshakes = 0
        self._rekeys = 0
        self._drops: dict[str, int] = {}

    # --- public properties ---

    @property
    def role(self) -> PathRole:
        return self.config.role

    @property
    def peer_address(self) -> Endpoint | None:
        """Where packets for the peer go now (None before the handshake)."""
        return self._peer_address

    @property
    def last_received(self) -> float:
        """When the last authenticated packet arrived (`created` before any)."""
        return self._last_received

    @property
    def epoch(self) -> int | None:
        """Key generation used for sending, None without keys."""
        return None if self._current is None else self._current.generation

    @property
    def counters(self) -> dict[str, int]:
        """rx/tx packets and bytes (whole datagrams), handshakes, rekeys, drop_<reason>."""
        out = {
            "rx_packets": self._rx_packets,
            "rx_bytes": self._rx_bytes,
            "tx_packets": self._tx_packets,
            "tx_bytes": self._tx_bytes,
            "handshakes": self._handshakes,
            "rekeys": self._rekeys,
        }
        for reason, n in self._drops.items():
            out["drop_" + reason] = n
        return out

    def next_event(self) -> PathEvent | None:
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        out = self._out
        self._out = []
        return out

    # --- commands ---

    def connect(self, now: float, wall_ns: int) -> None:
        """Initiator: start the first handshake toward every candidate endpoint."""
        if not self._initiator:
            raise LocalProtocolError("only the initiator connects; the responder waits")
        if self.state is not PathState.NEW:
            raise LocalProtocolError(f"connect() in state {self.state.name}")
        if not self.config.peer_endpoints:
            raise LocalProtocolError("no peer endpoints to send the handshake to")
        self.state = PathState.HANDSHAKING
        self._start_handshake(now, wall_ns, new_round=True)

    def seal(self, ip_packet: bytes, now: float) -> bytes | None:
        """Encrypt one IP packet for `peer_address`; None when there is no usable key.

        After a burst of `seal` calls, re-read `get_timer()`: a spent packet budget makes a
        rekey due at once (the handshake itself needs `wall_ns`, so it starts in
        `handle_timer`).
        """
        s = self._current
        if s is None:
            return None
        send = s.send
        if send.counter >= self._tx_budget and self._send_budget_spent(send.counter, now):
            return None
        out = send.seal(ip_packet)
        self._tx_packets += 1
        self._tx_bytes += len(out)
        self._last_sent = now
        return out

    def send_probe(self, now: float, to: Endpoint | None = None) -> int | None:
        """Queue a Probe (to `peer_address`, or `to`); its ProbeResult arrives as an event.

        None when not established."""
        if self.state is not PathState.ESTABLISHED:
            return None
        seq = self._next_probe_seq(now)
        sent_us = max(0, int(now * 1_000_000)) & 0xFFFFFFFFFFFFFFFF
        self._send_control(encode(Probe(seq=seq, sent_us=sent_us)), now, to)
        return seq

    def try_peer_address(self, endpoint: Endpoint, now: float) -> int | None:
        """Probe `endpoint` (another address of the peer); its answer moves the path there.

        Returns the probe's seq (its ProbeResult arrives as usual), None when not
        established. Nothing changes until an authenticated answer comes from `endpoint`.
        """
        return self.send_probe(now, to=endpoint)

    def standby_probe(self, now: float, to: Endpoint) -> tuple[int, bytes] | None:
        """(seq, datagram) of a StandbyProbe for `to`, returned instead of queued: the
        caller sends it on the standby leg (another local address). Its answer arrives as
        a StandbyProbeResult with that seq; neither moves the path nor counts as its life.
        None when not established."""
        if self.state is not PathState.ESTABLISHED:
            return None
        seq = self._next_probe_seq(now)
        sent_us = max(0, int(now * 1_000_000)) & 0xFFFFFFFFFFFFFFFF
        datagram = self._seal_control(encode(StandbyProbe(seq=seq, sent_us=sent_us)))
        if datagram is None:
            return None
        self._tx_packets += 1
        self._tx_bytes += len(datagram)
        return seq, datagram

    def move_to(self, endpoint: Endpoint, now: float, hold: float) -> bool:
        """Local policy moves the path to `endpoint` (make-before-break onto a leg known to
        work): what we send goes there from now on, and an authenticated Keepalive leaves
        at once so the peer follows on its first packet. Packets still arriving from the
        address we left are accepted but do not move us back for `hold` seconds. Also call
        it with the same endpoint when only our local address changes (the Keepalive tells
        the peer). False when not established."""
        if self.state is not PathState.ESTABLISHED:
            return False
        old = self._peer_address
        if endpoint != old:
            self._left, self._left_until = old, now + hold
            self._move_peer(endpoint)
        self._send_control(_KEEPALIVE, now)
        return True

    def set_local_address_changed(self, now: float, wall_ns: int) -> None:
        """Our outer address changed: tell the peer at once with authenticated packets."""
        if self.state is PathState.CLOSED:
            return
        if self._pending is not None:
            # A fresh INIT (new timestamp) from the new address; the old one's answer
            # would go to the address we just lost.
            self._hs_attempts = 0
            self._start_handshake(now, wall_ns, new_round=False)
        if self.state is PathState.ESTABLISHED:
            self._send_control(_KEEPALIVE, now)

    def close(self) -> None:
        """Forget all keys; the path accepts and sends nothing more."""
        self.state = PathState.CLOSED
        self._current = self._previous = self._next = None
        self._pending = None
        self._hs_retry_at = None
        self._rekey_due_at = None
        self._probes.clear()

    # --- input ---

    def receive_datagram(
        self, data: bytes, addr: Endpoint, now: float, wall_ns: int
    ) -> bytes | None:
        """Handle one datagram from `addr`; returns the inner IP packet for DATA.

        Raises a `RemoteProtocolError` subclass for anything that must be dropped (counted
        in `counters` as drop_<reason> first).
        """
        # One function on purpose: DATA under the current key is the hot path.
        try:
            n = len(data)
            if n < PREFIX_SIZE:
                raise LengthError(f"{n} bytes is shorter than the {PREFIX_SIZE}-byte prefix")
            if data[4:12] != self.path_id:
                raise WrongPath("packet for another path")
            ptype = data[0]
            if ptype != _DATA and ptype != _CONTROL:
                return self._receive_handshake(ptype, data, addr, now)
            if n < TUNNEL_OVERHEAD + (ptype == _DATA) or data[2] or data[3]:
                parse(data)  # raises the precise DecodeError
            s = self._current
            if s is None or s.epoch_byte != data[1]:
                s = self._other_session(data[1], now)
            counter = int.from_bytes(data[12:20], "big")
            recv = s.recv
            newest = counter > recv.window.highest
            plaintext = recv.open(data, counter)  # raises ReplayError/AuthenticationError
            self._rx_packets += 1
            self._rx_bytes += n
            standby = ptype == _CONTROL and len(plaintext) > 1 and plaintext[1] in _STANDBY
            if not standby:
                self._last_received = now
                self._idle_reported = False
            if (
                s is not self._current
                or not s.peer_used
                or addr != self._peer_address
                or counter >= self._rx_budget
            ):
                self._after_transport(s, newest, counter, addr, now, wall_ns, roam=not standby)
            if ptype == _DATA:
                return plaintext
            self._on_control(plaintext, addr, now)
            return None
        except RemoteProtocolError as exc:
            reason = error_reason(exc)
            self._drops[reason] = self._drops.get(reason, 0) + 1
            raise

    def _receive_handshake(
        self, ptype: int, data: bytes, addr: Endpoint, now: float
    ) -> bytes | None:
        if ptype == _INIT:
            self._on_init(data, addr, now)
        elif ptype == _RESP:
            self._on_response(data, addr, now)
        else:
            raise UnknownMessageType(f"tunnel packet type {ptype}")
        return None

    def _other_session(self, epoch: int, now: float) -> _Session:
        """The key for a packet not under the current epoch (next or previous)."""
        if self.state is PathState.CLOSED:
            raise PathClosed("path is closed")
        nxt = self._next
        if nxt is not None and nxt.epoch_byte == epoch:
            return nxt
        prev = self._previous
        if prev is not None and prev.epoch_byte == epoch:
            if now < self._previous_expires:
                return prev
            self._previous = None
        if self._current is None and nxt is None:
            raise NoSession("no tunnel key yet")
        raise UnknownEpoch(f"no key for epoch {epoch}")

    def _after_transport(
        self,
        s: _Session,
        newest: bool,
        counter: int,
        addr: Endpoint,
        now: float,
        wall_ns: int,
        *,
        roam: bool,
    ) -> None:
        """The rare cases after an authenticated transport packet (off the fast path);
        `roam` False: a standby leg's packet, which never moves the path."""
        newest = newest and roam
        if s is self._next:
            self._promote(addr, now, roam=roam)
            return
        cur = self._current
        if s is cur:
            if not s.peer_used:
                s.peer_used = True
                if self._previous is not None:  # peer switched: old key only for stragglers
                    self._previous_expires = min(
                        self._previous_expires, now + self.config.old_key_grace
                    )
            if newest and addr != self._peer_address and self._may_roam(addr, now):
                self._move_peer(addr)
            if counter >= self._rx_budget and self._pending is None:
                self._start_handshake(now, wall_ns, new_round=True)
        elif cur is not None and not cur.peer_used:
            # An old-key packet while the peer has not switched: it is still the key the
            # peer sends with, so it may roam; and our confirmation may have been lost.
            if newest and addr != self._peer_address and self._may_roam(addr, now):
                self._move_peer(addr)
            if now - self._confirm_sent_at >= self.config.handshake_retry:
                self._send_confirmation(now)

    def _on_control(self, plaintext: bytes, addr: Endpoint, now: float) -> None:
        msg = decode(plaintext)
        if isinstance(msg, Keepalive):
            return  # its work (liveness, roaming) is done by authenticating it
        if isinstance(msg, Probe):
            self._send_control(encode(ProbeAck(seq=msg.seq, sent_us=msg.sent_us)), now)
        elif isinstance(msg, ProbeAck | StandbyProbeAck):
            sent = self._probes.pop(msg.seq, None)
            if sent is None:
                self._drops["stale_probe_ack"] = self._drops.get("stale_probe_ack", 0) + 1
            elif isinstance(msg, ProbeAck):
                self._events.append(ProbeResult(seq=msg.seq, rtt=now - sent))
            else:
                self._events.append(StandbyProbeResult(seq=msg.seq, rtt=now - sent, peer=addr))
        elif isinstance(msg, StandbyProbe):
            # Back the way it came (the standby leg), without touching `_last_sent`: the
            # leg in use keeps its own keepalives.
            ack = encode(StandbyProbeAck(seq=msg.seq, sent_us=msg.sent_us))
            datagram = self._seal_control(ack)
            if datagram is not None:
                self._queue(datagram, addr)
        else:
            raise UnexpectedPacket(f"{type(msg).__name__} inside a CONTROL packet")

    def _on_init(self, data: bytes, addr: Endpoint, now: float) -> None:
        if self._initiator:
            raise UnexpectedPacket("HANDSHAKE_INIT sent to the initiator")
        if self.state is PathState.CLOSED:
            raise PathClosed("path is closed")
        incoming = self._ctx.receive_initiation(data)  # authenticates; no state before
        request = incoming.request
        if request.timestamp <= self._last_timestamp:
            raise HandshakeReplayed(f"timestamp {request.timestamp} not above the last")
        if request.initiator_vip != self.config.peer_vip:
            raise PeerMismatch(f"initiator claims vIP {request.initiator_vip}")
        cur, nxt = self._current, self._next
        epoch = incoming.epoch
        if nxt is not None and epoch == nxt.epoch_byte:
            generation = nxt.generation  # a retry: the initiator never got our answer
        elif nxt is not None and epoch == (nxt.generation + 1) & 0xFF:
            # The initiator moved past `nxt`, so it holds those keys: confirmed.
            self._promote(addr, now)
            generation = nxt.generation + 1
        elif nxt is None and cur is not None and epoch == (cur.generation + 1) & 0xFF:
            generation = cur.generation + 1
        elif nxt is None and cur is None:
            generation = epoch
        else:
            raise UnknownEpoch(f"handshake for epoch {epoch}")
        self._last_timestamp = request.timestamp
        response = TunnelResponse(timestamp=request.timestamp, responder_vip=self.config.local_vip)
        packet, keys = incoming.accept(response, generation, self._ephemeral())
        self._next = _Session(keys, now)
        self._handshakes += 1
        self._rx_packets += 1
        self._rx_bytes += len(data)
        self._last_received = now
        self._idle_reported = False
        if self.state is PathState.NEW:
            self.state = PathState.HANDSHAKING
        self._queue(packet, addr)

    def _on_response(self, data: bytes, addr: Endpoint, now: float) -> None:
        if not self._initiator:
            raise UnexpectedPacket("HANDSHAKE_RESP sent to the responder")
        if self.state is PathState.CLOSED:
            raise PathClosed("path is closed")
        pending = self._pending
        if pending is None:
            raise UnexpectedPacket("no handshake in progress")
        response, keys = pending.complete(data)  # authenticates
        if response.timestamp != pending.request.timestamp:
            raise PeerMismatch("response echoes another timestamp")
        if response.responder_vip != self.config.peer_vip:
            raise PeerMismatch(f"responder claims vIP {response.responder_vip}")
        self._pending = None
        self._hs_retry_at = None
        self._rekey_due_at = None
        self._handshakes += 1
        self._rx_packets += 1
        self._rx_bytes += len(data)
        self._last_received = now
        self._idle_reported = False
        old = self._current
        self._current = _Session(keys, now)
        if old is None:
            self.state = PathState.ESTABLISHED
            self._peer_address = addr
            self._events.append(PathEstablished(self.path_id, addr))
        else:
            # Keep receiving under the old key until the responder has switched (+ grace),
            # but never past the old key's own lifetime.
            self._previous = old
            self._previous_expires = old.created + self.config.reject_after_seconds
            self._rekeys += 1
            self._events.append(Rekeyed(self._current.generation))
        self._confirm_until = now + self.config.handshake_timeout
        self._send_confirmation(now)

    # --- timers ---

    def get_timer(self) -> float | None:
        """When `handle_timer` must run next (monotonic seconds), None for never."""
        if self.state is PathState.CLOSED:
            return None
        cfg = self.config
        timers: list[float] = []
        if self._hs_retry_at is not None:
            timers.append(self._hs_retry_at)
        if self._rekey_due_at is not None:
            timers.append(self._rekey_due_at)
        s = self._current
        if s is not None:
            timers.append(s.created + cfg.reject_after_seconds)
            if self._initiator and self._pending is None:
                timers.append(s.created + cfg.rekey_after_seconds)
            timers.append(self._last_sent + cfg.keepalive_interval)
            if not self._idle_reported:
                timers.append(self._last_received + cfg.idle_timeout)
            if self._confirming(s):
                timers.append(self._confirm_sent_at + cfg.handshake_retry)
        if self._previous is not None:
            timers.append(self._previous_expires)
        return min(timers) if timers else None

    def handle_timer(self, now: float, wall_ns: int) -> None:
        if self.state is PathState.CLOSED:
            return
        cfg = self.config
        s = self._current
        if s is not None and now >= s.created + cfg.reject_after_seconds:
            self._fail("expired")
            return
        if self._hs_retry_at is not None and now >= self._hs_retry_at:
            if s is None and now >= self._hs_started + cfg.handshake_timeout:
                self._fail("timeout")
                return
            self._start_handshake(now, wall_ns, new_round=False)
        if (
            self._initiator
            and s is not None
            and self._pending is None
            and (self._rekey_due_at is not None or now >= s.created + cfg.rekey_after_seconds)
        ):
            self._start_handshake(now, wall_ns, new_round=True)
        if self._previous is not None and now >= self._previous_expires:
            self._previous = None
        s = self._current  # a rekey above may not have finished, but be safe
        if (
            s is not None
            and self._confirming(s)
            and now >= self._confirm_sent_at + cfg.handshake_retry
        ):
            self._send_confirmation(now)
        if s is not None and now >= self._last_sent + cfg.keepalive_interval:
            self._send_control(_KEEPALIVE, now)
        # Compared the way get_timer computes it: `now - last >= timeout` can be False at
        # now == last + timeout (rounding), and the timer would fire again at once, forever.
        if (
            s is not None
            and not self._idle_reported
            and now >= self._last_received + cfg.idle_timeout
        ):
            self._idle_reported = True
            self._events.append(PathIdle(self.path_id, now - self._last_received))

    # --- internals ---

    def _start_handshake(self, now: float, wall_ns: int, *, new_round: bool) -> None:
        """(Re)send a HANDSHAKE_INIT with a fresh ephemeral key and timestamp."""
        cfg = self.config
        if new_round:
            self._hs_started = now
            self._hs_attempts = 0
        self._rekey_due_at = None
        generation = 0 if self._current is None else self._current.generation + 1
        timestamp = max(wall_ns, self._last_timestamp + 1)  # strictly growing per path
        self._last_timestamp = timestamp
        request = TunnelRequest(timestamp=timestamp, initiator_vip=cfg.local_vip)
        self._pending = pending = self._ctx.initiate(generation, request, self._ephemeral())
        targets = cfg.peer_endpoints if self._peer_address is None else (self._peer_address,)
        for target in targets:
            self._queue(pending.packet, target)
        delay = min(cfg.handshake_retry * (2**self._hs_attempts), cfg.handshake_timeout)
        self._hs_attempts += 1
        retry_at = now + delay
        if self._current is None:  # the initial handshake has a deadline
            retry_at = min(retry_at, self._hs_started + cfg.handshake_timeout)
        self._hs_retry_at = retry_at

    def _ephemeral(self) -> Ephemeral | None:
        source = self.config.ephemerals
        return None if source is None else source.take()

    def _confirming(self, s: _Session) -> bool:
        """Initiator: the responder has not yet shown it switched to key `s`."""
        return self._initiator and not s.peer_used and self._confirm_sent_at < self._confirm_until

    def _send_confirmation(self, now: float) -> None:
        self._confirm_sent_at = now
        self._send_control(_KEEPALIVE, now)

    def _send_budget_spent(self, counter: int, now: float) -> bool:
        """The current key has sent its budget: schedule a rekey; True when it must stop."""
        if counter >= REJECT_AFTER_MESSAGES:
            return True
        if self._initiator and self._pending is None and self._rekey_due_at is None:
            self._rekey_due_at = now
        return False

    def _next_probe_seq(self, now: float) -> int:
        seq = self._probe_seq
        self._probe_seq = (seq + 1) & 0xFFFFFFFF
        self._probes[seq] = now
        if len(self._probes) > MAX_OUTSTANDING_PROBES:
            del self._probes[next(iter(self._probes))]  # forget the oldest unanswered
        return seq

    def _may_roam(self, addr: Endpoint, now: float) -> bool:
        """Not back to the address a local move left, while that move is fresh."""
        return addr != self._left or now >= self._left_until

    def _promote(self, addr: Endpoint, now: float, *, roam: bool = True) -> None:
        """Responder: the initiator proved it holds the next keys; send with them now."""
        nxt = self._next
        assert nxt is not None
        old = self._current
        self._next = None
        self._current = nxt
        nxt.peer_used = True
        self._previous = old
        self._previous_expires = now + self.config.old_key_grace
        if old is None:
            self.state = PathState.ESTABLISHED
            self._peer_address = addr
            self._events.append(PathEstablished(self.path_id, addr))
        else:
            self._rekeys += 1
            self._events.append(Rekeyed(nxt.generation))
            if roam and addr != self._peer_address and self._may_roam(addr, now):
                self._move_peer(addr)
        # Our first packet under the new key tells the initiator to stop re-confirming.
        self._send_control(_KEEPALIVE, now)

    def _move_peer(self, addr: Endpoint) -> None:
        old = self._peer_address
        self._peer_address = addr
        self._events.append(PeerAddressChanged(old, addr))

    def _send_control(self, plaintext: bytes, now: float, to: Endpoint | None = None) -> None:
        addr = to or self._peer_address
        if addr is None:
            return
        datagram = self._seal_control(plaintext)
        if datagram is None:
            return
        self._queue(datagram, addr)
        self._last_sent = now

    def _seal_control(self, plaintext: bytes) -> bytes | None:
        s = self._current
        if s is None or s.send.counter >= REJECT_AFTER_MESSAGES:
            return None
        return s.send.seal(plaintext, control=True)

    def _queue(self, datagram: bytes, addr: Endpoint) -> None:
        self._out.append((datagram, addr))
        self._tx_packets += 1
        self._tx_bytes += len(datagram)

    def _fail(self, reason: str) -> None:
        self._events.append(HandshakeFailed(reason))
        self.close()

    def __repr__(self) -> str:
        return (
            f"TunnelPath(path_id={self.path_id.hex()}, role={self.config.role.name}, "
            f"state={self.state.name}, peer={self._peer_address}, epoch={self.epoch})"
        )


__all__ = [
    "HandshakeFailed",
    "HandshakeReplayed",
    "NoSession",
    "PathClosed",
    "PathConfig",
    "PathEstablished",
    "PathEvent",
    "PathIdle",
    "PathState",
    "PeerAddressChanged",
    "PeerMismatch",
    "ProbeResult",
    "Rekeyed",
    "StandbyProbeResult",
    "TunnelPath",
    "UnexpectedPacket",
    "UnknownEpoch",
    "WrongPath",
    "error_reason",
]
