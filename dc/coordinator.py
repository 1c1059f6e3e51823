"""The Direction Coordinator's decisions, sans-IO: registration and Direction Requests.

The asyncio server (`dc.server`) decodes a request, asks this class what to answer and
whom to push a Route Direction to, and moves the bytes. Nothing here touches a socket.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import secrets
from collections.abc import Callable

from ntm_proto.marker import MarkerRule
from ntm_proto.messages import (
    DirectionRequest,
    Endpoint,
    ErrorCode,
    ErrorMessage,
    NodeInformationRequest,
    PathRole,
    RegistrationRequest,
    RegistrationResponse,
    RouteDirection,
    RouteKind,
)
from ntm_proto.pool import PoolExhausted
from ntm_proto.relay_binding import side_key

from .registry import NodeRecord, Registry
from .route import EndView, RouteDecision, decide

log = logging.getLogger("ntm.dc")

REGISTERING_ROLES = frozenset({"node", "adaptor"})
NO_KEY = bytes(32)


@dataclasses.dataclass(frozen=True)
class Federate:
    """The target lives in another DC's zone: ask that DC (found through DNS)."""

    zone: str
    requester: NodeRecord


@dataclasses.dataclass(frozen=True)
class DirectionPlan:
    """Send `to_responder` over `responder.handle`, wait for its ack, answer `to_initiator`."""

    path_id: bytes
    kind: RouteKind
    requester: NodeRecord
    responder: NodeRecord
    to_requester: RouteDirection
    to_responder: RouteDirection


