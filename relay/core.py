"""The Relay Server's forwarding core (sans-IO): paths, bindings, forwarding, expiry, load.

The DC installs a path with a Relay Direction (`handle_direction`); each end binds its
side with a BIND (`ntm_proto.relay_binding`); then every tunnel packet of the path that
comes FROM one side's bound address goes out unchanged TO the other side's bound address.
The RS never decrypts. Input is never trusted and never raises: whatever cannot be used is
dropped and counted under `drop_<reason>`.

Datagram handling, in order (first match wins)::

    shorter than 12 bytes                              drop too_short
    type 5/6 (BIND / BIND_ACK)                         -> binding, below
    type not 1-4, wrong size for its type              drop bad_type / bad_length
    reserved bytes 2..3 not zero                       drop bad_field
    path id unknown                                    drop unknown_path (expired_path
                                                       for one that expired lately)
    path past its lifetime or idle timeout             drop expired_path (path removed)
    source is neither side's bound address             drop unbound_source
    other side not bound yet                           queued (see below)
    otherwise                                          forward to the other side

    BIND_ACK received                                  drop bind_unexpected
    BIND malformed                                     drop bind_<bad_length|bad_type|bad_field>
    BIND for an unknown / expired path                 drop bind_unknown_path / bind_expired_path
    MAC does not verify under that side's key          drop bind_bad_mac
    timestamp not above the side's last accepted one   drop bind_replayed
    source is the other side's bound address           drop bind_conflict
    otherwise: bind (or re-bind) the side to the source, answer BIND_ACK to it,
               flush packets queued for that side

Not a reflector: the RS only ever sends to an address that proved, with a fresh MAC, that
it holds a side's key; a packet from anywhere else produces nothing. Not an amplifier: per
datagram received it sends at most one datagram of at most the same size (a forward, or a
BIND_ACK of exactly the BIND's size); a queued packet is sent once, when its side binds.

Queue: the first tunnel packets (a HANDSHAKE_INIT) often reach the RS before the peer's
BIND does. Dropping them would cost the initiator a handshake retry (1 s), so up to
`queue_packets` / `queue_bytes` packets per path wait at most `queue_max_age` seconds for
the other side to bind. They came from a bound side, so they cost an attacker a key.

Re-binding: a valid BIND with a fresh timestamp from a new address moves that side
(an end behind NAT got a new mapping, or moved). Only the MAC can do that; a tunnel packet
from a new address never moves anything (the RS cannot authenticate tunnel packets).

Expiry: a path ends at `created + lifetime` (the DC renews with another Relay Direction of
the same key) or after `idle_timeout` seconds without a forwarded packet or a valid BIND.
`get_timer` / `handle_timer` run the expiry (lazy min-heap: one entry per path).

Load: `load(now)` is the larger of active paths / `max_paths` and received packet rate /
`capacity_pps` (0.0 idle, 1.0 full, may exceed 1.0). The DC reads it in every
RelayDirectionAck (`load` in permille); a RelayDirection for the reserved path id
0000000000000000 with lifetime 0 is a pure load probe.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any

from ntm_proto.messages import (
    Endpoint,
    ErrorCode,
    ErrorMessage,
    PathRole,
    RelayDirection,
    RelayDirectionAck,
)
from ntm_proto.packet import HANDSHAKE_SIZE, PREFIX_SIZE, TUNNEL_OVERHEAD, PacketType
from ntm_proto.relay_binding import BIND_SIZE, BindingType, build_bind_ack, side_key, verify_raw

PROBE_PATH_ID = bytes(8)  # never installed: RelayDirection(PROBE_PATH_ID, ..., 0) asks for load

_INIT, _RESP = int(PacketType.HANDSHAKE_INIT), int(PacketType.HANDSHAKE_RESP)
_DATA, _CONTROL = int(PacketType.DATA), int(PacketType.CONTROL)
_BIND, _BIND_ACK = int(BindingType.BIND), int(BindingType.BIND_ACK)
_ZERO2 = b"\0\0"


@dataclasses.dataclass(frozen=True, slots=True)
class RelaySettings:
    """Limits and timers of one Relay Server (seconds, packets, bytes)."""

    max_paths: int = 10_000
    idle_timeout: float = 90.0  # ends keep a path busy with tunnel keepalives (15 s)
    max_lifetime: int = 86_400  # a longer lifetime in a Relay Direction is cut to this
    queue_packets: int = 8  # per path, waiting for the other side's BIND
    queue_bytes: int = 16_384
    queue_max_age: float = 3.0
    capacity_pps: float = 50_000.0  # the packet rate this RS counts as fully loaded
    tombstones: int = 4096  # recently expired path ids, to count their packets apart

    def __post_init__(self) -> None:
        if self.max_paths < 1 or self.max_lifetime < 1 or self.tombstones < 0:
            raise ValueError("max_paths and max_lifetime must be positive")
        if min(self.idle_timeout, self.queue_max_age, self.capacity_pps) <= 0:
            raise ValueError("timers and capacity must be positive")
        if self.queue_packets < 0 or self.queue_bytes < 0:
            raise ValueError("queue limits must not be negative")


class Binding:
    """One side of a relayed path: its key, where it is bound, and its counters.

    `address` / `via` are where packets for this side go: the (ip, port) its latest
    valid BIND came from, and the owner's token for the socket it arrived on.
    """

    __slots__ = (
        "address",
        "binds",
        "bound_at",
        "key",
        "last_timestamp",
        "rebinds",
        "role",
        "rx_bytes",
        "rx_packets",
        "tx_bytes",
        "tx_packets",
        "via",
    )

    def __init__(self, role: PathRole, key: bytes) -> None:
        self.role = role
        self.key = key
        self.address: Endpoint | None = None
        self.via = 0
        self.last_timestamp = 0
        self.bound_at: float | None = None
        self.binds = 0  # accepted BINDs (first bind and refreshes)
        self.rebinds = 0  # accepted BINDs that moved the side to a new address
        self.rx_packets = 0  # tunnel packets from this side
        self.rx_bytes = 0
        self.tx_packets = 0  # tunnel packets to this side
        self.tx_bytes = 0

    def status(self, now: float) -> dict[str, Any]:
        return {
            "address": None if self.address is None else list(self.address),
            "bound_for_s": None if self.bound_at is None else round(now - self.bound_at, 3),
            "binds": self.binds,
            "rebinds": self.rebinds,
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
        }


class RelayPath:
    __slots__ = (
        "binding_key",
        "created",
        "expires_at",
        "last_active",
        "owner",
        "path_id",
        "pending",
        "pending_bytes",
        "sides",
        "timer_at",
    )

    def __init__(
        self, path_id: bytes, binding_key: bytes, owner: str, now: float, expires_at: float
    ) -> None:
        self.path_id = path_id
        self.binding_key = binding_key
        self.owner = owner  # the DC that installed it; only it may change or remove it
        self.created = now
        self.expires_at = expires_at
        self.last_active = now
        self.sides = (
            Binding(PathRole.INITIATOR, side_key(binding_key, PathRole.INITIATOR)),
            Binding(PathRole.RESPONDER, side_key(binding_key, PathRole.RESPONDER)),
        )
        # Packets from the bound side waiting for the other one (only one side can be
        # unbound while the other sends), as (arrival time, datagram).
        self.pending: list[tuple[float, bytes]] = []
        self.pending_bytes = 0
        self.timer_at = 0.0  # deadline of this path's live heap entry

    def deadline(self, idle_timeout: float) -> float:
        return min(self.expires_at, self.last_active + idle_timeout)

    def side(self, role: PathRole) -> Binding:
        return self.sides[0] if role is PathRole.INITIATOR else self.sides[1]

    def status(self, now: float) -> dict[str, Any]:
        a, b = self.sides
        return {
            "path_id": self.path_id.hex(),
            "owner": self.owner,
            "age_s": round(now - self.created, 3),
            "expires_in_s": round(self.expires_at - now, 3),
            "idle_s": round(now - self.last_active, 3),
            "queued": len(self.pending),
            "initiator": a.status(now),
            "responder": b.status(now),
        }


class RelayCore:
    """The Relay Server's state (see the module docstring). Time is passed in: `now` is
    monotonic seconds; `via` is an opaque token the owner uses to pick the socket to send
    from (the one the side's BIND arrived on), 0 when it has only one per family."""

    def __init__(self, settings: RelaySettings | None = None, now: float = 0.0) -> None:
        self.settings = settings or RelaySettings()
        self._paths: dict[bytes, RelayPath] = {}
        self._heap: list[tuple[float, bytes]] = []
        self._tombstones: dict[bytes, None] = {}  # insertion-ordered, capped
        self._out: list[tuple[bytes, Endpoint, int]] = []
        self._drops: dict[str, int] = {}
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "rx_datagrams",
                "rx_bytes",
                "forwarded_packets",
                "forwarded_bytes",
                "binds",
                "rebinds",
                "bind_acks",
                "queued",
                "queue_flushed",
                "paths_added",
                "paths_renewed",
                "paths_replaced",
                "paths_removed",
                "paths_expired_lifetime",
                "paths_expired_idle",
                "directions_refused",
            ),
            0,
        )
        self._rate_t = now
        self._rate_n = 0
        self._rate = 0.0

    # --- control plane --------------------------------------------------------------------

    def handle_direction(
        self, msg: RelayDirection, owner: str, now: float
    ) -> RelayDirectionAck | ErrorMessage:
        """Install, renew, replace or (lifetime 0) remove a path for DC `owner`."""
        pid = msg.path_id
        path = self._paths.get(pid)
        if path is not None and path.owner != owner:
            return self._refuse(ErrorCode.NOT_AUTHORIZED, f"path {pid.hex()} belongs to another DC")
        if msg.lifetime == 0:
            if path is not None:
                self._remove(path, "paths_removed")
            return self._ack(pid, now)
        if pid == PROBE_PATH_ID:
            return self._refuse(ErrorCode.BAD_MESSAGE, "path id 0 is reserved for load probes")
        expires_at = now + min(msg.lifetime, self.settings.max_lifetime)
        if path is not None and path.binding_key == msg.binding_key:
            path.expires_at = expires_at  # renewal: bindings and counters stay
            self._counters["paths_renewed"] += 1
            self._arm(path)
            return self._ack(pid, now)
        if path is not None:
            # A new key: bindings proven under the old one no longer count.
            self._remove(path, "paths_replaced")
        elif len(self._paths) >= self.settings.max_paths:
            return self._refuse(
                ErrorCode.POOL_EXHAUSTED,
                f"relay full ({self.settings.max_paths} paths); pick another relay",
            )
        path = RelayPath(pid, msg.binding_key, owner, now, expires_at)
        self._paths[pid] = path
        self._tombstones.pop(pid, None)
        self._counters["paths_added"] += 1
        self._arm(path)
        return self._ack(pid, now)

    def remove_path(self, path_id: bytes) -> bool:
        path = self._paths.get(path_id)
        if path is None:
            return False
        self._remove(path, "paths_removed")
        return True

    # --- data plane -----------------------------------------------------------------------

    def receive_datagram(
        self, data: bytes, addr: Endpoint, now: float, via: int = 0
    ) -> Binding | None:
        """One datagram from `addr`. Returns the side to forward `data` to, unchanged (send it
        to `.address` via `.via`), or None; then `datagrams_to_send` may hold BIND_ACKs and
        released queued packets. Never raises on any input."""
        counters = self._counters
        n = len(data)
        counters["rx_datagrams"] += 1
        counters["rx_bytes"] += n
        reason = self._check(data, n)
        if reason is not None:
            if reason == "binding":
                self._on_binding(data, addr, now, via)
            else:
                self._drop(reason)
            return None
        pid = data[4:12]
        path = self._paths.get(pid)
        if path is None:
            self._drop("expired_path" if pid in self._tombstones else "unknown_path")
            return None
        if now >= path.expires_at or now - path.last_active >= self.settings.idle_timeout:
            self._expire(path, now)
            self._drop("expired_path")
            return None
        a, b = path.sides
        if addr == a.address:
            src, dst = a, b
        elif addr == b.address:
            src, dst = b, a
        else:
            self._drop("unbound_source")  # includes every reflection attempt
            return None
        src.rx_packets += 1
        src.rx_bytes += n
        path.last_active = now
        if dst.address is None:
            self._enqueue(path, data, now)
            return None
        dst.tx_packets += 1
        dst.tx_bytes += n
        counters["forwarded_packets"] += 1
        counters["forwarded_bytes"] += n
        return dst

    @staticmethod
    def _check(data: bytes, n: int) -> str | None:
        """Why a datagram cannot be a forwardable tunnel packet ("binding" for 5/6), or None."""
        if n < PREFIX_SIZE:
            return "too_short"
        t = data[0]
        if t in (_DATA, _CONTROL):
            if n < TUNNEL_OVERHEAD + (t == _DATA):
                return "bad_length"
        elif t in (_INIT, _RESP):
            if n != HANDSHAKE_SIZE:
                return "bad_length"
        elif t in (_BIND, _BIND_ACK):
            return "binding"
        else:
            return "bad_type"
        if data[2:4] != _ZERO2:
            return "bad_field"
        return None

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint, int]]:
        """BIND_ACKs and released queued packets, as (datagram, address, via)."""
        out, self._out = self._out, []
        return out

    # --- timers ---------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When `handle_timer` should run next (may be early; never late)."""
        return self._heap[0][0] if self._heap else None

    def handle_timer(self, now: float) -> None:
        heap = self._heap
        idle = self.settings.idle_timeout
        while heap and heap[0][0] <= now:
            at, pid = heapq.heappop(heap)
            path = self._paths.get(pid)
            if path is None or at != path.timer_at:
                continue  # stale entry: path gone, or re-armed earlier
            deadline = path.deadline(idle)
            if deadline <= now:
                self._expire(path, now)
            else:
                path.timer_at = deadline  # activity pushed it back: one live entry again
                heapq.heappush(heap, (deadline, pid))
        self._sample_rate(now)

    # --- health and status ----------------------------------------------------------------

    @property
    def active_paths(self) -> int:
        return len(self._paths)

    def path(self, path_id: bytes) -> RelayPath | None:
        return self._paths.get(path_id)

    @property
    def paths(self) -> tuple[RelayPath, ...]:
        return tuple(self._paths.values())

    def packet_rate(self, now: float) -> float:
        """Received datagrams per second, smoothed over samples at least 1 s apart."""
        self._sample_rate(now)
        return self._rate

    def load(self, now: float) -> float:
        s = self.settings
        return max(len(self._paths) / s.max_paths, self.packet_rate(now) / s.capacity_pps)

    def load_permille(self, now: float) -> int:
        return min(round(self.load(now) * 1000), 0xFFFF)

    @property
    def counters(self) -> dict[str, int]:
        out = dict(self._counters)
        for reason, n in self._drops.items():
            out["drop_" + reason] = n
        return out

    def status(self, now: float, max_listed: int = 1000) -> dict[str, Any]:
        """The relay's part of `ntm status` (JSON-ready); lists at most `max_listed` paths."""
        listed = list(self._paths.values())[:max_listed]
        return {
            "active_paths": len(self._paths),
            "bound_paths": sum(1 for p in self._paths.values() if all(s.address for s in p.sides)),
            "max_paths": self.settings.max_paths,
            "packet_rate": round(self.packet_rate(now), 1),
            "load": round(self.load(now), 4),
            "counters": self.counters,
            "paths": [p.status(now) for p in listed],
            "paths_not_listed": len(self._paths) - len(listed),
        }

    # --- internals ------------------------------------------------------------------------

    def _on_binding(self, data: bytes, addr: Endpoint, now: float, via: int) -> None:
        # Raw-byte checks, cheapest first: a flood of forged BINDs costs one dict lookup
        # each, or one HMAC for a known path id; no object is built before the MAC holds.
        if len(data) != BIND_SIZE:
            self._drop("bind_bad_length")
            return
        if data[0] != _BIND:
            self._drop("bind_unexpected")  # the RS sends BIND_ACKs, it never takes them
            return
        if data[2:4] != _ZERO2 or data[1] not in (1, 2):
            self._drop("bind_bad_field")
            return
        pid = data[4:12]
        path = self._paths.get(pid)
        if path is None:
            self._drop("bind_expired_path" if pid in self._tombstones else "bind_unknown_path")
            return
        if now >= path.expires_at or now - path.last_active >= self.settings.idle_timeout:
            self._expire(path, now)
            self._drop("bind_expired_path")
            return
        side, other = path.sides if data[1] == 1 else path.sides[::-1]
        if not verify_raw(data, side.key):
            self._drop("bind_bad_mac")
            return
        timestamp = int.from_bytes(data[12:20], "big")
        if timestamp <= side.last_timestamp:
            self._drop("bind_replayed")
            return
        if other.address == addr:
            self._drop("bind_conflict")  # one address cannot be both ends
            return
        side.last_timestamp = timestamp
        side.binds += 1
        path.last_active = now
        self._counters["binds"] += 1
        if side.address != addr:
            if side.address is not None:
                side.rebinds += 1
                self._counters["rebinds"] += 1
            side.address = addr
            side.bound_at = now
        side.via = via
        ack = build_bind_ack(side.role, pid, timestamp, side.key)
        self._out.append((ack, addr, via))
        self._counters["bind_acks"] += 1
        if path.pending and other.address is not None:
            self._flush(path, side, now)

    def _enqueue(self, path: RelayPath, data: bytes, now: float) -> None:
        s = self.settings
        self._prune(path, now)
        if len(path.pending) >= s.queue_packets or path.pending_bytes + len(data) > s.queue_bytes:
            self._drop("queue_full")
            return
        path.pending.append((now, data))
        path.pending_bytes += len(data)
        self._counters["queued"] += 1

    def _flush(self, path: RelayPath, dst: Binding, now: float) -> None:
        self._prune(path, now)
        addr = dst.address
        assert addr is not None
        for _t, data in path.pending:
            self._out.append((data, addr, dst.via))
            dst.tx_packets += 1
            dst.tx_bytes += len(data)
            self._counters["forwarded_packets"] += 1
            self._counters["forwarded_bytes"] += len(data)
            self._counters["queue_flushed"] += 1
        path.pending.clear()
        path.pending_bytes = 0

    def _prune(self, path: RelayPath, now: float) -> None:
        limit = now - self.settings.queue_max_age
        stale = 0
        while stale < len(path.pending) and path.pending[stale][0] < limit:
            path.pending_bytes -= len(path.pending[stale][1])
            stale += 1
        if stale:
            del path.pending[:stale]
            self._drops["queue_expired"] = self._drops.get("queue_expired", 0) + stale

    def _expire(self, path: RelayPath, now: float) -> None:
        lifetime_over = now >= path.expires_at
        self._remove(path, "paths_expired_lifetime" if lifetime_over else "paths_expired_idle")

    def _remove(self, path: RelayPath, counter: str) -> None:
        del self._paths[path.path_id]
        self._counters[counter] += 1
        if path.pending:
            self._drops["queue_expired"] = self._drops.get("queue_expired", 0) + len(path.pending)
            path.pending.clear()
        if self.settings.tombstones:
            self._tombstones[path.path_id] = None
            if len(self._tombstones) > self.settings.tombstones:
                del self._tombstones[next(iter(self._tombstones))]
        # its heap entry goes stale (path gone) and is skipped when popped

    def _arm(self, path: RelayPath) -> None:
        deadline = path.deadline(self.settings.idle_timeout)
        if self._paths.get(path.path_id) is path and (
            path.timer_at == 0.0 or deadline < path.timer_at
        ):
            path.timer_at = deadline
            heapq.heappush(self._heap, (deadline, path.path_id))

    def _ack(self, path_id: bytes, now: float) -> RelayDirectionAck:
        return RelayDirectionAck(path_id, len(self._paths), self.load_permille(now))

    def _refuse(self, code: ErrorCode, reason: str) -> ErrorMessage:
        self._counters["directions_refused"] += 1
        return ErrorMessage(code, reason)

    def _drop(self, reason: str) -> None:
        self._drops[reason] = self._drops.get(reason, 0) + 1

    def _sample_rate(self, now: float) -> None:
        dt = now - self._rate_t
        if dt >= 1.0:
            n = self._counters["rx_datagrams"]
            rate = (n - self._rate_n) / dt
            self._rate = rate if self._rate == 0.0 else 0.5 * self._rate + 0.5 * rate
            self._rate_t, self._rate_n = now, n


__all__ = ["PROBE_PATH_ID", "Binding", "RelayCore", "RelayPath", "RelaySettings"]
