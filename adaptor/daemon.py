"""`ntm adaptor`: an NTM node that terminates tunnels for a service behind a load balancer.

It is `ntm_node`'s NodeDaemon (registration with the DC under the service's FQDN, the
tunnel engine, status) plus three things:

- its service-side interface is never offered to the DC as a tunnel endpoint (the DC also
  answers ordinary clients' A queries for the service name with the endpoints);
- nftables DNAT of inner packets to the LB's virtual service, and of ordinary clients'
  packets to our public address (adaptor/forwarding.py), without SNAT;
- route claims for every MN vIP with an established tunnel here (adaptor/claims.py), so the
  LB host's return route for that vIP points at us;
- as one of several gateways of the service (`[adaptor] gateway`): probes on its tunnels and
  a GatewayReport to the DC every `report_interval` (tunnels, RTT, jitter, loss;
  adaptor/quality.py), which the DC's gateway choice uses (dc/gateways.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

from lb_integration.claims import RouteClaim
from ntm_io.daemon import serve_until_signalled
from ntm_node.daemon import NodeDaemon
from ntm_node.dc_client import DirectionError
from ntm_node.engine import TunnelEngine
from ntm_proto.messages import GatewayReport, RegistrationResponse
from ntm_proto.path import PathState, ProbeResult

from . import forwarding
from .claims import ClaimSender, ClaimTracker
from .config import AdaptorConfig
from .quality import ProbeQuality, Quality

log = logging.getLogger("ntm.adaptor")

TICK = 0.25  # seconds between looks at the tunnels when nothing changed (expiry, retries)
WARM_RETRY = 5.0  # seconds between attempts to connect to an unreachable LB agent while idle
PROBE_INTERVAL = 1.0  # seconds between probes on each tunnel, for the gateway report
MAX_PROBES_PER_ROUND = 256  # with more tunnels, a random sample of them each round
U32_MAX = 0xFFFFFFFF


class AdaptorDaemon(NodeDaemon):
    def __init__(self, config: AdaptorConfig) -> None:
        self.adaptor = config  # before NodeDaemon.__init__, which asks ignored_interfaces()
        super().__init__(config.node)
        self.dc.gateway = config.gateway
        self.dc.weight = config.weight
        self.dc.ordinary_clients = bool(config.public_forward)  # else DNS would send them here
        self.quality = ProbeQuality(timeout=2.0, window=max(30.0, 3 * config.report_interval))
        self.last_report: GatewayReport | None = None
        self.report_error: str | None = None
        self.report_counters: dict[str, int] = {}
        if config.gateway:
            self.engine.probe_listeners.append(self._on_probe)
        self.forwarding_vip: str | None = None
        self.forwarding_error: str | None = None
        self.tracker: ClaimTracker | None = None
        self.sender: ClaimSender | None = None
        self._claim_task: asyncio.Task[Any] | None = None
        self._paths_changed = asyncio.Event()
        self.engine.on_path_change = self._paths_changed.set
        if config.claims is not None:
            c = config.claims
            self.tracker = ClaimTracker(config.next_hop, c.lifetime, c.refresh, c.retry)
            node = config.node
            self.sender = ClaimSender(c, node.ca, node.cert, node.key)

    def ignored_interfaces(self) -> tuple[str, ...]:
        return (*super().ignored_interfaces(), self.adaptor.service_interface)

    async def start(self) -> None:
        forwarding.enable_ip_forward()
        await super().start()
        if self.tracker is not None:
            self._claim_task = self._spawn(self._claim_loop())
        if self.adaptor.gateway:
            self._spawn(self._report_loop())
        log.info(
            "adaptor %s: %s -> LB %s (%s)",
            self.adaptor.name,
            self.config.fqdn,
            self.adaptor.lb_address,
            ", ".join(map(str, self.adaptor.forward)),
        )

    async def close(self) -> None:
        if self._claim_task is not None:
            self._claim_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._claim_task
        if self.tracker is not None and self.sender is not None:
            # Withdraw what we hold, briefly: the agent would expire them anyway.
            withdrawals = self.tracker.update({}, time.monotonic(), time.time_ns() // 1_000_000)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._send_all(withdrawals), 2.0)
            await self.sender.close()
        await super().close()
        forwarding.remove(self.adaptor)

    # --- forwarding ----------------------------------------------------------------------

    def _on_registered(self, resp: RegistrationResponse) -> None:
        super()._on_registered(resp)
        if resp.vip == self.forwarding_vip:
            return
        try:
            forwarding.install(self.adaptor, resp.vip)
        except (forwarding.NftError, OSError) as exc:
            self.forwarding_error = str(exc)
            log.error("cannot install the forwarding rules: %s", exc)
            return
        self.forwarding_vip = resp.vip
        self.forwarding_error = None

    # --- route claims --------------------------------------------------------------------

    def tunnels(self) -> dict[str, bytes]:
        """MN vIP -> the established path that carries it here now."""
        out: dict[str, bytes] = {}
        for path in self.engine.endpoint.paths:
            if path.state is not PathState.ESTABLISHED:
                continue
            rd = self.engine.route_direction(path.path_id)
            if rd is None:
                continue
            current = self.engine.path_to(rd.peer_vip)
            if current is not None and current.path_id == path.path_id:
                out[rd.peer_vip] = path.path_id
        return out

    async def _claim_loop(self) -> None:
        assert self.tracker is not None and self.sender is not None
        warm_at = 0.0
        while True:
            try:
                now = time.monotonic()
                claims = self.tracker.update(self.tunnels(), now, time.time_ns() // 1_000_000)
                await self._send_all(claims)
                if not claims and now >= warm_at and not self.sender.connected:
                    # keep the connection up while idle (see ClaimSender.warm)
                    warm_at = now + (0.0 if await self.sender.warm() else WARM_RETRY)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("route claims: unexpected error")
            # A tunnel established or moved wakes us at once: the LB's return route must
            # follow a gateway switch within the switch time, not within a polling tick.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._paths_changed.wait(), TICK)
            self._paths_changed.clear()

    async def _send_all(self, claims: list[RouteClaim]) -> None:
        assert self.tracker is not None and self.sender is not None
        if not claims:
            return
        acks = await self.sender.send_many(claims)
        now = time.monotonic()
        for claim, ack in zip(claims, acks, strict=True):
            self.tracker.result(claim, ack, now)

    # --- gateway reports -----------------------------------------------------------------

    def _on_probe(self, path_id: bytes, result: ProbeResult) -> None:
        self.quality.answered(path_id, result.seq, result.rtt, time.monotonic())

    def gateway_report(self, tunnels: dict[str, bytes], quality: Quality) -> GatewayReport:
        return GatewayReport(
            fqdn=self.config.fqdn,
            gateway=self.adaptor.gateway,
            tunnels=min(len(tunnels), U32_MAX),
            rtt_us=min(quality.rtt_us, U32_MAX),
            jitter_us=min(quality.jitter_us, U32_MAX),
            loss_ppm=quality.loss_ppm,
        )

    async def _report_loop(self) -> None:
        interval = self.adaptor.report_interval
        next_report = time.monotonic()
        while True:
            try:
                now = time.monotonic()
                tunnels = self.tunnels()
                send_probes(self.engine, self.quality, list(tunnels.values()), now)
                if now >= next_report and self.dc.registered.is_set():
                    next_report = now + interval
                    self.quality.forget(set(tunnels.values()))
                    await self._send_report(
                        self.gateway_report(tunnels, self.quality.snapshot(now))
                    )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("gateway report: unexpected error")
            await asyncio.sleep(min(PROBE_INTERVAL, interval))

    async def _send_report(self, report: GatewayReport) -> None:
        try:
            await self.dc.report(report)
        except DirectionError as exc:
            key = "refused" if exc.code is not None else "errors"
            self.report_counters[key] = self.report_counters.get(key, 0) + 1
            if str(exc) != self.report_error:
                log.warning("gateway report to the DC failed: %s", exc)
            self.report_error = str(exc)
            return
        self.report_counters["sent"] = self.report_counters.get("sent", 0) + 1
        self.report_error = None
        self.last_report = report

    # --- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        doc = super().status()
        cfg = self.adaptor
        doc["role"] = "adaptor"
        claims: dict[str, Any] | None = None
        if self.tracker is not None and self.sender is not None:
            assert cfg.claims is not None
            claims = {
                "agent": f"{cfg.claims.agent}:{cfg.claims.port}",
                "server_name": cfg.claims.server_name,
                "connected": self.sender.connected,
                "last_error": self.sender.last_error,
                "held": self.tracker.status(time.monotonic()),
                "counters": {**self.sender.counters, **self.tracker.counters},
            }
        doc["adaptor"] = {
            "service_fqdn": self.config.fqdn,
            "service_interface": cfg.service_interface,
            "next_hop": cfg.next_hop,
            "lb_address": cfg.lb_address,
            "forward": [str(f) for f in cfg.forward],
            "public_addresses": list(cfg.public_addresses),
            "public_forward": [str(f) for f in cfg.public_forward],
            "nft_table": cfg.nft_table,
            "forwarding_vip": self.forwarding_vip,
            "forwarding_error": self.forwarding_error,
            "nft_counters": forwarding.counters(cfg) if self.forwarding_vip else {},
            "claims": claims,
            "gateway": self._gateway_status(),
        }
        return doc

    def _gateway_status(self) -> dict[str, Any] | None:
        if not self.adaptor.gateway:
            return None
        r = self.last_report
        return {
            "name": self.adaptor.gateway,
            "weight": self.adaptor.weight,
            "report_interval": self.adaptor.report_interval,
            "last_report": None
            if r is None
            else {
                "tunnels": r.tunnels,
                "rtt_us": r.rtt_us,
                "jitter_us": r.jitter_us,
                "loss_ppm": r.loss_ppm,
            },
            "last_error": self.report_error,
            "counters": dict(self.report_counters),
        }


def send_probes(
    engine: TunnelEngine, quality: ProbeQuality, path_ids: list[bytes], now: float
) -> int:
    """One probe on each of these tunnels (a random sample when there are many), recorded
    in `quality`; their answers come back through the engine's probe listeners."""
    if len(path_ids) > MAX_PROBES_PER_ROUND:
        path_ids = random.sample(path_ids, MAX_PROBES_PER_ROUND)
    paths = {p.path_id: p for p in engine.endpoint.paths}
    sent = 0
    for path_id in path_ids:
        path = paths.get(path_id)
        seq = path.send_probe(now) if path is not None else None
        if seq is not None:
            quality.sent(path_id, seq, now)
            sent += 1
    engine.flush()
    return sent


async def run(config: AdaptorConfig) -> None:
    await serve_until_signalled(AdaptorDaemon(config))
