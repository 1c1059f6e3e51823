"""Gateway failover and uplink switching for the paths this node built (asyncio glue).

Every decision is in `ntm_proto.liveness` (timers, `PathMonitor`, `GatewayPlan`); this
module reads the clock, sends the probes a monitor asks for, and acts on its verdicts:

- watch each service reached through a multi-gateway path we initiated (Route Direction
  `gateway` set): one PathMonitor on the path that carries it now;
- dead and the gateway has other addresses (a gateway with two uplinks): probe them with
  `TunnelPath.try_peer_address`; the first authenticated answer moves the path, same path
  id, so the gateway's route claim at the LB does not move;
- dead otherwise (or no other address answered within the uplink timeout): ask the DC for
  a path through the next alternative gateway, add it and wait until it is established
  (the engine then routes the peer vIP through it and retires the dead path);
- once the gateway we left has been held down long enough, ask the DC for it again; if the
  DC offers it, build that path while the current one keeps carrying traffic
  (make-before-break) and let the engine switch when it is established.

Each build's direction round trip + handshake is a measurement of C, the switch time, and
F = A - C follows it (`timers`). Events are kept for `ntm status`.

With `probe_idle=False` only paths in use are probed: the engine reports the paths it sealed
data on (`send_listeners`) and a monitor watches from the first such packet no inbound one
has followed yet (`PathMonitor.data_sent`); a swarm of hundreds of quiet paths sends no
probes at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from ntm_io.netwatch import AddressSet
from ntm_proto.endpoint import TunnelEndpoint
from ntm_proto.errors import LocalProtocolError
from ntm_proto.liveness import (
    GatewayPlan,
    LivenessTimers,
    PathMonitor,
    SwitchTimeEstimate,
    Verdict,
    other_endpoints,
)
from ntm_proto.messages import Endpoint, PathRole, RouteDirection
from ntm_proto.path import PathState, ProbeResult, TunnelPath

from .dc_client import DirectionError
from .engine import PathError, ProbeListener, SendListener

log = logging.getLogger("ntm.failover")

HANDSHAKE_RETRY = 0.25  # s: first INIT retry of a failover path (the default 1 s is too slow)
SWITCH_TIMEOUT = 3.0  # s: for one new path to be established before the next candidate
RETRY_MIN, RETRY_MAX = 0.5, 10.0  # s: when every candidate failed, try again after this
MAX_WAIT = 1.0  # s: the loop looks at the engine at least this often
UPLINK_TRIAL_MIN = 0.05  # s: the least time another address of the gateway gets to answer
UPLINK_TRIAL_RTTS = 3  # round trips it gets on a slower path
EVENTS_KEPT = 50
TRAFFIC_POLL = 0.01  # s: how often a new gateway path is looked at for its first traffic
PAUSE_MAX = 35.0  # s: the longest the node's own move may hold failover back

RequestDirection = Callable[[str, str], Awaitable[RouteDirection]]


class Engine(Protocol):
    """What failover uses of `ntm_node.engine.TunnelEngine` (tests drive a fake)."""

    endpoint: TunnelEndpoint
    probe_listeners: list[ProbeListener]
    send_listeners: list[SendListener]  # used only with probe_idle=False

    def route_direction(self, path_id: bytes) -> RouteDirection | None: ...
    def path_to(self, peer_vip: str) -> TunnelPath | None: ...
    def add_path(self, rd: RouteDirection, handshake_retry: float | None = None) -> TunnelPath: ...
    async def wait_established(self, path_id: bytes, timeout: float) -> None: ...
    def remove_path(self, path_id: bytes) -> None: ...
    def flush(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class FailoverEvent:
    """One move of a service's traffic (what `ntm status` lists)."""

    at: float  # wall clock, seconds since the epoch
    service: str
    kind: str  # "uplink", "gateway", "failback"
    reason: str
    from_gateway: str
    to_gateway: str
    from_address: str
    to_address: str
    detection_s: float | None  # last heard -> declared dead (None for a fail-back)
    switch_s: float  # declared dead (or fail-back started) -> traffic on the new path
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("detection_s", "switch_s"):
            if d[k] is not None:
                d[k] = round(d[k], 4)
        return d


