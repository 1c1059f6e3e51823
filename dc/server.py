"""asyncio glue for the DC: the QUIC control server, the NTM zone's DNS, status.

Everything decided here comes from `dc.coordinator`; this module only decodes, calls,
pushes Route Directions to responders and encodes answers.

Path lifetime (`[dc] path_lifetime`, default 3600 s): every Route Direction and Relay
Direction carries it. At its end the relay removes the path (`paths_expired_lifetime`; its
later packets are `drop_expired_path`), and this DC forgets the path: the relayed-path
table it keeps for relay failover (`RelayedPaths`), the federated paths another DC may ask
it to rebuild (`FederatedPaths`) and gateway assignments. Nothing is sent at that point;
the requester renews the paths it uses before then (`ntm_proto.renewal`), each renewal an
ordinary Direction Request that gets a new path id (and a relay chosen afresh); the DC
never extends a relay path in place. The replaced path goes quiet, so the relay drops it at
its lifetime end or, when more than the relay's idle timeout (90 s) of it was left (the
default lifetime), that long after the switch (`paths_expired_idle`).

Answering before the responder's ack: a Route Direction goes to the responder first and,
normally, to the requester only once the responder acknowledged it, so a responder that
cannot take the path gives the requester a clear error at once. That costs a round trip to
the responder on every set-up. When nothing depends on the ack, the DC answers the
requester at once and pushes in the next loop pass: not through a relay (the responder
must bind there before the requester's first packet can pass), not through a gateway
(another one is tried when it does not take the path), only toward a responder that took
the last Route Direction pushed on its connection, and only on an idle DC (no push waits
for its ack, and the previous direction began `IDLE_GAP` or more ago). Under load, waiting
lets pushes, acks and answers share datagrams: answering first there cost a quarter of the
Direction Requests per DC CPU-second in `ntm bench --only dc`, and the latency is the
queue's anyway. A handshake that overtakes its push is held
by the responder's endpoint and answered once the push arrives (`ntm_proto.endpoint`). If
such a responder does not take the path after all, the requester's handshake goes
unanswered (its node falls back to the ordinary DNS answer after `direction_timeout`), the
DC counts `push_failed_after_answer` and waits for the ack again next time.

Relay failover: when a relay dies, the newest path of each (requester, target) pair that
went through it is given a new relayed path. A path of our own two nodes is replanned here
and pushed to both. A federated path whose relay we chose (we are DC_CN: see
`dc.federation`) is rebuilt by asking the requester's DC to repeat its Direction Request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from ntm_io.control import ControlConnection, ControlError, serve_control
from ntm_io.daemon import serve_until_signalled
from ntm_io.status import serve_status
from ntm_proto.errors import DecodeError
from ntm_proto.messages import (
    DirectionRequest,
    ErrorCode,
    ErrorMessage,
    GatewayReport,
    Message,
    NodeInformationRequest,
    RegistrationRequest,
    RouteDirection,
    RouteDirectionAck,
    RouteKind,
    decode,
    encode,
)
from ntm_proto.pool import VipPool
from ntm_proto.relay_binding import new_binding_key

from .config import DcConfig
from .coordinator import Coordinator, DirectionPlan, Federate, relayed, view_of
from .dns_server import serve_zone
from .dns_zone import NtmZone
from .federation import FederatedPaths, Federation
from .gateways import effective_weight, fresh_health, hold_down_left
from .registry import Registry
from .relays import RelayedPath, RelayedPaths, RelayPool

log = logging.getLogger("ntm.dc")

PUSH_TIMEOUT = 3.0  # how long the responder gets to acknowledge a Route Direction
# All tries through several gateways stay within the node's 5 s request timeout.
DIRECTION_BUDGET = 4.5
MIN_TRY = 0.5  # below this much budget left, another gateway is not tried
# A federated relay failover: the requester's DC asks us again (its own federation
# timeout) and pushes the answer to its node (PUSH_TIMEOUT); some slack on top.
REBUILD_TIMEOUT = 10.0
# A DC answers before the responder's ack only when directions come this far apart (under
# ~100/s): closer, they share loop passes and datagrams, which the early answer breaks up.
IDLE_GAP = 0.010


class DcServer:
    def __init__(self, config: DcConfig) -> None:
        self.config = config
        pool = VipPool(config.vip_pool)
        if config.state_file and Path(config.state_file).is_file():
            pool.restore(json.loads(Path(config.state_file).read_text()).get("vips", {}))
        self.registry = Registry(pool, config.registration_lifetime)
        self.coordinator = Coordinator(
            config.zone,
            self.registry,
            config.vip_route,
            federation=config.federation is not None,
            gateway_hold_down=config.gateway_hold_down,
            path_lifetime=config.path_lifetime,
        )
        self.federation = (
            Federation(
                config.federation.resolvers,
                config.federation.timeout,
                config.federation.peer_port,
                config.tls,
                handler=self.handle,
            )
            if config.federation
            else None
        )
        self.relays = RelayPool(config.relays, config.tls, on_down=self._relay_down)
        self.coordinator.relays_available = self.relays.any_healthy
        self._saved_vips: dict[str, str] | None = None  # what the state file holds
        self._relayed = RelayedPaths()  # the relayed paths we installed, for failover
        self.federated = FederatedPaths(config.path_lifetime)  # our nodes' federated paths
        self.counters: dict[str, int] = {}
        self.started = time.monotonic()
        self._closers: list[Any] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # responder connections that took the last Route Direction pushed to them
        self._took_last_push: set[ControlConnection] = set()
        # Answering first only on an idle DC: no push waits for its ack, and the last
        # direction began at least IDLE_GAP ago.
        self._pushes_in_flight = 0
        self._last_direction = float("-inf")

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    async def start(self) -> None:
        cfg = self.config
        zone = NtmZone(
            zone=cfg.zone,
            ns_name=cfg.ns_name,
            ns_addresses=list(cfg.ns_addresses),
            lookup=self._zone_lookup,
        )
        for host in cfg.listen:
            server = await serve_control(
                host,
                cfg.quic_port,
                ca=cfg.tls.ca,
                cert=cfg.tls.cert,
                key=cfg.tls.key,
                handler=self.handle,
                on_close=self._on_close,
            )
            self._closers.append(server)
            if cfg.dns_port:
                self._closers.append(await serve_zone(zone, host, cfg.dns_port))
        self.relays.start()
        status = await serve_status(cfg.status_socket, self.status)
        self._closers.append(status)
        self._spawn(self._housekeeping())
        log.info(
            "dc %s serving zone %s on %s (quic %d, dns %d), vIP pool %s",
            cfg.name,
            cfg.zone,
            ", ".join(cfg.listen),
            cfg.quic_port,
            cfg.dns_port,
            cfg.vip_pool,
        )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for closer in self._closers:
            closer.close()
        if self.federation is not None:
            await self.federation.close()
        await self.relays.close()
        self._save_state()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _zone_lookup(self, fqdn: str) -> list[str]:
        return self.registry.addresses(fqdn)

    def _on_close(self, conn: ControlConnection) -> None:
        self._took_last_push.discard(conn)
        self.registry.disconnected(conn)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            now = time.monotonic()
            for label in self.registry.expire(now):
                log.info("registration of %s expired", label)
            self.coordinator.forget_assignments(now)
            self._relayed.expire(now)
            self.federated.expire(now)

    def _save_state(self) -> None:
        if not self.config.state_file:
            return
        vips = self.registry.pool.assignments()
        if vips == self._saved_vips:
            return  # a refresh or a move (hundreds at once from a swarm): nothing new
        path = Path(self.config.state_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"vips": vips}))
        self._saved_vips = vips

    # --- requests ------------------------------------------------------------------------

    async def handle(self, conn: ControlConnection, payload: bytes) -> bytes:
        try:
            msg = decode(payload)
        except DecodeError as exc:
            self._count(f"bad_{exc.reason}")
            log.warning("bad message from %s: %s", conn.peer_address, exc.detail)
            code = (
                ErrorCode.UNSUPPORTED_VERSION
                if exc.reason == "bad_version"
                else ErrorCode.BAD_MESSAGE
            )
            return encode(ErrorMessage(code, exc.detail[:500]))
        return encode(await self._dispatch(conn, msg))

    async def _dispatch(self, conn: ControlConnection, msg: Message) -> Message:
        now = time.monotonic()
        if isinstance(msg, RegistrationRequest):
            answer = self.coordinator.register(
                conn.peer_names, conn.peer_role, msg, conn.peer_address, conn, now
            )
            if not isinstance(answer, ErrorMessage):
                self._save_state()
            return answer
        if isinstance(msg, DirectionRequest) and conn.peer_role == "dc":
            return await self._rebuild_for_peer(conn, msg, now)
        if isinstance(msg, DirectionRequest):
            plan = self.coordinator.plan(conn.peer_names, msg, conn, now)
            if isinstance(plan, ErrorMessage):
                return plan
            if isinstance(plan, Federate):
                return await self._federate(plan, msg.target, msg.gateway)
            return await self._direct_any(plan)
        if isinstance(msg, NodeInformationRequest):
            remote = self.coordinator.plan_remote(conn.peer_names, conn.peer_role, msg, now)
            if isinstance(remote, ErrorMessage):
                return remote
            return await self._direct_any(remote, origin=(msg.requester_zone, conn))
        if isinstance(msg, GatewayReport):
            ack = self.coordinator.report(conn.peer_names, msg, conn, now)
            if isinstance(ack, ErrorMessage):
                log.warning("refused a report from %s: %s", conn.peer_address, ack.reason)
            return ack
        self._count("unexpected")
        return ErrorMessage(ErrorCode.UNEXPECTED, f"{type(msg).__name__} is not a request to a DC")

    async def _federate(self, plan: Federate, target: str, gateway: str) -> Message:
        """Ask the target zone's DC; it directs its node and answers with our node's RD."""
        assert self.federation is not None
        view = view_of(plan.requester)
        request = NodeInformationRequest(
            requester_zone=self.config.zone,
            target=target,
            source_fqdn=plan.requester.fqdn,
            source_vip=plan.requester.vip,
            source_key=plan.requester.static_key,
            source_endpoints=view.public_endpoints,
            source_families=(1 if 4 in view.families else 0) | (2 if 6 in view.families else 0),
            source_behind_nat=view.behind_nat,
            source_seen=plan.requester.seen,
            gateway=gateway,
        )
        answer = await self.federation.ask(plan.zone, request)
        if not isinstance(answer, (RouteDirection, ErrorMessage)):
            return ErrorMessage(
                ErrorCode.UNEXPECTED, f"DC of {plan.zone} sent {type(answer).__name__}"
            )
        if isinstance(answer, RouteDirection):
            self.federated.remember(plan.requester.fqdn, target, plan.zone, time.monotonic())
        return answer

    async def _rebuild_for_peer(
        self, conn: ControlConnection, msg: DirectionRequest, now: float
    ) -> Message:
        """Another DC lost the relay of a federated path of our node `msg.source`: ask it
        again for our node, as the node once did, and push the new path to the node."""
        zone = self.federated.may_rebuild(conn.peer_names, conn.peer_role, msg, now)
        if isinstance(zone, ErrorMessage):
            self._count("rebuild_refused")
            log.warning("refused a rebuild from %s: %s", sorted(conn.peer_names), zone.reason)
            return zone
        requester = self.registry.lookup(msg.source)
        handle = requester.handle if requester is not None else None
        if requester is None or not isinstance(handle, ControlConnection):
            self._count("rebuild_failed")
            return ErrorMessage(
                ErrorCode.PEER_UNREACHABLE, f"{msg.source} has no live control connection"
            )
        answer = await self._federate(Federate(zone, requester), msg.target, msg.gateway)
        if not isinstance(answer, RouteDirection):
            self._count("rebuild_failed")
            return answer
        pushed = await self._push(handle, answer, msg.source)
        if pushed is not None:
            self._count("rebuild_failed")
            return pushed
        self._count("federated_rebuilds")
        log.info("path %s to %s rebuilt for %s", answer.path_id.hex(), msg.target, msg.source)
        return answer

    async def _push(
        self, handle: ControlConnection, rd: RouteDirection, who: str
    ) -> ErrorMessage | None:
        """Push a Route Direction to a node of ours; None when it took it."""
        try:
            ack = decode(await handle.request(encode(rd), PUSH_TIMEOUT))
        except (ControlError, DecodeError, TimeoutError) as exc:
            log.warning("path %s: %s did not take its new route: %s", rd.path_id.hex(), who, exc)
            return ErrorMessage(ErrorCode.PEER_UNREACHABLE, f"{who} did not answer its DC")
        if not (isinstance(ack, RouteDirectionAck) and ack.path_id == rd.path_id):
            reason = ack.reason if isinstance(ack, ErrorMessage) else type(ack).__name__
            return ErrorMessage(ErrorCode.PEER_UNREACHABLE, f"{who} refused the path: {reason}")
        return None

    async def _direct_any(
        self, plan: DirectionPlan, origin: tuple[str, ControlConnection] | None = None
    ) -> Message:
        """`_direct`; when the DC chose the gateway and it does not take the path, through
        the next usable one (each gateway is tried once). `origin`: the requester's zone
        and its DC's connection, for a Node Information Request."""
        failed: frozenset[str] = frozenset()
        deadline = time.monotonic() + DIRECTION_BUDGET
        while True:
            timeout = min(PUSH_TIMEOUT, deadline - time.monotonic())
            answer = await self._direct(plan, timeout, origin)
            if not isinstance(answer, ErrorMessage):
                return answer
            failed |= {plan.to_responder.gateway}
            now = time.monotonic()
            retry = self.coordinator.without_gateway(plan, failed, now)
            if not isinstance(retry, DirectionPlan) or deadline - now < MIN_TRY:
                return answer
            self._count("gateway_retries")
            log.info(
                "gateway %s of %s did not take the path; trying %s",
                plan.to_responder.gateway,
                plan.responder.fqdn,
                retry.to_responder.gateway,
            )
            plan = retry

    async def _direct(
        self,
        plan: DirectionPlan,
        timeout: float = PUSH_TIMEOUT,
        origin: tuple[str, ControlConnection] | None = None,
    ) -> Message:
        """Tell the relay (if any) and the responder first, so both know the path before
        the first tunnel packet; then answer the requester (at once, in parallel with the
        push, when nothing waits on the ack: see the module docstring)."""
        if plan.kind is RouteKind.RELAY:
            routed = await self._through_relay(plan, origin=origin)
            if isinstance(routed, ErrorMessage):
                return routed
            plan = routed
        conn = plan.responder.handle
        if not isinstance(conn, ControlConnection):  # it left while we waited
            self._count("push_failed")
            return ErrorMessage(
                ErrorCode.PEER_UNREACHABLE, f"{plan.responder.label} has no live control connection"
            )
        trusted = conn in self._took_last_push
        self._took_last_push.discard(conn)  # until this push is acked
        now = time.monotonic()
        idle = now - self._last_direction >= IDLE_GAP and not self._pushes_in_flight
        self._last_direction = now
        push = encode(plan.to_responder)
        if trusted and idle and plan.kind is not RouteKind.RELAY and not plan.to_responder.gateway:
            # See the module docstring: nothing waits on this ack.
            self._count("answered_before_ack")
            self._spawn(self._push_after_answer(plan, conn, conn.request(push, timeout)))
            return plan.to_requester
        refused = await self._push_plan(plan, conn, conn.request(push, timeout))
        if refused is not None:
            return refused
        self.coordinator.assigned(plan, time.monotonic())
        return plan.to_requester

    async def _push_after_answer(
        self, plan: DirectionPlan, conn: ControlConnection, acked: Awaitable[bytes]
    ) -> None:
        if await self._push_plan(plan, conn, acked) is not None:
            self._count("push_failed_after_answer")

    async def _push_plan(
        self, plan: DirectionPlan, conn: ControlConnection, acked: Awaitable[bytes]
    ) -> ErrorMessage | None:
        """Wait for the responder's answer to its pushed Route Direction; None when it
        took it (and remember that)."""
        self._pushes_in_flight += 1
        try:
            ack = decode(await acked)
        except (TimeoutError, ControlError, DecodeError) as exc:
            self._count("push_failed")
            log.warning(
                "path %s: %s did not take the Route Direction: %s",
                plan.path_id.hex(),
                plan.responder.label,
                exc,
            )
            return ErrorMessage(
                ErrorCode.PEER_UNREACHABLE, f"{plan.responder.label} did not answer its DC"
            )
        finally:
            self._pushes_in_flight -= 1
        if not (isinstance(ack, RouteDirectionAck) and ack.path_id == plan.path_id):
            self._count("push_refused")
            reason = ack.reason if isinstance(ack, ErrorMessage) else type(ack).__name__
            log.warning(
                "path %s: %s refused the Route Direction: %s",
                plan.path_id.hex(),
                plan.responder.label,
                reason,
            )
            return ErrorMessage(
                ErrorCode.PEER_UNREACHABLE, f"{plan.responder.label} refused the path: {reason}"
            )
        if not conn.closed.is_set():
            self._took_last_push.add(conn)
        return None

    async def _through_relay(
        self,
        plan: DirectionPlan,
        exclude: frozenset[str] = frozenset(),
        origin: tuple[str, ControlConnection] | None = None,
    ) -> DirectionPlan | ErrorMessage:
        lifetime = self.coordinator.path_lifetime
        for relay in self.relays.candidates(exclude):
            key = new_binding_key()
            routed = relayed(plan, relay.spec.endpoints, key)
            if routed is None:
                continue  # this relay lacks an address family one end needs
            if await self.relays.install(relay, plan.path_id, key, lifetime):
                self._relayed.add(
                    RelayedPath(
                        plan.path_id,
                        relay.spec.name,
                        plan.requester.fqdn,
                        plan.responder.fqdn,
                        plan.to_responder.gateway,
                        expires_at=time.monotonic() + lifetime,
                        requester_zone=origin[0] if origin else "",
                        origin=origin[1] if origin else None,
                    )
                )
                self._count("relayed_paths")
                log.info("path %s through relay %s", plan.path_id.hex(), relay.spec.name)
                return routed
        self._count("relay_unavailable")
        return ErrorMessage(
            ErrorCode.PEER_UNREACHABLE,
            f"{plan.requester.fqdn} and {plan.responder.fqdn} need a relay and none could take "
            "the path",
        )

    def _relay_down(self, name: str) -> None:
        self._spawn(self._reroute(name))

    async def _reroute(self, dead: str) -> None:
        """A relay died: give the newest path of each pair that went through it a new
        relayed path through another one (the ends switch when it is up; vIPs stay)."""
        for path in self._relayed.take_on(dead, time.monotonic()):
            if path.requester_zone:
                moved = await self._reroute_federated(path)
            else:
                moved = await self._reroute_local(path)
            if moved is None:
                self._count("relay_failover_failed")
                log.warning("path %s: no new route after relay %s died", path.path_id.hex(), dead)
                continue
            self._count("relay_failovers")
            log.info(
                "path %s moved off relay %s: new path %s", path.path_id.hex(), dead, moved.hex()
            )

    async def _reroute_local(self, path: RelayedPath) -> bytes | None:
        """A path between two of our nodes: replan, direct both ends; the new path id."""
        requester = self.registry.lookup(path.requester)
        if requester is None or not isinstance(requester.handle, ControlConnection):
            return None
        plan = self.coordinator.replan(requester, path.responder, time.monotonic(), path.gateway)
        if not isinstance(plan, DirectionPlan):
            return None
        answer = await self._direct_any(plan)
        if not isinstance(answer, RouteDirection):
            return None
        if await self._push(requester.handle, answer, path.requester) is not None:
            return None
        return answer.path_id

    async def _reroute_federated(self, path: RelayedPath) -> bytes | None:
        """A federated path whose relay we chose: the requester's DC asks us again for its
        node (we pick a healthy relay then) and pushes the answer; the new path id."""
        msg = DirectionRequest(source=path.requester, target=path.responder, gateway=path.gateway)
        answer: Message | None = None
        conn = path.origin
        if isinstance(conn, ControlConnection) and not conn.closed.is_set():
            try:
                answer = decode(await conn.request(encode(msg), REBUILD_TIMEOUT))
            except (ControlError, DecodeError, TimeoutError) as exc:
                log.info("asking the DC of %s on its connection: %s", path.requester_zone, exc)
        if answer is None and self.federation is not None:
            answer = await self.federation.ask(path.requester_zone, msg, REBUILD_TIMEOUT)
        if not isinstance(answer, RouteDirection):
            reason = answer.reason if isinstance(answer, ErrorMessage) else "no way to ask"
            log.warning(
                "the DC of %s did not rebuild %s -> %s: %s",
                path.requester_zone,
                path.requester,
                path.responder,
                reason,
            )
            return None
        self._count("relay_failovers_federated")
        return answer.path_id

    def status(self) -> dict[str, Any]:
        return {
            "role": "dc",
            "name": self.config.name,
            "zone": self.config.zone,
            "nodes": [
                {
                    "fqdn": r.fqdn,
                    "gateway": r.gateway,
                    "vip": r.vip,
                    "seen": list(r.seen),
                    "reported": [list(ep) for ep in r.reported],
                    "behind_nat": r.behind_nat,
                    "connected": r.handle is not None,
                }
                for r in self.registry.records()
            ],
            "services": self._services_status(time.monotonic()),
            "relays": self.relays.status(),
            "live_relayed_paths": len(self._relayed),
            "live_federated_paths": len(self.federated),
            "counters": {
                **self.counters,
                **self.coordinator.counters,
                **{
                    f"federation_{k}": v
                    for k, v in (self.federation.counters if self.federation else {}).items()
                },
            },
        }

    def _services_status(self, now: float) -> dict[str, Any]:
        """Multi-gateway services: each gateway's weight, state, latest report, MNs sent."""
        hold_down = self.coordinator.gateway_hold_down
        out: dict[str, Any] = {}
        for service in sorted({r.fqdn for r in self.registry.records() if r.gateway}):
            counts = self.coordinator.assignment_counts(service)
            rows = []
            for r in self.registry.gateways(service):
                gw = r.as_gateway()
                health = fresh_health(gw, now)
                rows.append(
                    {
                        "gateway": r.gateway,
                        "weight": r.weight,
                        "effective_weight": round(effective_weight(gw, now), 2),
                        "connected": gw.connected,
                        "hold_down_left": round(hold_down_left(gw, now, hold_down), 1),
                        "public_addresses": r.public_addresses(),
                        "tunnels": health.tunnels if health else None,
                        "rtt_us": health.rtt_us if health else None,
                        "jitter_us": health.jitter_us if health else None,
                        "loss_ppm": health.loss_ppm if health else None,
                        "report_age": round(now - r.health.at, 1) if r.health else None,
                        "assignments": counts.get(r.gateway, 0),
                    }
                )
            out[service] = {"vip": self.registry.pool.lookup(service), "gateways": rows}
        return out


async def run(config: DcConfig) -> None:
    await serve_until_signalled(DcServer(config))
