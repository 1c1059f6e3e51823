"""The Direction Coordinator's decisions, sans-IO: registration and Direction Requests.

The asyncio server (`dc.server`) decodes a request, asks this class what to answer and
whom to push a Route Direction to, and moves the bytes. Nothing here touches a socket.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import secrets

from ntm_proto.messages import (
    DirectionRequest,
    ErrorCode,
    ErrorMessage,
    PathRole,
    RegistrationRequest,
    RegistrationResponse,
    RouteDirection,
    RouteKind,
)
from ntm_proto.pool import PoolExhausted

from .registry import NodeRecord, Registry
from .route import EndView, RouteDecision, decide

log = logging.getLogger("ntm.dc")

REGISTERING_ROLES = frozenset({"node", "adaptor"})


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
    ) -> None:
        self.zone = zone
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
    ) -> DirectionPlan | ErrorMessage:
        requester = self.registry.lookup(msg.source)
        if requester is None or msg.source not in peer_names or requester.handle is not handle:
            self._count("direction_refused")
            return ErrorMessage(
                ErrorCode.NOT_REGISTERED,
                f"{msg.source} is not registered on this connection; register it first",
            )
        if not self.in_zone(msg.target):
            self._count("direction_unknown")
            return ErrorMessage(
                ErrorCode.UNKNOWN_TARGET, f"{msg.target} is not in this DC's zone {self.zone}"
            )
        responder = self.registry.lookup(msg.target)
        if responder is None:
            self._count("direction_unknown")
            return ErrorMessage(ErrorCode.UNKNOWN_TARGET, f"{msg.target} is not registered")
        if responder.handle is None:
            self._count("direction_unreachable")
            return ErrorMessage(
                ErrorCode.PEER_UNREACHABLE, f"{msg.target} has no live control connection"
            )
        if responder.fqdn == requester.fqdn:
            return ErrorMessage(ErrorCode.UNEXPECTED, "a node cannot build a tunnel to itself")
        decision = decide(_view(requester), _view(responder))
        if decision.kind is RouteKind.RELAY:
            self._count("direction_unreachable")
            return ErrorMessage(
                ErrorCode.PEER_UNREACHABLE,
                f"{requester.fqdn} and {responder.fqdn} need a relay (both behind NAT or no "
                "common IP family) and this DC has no relay server configured",
            )
        self._count("directions")
        return self._plan(requester, responder, decision)

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


def _view(record: NodeRecord) -> EndView:
    return EndView(
        families=record.families,
        behind_nat=record.behind_nat,
        seen_address=record.seen[0],
        public_endpoints=record.public_endpoints(),
    )
