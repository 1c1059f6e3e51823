"""ntm_node.failover over an in-memory world with a fake clock: real TunnelPaths, a lossy
network, two gateways (ntma2 with two uplinks) and a fake DC. No sockets, no sleeping.

Also the [node] failover/tunnel_addresses settings (ntm_node.config).
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import os
import random
import re
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from ntm_io.config import ConfigError
from ntm_io.netwatch import AddressSet
from ntm_node import config as node_config
from ntm_node.daemon import NodeDaemon
from ntm_node.dc_client import DirectionError
from ntm_node.engine import PathError, ProbeListener
from ntm_node.failover import FailoverManager
from ntm_proto.crypto import StaticKey
from ntm_proto.endpoint import TunnelEndpoint
from ntm_proto.liveness import LivenessTimers
from ntm_proto.messages import Endpoint, ErrorCode, PathRole, RouteDirection, RouteKind
from ntm_proto.path import PathConfig, PathEstablished, PathState, ProbeResult, TunnelPath

SERVICE = "www.ntm.example.com"
SERVICE_VIP = "100.64.0.80"
MN_VIP = "100.64.0.10"
MN_ADDR: Endpoint = ("10.10.1.100", 7400)
GW1, GW2 = "ntma1.ntm.example.com", "ntma2.ntm.example.com"
GW1_ADDRS: tuple[Endpoint, ...] = (("198.51.100.60", 7400),)
GW2_ADDRS: tuple[Endpoint, ...] = (("198.51.100.61", 7400), ("203.0.113.61", 7400))
WALL0 = 1_700_000_000 * 10**9


class Host:
    """A tunnel endpoint at one or more addresses; it answers from the address the path's
    latest authenticated packet came to (what the engine does with tunnel_addresses)."""

    def __init__(self, addrs: tuple[Endpoint, ...], key: StaticKey) -> None:
        self.addrs = addrs
        self.key = key
        self.ep = TunnelEndpoint()
        self.pinned: dict[bytes, Endpoint] = {}
        self.events: list[tuple[bytes, Any]] = []


class World:
    """The network, a fake MN engine on top of it, and a fake DC."""

    def __init__(self, loss: float = 0.0, seed: int = 1, delay: float = 0.005) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self.loss = loss
        self.delay = delay
        self.down: set[Endpoint] = set()  # addresses whose link is cut
        self._queue: list[tuple[float, int, bytes, Endpoint, Endpoint]] = []
        self._seq = itertools.count()
        self.mn = Host((MN_ADDR,), StaticKey.generate())
        self.gws = {
            GW1: Host(GW1_ADDRS, StaticKey.generate()),
            GW2: Host(GW2_ADDRS, StaticKey.generate()),
        }
        self.dc_usable = {GW1: True, GW2: True}
        self.dc_order = [GW1, GW2]  # the DC's policy choice, best first
        self.directions: list[tuple[str, str]] = []
        self.engine = FakeEngine(self)
        self.route_log: list[tuple[float, str | None]] = []  # (time, path id the route uses)

    @property
    def wall(self) -> int:
        return WALL0 + int(self.now * 1e9)

    def hosts(self) -> list[Host]:
        return [self.mn, *self.gws.values()]

    def host_at(self, addr: Endpoint) -> Host | None:
        return next((h for h in self.hosts() if addr in h.addrs), None)

    # --- network ---

    def send(self, host: Host, data: bytes, dst: Endpoint) -> None:
        src = host.pinned.get(data[4:12], host.addrs[0])
        if src in self.down or dst in self.down:
            return
        if self.rng.random() < self.loss:
            return
        heapq.heappush(self._queue, (self.now + self.delay, next(self._seq), data, src, dst))

    def flush(self) -> None:
        for host in self.hosts():
            for data, dst in host.ep.datagrams_to_send(self.now):
                self.send(host, data, dst)
        for pid, event in self.mn.ep.events():
            self.engine.on_event(pid, event)
        for gw in self.gws.values():
            gw.events.extend(gw.ep.events())
        route = self.engine.path_to(SERVICE_VIP)
        rid = route.path_id.hex() if route is not None else None
        if not self.route_log or self.route_log[-1][1] != rid:
            self.route_log.append((self.now, rid))

    def next_time(self) -> float | None:
        times = [t for h in self.hosts() if (t := h.ep.get_timer()) is not None]
        if self._queue:
            times.append(self._queue[0][0])
        times += [d for d, _ in self.engine.deadlines.values()]
        return min(times) if times else None

    def advance_to(self, t: float) -> None:
        self.now = max(self.now, t)
        while self._queue and self._queue[0][0] <= self.now:
            _, _, data, src, dst = heapq.heappop(self._queue)
            host = self.host_at(dst)
            if host is None or dst in self.down:
                continue
            path = host.ep.path(data[4:12])
            before = path.last_received if path is not None else None
            host.ep.receive_datagram(data, src, self.now, self.wall)
            if path is not None and path.last_received != before:
                host.pinned[path.path_id] = dst
        for host in self.hosts():
            timer = host.ep.get_timer()
            if timer is not None and timer <= self.now:
                host.ep.handle_timer(self.now, self.wall)
        self.engine.check_deadlines()
        self.flush()

    # --- the fake DC ---

    async def request_direction(self, fqdn: str, gateway: str) -> RouteDirection:
        assert fqdn == SERVICE
        self.directions.append((fqdn, gateway))
        usable = [g for g in self.dc_order if self.dc_usable[g]]
        if gateway and gateway not in usable:
            raise DirectionError(f"gateway {gateway} is not usable", ErrorCode.PEER_UNREACHABLE)
        if not usable:
            raise DirectionError("no gateway", ErrorCode.PEER_UNREACHABLE)
        chosen = gateway or usable[0]
        gw = self.gws[chosen]
        pid = os.urandom(8)
        gw.ep.add_path(
            PathConfig(
                pid, PathRole.RESPONDER, gw.key, self.mn.key.public_bytes(), SERVICE_VIP, MN_VIP
            ),
            self.now,
        )
        return RouteDirection(
            pid, RouteKind.DIRECT, PathRole.INITIATOR, SERVICE, SERVICE_VIP,
            gw.key.public_bytes(), gw.addrs, None, 300, bytes(32), gateway=chosen,
            alternatives=tuple(g for g in usable if g != chosen),
        )  # fmt: skip

    # --- driving ---

    def manager(self, timers: LivenessTimers) -> FailoverManager:
        return FailoverManager(self.engine, self.request_direction, timers, clock=lambda: self.now)

    async def run(self, manager: FailoverManager, until: float) -> None:
        """Advance the world and the manager together up to `until` (fake seconds)."""
        spins = 0
        while self.now < until:
            delay = manager.step(self.now)
            for _ in range(10):  # let switch tasks run as far as they can now
                if len(asyncio.all_tasks()) == 1:
                    break
                await asyncio.sleep(0)
            self.flush()
            nxt = self.next_time()
            t = min(until, self.now + max(delay, 0.0))
            if nxt is not None:
                t = min(t, nxt)
            spins = spins + 1 if t <= self.now else 0
            assert spins < 1000, "no progress"
            self.advance_to(t)

    async def connect(self, manager: FailoverManager, gateway: str = "") -> TunnelPath:
        """What the daemon does on a DNS lookup: a direction, a path, C measured."""
        rd = await self.request_direction(SERVICE, gateway)
        t0 = self.now
        path = self.engine.add_path(rd)
        self.flush()
        while path.state is not PathState.ESTABLISHED:
            await self.run(manager, self.now + 0.01)
        manager.record_switch_time(self.now - t0)
        return path


class FakeEngine:
    """The part of TunnelEngine failover uses, over World's MN host and fake clock."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.endpoint = world.mn.ep
        self.probe_listeners: list[ProbeListener] = []
        self._meta: dict[bytes, RouteDirection] = {}
        self._route: dict[str, TunnelPath] = {}
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self.deadlines: dict[int, tuple[float, asyncio.Future[None]]] = {}
        self.retired: list[bytes] = []

    def route_direction(self, path_id: bytes) -> RouteDirection | None:
        return self._meta.get(path_id)

    def path_to(self, peer_vip: str) -> TunnelPath | None:
        return self._route.get(peer_vip)

    def add_path(self, rd: RouteDirection, handshake_retry: float | None = None) -> TunnelPath:
        w = self.world
        cfg = PathConfig(
            rd.path_id, rd.role, w.mn.key, rd.peer_key, MN_VIP, rd.peer_vip, rd.peer_endpoints
        )
        if handshake_retry is not None:
            cfg = dataclasses.replace(cfg, handshake_retry=handshake_retry)
        path = self.endpoint.add_path(cfg, w.now)
        self._meta[rd.path_id] = rd
        path.connect(w.now, w.wall)
        return path

    async def wait_established(self, path_id: bytes, timeout: float) -> None:
        path = self.endpoint.path(path_id)
        if path is None:
            raise PathError("gone")
        if path.state is PathState.ESTABLISHED:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(path_id, []).append(fut)
        self.deadlines[id(fut)] = (self.world.now + timeout, fut)
        try:
            await fut
        finally:
            self.deadlines.pop(id(fut), None)

    def check_deadlines(self) -> None:
        for deadline, fut in list(self.deadlines.values()):
            if deadline <= self.world.now and not fut.done():
                fut.set_exception(TimeoutError())

    def remove_path(self, path_id: bytes) -> None:
        path = self.endpoint.remove_path(path_id)
        self._meta.pop(path_id, None)
        if path is not None and self._route.get(path.config.peer_vip) is path:
            del self._route[path.config.peer_vip]

    def flush(self) -> None:
        self.world.flush()

    def on_event(self, pid: bytes, event: Any) -> None:
        if isinstance(event, PathEstablished):
            path = self.endpoint.path(pid)
            assert path is not None
            old = self._route.get(path.config.peer_vip)
            self._route[path.config.peer_vip] = path
            if old is not None and old.path_id != pid:
                self.retired.append(old.path_id)
                self.endpoint.remove_path(old.path_id)
                self._meta.pop(old.path_id, None)
            for fut in self._waiters.pop(pid, []):
                if not fut.done():
                    fut.set_result(None)
        elif isinstance(event, ProbeResult):
            for listener in self.probe_listeners:
                listener(pid, event)