class Coordinator:
    def __init__(
        self,
        zone: str,
        registry: Registry,
        vip_route: ipaddress.IPv4Network | ipaddress.IPv6Network,
        path_lifetime: int = 3600,
        federation: bool = False,
        mark: str = "ntm",
    ) -> None:
        self.zone = zone
        self.federation = federation
        # the server tells us whether a healthy relay exists (asked at decision time)
        self.relays_available: Callable[[], bool] = lambda: False
        self.marker = MarkerRule(mark)
        self.registry = registry
        self.vip_route = vip_route
        self.path_lifetime = path_lifetime
        self.counters: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def in_zone(self, fqdn: str) -> bool:
        return fqdn == self.zone or fqdn.endswith("." + self.zone)

    def register(
        self,
        peer_names: frozenset[str],
        peer_role: str,
        msg: RegistrationRequest,
        seen: tuple[str, int],
        handle: object,
        now: float,
    ) -> RegistrationResponse | ErrorMessage:
        if peer_role not in REGISTERING_ROLES:
            self._count("register_refused")
            return ErrorMessage(
                ErrorCode.NOT_AUTHORIZED,
                f"a {peer_role!r} certificate cannot register nodes; use a node certificate",
            )
        if msg.fqdn not in peer_names:
            self._count("register_refused")
            log.warning("refused registration of %s: certificate names %s", msg.fqdn, peer_names)
            return ErrorMessage(
                ErrorCode.NOT_AUTHORIZED,
                f"{msg.fqdn} is not among the names in your certificate "
                f"({', '.join(sorted(peer_names)) or 'none'}); issue a certificate that names it",
            )
        if not self.in_zone(msg.fqdn):
            self._count("register_refused")
            return ErrorMessage(
                ErrorCode.NOT_AUTHORIZED,
                f"{msg.fqdn} is outside this DC's zone {self.zone}; register with its own DC",
            )
        try:
            record = self.registry.register(
                msg.fqdn, msg.static_key, msg.tunnel_port, msg.endpoints, seen, now, handle
            )
        except PoolExhausted as exc:
            self._count("register_failed")
            return ErrorMessage(ErrorCode.POOL_EXHAUSTED, str(exc))
        self._count("registrations")
        log.info(
            "registered %s vip=%s seen=%s nat=%s", record.fqdn, record.vip, seen, record.behind_nat
        )
        return RegistrationResponse(
            vip=record.vip,
            vip_prefix_len=self.vip_route.prefixlen,
            vip_network=str(self.vip_route.network_address),
            seen=seen,
            behind_nat=record.behind_nat,
            lifetime=self.registry.lifetime,
        )

    def plan(
        self, peer_names: frozenset[str], msg: DirectionRequest, handle: object
    ) -> DirectionPlan | Federate | ErrorMessage:
        requester = self.registry.lookup(msg.source)
        if requester is None or msg.source not in peer_names or requester.handle is not handle:
            self._count("direction_refused")
            return ErrorMessage(
                ErrorCode.NOT_REGISTERED,
                f"{msg.source} is not registered on this connection; register it first",
            )
        if not self.in_zone(msg.target):
            zone = self.marker.zone_of(msg.target)
            if self.federation and zone:
                self._count("direction_federated")
                return Federate(zone, requester)
            self._count("direction_unknown")
            return ErrorMessage(
                ErrorCode.UNKNOWN_TARGET, f"{msg.target} is not in this DC's zone {self.zone}"
            )
        return self._plan_to_local(requester, msg.target)

    def _plan_to_local(
        self, requester: NodeRecord, target: str, requester_view: EndView | None = None
    ) -> DirectionPlan | ErrorMessage:
        responder = self.registry.lookup(target)
        if responder is None:
            self._count("direction_unknown")
            return ErrorMessage(ErrorCode.UNKNOWN_TARGET, f"{target} is not registered")
        if responder.handle is None:
            self._count("direction_unreachable")
            return ErrorMessage(
                ErrorCode.PEER_UNREACHABLE, f"{target} has no live control connection"
            )
        if responder.fqdn == requester.fqdn:
            return ErrorMessage(ErrorCode.UNEXPECTED, "a node cannot build a tunnel to itself")
        decision = decide(requester_view or view_of(requester), view_of(responder))
        if decision.kind is RouteKind.RELAY and not self.relays_available():
            self._count("direction_unreachable")
            return ErrorMessage(
                ErrorCode.PEER_UNREACHABLE,
                f"{requester.fqdn} and {responder.fqdn} need a relay (both behind NAT or no "
                "common IP family) and this DC has no relay server configured",
            )
        self._count("directions")
        return self._plan(requester, responder, decision)

    def replan(self, requester: NodeRecord, target: str) -> DirectionPlan | ErrorMessage:
        """A fresh plan (new path id) between two registered nodes, e.g. after a relay died."""
        return self._plan_to_local(requester, target)

    def plan_remote(
        self, peer_names: frozenset[str], peer_role: str, msg: NodeInformationRequest, now: float
    ) -> DirectionPlan | ErrorMessage:
        """Another DC asks for one of our nodes on behalf of one of its own."""
        zone = msg.requester_zone
        speaks_for_zone = any(n == zone or n.endswith("." + zone) for n in peer_names)
        if (
            peer_role != "dc"
            or not speaks_for_zone
            or not (msg.source_fqdn == zone or msg.source_fqdn.endswith("." + zone))
        ):
            self._count("federation_refused")
            log.warning(
                "refused Node Information Request for %s from %s (claims zone %s)",
                msg.target,
                sorted(peer_names),
                zone,
            )
            return ErrorMessage(
                ErrorCode.NOT_AUTHORIZED,
                f"a DC certificate naming {', '.join(sorted(peer_names)) or 'nothing'} "
                f"({peer_role}) cannot speak for zone {zone} or its node {msg.source_fqdn}",
            )
        if not self.in_zone(msg.target):
            return ErrorMessage(
                ErrorCode.UNKNOWN_TARGET, f"{msg.target} is not in this DC's zone {self.zone}"
            )
        requester = NodeRecord(
            fqdn=msg.source_fqdn,
            vip=msg.source_vip,
            static_key=msg.source_key,
            tunnel_port=msg.source_seen[1],
            reported=msg.source_endpoints,
            seen=msg.source_seen,
            registered_at=now,
            expires_at=now,
        )
        view = EndView(
            families=frozenset(v for bit, v in ((1, 4), (2, 6)) if msg.source_families & bit),
            behind_nat=msg.source_behind_nat,
            seen_address=msg.source_seen[0],
            public_endpoints=msg.source_endpoints,
        )
        self._count("federation_requests")
        return self._plan_to_local(requester, msg.target, view)

    def _plan(
        self, requester: NodeRecord, responder: NodeRecord, decision: RouteDecision
    ) -> DirectionPlan:
        path_id = secrets.token_bytes(8)
        requester_initiates = decision.kind is RouteKind.DIRECT
        to_requester = RouteDirection(
            path_id=path_id,
            kind=decision.kind,
            role=PathRole.INITIATOR if requester_initiates else PathRole.RESPONDER,
            peer_fqdn=responder.fqdn,
            peer_vip=responder.vip,
            peer_key=responder.static_key,
            peer_endpoints=decision.initiator_targets,
            relay=None,
            lifetime=self.path_lifetime,
            relay_key=NO_KEY,
        )
        to_responder = RouteDirection(
            path_id=path_id,
            kind=decision.kind,
            role=PathRole.RESPONDER if requester_initiates else PathRole.INITIATOR,
            peer_fqdn=requester.fqdn,
            peer_vip=requester.vip,
            peer_key=requester.static_key,
            peer_endpoints=decision.responder_targets,
            relay=None,
            lifetime=self.path_lifetime,
            relay_key=NO_KEY,
        )
        log.info(
            "path %s: %s -> %s kind=%s",
            path_id.hex(),
            requester.fqdn,
            responder.fqdn,
            decision.kind.name.lower(),
        )
        return DirectionPlan(
            path_id, decision.kind, requester, responder, to_requester, to_responder
        )


def relayed(
    plan: DirectionPlan, relay: tuple[Endpoint, ...], binding_key: bytes
) -> DirectionPlan | None:
    """The plan through one relay: each end gets the relay endpoint of a family it has and
    only its own side's binding key. None when the relay lacks a family an end needs."""

    def endpoint_for(record: NodeRecord) -> Endpoint | None:
        for ep in relay:
            if ipaddress.ip_address(ep[0]).version in record.families:
                return ep
        return None

    ep_requester, ep_responder = endpoint_for(plan.requester), endpoint_for(plan.responder)
    if ep_requester is None or ep_responder is None:
        return None
    to_requester = dataclasses.replace(
        plan.to_requester,
        kind=RouteKind.RELAY,
        role=PathRole.INITIATOR,
        peer_endpoints=(ep_requester,),
        relay=ep_requester,
        relay_key=side_key(binding_key, PathRole.INITIATOR),
    )
    to_responder = dataclasses.replace(
        plan.to_responder,
        kind=RouteKind.RELAY,
        role=PathRole.RESPONDER,
        peer_endpoints=(),
        relay=ep_responder,
        relay_key=side_key(binding_key, PathRole.RESPONDER),
    )
    return dataclasses.replace(plan, to_requester=to_requester, to_responder=to_responder)


def view_of(record: NodeRecord) -> EndView:
    return EndView(
        families=record.families,
        behind_nat=record.behind_nat,
        seen_address=record.seen[0],
        public_endpoints=record.public_endpoints(),
    )
