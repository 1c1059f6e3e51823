"""Path renewal (asyncio glue): renew the paths this node asked for before they expire.

Every decision (when, in use or not, retry back-off and jitter) is in
`ntm_proto.renewal.RenewalSchedule`; this module follows the engine (which paths we
requested and which of them carry their peer's traffic now), feeds the schedule their
packet counts, and for each path it says is due asks the DC for a new direction to the same
peer (through the same gateway, or the DC's choice when that gateway cannot take it), adds
the new path and waits until it is established. The engine then routes the peer's vIP
through the new path and drops the old one; the peer's engine does the same when the new
path reaches it, and the relay (for a relayed path) forgets the old binding at its
lifetime end. A renewal that fails leaves the old path alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ntm_proto.endpoint import TunnelEndpoint
from ntm_proto.messages import ErrorCode, PathRole, RouteDirection, RouteKind
from ntm_proto.path import PathState, TunnelPath
from ntm_proto.renewal import RenewalSchedule, RenewalSettings

from .dc_client import DirectionError

log = logging.getLogger("ntm.renewal")

ESTABLISH_TIMEOUT = 10.0  # s: the new path's handshake (the path's own handshake_timeout)
MAX_WAIT = 15.0  # s: the loop looks at the engine at least this often

RequestDirection = Callable[[str, str], Awaitable[RouteDirection]]


class Engine(Protocol):
    """What renewal uses of `ntm_node.engine.TunnelEngine` (tests drive a fake)."""

    endpoint: TunnelEndpoint

    def route_direction(self, path_id: bytes) -> RouteDirection | None: ...
    def path_to(self, peer_vip: str) -> TunnelPath | None: ...
    def add_path(self, rd: RouteDirection, handshake_retry: float | None = None) -> TunnelPath: ...
    async def wait_established(self, path_id: bytes, timeout: float) -> None: ...
    def remove_path(self, path_id: bytes) -> None: ...


def requested_here(rd: RouteDirection) -> bool:
    """Whether this end sent the Direction Request: the DC makes the requester the
    initiator of direct and relayed paths and the responder of reverse ones."""
    return (rd.role is PathRole.INITIATOR) != (rd.kind is RouteKind.REVERSE)


class PathRenewer:
    def __init__(
        self,
        engine: Engine,
        request_direction: RequestDirection,
        settings: RenewalSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        establish_timeout: float = ESTABLISH_TIMEOUT,
    ) -> None:
        self.engine = engine
        self.request_direction = request_direction
        self.schedule = RenewalSchedule(settings, rng)
        self.clock = clock
        self.establish_timeout = establish_timeout
        self._tasks: dict[bytes, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    async def run(self) -> None:
        try:
            while True:
                delay = MAX_WAIT
                try:
                    delay = self.step(self.clock())
                except Exception:  # never let a bug here stop the node
                    log.exception("renewal step failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(delay, 0.01))
                self._wake.clear()
        finally:
            for task in self._tasks.values():
                task.cancel()

    def step(self, now: float) -> float:
        """Follow the engine, start the renewals that are due; seconds until the next look."""
        self._sync(now)
        for path_id in self.schedule.due(now):
            rd = self.engine.route_direction(path_id)
            if rd is None:  # gone since _sync: nothing to renew
                self.schedule.untrack(path_id)
                continue
            task = asyncio.get_running_loop().create_task(self._renew(path_id, rd))
            self._tasks[path_id] = task
            task.add_done_callback(functools.partial(self._done, path_id))
        wake = self.schedule.next_wakeup(now)
        return MAX_WAIT if wake is None else min(max(wake - now, 0.0), MAX_WAIT)

    def _done(self, path_id: bytes, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(path_id, None)
        self._wake.set()

    def _sync(self, now: float) -> None:
        """Track each path we requested that carries its peer's traffic now; observe it."""
        current: set[bytes] = set()
        for path in self.engine.endpoint.paths:
            rd = self.engine.route_direction(path.path_id)
            if rd is None or not requested_here(rd) or path.state is not PathState.ESTABLISHED:
                continue
            route = self.engine.path_to(rd.peer_vip)
            if route is None or route.path_id != path.path_id:
                continue
            current.add(path.path_id)
            if path.path_id not in self.schedule:
                self.schedule.track(
                    path.path_id,
                    rd.peer_fqdn,
                    path.created,
                    float(rd.lifetime),
                    path.config.keepalive_interval,
                    path.config.rekey_after_seconds,
                )
            counters = path.counters
            self.schedule.observe(
                path.path_id, counters["rx_packets"] + counters["tx_packets"], now
            )
        for path_id in self.schedule:
            if path_id not in current and path_id not in self._tasks:
                self.schedule.untrack(path_id)

    async def _renew(self, path_id: bytes, rd: RouteDirection) -> None:
        started = self.clock()
        try:
            try:
                new = await self._build(rd.peer_fqdn, rd.gateway)
            except DirectionError as exc:
                if not rd.gateway or exc.code is not ErrorCode.PEER_UNREACHABLE:
                    raise
                # That gateway takes no new paths (draining, gone): let the DC choose.
                log.info("renewing %s: gateway %s: %s", rd.peer_fqdn, rd.gateway, exc)
                new = await self._build(rd.peer_fqdn, "")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed renewal leaves the old path alone
            delay = self.schedule.failed(path_id, self.clock())
            log.warning(
                "renewing path %s to %s failed: %s; next try in %.1f s",
                path_id.hex(),
                rd.peer_fqdn,
                str(exc) or type(exc).__name__,
                delay,
            )
            return
        self.schedule.succeeded(path_id)
        log.info(
            "path %s to %s renewed by path %s (%s, %.3f s)",
            path_id.hex(),
            rd.peer_fqdn,
            new.path_id.hex(),
            new.kind.name.lower(),
            self.clock() - started,
        )

    async def _build(self, fqdn: str, gateway: str) -> RouteDirection:
        new = await self.request_direction(fqdn, gateway)
        self.engine.add_path(new)
        try:
            await self.engine.wait_established(new.path_id, self.establish_timeout)
        except BaseException:
            self.engine.remove_path(new.path_id)  # half-built: never leave it behind
            raise
        return new

    def status(self) -> dict[str, Any]:
        return {
            "paths": self.schedule.status(self.clock()),
            "counters": dict(self.schedule.counters),
        }
