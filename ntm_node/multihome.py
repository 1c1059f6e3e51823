"""Make-before-break over several uplinks: asyncio glue over `ntm_proto.multihome`.

Every `tick` asks the policy what to do for the established direct paths (a relayed path
is bound to the relay from one address, so it stays where it is) and does it: standby
probes out of the other legs' sockets, switches through `TunnelEngine.use_leg`. Ticks
run every quarter of the standby interval, at once on a change of the host's addresses
(netlink), on a standby answer, and on the admin command `prefer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

from ntm_io.netwatch import AddressSet
from ntm_io.status import AdminError
from ntm_proto.messages import RouteKind
from ntm_proto.multihome import MOVE_HOLD, MultihomePolicy, PathView
from ntm_proto.path import PathState, StandbyProbeResult

from .engine import TunnelEngine

log = logging.getLogger("ntm.multihome")

MAX_EVENTS = 50


class MultihomeManager:
    def __init__(self, engine: TunnelEngine, policy: MultihomePolicy) -> None:
        self.engine = engine
        self.policy = policy
        self.counters: dict[str, int] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._sent: dict[tuple[bytes, int], str] = {}  # (path id, seq) -> leg probed
        self._wake = asyncio.Event()
        engine.standby_listeners.append(self._on_standby)

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    async def run(self) -> None:
        period = self.policy.interval / 4
        while True:
            try:
                self.tick()
            except Exception:  # a bug here must not end make-before-break for good
                log.exception("multihome tick failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), period)

    def views(self) -> list[PathView]:
        out: list[PathView] = []
        engine = self.engine
        for path in engine.endpoint.paths:
            rd = engine.route_direction(path.path_id)
            if path.state is not PathState.ESTABLISHED or rd is None or rd.kind is RouteKind.RELAY:
                continue
            out.append(
                PathView(
                    path_id=path.path_id,
                    local=engine.local_address_of(path.path_id),
                    peer=path.peer_address,
                    peer_endpoints=path.config.peer_endpoints or rd.peer_endpoints,
                    last_received=path.last_received,
                )
            )
        return out

    def tick(self) -> list[PathView]:
        now = time.monotonic()
        views = self.views()
        self.policy.forget(v.path_id for v in views)
        alive = {v.path_id for v in views}
        for key in [k for k in self._sent if k[0] not in alive]:
            del self._sent[key]
        plan = self.policy.plan(views, now)
        before = {v.path_id: v for v in views}
        for switch in plan.switches:
            old = before[switch.path_id]
            if self.engine.use_leg(switch.path_id, switch.local, switch.peer, now, MOVE_HOLD):
                self._count("switches_" + switch.reason)
                event = {
                    "path_id": switch.path_id.hex(),
                    "reason": switch.reason,
                    "from": old.local,
                    "to": switch.local,
                    "peer": list(switch.peer),
                    "at": round(now, 6),
                }
                self.events.append(event)
                log.info(
                    "path %s: %s -> %s (%s), peer %s",
                    switch.path_id.hex(),
                    old.local,
                    switch.local,
                    switch.reason,
                    switch.peer,
                )
            else:
                self._count("switch_failed")
        for probe in plan.probes:
            seq = self.engine.send_standby(probe.path_id, probe.local, probe.peer, now)
            if seq is None:
                self._count("standby_not_sent")
            else:
                self._sent[(probe.path_id, seq)] = probe.local
                if len(self._sent) > 4096:  # unanswered ones (a dead leg)
                    del self._sent[next(iter(self._sent))]
        return views

    def _on_standby(self, path_id: bytes, event: StandbyProbeResult) -> None:
        local = self._sent.pop((path_id, event.seq), None)
        if local is None:
            self._count("standby_answer_unknown")
            return
        self._count("standby_answered")
        ready_before = self._ready_count()
        self.policy.answered(path_id, local, time.monotonic(), event.rtt)
        if self._ready_count() != ready_before:
            self._wake.set()  # a leg became ready: a better one may be worth moving to now

    def _ready_count(self) -> int:
        now = time.monotonic()
        return sum(
            1
            for (_pid, _local), leg in self.policy.legs.items()
            if leg.last_answer is not None and now - leg.last_answer <= self.policy.ready_for
        )

    def addresses_changed(self, addresses: AddressSet) -> bool:
        """The netlink view changed: move paths off a leg that went away at once. True when
        every multihomed path now sends from an address the host still has (the node then
        needs no new paths for this change)."""
        self.policy.set_available(addresses.interface_of())
        views = self.tick()
        have = set(addresses.all)
        established = sum(1 for p in self.engine.endpoint.paths if p.state is PathState.ESTABLISHED)
        # A relayed (or otherwise unmanaged) path needs the node's usual handling.
        return len(views) == established and all(
            (local := self.engine.local_address_of(v.path_id)) is not None and local in have
            for v in views
        )

    def prefer(self, request: dict[str, Any]) -> dict[str, Any]:
        """Admin `prefer`: put an uplink (interface name or address) first; paths move to it
        as soon as it has answered a standby probe (make-before-break)."""
        name = request.get("uplink")
        if not isinstance(name, str) or not name:
            raise AdminError('prefer needs "uplink": an interface name or tunnel address')
        try:
            address = self.policy.prefer(name)
        except ValueError as exc:
            raise AdminError(str(exc)) from None
        log.info("admin: prefer %s (%s)", name, address)
        self._count("prefer_requests")
        self.tick()
        return {"uplink": name, "address": address, **self.policy.status()}

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            **self.policy.status(),
            "paths": [
                {
                    "path_id": v.path_id.hex(),
                    "local": v.local,
                    "peer": list(v.peer) if v.peer else None,
                    "legs": self.policy.leg_status(v.path_id, now),
                }
                for v in self.views()
            ],
            "events": list(self.events),
            "counters": dict(self.counters),
        }
