"""Return routes for mobile nodes' vIPs: /32 (/128) routes towards the NTMA holding them.

`NetlinkRoutes` writes them with pyroute2 (`replace`, so a moved claim swaps the next hop
in one netlink message, with no moment without a route). Routes carry their own protocol
number (RTPROT_NTM) so the agent can find the ones it made after a restart and keep them:
a restarting agent must not cut the return path of live sessions.

`ClaimService` is the asyncio glue: the control-channel handler that decodes a claim,
asks the ClaimBook (claims.py), applies the route changes, and a timer that expires claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Protocol, TypeVar

from ntm_io.control import ControlConnection

from . import claims
from .claims import ClaimBook, Code, Remove, Replace, RouteChange, RouteClaim, RouteClaimAck

log = logging.getLogger("ntm.lb.routes")

T = TypeVar("T")
RTPROT_NTM = 78  # 'N'; unassigned in /etc/iproute2/rt_protos, marks routes the agent made


class RouteTable(Protocol):
    def replace(self, vip: str, next_hop: str) -> None: ...
    def remove(self, vip: str) -> None: ...
    def ours(self) -> list[tuple[str, str]]: ...  # (vip, next hop) left by earlier runs
    def close(self) -> None: ...


class NetlinkRoutes:
    def __init__(
        self, interface: str | None = None, table: int = 254, netns: str | None = None
    ) -> None:
        from pyroute2 import IPRoute

        self.ipr = IPRoute(netns=netns) if netns else IPRoute()
        self.table = table
        self.oif: int | None = None
        if interface is not None:
            found = self.ipr.link_lookup(ifname=interface)
            if not found:
                raise OSError(f"interface {interface} does not exist")
            self.oif = found[0]

    def _args(self, vip: str) -> dict[str, Any]:
        v6 = ":" in vip
        args: dict[str, Any] = {
            "dst": vip,
            "dst_len": 128 if v6 else 32,
            "family": socket.AF_INET6 if v6 else socket.AF_INET,
            "table": self.table,
            "proto": RTPROT_NTM,
        }
        if self.oif is not None:
            args["oif"] = self.oif
        return args

    def replace(self, vip: str, next_hop: str) -> None:
        self.ipr.route("replace", gateway=next_hop, **self._args(vip))

    def remove(self, vip: str) -> None:
        args = self._args(vip)
        args.pop("oif", None)
        try:
            self.ipr.route("del", **args)
        except Exception as exc:  # already gone is fine: the goal is "no route"
            if "No such process" not in str(exc) and "(3," not in str(exc):
                raise

    def ours(self) -> list[tuple[str, str]]:
        found = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in self.ipr.get_routes(family=family, table=self.table, proto=RTPROT_NTM):
                dst, gw = r.get_attr("RTA_DST"), r.get_attr("RTA_GATEWAY")
                if dst and gw:
                    found.append((str(dst), str(gw)))
        return found

    def close(self) -> None:
        self.ipr.close()


async def inline(fn: Callable[[], T]) -> T:
    """Run a kernel call right here (tests, fakes)."""
    return fn()


class KernelThread:
    """One thread, without an event loop, for every blocking kernel call (netlink, nft).

    pyroute2's sync API binds a socket to the thread that made it, and to the event loop
    running there if there is one (then every call fails with "loop already running").
    So sockets are made and used only here, and the asyncio loop never blocks on them.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lb-kernel")

    async def __call__(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


KernelCall = Callable[[Callable[[], T]], Awaitable[T]]


class ClaimService:
    """Handles route claims from NTMAs and keeps the routes in step with the ClaimBook."""

    def __init__(
        self, book: ClaimBook, routes: RouteTable, kernel: KernelCall[Any] = inline
    ) -> None:
        self.book = book
        self.routes = routes
        self.kernel = kernel
        self.errors = 0
        self._timer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def adopt_existing(self) -> None:
        now = time.monotonic()
        for vip, hop in await self.kernel(self.routes.ours):
            self.book.adopt(vip, hop, now)
            log.info("kept return route %s via %s from a previous run (until claimed)", vip, hop)

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().create_task(self._expiry_loop())

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer

    async def handle(self, conn: ControlConnection, payload: bytes) -> bytes:
        """The ntm_io.control handler: one claim in, one ack out."""
        return claims.encode(
            await self.handle_claim(payload, conn.peer_names, conn.peer_role, repr(conn))
        )

    async def handle_claim(
        self, payload: bytes, names: frozenset[str], role: str | None, who: str
    ) -> RouteClaimAck:
        try:
            msg = claims.decode(payload)
        except claims.ClaimDecodeError as exc:
            self.book._count("refused_bad_message")
            log.warning("bad claim message from %s: %s", who, exc)
            return RouteClaimAck("0.0.0.0", Code.BAD_MESSAGE, str(exc)[:200])
        if not isinstance(msg, RouteClaim):
            self.book._count("refused_bad_message")
            return RouteClaimAck(msg.vip, Code.BAD_MESSAGE, "send a route_claim")
        decision = self.book.offer(msg, names, role, time.monotonic())
        ack = decision.ack
        if not ack.accepted:
            log.warning(
                "refused route claim for vIP %s via %s from %s: %s",
                msg.vip,
                msg.next_hop,
                who,
                ack.reason,
            )
        else:
            log.info(
                "vIP %s: %s claim from %s (next hop %s, t=%d)",
                msg.vip,
                "withdrawn" if msg.withdraw else "accepted",
                who,
                msg.next_hop,
                msg.claim_time,
            )
        await self._carry_out(decision.changes)
        self._wake.set()
        return ack

    async def _carry_out(self, changes: tuple[RouteChange, ...] | list[RouteChange]) -> None:
        for change in changes:
            try:
                if isinstance(change, Replace):
                    await self.kernel(partial(self.routes.replace, change.vip, change.next_hop))
                    log.info("return route %s via %s", change.vip, change.next_hop)
                elif isinstance(change, Remove):
                    await self.kernel(partial(self.routes.remove, change.vip))
                    log.info("return route %s removed", change.vip)
            except Exception as exc:
                self.errors += 1
                log.error("route change %s failed: %s", change, exc)

    async def _expiry_loop(self) -> None:
        while True:
            nxt = self.book.next_expiry()
            delay = 3600.0 if nxt is None else max(nxt - time.monotonic(), 0.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            changes = self.book.expire(time.monotonic())
            for change in changes:
                log.info("claim for vIP %s expired", change.vip)
            await self._carry_out(changes)

    async def remove_all(self) -> None:
        await self._carry_out([Remove(vip) for vip in list(self.book.held)])
        self.book.held.clear()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "held": [
                {
                    "vip": h.vip,
                    "next_hop": h.next_hop,
                    "holder": h.holder or "(previous run)",
                    "claim_time": h.claim_time,
                    "expires_in_s": round(h.expires - now, 1),
                }
                for h in sorted(self.book.held.values(), key=lambda h: h.vip)
            ],
            "counters": dict(self.book.counters),
            "route_errors": self.errors,
        }
