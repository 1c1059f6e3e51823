"""Which gateway of a multi-gateway service an MN gets, sans-IO.

Several NTMAs ("gateways") may front one service FQDN. For each Direction Request to such a
service the DC picks one of them with `choose` and tells the MN the others, best first, as
alternatives to fail over to.

Policy, in order:

1. **Usable** gateways only: connected to the DC and weight > 0 (weight 0 drains a gateway:
   its MNs stay, new ones go elsewhere). Nothing else is ever chosen or offered.
2. **Hold-down**: a gateway that (re)connected less than `hold_down` seconds ago ranks after
   every settled one, so a recovered primary gets MNs back only once it has stayed up for
   the hold-down, and a flapping one gets none while something else works.
3. **Host-based weighted rendezvous hashing** (HRW) over the requester's FQDN within each of
   those two groups: every gateway gets the score ``w_eff / -ln(u)``, where ``u`` in (0, 1) is
   a keyed hash of (requester, gateway) and ``w_eff`` the effective weight below; the highest
   score wins. An MN therefore keeps its gateway while the set is stable, the shares follow
   the weights, and when a gateway leaves or joins only the MNs that must move do.
4. A **preferred** gateway (the MN asked for it) is chosen whenever it is usable, even in
   hold-down: the MN knows something (its current path, its failover) that the DC does not.

Effective weight, from the gateway's latest report (ignored when older than `REPORT_TTL`)::

    w_eff = weight * f_loss * f_load * f_delay
    f_loss  = clamp(1 - 5 * (loss - 0.10), 0.01, 1)    loss in [0, 1]: <= 10 % -> 1,
                                                       20 % -> 0.5, >= 29.8 % -> 0.01
    f_load  = 1 / (1 + tunnels / (10 * weight))        10 tunnels per weight unit halve it
    f_delay = 1 / (1 + (rtt + 4 * jitter) / 200 ms)    a congested uplink shows as delay

The loss is the probes' round trip to the gateway's MNs, so it includes their access
networks: up to 10 % (5 % each way gives 9.75 %) counts as ordinary and changes nothing.
The floors keep a usable gateway's w_eff above zero, so a lossy gateway still serves when it
is the only one. Health moves only the MNs whose two best scores are close (the HRW property),
and only for new Direction Requests: the DC never moves an existing tunnel by itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable

REPORT_TTL = 60.0  # seconds; an older report says nothing about the gateway now
LOSS_FREE = 0.10  # round-trip probe loss that counts as ordinary
LOSS_SLOPE = 5.0
MIN_LOSS_FACTOR = 0.01
TUNNELS_PER_WEIGHT = 10
DELAY_SCALE_US = 200_000
JITTER_WEIGHT = 4
MAX_ALTERNATIVES = 8  # ntm_proto.messages.MAX_ALTERNATIVES


@dataclasses.dataclass(frozen=True)
class Health:
    """A gateway's latest report, as the DC received it at `at` (its monotonic clock)."""

    tunnels: int
    rtt_us: int
    jitter_us: int
    loss_ppm: int
    at: float


@dataclasses.dataclass(frozen=True)
class Gateway:
    """What the policy knows of one gateway of a service."""

    name: str
    weight: int
    connected: bool
    connected_since: float  # when its current run of being connected began
    health: Health | None = None


@dataclasses.dataclass(frozen=True)
class Choice:
    chosen: str | None  # None: no usable gateway
    alternatives: tuple[str, ...]  # the other usable ones, best first, at most 8


def unusable(gw: Gateway) -> str | None:
    """Why `gw` may never be chosen, or None when it may."""
    if not gw.connected:
        return "not connected to the DC"
    if gw.weight == 0:
        return "draining (weight 0)"
    return None


def hold_down_left(gw: Gateway, now: float, hold_down: float) -> float:
    """Seconds until a (re)connected gateway counts as settled; 0 once it does."""
    if not gw.connected:
        return 0.0
    return max(0.0, gw.connected_since + hold_down - now)


def fresh_health(gw: Gateway, now: float) -> Health | None:
    h = gw.health
    return h if h is not None and now - h.at <= REPORT_TTL else None


def effective_weight(gw: Gateway, now: float) -> float:
    """The weight HRW uses: the configured one scaled down by loss, load and delay."""
    if gw.weight == 0:
        return 0.0
    h = fresh_health(gw, now)
    if h is None:
        return float(gw.weight)
    loss = min(h.loss_ppm, 1_000_000) / 1_000_000
    f_loss = min(1.0, max(MIN_LOSS_FACTOR, 1.0 - LOSS_SLOPE * (loss - LOSS_FREE)))
    f_load = 1.0 / (1.0 + h.tunnels / (TUNNELS_PER_WEIGHT * gw.weight))
    f_delay = 1.0 / (1.0 + (h.rtt_us + JITTER_WEIGHT * h.jitter_us) / DELAY_SCALE_US)
    return gw.weight * f_loss * f_load * f_delay


def unit_hash(requester: str, gateway: str) -> float:
    """A stable value in (0, 1) for the pair: the same in every DC process and run."""
    digest = hashlib.blake2b(
        f"{requester}\0{gateway}".encode(), digest_size=8, person=b"ntm-hrw"
    ).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2**64


def score(gw: Gateway, requester: str, now: float) -> float:
    """Weighted rendezvous score (logarithmic method): higher is better."""
    return effective_weight(gw, now) / -math.log(unit_hash(requester, gw.name))


def ranking(
    gateways: Iterable[Gateway], requester: str, now: float, hold_down: float
) -> list[Gateway]:
    """Usable gateways, best first: settled ones by score, then those still in hold-down."""
    usable = [gw for gw in gateways if unusable(gw) is None]
    return sorted(
        usable,
        key=lambda gw: (
            hold_down_left(gw, now, hold_down) > 0,
            -score(gw, requester, now),
            gw.name,
        ),
    )


def choose(
    gateways: Iterable[Gateway],
    requester: str,
    now: float,
    hold_down: float,
    preferred: str = "",
) -> Choice:
    order = [gw.name for gw in ranking(gateways, requester, now, hold_down)]
    if preferred in order:
        order.remove(preferred)
        order.insert(0, preferred)
    if not order:
        return Choice(None, ())
    return Choice(order[0], tuple(order[1 : 1 + MAX_ALTERNATIVES]))
