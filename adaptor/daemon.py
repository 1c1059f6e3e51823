"""`ntm adaptor`: an NTM node that terminates tunnels for a service behind a load balancer.

It is `ntm_node`'s NodeDaemon (registration with the DC under the service's FQDN, the
tunnel engine, status) plus three things:

- its service-side interface is never offered to the DC as a tunnel endpoint (the DC also
  answers ordinary clients' A queries for the service name with the endpoints);
- nftables DNAT of inner packets to the LB's virtual service, and of ordinary clients'
  packets to our public address (adaptor/forwarding.py), without SNAT;
- route claims for every MN vIP with an established tunnel here (adaptor/claims.py), so the
  LB host's return route for that vIP points at us.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from lb_integration.claims import RouteClaim
from ntm_io.daemon import serve_until_signalled
from ntm_node.daemon import NodeDaemon
from ntm_proto.messages import RegistrationResponse
from ntm_proto.path import PathState

from . import forwarding
from .claims import ClaimSender, ClaimTracker
from .config import AdaptorConfig

log = logging.getLogger("ntm.adaptor")

TICK = 0.25  # seconds between looks at the tunnels (claims follow within this)


class AdaptorDaemon(NodeDaemon):
    def __init__(self, config: AdaptorConfig) -> None:
        self.adaptor = config  # before NodeDaemon.__init__, which asks ignored_interfaces()
        super().__init__(config.node)
        self.forwarding_vip: str | None = None
        self.forwarding_error: str | None = None
        self.tracker: ClaimTracker | None = None
        self.sender: ClaimSender | None = None
        self._claim_task: asyncio.Task[Any] | None = None
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
        assert self.tracker is not None
        while True:
            try:
                claims = self.tracker.update(
                    self.tunnels(), time.monotonic(), time.time_ns() // 1_000_000
                )
                await self._send_all(claims)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("route claims: unexpected error")
            await asyncio.sleep(TICK)

    async def _send_all(self, claims: list[RouteClaim]) -> None:
        assert self.tracker is not None and self.sender is not None
        if not claims:
            return
        acks = await self.sender.send_many(claims)
        now = time.monotonic()
        for claim, ack in zip(claims, acks, strict=True):
            self.tracker.result(claim, ack, now)

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
        }
        return doc


async def run(config: AdaptorConfig) -> None:
    await serve_until_signalled(AdaptorDaemon(config))
