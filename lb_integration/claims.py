"""Route claims: "vIP V is behind me, next hop H, claimed at T" (codec + rules, sans-IO).

An NTMA that holds a mobile node's tunnel claims the node's vIP at the LB host, so the LB's
replies to V go to that NTMA. Claims travel over ntm_io.control (QUIC, mutual TLS), one
claim per request stream; the answer is a RouteClaimAck.

Wire format: one JSON object, UTF-8, at most 1 KiB, keys exactly as below, "v": 1. JSON
because it is one small message on an authenticated channel; the decoder is strict (unknown
or missing keys, wrong types, bad addresses -> ClaimDecodeError), so anything it accepts is
well formed.

Rules (ClaimBook.offer), in order:
1. the peer's certificate role is `adaptor` (nobody else holds tunnels for MNs);
2. V lies inside an accepted vIP network; H is a unicast address of V's family, not V,
   and inside an accepted next-hop network when the config names any;
3. newest claim wins: `claim_time` is when the NTMA took the tunnel over (its own clock,
   milliseconds; NTMAs run NTP-synced clocks, and an NTMA never reuses a time). A claim
   older than the holder's is refused as stale; an equal time wins only for the current
   holder (a refresh), so two NTMAs racing with the same time cannot flap the route;
4. a claim lives `lifetime` seconds (capped by the config) unless refreshed; a withdrawal
   from the holder removes it at once. Expired and withdrawn claims remove their route.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
from typing import Any

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

VERSION = 1
MAX_MESSAGE = 1024
MAX_LIFETIME = 86400
ADAPTOR_ROLE = "adaptor"


class ClaimDecodeError(ValueError):
    """The bytes are not a well-formed claim message (the message says what is wrong)."""


class Code(enum.Enum):
    OK = "ok"
    NOT_ADAPTOR = "not_adaptor"
    VIP_OUTSIDE = "vip_outside"
    BAD_NEXT_HOP = "bad_next_hop"
    STALE = "stale"
    NOT_HOLDER = "not_holder"
    BAD_MESSAGE = "bad_message"


@dataclasses.dataclass(frozen=True, slots=True)
class RouteClaim:
    vip: str
    next_hop: str
    claim_time: int  # ms, when the NTMA took the tunnel over; newest wins
    lifetime: int = 60  # seconds; refresh well before (e.g. every lifetime / 3)
    withdraw: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class RouteClaimAck:
    vip: str
    code: Code
    reason: str = ""
    lifetime: int = 0  # seconds granted (0 when refused or withdrawn)

    @property
    def accepted(self) -> bool:
        return self.code is Code.OK


Message = RouteClaim | RouteClaimAck


def encode(msg: Message) -> bytes:
    if isinstance(msg, RouteClaim):
        doc: dict[str, Any] = {
            "v": VERSION,
            "type": "route_claim",
            "vip": msg.vip,
            "next_hop": msg.next_hop,
            "claim_time": msg.claim_time,
            "lifetime": msg.lifetime,
            "withdraw": msg.withdraw,
        }
    else:
        doc = {
            "v": VERSION,
            "type": "route_claim_ack",
            "vip": msg.vip,
            "code": msg.code.value,
            "reason": msg.reason,
            "lifetime": msg.lifetime,
        }
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"claim message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


_FIELDS = {
    "route_claim": {
        "v": int,
        "type": str,
        "vip": str,
        "next_hop": str,
        "claim_time": int,
        "lifetime": int,
        "withdraw": bool,
    },
    "route_claim_ack": {
        "v": int,
        "type": str,
        "vip": str,
        "code": str,
        "reason": str,
        "lifetime": int,
    },
}


def decode(data: bytes) -> Message:
    if len(data) > MAX_MESSAGE:
        raise ClaimDecodeError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ClaimDecodeError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ClaimDecodeError("not a JSON object")
    kind = doc.get("type")
    fields = _FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ClaimDecodeError(f"unknown message type {kind!r}")
    if set(doc) != set(fields):
        raise ClaimDecodeError(f"keys {sorted(doc)} are not {sorted(fields)}")
    for key, typ in fields.items():
        value = doc[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ClaimDecodeError(f"{key} must be {typ.__name__}")
    if doc["v"] != VERSION:
        raise ClaimDecodeError(f"version {doc['v']} is not {VERSION}")
    vip = _address(doc["vip"], "vip")
    if not 0 <= doc["lifetime"] <= MAX_LIFETIME:
        raise ClaimDecodeError(f"lifetime must be 0..{MAX_LIFETIME} seconds")
    if kind == "route_claim_ack":
        try:
            code = Code(doc["code"])
        except ValueError:
            raise ClaimDecodeError(f"unknown code {doc['code']!r}") from None
        return RouteClaimAck(vip, code, doc["reason"][:500], doc["lifetime"])
    if doc["claim_time"] < 0 or doc["claim_time"] >= 2**63:
        raise ClaimDecodeError("claim_time must be a non-negative 64-bit integer")
    if not doc["withdraw"] and doc["lifetime"] < 1:
        raise ClaimDecodeError("lifetime must be at least 1 second")
    return RouteClaim(
        vip,
        _address(doc["next_hop"], "next_hop"),
        doc["claim_time"],
        doc["lifetime"],
        doc["withdraw"],
    )


def _address(text: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ClaimDecodeError(f"{what} {text[:60]!r} is not an IP address") from None


# ---------------------------------------------------------------- the rules


@dataclasses.dataclass(frozen=True, slots=True)
class Held:
    vip: str
    holder: str  # the claimant's identity: its certificate's DNS names, sorted
    next_hop: str
    claim_time: int
    expires: float  # agent's monotonic clock
    adopted: bool = False  # found in the kernel at start, nobody's claim yet


@dataclasses.dataclass(frozen=True, slots=True)
class Replace:
    vip: str
    next_hop: str


@dataclasses.dataclass(frozen=True, slots=True)
class Remove:
    vip: str


RouteChange = Replace | Remove


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    ack: RouteClaimAck
    changes: tuple[RouteChange, ...] = ()


def holder_id(names: frozenset[str]) -> str:
    return ",".join(sorted(names)) or "(no names)"


class ClaimBook:
    """Who holds which vIP (sans-IO: `now` is the agent's monotonic clock, passed in)."""

    def __init__(
        self,
        vip_networks: tuple[IpNetwork, ...],
        next_hop_networks: tuple[IpNetwork, ...] = (),
        max_lifetime: int = 120,
    ) -> None:
        self.vip_networks = vip_networks
        self.next_hop_networks = next_hop_networks
        self.max_lifetime = max_lifetime
        self.held: dict[str, Held] = {}
        self.counters: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _refuse(self, vip: str, code: Code, reason: str) -> Decision:
        self._count(f"refused_{code.value}")
        return Decision(RouteClaimAck(vip, code, reason))

    def adopt(self, vip: str, next_hop: str, now: float) -> None:
        """A route left by a previous run: kept until any real claim, or max_lifetime."""
        self.held[vip] = Held(vip, "", next_hop, -1, now + self.max_lifetime, adopted=True)

    def offer(
        self, claim: RouteClaim, names: frozenset[str], role: str | None, now: float
    ) -> Decision:
        vip = claim.vip
        holder = holder_id(names)
        if role != ADAPTOR_ROLE:
            return self._refuse(
                vip,
                Code.NOT_ADAPTOR,
                f"only an NTMA (certificate role adaptor) may claim; you are {role}",
            )
        v = ipaddress.ip_address(vip)
        if not any(v in net for net in self.vip_networks):
            return self._refuse(
                vip, Code.VIP_OUTSIDE, f"{vip} is outside the accepted vIP networks"
            )
        problem = self._next_hop_problem(v, claim.next_hop)
        if problem:
            return self._refuse(vip, Code.BAD_NEXT_HOP, problem)
        changes = list(self.expire(now))
        cur = self.held.get(vip)
        if claim.withdraw:
            if cur is None:
                self._count("withdrawn")
                return Decision(RouteClaimAck(vip, Code.OK, "not held"), tuple(changes))
            if cur.holder != holder or claim.claim_time < cur.claim_time:
                return self._refuse(
                    vip, Code.NOT_HOLDER, f"{vip} is held by {cur.holder or 'a previous run'}"
                )
            del self.held[vip]
            self._count("withdrawn")
            return Decision(RouteClaimAck(vip, Code.OK, "withdrawn"), (*changes, Remove(vip)))
        if cur is not None and not cur.adopted:
            newer = claim.claim_time > cur.claim_time
            tie_ours = claim.claim_time == cur.claim_time and holder == cur.holder
            if not (newer or tie_ours):
                return self._refuse(
                    vip,
                    Code.STALE,
                    f"{vip} is held by {cur.holder} with a claim from t={cur.claim_time} "
                    f"(yours t={claim.claim_time}); the newest claim wins",
                )
        lifetime = min(claim.lifetime, self.max_lifetime)
        self.held[vip] = Held(vip, holder, claim.next_hop, claim.claim_time, now + lifetime)
        if cur is None or cur.next_hop != claim.next_hop or cur.adopted:
            changes.append(Replace(vip, claim.next_hop))
            self._count("accepted")
        else:
            self._count("refreshed")
        return Decision(RouteClaimAck(vip, Code.OK, "", lifetime), tuple(changes))

    def _next_hop_problem(self, vip: IpAddress, text: str) -> str | None:
        hop = ipaddress.ip_address(text)
        if hop.version != vip.version:
            return f"next hop {hop} is IPv{hop.version} but the vIP is IPv{vip.version}"
        if hop == vip or hop.is_multicast or hop.is_unspecified or hop.is_loopback:
            return f"next hop {hop} is not a usable unicast gateway"
        if self.next_hop_networks and not any(hop in n for n in self.next_hop_networks):
            return f"next hop {hop} is outside the accepted next-hop networks"
        return None

    def expire(self, now: float) -> list[RouteChange]:
        gone = [h for h in self.held.values() if h.expires <= now]
        for h in gone:
            del self.held[h.vip]
            self._count("expired")
        return [Remove(h.vip) for h in gone]

    def next_expiry(self) -> float | None:
        return min((h.expires for h in self.held.values()), default=None)
