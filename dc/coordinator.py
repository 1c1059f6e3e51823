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
    GatewayReport,
    GatewayReportAck,
    NodeInformationRequest,
    PathRole,
    RegistrationRequest,
    RegistrationResponse,
    RouteDirection,
    RouteKind,
)
from ntm_proto.pool import PoolExhausted
from ntm_proto.relay_binding import side_key

from . import gateways
from .registry import KindConflict, NodeRecord, Registry, ip_of
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
    # A multi-gateway target: the requester's view (for a new plan through another gateway
    # when this one does not take the path) and whether the requester named the gateway.
    requester_view: EndView | None = None
    gateway_asked: bool = False


class Coordinator:
    def __init__(
        self,
        zone: str,
        registry: Registry,
        vip_route: ipaddress.IPv4Network | ipaddress.IPv6Network,
        path_lifetime: int = 3600,
        federation: bool = False,
        mark: str = "ntm",
        gateway_hold_down: float = 30.0,
    ) -> None:
        self.zone = zone
        self.gateway_hold_down = gateway_hold_down
        # (service, requester) -> (gateway, when): who was sent where, within a path lifetime
        self.assignments: dict[tuple[str, str], tuple[str, float]] = {}
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
        if msg.gateway and (refused := self._gateway_refusal(peer_names, peer_role, msg)):
            self._count("register_refused")
            log.warning("refused gateway registration of %s: %s", msg.fqdn, refused)
            return ErrorMessage(ErrorCode.NOT_AUTHORIZED, refused)
        try:
            record = self.registry.register(
                msg.fqdn,
                msg.static_key,
                msg.tunnel_port,
                msg.endpoints,
                seen,
                now,
                handle,
                gateway=msg.gateway,
                weight=msg.weight,
                ordinary_clients=msg.ordinary_clients,
            )
        except PoolExhausted as exc:
            self._count("register_failed")
            return ErrorMessage(ErrorCode.POOL_EXHAUSTED, str(exc))
        except KindConflict as exc:
            self._count("register_refused")
            return ErrorMessage(ErrorCode.NOT_AUTHORIZED, str(exc))
        self._count("registrations")
        if log.isEnabledFor(logging.INFO):  # the arguments cost more than the call
            log.info(
                "registered %s vip=%s seen=%s nat=%s%s",
                record.label,
                record.vip,
                seen,
                record.behind_nat,
                f" weight={record.weight}" if record.gateway else "",
            )
        return RegistrationResponse(
            vip=record.vip,
            vip_prefix_len=self.vip_route.prefixlen,
            vip_network=str(self.vip_route.network_address),
            seen=seen,
            behind_nat=record.behind_nat,
            lifetime=self.registry.lifetime,
        )

    @staticmethod
    def _gateway_refusal(
        peer_names: frozenset[str], peer_role: str, msg: RegistrationRequest
    ) -> str | None:
        if peer_role != "adaptor":
            return (
                f"only an adaptor (NTMA) certificate may register as gateway {msg.gateway}; "
                f"this one is a {peer_role!r} certificate"
            )
        if msg.gateway == msg.fqdn:
            return f"gateway name {msg.gateway} is the service name; name the gateway itself"
        if msg.gateway not in peer_names:
            return (
                f"gateway {msg.gateway} is not among the names in your certificate "
                f"({', '.join(sorted(peer_names)) or 'none'}); issue one that names it too"
            )
        return None

    def report(
        self, peer_names: frozenset[str], msg: GatewayReport, handle: object, now: float
    ) -> GatewayReportAck | ErrorMessage:
        """A gateway's health: kept only from the connection that registered that gateway."""
        record = self.registry.gateway(msg.fqdn, msg.gateway)
        if record is None or record.handle is not handle or msg.gateway not in peer_names:
            self._count("report_refused")
            return ErrorMessage(
                ErrorCode.NOT_REGISTERED,
                f"gateway {msg.gateway} of {msg.fqdn} is not registered on this connection; "
                "register it (with that gateway name) before reporting",
            )
        record.health = gateways.Health(
            msg.tunnels, msg.rtt_us, msg.jitter_us, msg.loss_ppm, at=now
        )
        self._count("gateway_reports")
        return GatewayReportAck(msg.gateway)

    def plan(
        self, peer_names: frozenset[str], msg: DirectionRequest, handle: object, now: float = 0.0
    ) -> DirectionPlan | Federate | ErrorMessage:
        requester = self.registry.on_handle(msg.source, handle)
        if requester is None or msg.source not in peer_names:
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
        return self._plan_to_local(requester, msg.target, now=now, gateway=msg.gateway)

    def _plan_to_local(
        self,
        requester: NodeRecord,
        target: str,
        requester_view: EndView | None = None,
        now: float = 0.0,
        gateway: str = "",
        exclude: frozenset[str] = frozenset(),
    ) -> DirectionPlan | ErrorMessage:
        """A plan to a node of ours; for a multi-gateway service through the gateway asked
        for (`gateway`) or chosen by policy among those not in `exclude`."""
        if self.registry.is_multi_gateway(target):
            return self._plan_to_gateway(requester, target, requester_view, now, gateway, exclude)
        if gateway:
            self._count("direction_unreachable")
            return ErrorMessage(
                ErrorCode.PEER_UNREACHABLE,
                f"{target} is not served by several gateways, so there is no gateway "
                f"{gateway} to go through; ask without a gateway",
            )
        responder = self.registry.lookup(target)
        if responder is None:
            self._count("direction_unknown")
            return ErrorMessage(ErrorCode.UNKNOWN_TARGET, f"{target} is not registered")
        if responder.handle is None:
            self._count("direction_unreachable")
            return ErrorMessage(
                ErrorCode.PEER_UNREACHABLE, f"{target} has no live control connection"
            )
        return self._plan_to(requester, responder, requester_view)

    def _plan_to_gateway(
        self,
        requester: NodeRecord,
        target: str,
        requester_view: EndView | None,
        now: float,
        asked: str,
        exclude: frozenset[str],
    ) -> DirectionPlan | ErrorMessage:
        records = {r.gateway: r for r in self.registry.gateways(target)}
        if asked:
            asked_record = records.get(asked)
            why = "is not one of its gateways" if asked_record is None else None
            if asked_record is not None:
                why = gateways.unusable(asked_record.as_gateway())
            if why:
                self._count("direction_unreachable")
                return ErrorMessage(
                    ErrorCode.PEER_UNREACHABLE,
                    f"gateway {asked} of {target} {why}; ask without a gateway for another",
                )
        views = [r.as_gateway() for name, r in records.items() if name not in exclude]
        choice = gateways.choose(
            views, requester.fqdn, now, self.gateway_hold_down, preferred=asked
        )
        if choice.chosen is None:
            self._count("direction_unreachable")
            states = "; ".join(
                f"{name}: {'tried, did not take the path' if name in exclude else why}"
                for name, r in records.items()
                if (why := gateways.unusable(r.as_gateway())) or name in exclude
            )
            return ErrorMessage(
                ErrorCode.PEER_UNREACHABLE, f"{target} has no usable gateway ({states})"
            )
        plan = self._plan_to(requester, records[choice.chosen], requester_view)
        if isinstance(plan, ErrorMessage):
            return plan
        return dataclasses.replace(
            plan,
            to_requester=dataclasses.replace(
                plan.to_requester, gateway=choice.chosen, alternatives=choice.alternatives
            ),
            to_responder=dataclasses.replace(plan.to_responder, gateway=choice.chosen),
            requester_view=requester_view,
            gateway_asked=bool(asked),
        )

    def _plan_to(
        self, requester: NodeRecord, responder: NodeRecord, requester_view: EndView | None
    ) -> DirectionPlan | ErrorMessage:
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

    def replan(
        self, requester: NodeRecord, target: str, now: float, gateway: str = ""
    ) -> DirectionPlan | ErrorMessage:
        """A fresh plan (new path id) between two registered nodes, e.g. after a relay died:
        through the same gateway when it is still usable, else through the policy's choice."""
        plan = self._plan_to_local(requester, target, now=now, gateway=gateway)
        if gateway and isinstance(plan, ErrorMessage):
            plan = self._plan_to_local(requester, target, now=now)
        return plan

    def without_gateway(
        self, plan: DirectionPlan, failed: frozenset[str], now: float
    ) -> DirectionPlan | ErrorMessage | None:
        """The chosen gateway did not take the path: a plan through the next one, or None
        when there is no other to try (not a gateway plan, or the requester named it)."""
        if not plan.to_responder.gateway or plan.gateway_asked:
            return None
        return self._plan_to_local(
            plan.requester, plan.responder.fqdn, plan.requester_view, now, exclude=failed
        )

    def assigned(self, plan: DirectionPlan, now: float) -> None:
        """The gateway took the path: count the requester as sent there."""
        if plan.to_responder.gateway:
            key = (plan.responder.fqdn, plan.requester.fqdn)
            self.assignments[key] = (plan.to_responder.gateway, now)

    def forget_assignments(self, now: float) -> None:
        """Drop assignments older than a path lifetime (their Route Directions lapsed)."""
        cutoff = now - self.path_lifetime
        self.assignments = {k: v for k, v in self.assignments.items() if v[1] > cutoff}

    def assignment_counts(self, service: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for (svc, _), (gw, _) in self.assignments.items():
            if svc == service:
                counts[gw] = counts.get(gw, 0) + 1
        return counts

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
        return self._plan_to_local(requester, msg.target, view, now, msg.gateway)

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
        if log.isEnabledFor(logging.INFO):
            log.info(
                "path %s: %s -> %s kind=%s",
                path_id.hex(),
                requester.label,
                responder.label,
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
            if ip_of(ep[0]).version in record.families:
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
