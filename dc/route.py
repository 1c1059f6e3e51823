"""Route decision: how a tunnel between two registered nodes is built.

A pure function of what the DC knows of both ends (their IP families and whether each sits
behind NAT). The table, first matching row wins:

| initiator (MN)        | responder (CN)           | kind     | who sends the Tunnel Request |
|-----------------------|--------------------------|----------|------------------------------|
| no family in common with the responder           || relay    | both, to the Relay Server    |
| behind NAT            | behind NAT               | relay    | both, to the Relay Server    |
| behind the same NAT address as the responder     || relay    | both, to the Relay Server    |
| any                   | reachable (no NAT)       | direct   | the initiator                |
| reachable (no NAT)    | behind NAT               | reverse  | the responder, toward the MN |
"""

from __future__ import annotations

import dataclasses
import ipaddress

from ntm_proto.messages import Endpoint, RouteKind


@dataclasses.dataclass(frozen=True)
class EndView:
    """What the route decision needs to know of one end."""

    families: frozenset[int]
    behind_nat: bool
    seen_address: str
    public_endpoints: tuple[Endpoint, ...]


@dataclasses.dataclass(frozen=True)
class RouteDecision:
    kind: RouteKind
    # Where each end sends its tunnel packets (empty: it waits to be contacted).
    initiator_targets: tuple[Endpoint, ...]
    responder_targets: tuple[Endpoint, ...]


def decide(initiator: EndView, responder: EndView) -> RouteDecision:
    common = initiator.families & responder.families
    both_nat = initiator.behind_nat and responder.behind_nat
    same_nat = (
        initiator.behind_nat
        and responder.behind_nat
        and initiator.seen_address == responder.seen_address
    )
    if not common or both_nat or same_nat:
        return RouteDecision(RouteKind.RELAY, (), ())
    if not responder.behind_nat:
        targets = _of_families(responder.public_endpoints, initiator.families)
        if targets:
            # Then the responder's other-family addresses: the initiator's first INIT goes
            # to all it can send to, but after a move to a network of another family it
            # probes the path's peer there and moves it in a round trip
            # (ntm_node.failover.probe_other_families) instead of waiting for a new Direction.
            others = tuple(ep for ep in responder.public_endpoints if ep not in targets)
            return RouteDecision(RouteKind.DIRECT, targets + others, ())
    if not initiator.behind_nat:
        targets = _of_families(initiator.public_endpoints, responder.families)
        if targets:
            return RouteDecision(RouteKind.REVERSE, (), targets)
    return RouteDecision(RouteKind.RELAY, (), ())


def _of_families(endpoints: tuple[Endpoint, ...], families: frozenset[int]) -> tuple[Endpoint, ...]:
    return tuple(ep for ep in endpoints if ipaddress.ip_address(ep[0]).version in families)