@dataclasses.dataclass
class _Watch:
    """One service (peer FQDN) reached through a multi-gateway path."""

    service: str
    plan: GatewayPlan
    path_id: bytes = b""
    monitor: PathMonitor | None = None
    uplink_from: Endpoint | None = None  # trying other addresses since the path was here
    uplink_until: float = 0.0
    uplink_next_probe: float = 0.0
    uplink_every: float = 0.0
    dead_since: float = 0.0
    detection_s: float = 0.0
    task: asyncio.Task[None] | None = None
    task_kind: str = ""  # "switch" or "failback"
    retry_at: float = 0.0
    retry_delay: float = RETRY_MIN

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def switching(self) -> bool:
        """Moving away from a dead path: that path is not watched meanwhile. A fail-back is
        not this: the path it would replace carries the traffic, so it stays watched."""
        return self.busy and self.task_kind != "failback"


class FailoverManager:
    def __init__(
        self,
        engine: Engine,
        request_direction: RequestDirection,
        timers: LivenessTimers,
        clock: Callable[[], float] = time.monotonic,
        probe_idle: bool = True,
    ) -> None:
        self.engine = engine
        self.probe_idle = probe_idle  # False: probe only paths in use
        self.request_direction = request_direction
        self.base = timers
        self.switch_time = SwitchTimeEstimate(timers.switch_time)
        self.timers = timers
        self.clock = clock
        self.events: deque[FailoverEvent] = deque(maxlen=EVENTS_KEPT)
        self.counters: dict[str, int] = {}
        self._watches: dict[str, _Watch] = {}
        self._by_path: dict[bytes, _Watch] = {}  # watched path id -> its watch
        # run()'s sleep: a future the alarm (or wake()) completes; _wake_by moves the alarm
        self._rung = False
        self._sleep: asyncio.Future[None] | None = None
        self._alarm: asyncio.TimerHandle | None = None
        self._due = float("inf")
        self._reported_problem: str | None = None
        self._paused_until = 0.0
        # path id -> (asked for, established, rx packets then): see path_built
        self._builds: dict[bytes, tuple[float, float, int]] = {}
        engine.probe_listeners.append(self._on_probe)
        if not probe_idle:
            engine.send_listeners.append(self._on_data_sent)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    # --- what other parts of the node ask --------------------------------------------------

    def gateway_for(self, service: str) -> str:
        """The gateway the service goes through now ("" when not a multi-gateway one)."""
        w = self._watches.get(service)
        return w.plan.current if w is not None else ""

    def record_switch_time(self, seconds: float) -> None:
        """One path build's direction round trip + handshake: a measurement of C."""
        self.switch_time.add(seconds)
        self.timers = self.base.with_switch_time(self.switch_time.value)
        problem = self.timers.problem
        if problem and problem != self._reported_problem:
            log.error("%s; detection uses the minimum %.3f s", problem, self.timers.detection)
        self._reported_problem = problem

    def path_built(self, path_id: bytes, started: float) -> None:
        """A gateway path asked for at `started` is established now. What the application
        sees of a switch lasts until the first packet comes back through the new path: it
        crossed the new gateway and the LB's route back, which follows only once that
        gateway's claim for our vIP has landed. So C is measured up to the first
        authenticated packet after establishment, if one arrives within one probe interval
        P (a later one may answer our own probe, which needs no LB route); otherwise C is
        the build alone (direction round trip + handshake). The gateway's own Keepalive
        that confirms the new key (ntm_proto.path) comes first and needs no LB route: it
        is not counted."""
        path = self.engine.endpoint.path(path_id)
        rx = path.counters["rx_packets"] if path is not None else 0
        self._builds[path_id] = (started, self.clock(), rx)
        self.wake()

    def _measure_builds(self, now: float) -> float | None:
        """Turn built paths into C samples (path_built); the next look while any wait."""
        window = self.timers.probe_interval
        for pid, (started, built, rx) in list(self._builds.items()):
            path = self.engine.endpoint.path(pid)
            if path is not None and path.counters["rx_packets"] > rx + 1:
                heard = path.last_received
                self.record_switch_time((heard if heard <= built + window else built) - started)
            elif path is None or now >= built + window:
                self.record_switch_time(built - started)
            else:
                continue
            del self._builds[pid]
        return now + TRAFFIC_POLL if self._builds else None

    def wake(self) -> None:
        """Look at the engine now (a path was built, a task ended)."""
        self._rung = True
        if self._sleep is not None and not self._sleep.done():
            self._sleep.set_result(None)

    def _wake_by(self, when: float) -> None:
        """Look at the engine no later than `when` (moves run()'s alarm; no extra step)."""
        if self._sleep is None or when >= self._due:
            return  # stepping now (timers are read afterwards), or waking in time anyway
        if self._alarm is not None:
            self._alarm.cancel()
        self._due = when
        delay = max(when - self.clock(), 0.0)
        self._alarm = asyncio.get_running_loop().call_later(delay, self.wake)

    def pause(self, now: float) -> None:
        """The node itself is moving: its paths go quiet for a reason of its own, so hold
        verdicts until `resume` (at most PAUSE_MAX)."""
        self._paused_until = now + PAUSE_MAX

    def resume(self, now: float) -> None:
        """The move is done: watch every path afresh from now."""
        self._paused_until = 0.0
        for w in self._watches.values():
            if w.monitor is not None and w.uplink_from is None:
                w.monitor.reset(now)
        self.wake()

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._rung = False
                delay = MAX_WAIT
                try:
                    delay = self.step(self.clock())
                except Exception:  # never let a bug here stop the node
                    log.exception("failover step failed")
                if self._rung:
                    continue  # woken while stepping
                # A bare future and timer: a swarm runs hundreds of these loops.
                delay = max(delay, 0.001)
                self._due = self.clock() + delay
                self._sleep = sleep = loop.create_future()
                self._alarm = loop.call_later(delay, self.wake)
                try:
                    await sleep
                finally:
                    if self._alarm is not None:
                        self._alarm.cancel()
                    self._sleep = self._alarm = None
                    self._due = float("inf")
        finally:
            for w in self._watches.values():
                if w.task is not None:
                    w.task.cancel()

    def step(self, now: float) -> float:
        """Look at every watched path once; returns the seconds until the next look."""
        measuring = self._measure_builds(now) if self._builds else None
        self._sync(now)
        if self._paused_until:
            if now < self._paused_until:
                return min(MAX_WAIT, self._paused_until - now, (measuring or now + MAX_WAIT) - now)
            self.resume(now)
        sent = False
        wakeups = [now + MAX_WAIT] if measuring is None else [now + MAX_WAIT, measuring]
        for w in self._watches.values():
            timers = self.timers_for(w)
            sent |= self._step_one(w, now, timers)
            self._maybe_failback(w, now)
            for t in self._timers_of(w, timers):
                wakeups.append(t)
        if sent:
            self.engine.flush()
        return min(wakeups) - now

    def _timers_of(self, w: _Watch, timers: LivenessTimers) -> list[float]:
        out: list[float] = []
        if w.switching:
            return out
        if w.uplink_from is not None:
            out += [w.uplink_until, w.uplink_next_probe]
        elif w.monitor is not None and (t := w.monitor.get_timer(timers)) is not None:
            out.append(t)
        elif w.monitor is not None and w.monitor.declared_dead_at is not None:
            out.append(w.retry_at)  # dead: the next attempt (no timer while not in use)
        if not w.busy and (t := w.plan.next_check()) is not None:  # no fail-back under way
            out.append(t)
        return out

    def _sync(self, now: float) -> None:
        """Follow the engine: which path carries each multi-gateway service now."""
        current: dict[str, tuple[TunnelPath, RouteDirection]] = {}
        for path in self.engine.endpoint.paths:
            rd = self.engine.route_direction(path.path_id)
            if rd is None or rd.role is not PathRole.INITIATOR or not rd.gateway:
                continue
            if path.state is not PathState.ESTABLISHED:
                continue
            route = self.engine.path_to(rd.peer_vip)
            if route is not None and route.path_id == path.path_id:
                current[rd.peer_fqdn] = (path, rd)
        for service, (path, rd) in current.items():
            w = self._watches.get(service)
            if w is None:
                w = self._watches[service] = _Watch(
                    service, GatewayPlan(self.base.failback_hold_down)
                )
            if w.path_id != path.path_id:
                if w.path_id:
                    log.info("%s: watching path %s via %s", service, path.path_id.hex(), rd.gateway)
                w.path_id = path.path_id
                w.monitor = PathMonitor(now, watch_idle=self.probe_idle)
                w.uplink_from = None
                w.retry_delay = RETRY_MIN
                w.retry_at = 0.0
                w.plan.observe(rd.gateway, rd.alternatives)
        for service, w in self._watches.items():
            if service not in current and w.monitor is not None and not w.busy:
                w.monitor = None  # the path is gone; the plan (hold-downs) stays
                w.path_id = b""
        if not self.probe_idle:
            self._by_path = {w.path_id: w for w in self._watches.values() if w.monitor}

    def _step_one(self, w: _Watch, now: float, timers: LivenessTimers) -> bool:
        """One watched service; True when a probe was queued."""
        if w.switching or w.monitor is None:
            return False
        path = self.engine.endpoint.path(w.path_id)
        if path is None:
            return False
        mon = w.monitor
        if w.uplink_from is not None:
            return self._step_uplink(w, path, now, timers)
        verdict = mon.poll(now, path.last_received, timers)
        if verdict is Verdict.PROBE:
            mon.probe_sent(path.send_probe(now), now)
            return True
        if verdict is Verdict.DEAD:
            w.dead_since = now
            w.detection_s = now - (mon.quiet_since() or mon.heard)
            self._count("dead")
            log.warning(
                "%s: gateway %s at %s silent for %.3f s after %d probes: dead",
                w.service,
                w.plan.current,
                _ep(path.peer_address),
                w.detection_s,
                timers.dead_after_losses,
            )
            return self._on_dead(w, path, now, timers)
        if mon.declared_dead_at is not None and now >= w.retry_at:
            # Dead and every candidate failed last time: try again (or it came back).
            if path.last_received > mon.declared_dead_at:
                log.info("%s: gateway %s answers again", w.service, w.plan.current)
                mon.reset(now)
                return False
            self._start_gateway_switch(w, "still dead", now)
        return False

    def _on_dead(self, w: _Watch, path: TunnelPath, now: float, timers: LivenessTimers) -> bool:
        if timers.reserve:
            w.uplink_from = path.peer_address
            w.uplink_until = now + timers.reserve
            w.uplink_every = timers.reserve / 2  # two chances: one lost probe is no verdict
            w.uplink_next_probe = now
            return self._step_uplink(w, path, now, timers)
        self._start_gateway_switch(w, "dead", now)
        return False

    def timers_for(self, w: _Watch) -> LivenessTimers:
        """The timers of one watched path: toward a gateway with other addresses, R (the
        time they get to answer: a few round trips) comes out of F, so F + R + C = A."""
        path = self.engine.endpoint.path(w.path_id) if w.path_id else None
        if path is None or not other_endpoints(
            path.config.peer_endpoints, w.uplink_from or path.peer_address
        ):
            return self.timers
        srtt = w.monitor.srtt if w.monitor is not None and w.monitor.srtt else 0.0
        return self.timers.with_reserve(max(UPLINK_TRIAL_MIN, UPLINK_TRIAL_RTTS * srtt))

    def _step_uplink(self, w: _Watch, path: TunnelPath, now: float, timers: LivenessTimers) -> bool:
        assert w.monitor is not None
        if path.peer_address != w.uplink_from and path.last_received > w.dead_since:
            # An authenticated answer from another address moved the path.
            self._record(w, "uplink", "dead", w.plan.current, _ep(w.uplink_from), path, now)
            self._count("uplink_switches")
            log.info(
                "%s: moved to %s of gateway %s", w.service, _ep(path.peer_address), w.plan.current
            )
            w.uplink_from = None
            w.monitor.reset(now)
            return False
        if path.last_received > w.dead_since:
            log.info("%s: gateway %s answers again", w.service, w.plan.current)
            w.uplink_from = None
            w.monitor.reset(now)
            return False
        if now >= w.uplink_until:
            w.uplink_from = None
            log.warning("%s: no other address of gateway %s answered", w.service, w.plan.current)
            self._start_gateway_switch(w, "dead on every address", now)
            return False
        if now < w.uplink_next_probe:
            return False
        sent = False
        for ep in other_endpoints(path.config.peer_endpoints, w.uplink_from):
            sent |= path.try_peer_address(ep, now) is not None
        w.uplink_next_probe = now + w.uplink_every
        return sent

    # --- switching gateways --------------------------------------------------------------

    def _start_gateway_switch(self, w: _Watch, reason: str, now: float) -> None:
        w.plan.failed(w.plan.current, now)
        self._start(w, self._switch(w, reason, now), "switch")

    def _start(self, w: _Watch, coro: Coroutine[Any, Any, None], kind: str) -> None:
        if w.task is not None and not w.task.done():
            w.task.cancel()  # a fail-back still under way: the dead path comes first
        w.task_kind = kind
        w.task = asyncio.get_running_loop().create_task(coro)
        w.task.add_done_callback(lambda t: self._done(w, t))

    def _done(self, w: _Watch, task: asyncio.Task[None]) -> None:
        self.wake()
        if task.cancelled() or task.exception() is None:
            return
        # A bug, not the network: say so, and back off as after a failed attempt.
        log.error("%s: failover task failed", w.service, exc_info=task.exception())
        self._count("task_errors")
        now = self.clock()
        w.retry_at = now + w.retry_delay
        w.retry_delay = min(w.retry_delay * 2, RETRY_MAX)
        w.plan.failback_refused(now)

    async def _switch(self, w: _Watch, reason: str, started: float) -> None:
        old_gw = w.plan.current
        old_path = self.engine.endpoint.path(w.path_id)
        old_addr = _ep(old_path.peer_address) if old_path else ""
        for gw in [*w.plan.candidates(started), ""]:
            if old_path is not None and old_path.last_received > w.dead_since:
                log.info("%s: gateway %s answers again; staying", w.service, old_gw)
                if w.monitor is not None:
                    w.monitor.reset(self.clock())
                return
            rd = await self._build(w.service, gw, exclude=old_gw)
            if rd is None:
                continue
            path = self.engine.endpoint.path(rd.path_id)
            w.plan.switched(rd.gateway, rd.alternatives)
            self._record(
                w, "gateway", reason, old_gw, old_addr, path, self.clock(), to_gw=rd.gateway
            )
            self._count("gateway_switches")
            log.warning(
                "%s: failed over %s -> %s in %.3f s",
                w.service,
                old_gw,
                rd.gateway,
                self.clock() - started,
            )
            return
        now = self.clock()
        w.retry_at = now + w.retry_delay
        w.retry_delay = min(w.retry_delay * 2, RETRY_MAX)
        self._count("switch_failed")
        self.events.append(
            FailoverEvent(
                time.time(), w.service, "gateway", f"{reason}; no gateway reachable", old_gw, "",
                old_addr, "", w.detection_s, now - started, False,
            )
        )  # fmt: skip
        log.error("%s: no gateway could take over from %s; retrying", w.service, old_gw)

    async def _build(self, service: str, gateway: str, exclude: str = "") -> RouteDirection | None:
        """Ask for a path (through `gateway`), add it, wait until it is established."""
        t0 = self.clock()
        rd: RouteDirection | None = None
        try:
            rd = await self.request_direction(service, gateway)
            if not gateway and rd.gateway == exclude:
                return None  # the DC still sends us to the one we left
            self.engine.add_path(rd, handshake_retry=HANDSHAKE_RETRY)
            await self.engine.wait_established(rd.path_id, SWITCH_TIMEOUT)
            self.path_built(rd.path_id, t0)
        except (DirectionError, PathError, TimeoutError, LocalProtocolError) as exc:
            log.info("%s via %s: %s", service, gateway or "the DC's choice", exc or "timeout")
            if rd is not None and self.engine.endpoint.path(rd.path_id) is not None:
                self.engine.remove_path(rd.path_id)
            return None
        except asyncio.CancelledError:  # a fail-back given up for a switch: leave no path
            if rd is not None and self.engine.endpoint.path(rd.path_id) is not None:
                self.engine.remove_path(rd.path_id)
            raise
        return rd

    async def _failback(self, w: _Watch, gateway: str) -> None:
        t0 = self.clock()
        old_gw = w.plan.current
        old_path = self.engine.endpoint.path(w.path_id)
        old_addr = _ep(old_path.peer_address) if old_path else ""
        rd = await self._build(w.service, gateway)
        if rd is None:
            w.plan.failback_refused(self.clock())
            return
        w.plan.switched(rd.gateway, rd.alternatives)
        path = self.engine.endpoint.path(rd.path_id)
        self.events.append(
            FailoverEvent(
                time.time(), w.service, "failback", "hold-down over and the DC offers it",
                old_gw, rd.gateway, old_addr, _ep(path.peer_address if path else None), None,
                self.clock() - t0, True,
            )
        )  # fmt: skip
        self._count("failbacks")
        log.info("%s: failed back %s -> %s", w.service, old_gw, rd.gateway)

    def _maybe_failback(self, w: _Watch, now: float) -> None:
        if w.busy or w.monitor is None or w.uplink_from is not None:
            return
        if w.monitor.declared_dead_at is not None:
            return
        gateway = w.plan.failback_due(now)
        if gateway is None:
            return
        self._start(w, self._failback(w, gateway), "failback")

    # --- helpers -------------------------------------------------------------------------

    def _on_data_sent(self, paths: list[TunnelPath], now: float) -> None:
        """The engine sealed data on `paths` (probe_idle=False): a quiet watched path is
        watched from this packet on, so the loop must look at it P from now."""
        for path in paths:
            w = self._by_path.get(path.path_id)
            if w is None or w.monitor is None:
                continue
            if w.monitor.data_sent(now, path.last_received):
                t = w.monitor.get_timer(self.timers_for(w))
                if t is not None:
                    self._wake_by(t)

    def _on_probe(self, path_id: bytes, result: ProbeResult) -> None:
        for w in self._watches.values():
            if w.path_id == path_id and w.monitor is not None:
                w.monitor.probe_answered(result.seq, result.rtt, self.clock())

    def _record(
        self,
        w: _Watch,
        kind: str,
        reason: str,
        from_gw: str,
        from_addr: str,
        path: TunnelPath | None,
        now: float,
        to_gw: str | None = None,
    ) -> None:
        self.events.append(
            FailoverEvent(
                at=time.time(),
                service=w.service,
                kind=kind,
                reason=reason,
                from_gateway=from_gw,
                to_gateway=from_gw if to_gw is None else to_gw,
                from_address=from_addr,
                to_address=_ep(path.peer_address if path else None),
                detection_s=w.detection_s,
                switch_s=now - w.dead_since,
                ok=True,
            )
        )

    def brief(self) -> dict[str, Any]:
        """The gateway each watched service goes through and the probes sent on the paths
        in use (a swarm shows this per identity; the full status is too much times N)."""
        return {
            "gateways": {s: w.plan.current for s, w in self._watches.items()},
            "probes_sent": sum(w.monitor.probes_sent for w in self._watches.values() if w.monitor),
        }

    def status(self) -> dict[str, Any]:
        now = self.clock()
        timers = self.timers
        services = {}
        for service, w in self._watches.items():
            path = self.engine.endpoint.path(w.path_id) if w.path_id else None
            services[service] = {
                "path_id": w.path_id.hex() or None,
                "peer_address": _ep(path.peer_address) if path else None,
                "gateway": w.plan.status(now),
                "liveness": w.monitor.status(now, timers) if w.monitor else None,
                "detection_s": round((t := self.timers_for(w)).detection, 4),
                "probe_interval_s": round(t.probe_interval, 4),
                "uplink_reserve_s": round(t.reserve, 4),
                "problem": t.problem,
                "switching": w.switching,
                "failing_back": w.busy and not w.switching,
                "trying_other_addresses": w.uplink_from is not None,
            }
        return {
            "timers": timers.to_dict(),
            "switch_time_samples_s": [round(s, 4) for s in self.switch_time.samples],
            "error": timers.problem,
            "paused": bool(self._paused_until),
            "probe_idle_paths": self.probe_idle,
            "services": services,
            "events": [e.to_dict() for e in self.events],
            "counters": dict(self.counters),
        }


def probe_other_families(endpoint: TunnelEndpoint, addresses: AddressSet, now: float) -> int:
    """After the node's own move to a network of another family (IPv4 to an IPv6-only
    one): probe the peer of each established path whose address is of a family we lost at
    its addresses of a family we have. The peer's authenticated answer moves the path (same
    path, keys and LB claim) within a round trip, long before the DC has re-registered us
    and the paths are rebuilt (a swarm re-registers hundreds of identities, a TLS handshake
    each). Finds something only where the Route Direction listed such addresses. Returns
    the probes queued (the caller flushes)."""
    have = {4: bool(addresses.ipv4), 6: bool(addresses.ipv6)}
    sent = 0
    for path in endpoint.paths:
        peer = path.peer_address
        if path.state is not PathState.ESTABLISHED or peer is None or have[_family(peer)]:
            continue
        for ep in path.config.peer_endpoints:
            if have[_family(ep)] and path.try_peer_address(ep, now) is not None:
                sent += 1
    return sent


def _family(ep: Endpoint) -> int:
    return 6 if ":" in ep[0] else 4


def _ep(addr: Endpoint | None) -> str:
    if addr is None:
        return ""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
