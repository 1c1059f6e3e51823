"""asyncio glue for the DC: the QUIC control server, the NTM zone's DNS, status.

Everything decided here comes from `dc.coordinator`; this module only decodes, calls,
pushes Route Directions to responders and encodes answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
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
from .federation import Federation
from .registry import Registry
from .relays import RelayPool

log = logging.getLogger("ntm.dc")

PUSH_TIMEOUT = 3.0  # how long the responder gets to acknowledge a Route Direction


class DcServer:
    def __init__(self, config: DcConfig) -> None:
        self.config = config
        pool = VipPool(config.vip_pool)
        if config.state_file and Path(config.state_file).is_file():
            pool.restore(json.loads(Path(config.state_file).read_text()).get("vips", {}))
        self.registry = Registry(pool, config.registration_lifetime)
        self.coordinator = Coordinator(
            config.zone, self.registry, config.vip_route, federation=config.federation is not None
        )
        self.federation = (
            Federation(
                config.federation.resolvers,
                config.federation.timeout,
                config.federation.peer_port,
                config.tls,
            )
            if config.federation
            else None
        )
        self.relays = RelayPool(config.relays, config.tls, on_down=self._relay_down)
        self.coordinator.relays_available = self.relays.any_healthy
        # relayed paths of our own nodes: path id -> (relay, requester, responder)
        self._relayed: dict[bytes, tuple[str, str, str]] = {}
        self.counters: dict[str, int] = {}
        self.started = time.monotonic()
        self._closers: list[Any] = []
        self._tasks: set[asyncio.Task[None]] = set()

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
        record = self.registry.lookup(fqdn)
        return record.public_addresses() if record else []

    def _on_close(self, conn: ControlConnection) -> None:
        self.registry.disconnected(conn)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            for fqdn in self.registry.expire(time.monotonic()):
                log.info("registration of %s expired", fqdn)

    def _save_state(self) -> None:
        if self.config.state_file:
            path = Path(self.config.state_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"vips": self.registry.pool.assignments()}))

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
        if isinstance(msg, DirectionRequest):
            plan = self.coordinator.plan(conn.peer_names, msg, conn)
            if isinstance(plan, ErrorMessage):
                return plan
            if isinstance(plan, Federate):
                return await self._federate(plan, msg.target)
            return await self._direct(plan)
        if isinstance(msg, NodeInformationRequest):
            remote = self.coordinator.plan_remote(conn.peer_names, conn.peer_role, msg, now)
            if isinstance(remote, ErrorMessage):
                return remote
            return await self._direct(remote)
        self._count("unexpected")
        return ErrorMessage(ErrorCode.UNEXPECTED, f"{type(msg).__name__} is not a request to a DC")

    async def _federate(self, plan: Federate, target: str) -> Message:
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
        )
        answer = await self.federation.ask(plan.zone, request)
        if not isinstance(answer, (RouteDirection, ErrorMessage)):
            return ErrorMessage(
                ErrorCode.UNEXPECTED, f"DC of {plan.zone} sent {type(answer).__name__}"
            )
        return answer

    async def _direct(self, plan: DirectionPlan) -> Message:
        """Tell the relay (if any) and the responder first, so both know the path before
        the first tunnel packet; then answer the requester."""
        if plan.kind is RouteKind.RELAY:
            routed = await self._through_relay(plan)
            if isinstance(routed, ErrorMessage):
                return routed
            plan = routed
        responder_conn = plan.responder.handle
        assert isinstance(responder_conn, ControlConnection)
        try:
            raw = await responder_conn.request(encode(plan.to_responder), PUSH_TIMEOUT)
            ack = decode(raw)
        except (TimeoutError, ControlError, DecodeError) as exc:
            self._count("push_failed")
            log.warning(
                "path %s: %s did not take the Route Direction: %s",
                plan.path_id.hex(),
                plan.responder.fqdn,
                exc,
            )
            return ErrorMessage(
                ErrorCode.PEER_UNREACHABLE, f"{plan.responder.fqdn} did not answer its DC"
            )
        if not (isinstance(ack, RouteDirectionAck) and ack.path_id == plan.path_id):
            self._count("push_refused")
            reason = ack.reason if isinstance(ack, ErrorMessage) else type(ack).__name__
            return ErrorMessage(
                ErrorCode.PEER_UNREACHABLE, f"{plan.responder.fqdn} refused the path: {reason}"
            )
        return plan.to_requester

    async def _through_relay(
        self, plan: DirectionPlan, exclude: frozenset[str] = frozenset()
    ) -> DirectionPlan | ErrorMessage:
        for relay in self.relays.candidates(exclude):
            key = new_binding_key()
            routed = relayed(plan, relay.spec.endpoints, key)
            if routed is None:
                continue  # this relay lacks an address family one end needs
            if await self.relays.install(relay, plan.path_id, key, self.coordinator.path_lifetime):
                self._relayed[plan.path_id] = (
                    relay.spec.name,
                    plan.requester.fqdn,
                    plan.responder.fqdn,
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
        """A relay died: give each of its paths a new relayed path through another one,
        pushed to both ends (they switch when the new path is up; the vIPs do not change)."""
        for path_id, (name, req, resp) in list(self._relayed.items()):
            if name != dead:
                continue
            del self._relayed[path_id]
            requester, responder = self.registry.lookup(req), self.registry.lookup(resp)
            if requester is None or responder is None or requester.handle is None:
                continue
            plan = self.coordinator.replan(requester, resp)
            if not isinstance(plan, DirectionPlan):
                continue
            answer = await self._direct(plan)
            if not isinstance(answer, RouteDirection):
                log.warning("path %s: no new route after relay %s died", path_id.hex(), dead)
                continue
            handle = requester.handle
            assert isinstance(handle, ControlConnection)
            try:
                await handle.request(encode(answer), PUSH_TIMEOUT)
            except (ControlError, TimeoutError) as exc:
                log.warning("path %s: %s did not take its new route: %s", path_id.hex(), req, exc)
                continue
            self._count("relay_failovers")
            log.info(
                "path %s moved off relay %s: new path %s", path_id.hex(), dead, plan.path_id.hex()
            )

    def status(self) -> dict[str, Any]:
        return {
            "role": "dc",
            "name": self.config.name,
            "zone": self.config.zone,
            "nodes": [
                {
                    "fqdn": r.fqdn,
                    "vip": r.vip,
                    "seen": list(r.seen),
                    "reported": [list(ep) for ep in r.reported],
                    "behind_nat": r.behind_nat,
                    "connected": r.handle is not None,
                }
                for r in self.registry.records()
            ],
            "relays": self.relays.status(),
            "counters": {
                **self.counters,
                **self.coordinator.counters,
                **{
                    f"federation_{k}": v
                    for k, v in (self.federation.counters if self.federation else {}).items()
                },
            },
        }


async def run(config: DcConfig) -> None:
    await serve_until_signalled(DcServer(config))