def arun(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


TIMERS = LivenessTimers(allowed_outage=1.0, switch_time=0.3, dead_after_losses=8)  # defaults


def outage(world: World, cut: float) -> float:
    """From the cut to the route pointing at a path that was established after it."""
    after = [t for t, pid in world.route_log if t >= cut and pid is not None]
    assert after, f"the route never moved after the cut: {world.route_log}"
    return after[0] - cut


# --- gateway failover ----------------------------------------------------------------------


def test_gateway_failover_within_the_allowed_outage() -> None:
    async def scenario() -> None:
        w = World()
        m = w.manager(TIMERS)
        first = await w.connect(m)
        await w.run(m, 10.0)
        assert m.gateway_for(SERVICE) == GW1
        assert m.timers.switch_time_measured and m.timers.switch_time < 0.05
        cut = w.now
        w.down.update(GW1_ADDRS)  # ntma1 dies
        await w.run(m, cut + 5.0)
        assert m.gateway_for(SERVICE) == GW2
        assert first.path_id in w.engine.retired
        assert outage(w, cut) <= m.timers.allowed_outage
        (ev,) = list(m.events)
        assert ev.kind == "gateway" and ev.from_gateway == GW1 and ev.to_gateway == GW2 and ev.ok
        assert ev.detection_s is not None and ev.detection_s <= m.timers.detection + 0.01
        assert ev.switch_s < 0.1
        assert w.directions[-1] == (SERVICE, GW2)
        st = m.status()
        svc = st["services"][SERVICE]
        assert svc["gateway"]["current"] == GW2 and svc["gateway"]["preferred"] == GW1
        assert GW1 in svc["gateway"]["held_down"]
        assert svc["liveness"]["state"] != "dead"
        assert st["timers"]["dead_after_losses"] == 8 and st["error"] is None
        assert st["events"][0]["to_gateway"] == GW2

    arun(scenario())


def test_no_false_failover_at_5_percent_loss_for_10_minutes() -> None:
    """End to end over real paths (test_liveness.py repeats it over more seeds, faster)."""

    async def scenario() -> None:
        w = World(seed=1)
        m = w.manager(TIMERS)
        await w.connect(m)
        w.loss = 0.05  # each datagram, each way
        await w.run(m, 600.0)
        assert not m.events and m.counters.get("dead", 0) == 0
        assert len(w.directions) == 1
        svc = m.status()["services"][SERVICE]["liveness"]
        assert svc["probes_sent"] > 3000 and 0.05 < svc["loss"] < 0.15

    arun(scenario())


# --- uplink switch -------------------------------------------------------------------------


def test_uplink_switch_keeps_the_path_and_the_gateway() -> None:
    async def scenario() -> None:
        w = World()
        w.dc_order = [GW2, GW1]
        m = w.manager(TIMERS)
        path = await w.connect(m)
        await w.run(m, 5.0)
        assert path.peer_address == GW2_ADDRS[0] and m.gateway_for(SERVICE) == GW2
        cut = w.now
        w.down.add(GW2_ADDRS[0])  # ntma2's isp1 uplink
        await w.run(m, cut + 5.0)
        assert path.peer_address == GW2_ADDRS[1]
        assert w.engine.path_to(SERVICE_VIP) is path  # same path id: the LB route stays
        assert m.gateway_for(SERVICE) == GW2 and len(w.directions) == 1
        (ev,) = list(m.events)
        assert ev.kind == "uplink" and ev.to_address == "203.0.113.61:7400"
        assert ev.detection_s is not None
        # Traffic stopped at the cut and flows again after detection + one round trip.
        assert ev.detection_s + ev.switch_s <= m.timers.allowed_outage + 1e-9
        # The gateway answers from its second uplink now.
        assert w.gws[GW2].pinned[path.path_id] == GW2_ADDRS[1]
        svc = m.status()["services"][SERVICE]
        assert svc["liveness"]["state"] != "dead"
        assert svc["uplink_reserve_s"] == 0.05  # 3 round trips of 10 ms, at least 50 ms
        assert svc["detection_s"] == pytest.approx(m.timers.detection - 0.05)

    arun(scenario())


def test_both_uplinks_down_fails_over_to_the_other_gateway() -> None:
    async def scenario() -> None:
        w = World()
        w.dc_order = [GW2, GW1]
        m = w.manager(TIMERS)
        await w.connect(m)
        await w.run(m, 5.0)
        cut = w.now
        w.down.update(GW2_ADDRS)
        await w.run(m, cut + 5.0)
        assert m.gateway_for(SERVICE) == GW1
        kinds = [e.kind for e in m.events]
        assert kinds == ["gateway"]
        assert m.events[0].reason == "dead on every address"
        # The other uplink is tried first, within the time F left for it: F + R + C = A.
        assert outage(w, cut) <= m.timers.allowed_outage
        svc = m.status()["services"][SERVICE]
        assert svc["uplink_reserve_s"] == 0.0  # ntma1 has one address

    arun(scenario())


# --- fail-back -----------------------------------------------------------------------------


def test_failback_only_after_hold_down_and_only_once() -> None:
    async def scenario() -> None:
        timers = dataclasses.replace(TIMERS, failback_hold_down=20.0)
        w = World()
        m = w.manager(timers)
        await w.connect(m)
        await w.run(m, 5.0)
        w.down.update(GW1_ADDRS)
        w.dc_usable[GW1] = False
        await w.run(m, 8.0)
        assert m.gateway_for(SERVICE) == GW2
        failed_at = m.events[0].at
        assert failed_at > 0
        w.down.clear()  # ntma1 comes back at once, but the hold-down holds
        w.dc_usable[GW1] = True
        asked = len(w.directions)
        await w.run(m, 24.0)
        assert m.gateway_for(SERVICE) == GW2 and len(w.directions) == asked
        await w.run(m, 40.0)
        assert m.gateway_for(SERVICE) == GW1
        assert [e.kind for e in m.events] == ["gateway", "failback"]
        # Make-before-break: the route never pointed nowhere during the fail-back.
        fb = [t for t, _ in w.route_log if t > 24.0]
        assert all(pid is not None for t, pid in w.route_log if t >= 8.0), w.route_log
        assert len(fb) == 1
        await w.run(m, 120.0)
        assert [e.kind for e in m.events] == ["gateway", "failback"]  # once

    arun(scenario())


def test_failback_waits_until_the_dc_offers_the_gateway() -> None:
    async def scenario() -> None:
        timers = dataclasses.replace(TIMERS, failback_hold_down=10.0)
        w = World()
        m = w.manager(timers)
        await w.connect(m)
        await w.run(m, 2.0)
        w.down.update(GW1_ADDRS)
        w.dc_usable[GW1] = False
        await w.run(m, 5.0)
        w.down.clear()
        await w.run(m, 40.0)  # past the hold-down, but the DC does not offer ntma1
        assert m.gateway_for(SERVICE) == GW2
        refused = [d for d in w.directions if d == (SERVICE, GW1)]
        assert 2 <= len(refused) <= 4  # asked after the hold-down, then every 10 s
        w.dc_usable[GW1] = True
        await w.run(m, 60.0)
        assert m.gateway_for(SERVICE) == GW1

    arun(scenario())


def test_a_failback_attempt_does_not_blind_the_watch_on_the_current_path() -> None:
    """ntma1's cable is pulled but the DC still counts it connected, so each fail-back
    attempt waits SWITCH_TIMEOUT for a handshake that never comes; an uplink of ntma2 dying
    meanwhile is still detected within A."""

    async def scenario() -> None:
        timers = dataclasses.replace(TIMERS, failback_hold_down=10.0)
        w = World()
        m = w.manager(timers)
        await w.connect(m)
        await w.run(m, 2.0)
        w.down.update(GW1_ADDRS)
        await w.run(m, 5.0)
        assert m.gateway_for(SERVICE) == GW2
        path = w.engine.path_to(SERVICE_VIP)
        assert path is not None and path.peer_address == GW2_ADDRS[0]
        asked = len(w.directions)
        while len(w.directions) == asked:  # until the hold-down is over
            await w.run(m, w.now + 0.05)
        assert w.directions[-1] == (SERVICE, GW1)
        svc = m.status()["services"][SERVICE]
        assert svc["failing_back"] and not svc["switching"]
        cut = w.now
        w.down.add(GW2_ADDRS[0])
        await w.run(m, cut + 5.0)
        uplink = [e for e in m.events if e.kind == "uplink"]
        assert len(uplink) == 1 and path.peer_address == GW2_ADDRS[1]
        assert uplink[0].detection_s is not None
        assert uplink[0].detection_s + uplink[0].switch_s <= m.timers.allowed_outage + 1e-9
        assert m.gateway_for(SERVICE) == GW2

    arun(scenario())


def test_a_dead_path_cancels_a_failback_attempt_and_fails_over() -> None:
    async def scenario() -> None:
        timers = dataclasses.replace(TIMERS, failback_hold_down=10.0)
        w = World()
        w.gws[GW2].addrs = GW2_ADDRS[:1]  # one uplink: a dead path means another gateway
        m = w.manager(timers)
        await w.connect(m)
        await w.run(m, 2.0)
        w.down.update(GW1_ADDRS)
        await w.run(m, 5.0)
        asked = len(w.directions)
        while len(w.directions) == asked:
            await w.run(m, w.now + 0.05)
        attempt = next(p.path_id for p in w.mn.ep.paths if p.state is not PathState.ESTABLISHED)
        cut = w.now
        w.down.update(GW2_ADDRS[:1])  # ntma2 dies while the fail-back attempt waits
        await w.run(m, cut + 1.5)  # declared dead: the attempt is dropped for a switch
        assert w.mn.ep.path(attempt) is None
        w.down.difference_update(GW1_ADDRS)  # ntma1 is back
        await w.run(m, cut + 8.0)
        assert m.gateway_for(SERVICE) == GW1
        assert [(e.kind, e.to_gateway, e.ok) for e in m.events] == [
            ("gateway", GW2, True),
            ("gateway", GW1, True),
        ]
        route = w.engine.path_to(SERVICE_VIP)
        assert route is not None and route.state is PathState.ESTABLISHED
        assert len(w.mn.ep.paths) == 1  # nothing left behind
        assert m.counters.get("task_errors", 0) == 0

    arun(scenario())


def test_no_gateway_reachable_keeps_the_path_and_retries() -> None:
    async def scenario() -> None:
        w = World()
        m = w.manager(TIMERS)
        path = await w.connect(m)
        await w.run(m, 2.0)
        w.down.update(GW1_ADDRS + GW2_ADDRS)
        w.dc_usable[GW2] = True
        await w.run(m, 12.0)
        assert m.counters.get("switch_failed", 0) >= 1
        assert not m.events[0].ok
        assert w.engine.path_to(SERVICE_VIP) is path  # nothing better: keep what we have
        w.down.clear()  # ntma1 is back: the old path answers again, or we move
        await w.run(m, 30.0)
        route = w.engine.path_to(SERVICE_VIP)
        assert route is not None and route.state is PathState.ESTABLISHED
        assert m.status()["services"][SERVICE]["liveness"]["state"] != "dead"

    arun(scenario())


# --- the node's own move, and C measured at run time ---------------------------------------


def test_pause_holds_verdicts_during_the_nodes_own_move() -> None:
    async def scenario() -> None:
        w = World()
        m = w.manager(TIMERS)
        await w.connect(m)
        await w.run(m, 2.0)
        m.pause(w.now)
        w.down.add(MN_ADDR)  # between networks
        await w.run(m, 6.0)
        assert not m.events and m.status()["paused"]
        w.down.clear()
        m.resume(w.now)
        await w.run(m, 10.0)
        assert not m.events and m.gateway_for(SERVICE) == GW1

    arun(scenario())


async def built_path(w: World, m: FailoverManager) -> tuple[float, TunnelPath]:
    """What the daemon does on a DNS lookup of a gateway service, up to path_built."""
    rd = await w.request_direction(SERVICE, "")
    t0 = w.now
    path = w.engine.add_path(rd)
    w.flush()
    while path.state is not PathState.ESTABLISHED:
        await w.run(m, w.now + 0.005)
    m.path_built(path.path_id, t0)
    return t0, path


def from_gateway(w: World, path: TunnelPath) -> None:
    """One data packet from the gateway down the path (a reply that crossed the LB)."""
    gw_path = w.gws[GW1].ep.path(path.path_id)
    assert gw_path is not None and gw_path.peer_address is not None
    data = gw_path.seal(b"\x45" + bytes(27), w.now)
    assert data is not None
    w.send(w.gws[GW1], data, gw_path.peer_address)


@pytest.mark.parametrize("reply_after", [0.03, None])
def test_switch_time_lasts_until_traffic_comes_back_through_the_new_path(
    reply_after: float | None,
) -> None:
    """C counts up to the first packet back through a new gateway path (the LB route must
    have followed the gateway's claim), if one comes within P; else the build alone."""

    async def scenario() -> None:
        w = World()
        m = w.manager(TIMERS)
        t0, path = await built_path(w, m)
        built = w.now - t0
        assert not m.switch_time.samples  # not yet: waiting for traffic
        if reply_after is not None:
            await w.run(m, w.now + reply_after)
            from_gateway(w, path)
        await w.run(m, w.now + 3 * m.timers.probe_interval)
        (c,) = m.switch_time.samples
        if reply_after is None:
            assert c == pytest.approx(built)
        else:  # one way more than the reply's departure, within one poll of the manager
            assert built + reply_after < c <= built + reply_after + w.delay + 0.011

    arun(scenario())


def test_a_late_packet_after_the_probe_interval_is_not_taken_for_traffic() -> None:
    async def scenario() -> None:
        w = World()
        m = w.manager(TIMERS)
        t0, path = await built_path(w, m)
        built = w.now - t0
        await w.run(m, w.now + m.timers.probe_interval + 0.02)
        from_gateway(w, path)
        await w.run(m, w.now + 0.1)
        assert m.switch_time.samples == (pytest.approx(built),)

    arun(scenario())


def test_measured_switch_time_too_large_is_an_error_in_status_not_a_crash() -> None:
    async def scenario() -> None:
        w = World()
        m = w.manager(TIMERS)
        await w.connect(m)
        for _ in range(9):
            m.record_switch_time(1.45)
        st = m.status()
        assert st["error"] is not None and "measured switch time C = 1.475 s" in st["error"]
        assert st["timers"]["detection_s"] == 0.15  # the floor, still watching
        cut = w.now
        w.down.update(GW1_ADDRS)
        await w.run(m, cut + 3.0)
        assert m.gateway_for(SERVICE) == GW2

    arun(scenario())


# --- configuration -------------------------------------------------------------------------

LAB = Path(__file__).resolve().parents[2] / "lab" / "config"
FAILOVER_KEYS = r"^(allowed_outage|switch_time_estimate|dead_after_losses|failback_hold_down) =.*\n"


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NTM_LAB_STATE", str(tmp_path))
    (tmp_path / "pki").mkdir()
    for name in ("ca.pem", "mn1.pem", "mn1.key"):
        (tmp_path / "pki" / name).write_text("x")
    return tmp_path


def mn1_with(state: Path, extra: str) -> Path:
    """lab/config/mn1.toml without the lab's own failover settings, plus `extra`."""
    text = re.sub(FAILOVER_KEYS, "", (LAB / "mn1.toml").read_text(), flags=re.MULTILINE)
    text = text.replace("[node]\n", "[node]\n" + extra + "\n", 1)
    out = state / "mn1.toml"
    out.write_text(text)
    return out


def test_config_defaults_and_settings(state: Path) -> None:
    cfg = node_config.load(mn1_with(state, ""))
    assert cfg.tunnel_addresses == () and cfg.allowed_outage == 1.0
    t = cfg.liveness_timers()
    assert (t.switch_time, t.dead_after_losses, t.failback_hold_down) == (0.3, 8, 60.0)
    cfg = node_config.load(
        mn1_with(
            state,
            'tunnel_addresses = ["192.0.2.10", "2001:db8::10"]\nallowed_outage = 3\n'
            "switch_time_estimate = 0.5\ndead_after_losses = 6\nfailback_hold_down = 120",
        )
    )
    assert cfg.tunnel_addresses == ("192.0.2.10", "2001:db8::10")
    t = cfg.liveness_timers()
    assert t.detection == pytest.approx(2.5) and t.dead_after_losses == 6
    assert t.failback_hold_down == 120


@pytest.mark.parametrize(
    "extra,expect",
    [
        ("allowed_outage = 0.4", "A = 0.4 s leaves detection F = A - C = 0.100 s"),
        ("allowed_outage = 0.4", "A must be at least 0.450 s"),
        ("switch_time_estimate = 1.4", "estimated switch time C = 1.400 s"),
        ("dead_after_losses = 0", "out of range"),
        ('tunnel_addresses = ["uplink1"]', "not an IP address"),
        ('tunnel_addresses = ["0.0.0.0"]', "not a usable unicast address"),
        ('tunnel_addresses = ["fe80::1"]', "not a usable unicast address"),
        ('tunnel_addresses = ["192.0.2.1", "192.0.2.1"]', "listed twice"),
    ],
)
def test_config_errors(state: Path, extra: str, expect: str) -> None:
    with pytest.raises(ConfigError) as exc:
        node_config.load(mn1_with(state, extra))
    assert expect in str(exc.value)


def test_daemon_offers_only_its_tunnel_addresses_and_shows_failover(state: Path) -> None:
    key = state / "mn1.x25519"
    cfg = dataclasses.replace(
        node_config.load(mn1_with(state, 'tunnel_addresses = ["192.0.2.10", "2001:db8::10"]')),
        key_file=str(key),
    )

    async def scenario() -> None:
        daemon = NodeDaemon(cfg)
        daemon.addresses = AddressSet(("10.0.0.5", "192.0.2.10"), ("2001:db8::10", "2001:db8::99"))
        offered = daemon.tunnel_address_set()
        assert offered.ipv4 == ("192.0.2.10",) and offered.ipv6 == ("2001:db8::10",)
        assert daemon.engine.addresses == ("192.0.2.10", "2001:db8::10")
        st = daemon.status()
        assert st["tunnel_addresses"] == ["192.0.2.10", "2001:db8::10"]
        fo = st["failover"]
        assert fo["timers"]["allowed_outage_s"] == 1.0 and fo["services"] == {}
        assert fo["events"] == [] and fo["error"] is None

    arun(scenario())
