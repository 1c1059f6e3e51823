"""Route claims from the NTMA to the LB agent: "vIP V is behind me (next hop H)".

`ClaimTracker` is sans-IO: it is told which MN vIPs have an established tunnel here now
(`update(vips, now, wall_ms)`) and answers with the claims to send: a new claim when a vIP
appears, a refresh every `refresh` seconds while it stays, a retry after `retry` seconds when
a send failed or was refused, and a withdrawal when it goes. `claim_time` is when this NTMA
took the tunnel over (wall clock, ms), strictly increasing so it is never reused (the
agent's newest-claim-wins rule depends on that).

`ClaimSender` is the asyncio glue: one QUIC control connection (mutual TLS, our `adaptor`
certificate) to the agent, reconnected on failure, one claim per request stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

from lb_integration import claims as wire
from lb_integration.claims import Code, RouteClaim, RouteClaimAck
from ntm_io.control import ControlConnection, ControlError, connect_control

from .config import ClaimsConfig

log = logging.getLogger("ntm.adaptor.claims")

REQUEST_TIMEOUT = 3.0
BATCH = 64  # claims in flight at once (a refresh of many MNs is not one round trip each)


@dataclasses.dataclass
class Held:
    vip: str
    path_id: bytes
    claim_time: int
    since: float  # monotonic, when the tunnel appeared
    sent_at: float | None = None  # last send attempt
    acked_at: float | None = None  # last accepted ack
    last_code: str | None = None
    failed: bool = False  # the last attempt got no answer: retry sooner
    lost: bool = False  # a newer claim by another NTMA won: stay quiet for this tunnel


class ClaimTracker:
    def __init__(self, next_hop: str, lifetime: int, refresh: float, retry: float) -> None:
        self.next_hop = next_hop
        self.lifetime = lifetime
        self.refresh = refresh
        self.retry = retry
        self.held: dict[str, Held] = {}
        self._last_time = 0
        self.counters: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _new_time(self, wall_ms: int) -> int:
        self._last_time = max(wall_ms, self._last_time + 1)
        return self._last_time

    def update(self, tunnels: dict[str, bytes], now: float, wall_ms: int) -> list[RouteClaim]:
        """`tunnels`: MN vIP -> the id of the established path carrying it here now."""
        out: list[RouteClaim] = []
        for vip in sorted(set(self.held) - set(tunnels)):
            gone = self.held.pop(vip)
            if not gone.lost:
                out.append(RouteClaim(vip, self.next_hop, gone.claim_time, 0, withdraw=True))
        for vip, path_id in sorted(tunnels.items()):
            h = self.held.get(vip)
            if h is None or h.path_id != path_id:
                # a new tunnel for this vIP: we took it over now
                h = self.held[vip] = Held(vip, path_id, self._new_time(wall_ms), now)
            if h.lost:
                continue
            if h.sent_at is None or now - h.sent_at >= (self.retry if h.failed else self.refresh):
                h.sent_at = now
                out.append(RouteClaim(vip, self.next_hop, h.claim_time, self.lifetime))
        return out

    def result(self, claim: RouteClaim, ack: RouteClaimAck | None, now: float) -> None:
        """What came back for `claim` (None: no answer)."""
        if claim.withdraw:
            self._count("withdrawn" if ack is not None and ack.accepted else "withdraw_failed")
            return
        h = self.held.get(claim.vip)
        if ack is None:
            self._count("send_errors")
        elif ack.accepted:
            self._count("acked")
        else:
            self._count(f"refused_{ack.code.value}")
        if h is None or h.claim_time != claim.claim_time:
            return  # withdrawn or superseded meanwhile
        h.failed = ack is None  # a refusal is retried at the refresh pace, not sooner
        h.last_code = "no answer" if ack is None else ack.code.value
        if ack is not None and ack.accepted:
            h.acked_at = now
        if ack is not None and ack.code is Code.STALE:
            # Another NTMA claimed it after us: the MN took its tunnel there, and that NTMA
            # holds the return route now. Only a newer tunnel here claims again.
            h.lost = True

    def status(self, now: float) -> list[dict[str, Any]]:
        return [
            {
                "vip": h.vip,
                "next_hop": self.next_hop,
                "claim_time": h.claim_time,
                "path_id": h.path_id.hex(),
                "acked": h.last_code == Code.OK.value,
                "lost_to_newer_claim": h.lost,
                "last_result": h.last_code,
                "acked_s_ago": None if h.acked_at is None else round(now - h.acked_at, 1),
            }
            for h in sorted(self.held.values(), key=lambda h: h.vip)
        ]


class ClaimSender:
    """Sends claims to the LB agent over one control connection (reconnects as needed)."""

    def __init__(self, cfg: ClaimsConfig, ca: str, cert: str, key: str) -> None:
        self.cfg = cfg
        self.ca, self.cert, self.key = ca, cert, key
        self.conn: ControlConnection | None = None
        self.last_error: str | None = None
        self.counters: dict[str, int] = {"sent": 0, "connects": 0}
        self._connecting = asyncio.Lock()  # concurrent sends share one connection

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed.is_set()

    async def _refuse_pushes(self, conn: ControlConnection, payload: bytes) -> bytes:
        return wire.encode(RouteClaimAck("0.0.0.0", Code.BAD_MESSAGE, "the NTMA takes no requests"))

    async def _connection(self) -> ControlConnection:
        async with self._connecting:
            return await self._connect_once()

    async def _connect_once(self) -> ControlConnection:
        if self.conn is None or self.conn.closed.is_set():
            self.conn = await asyncio.wait_for(
                connect_control(
                    self.cfg.agent,
                    self.cfg.port,
                    server_name=self.cfg.server_name,
                    ca=self.ca,
                    cert=self.cert,
                    key=self.key,
                    handler=self._refuse_pushes,
                ),
                REQUEST_TIMEOUT,
            )
            self.counters["connects"] += 1
            log.info("connected to the LB agent %s:%d", self.cfg.agent, self.cfg.port)
        return self.conn

    async def warm(self) -> bool:
        """Connect now if not connected, so that the first claim after a gateway switch
        (this NTMA may have held no tunnel until then) costs one round trip, not a QUIC
        handshake with mutual TLS on top (tens of ms in the LB's return route). True if
        connected; a failure is recorded in `last_error` and retried by the caller."""
        if self.connected:
            return True
        try:
            await self._connection()
        except (TimeoutError, ControlError, OSError) as exc:
            self.last_error = f"LB agent {self.cfg.agent}:{self.cfg.port}: {exc or 'timeout'}"
            log.warning("cannot connect to the LB agent ahead of claims: %s", self.last_error)
            return False
        return True

    async def send_many(self, claims: list[RouteClaim]) -> list[RouteClaimAck | None]:
        """Several claims, BATCH at a time on concurrent streams of the one connection."""
        acks: list[RouteClaimAck | None] = []
        for i in range(0, len(claims), BATCH):
            acks += await asyncio.gather(*(self.send(c) for c in claims[i : i + BATCH]))
        return acks

    async def send(self, claim: RouteClaim) -> RouteClaimAck | None:
        """One claim; the agent's ack, or None when it could not be asked (logged)."""
        try:
            conn = await self._connection()
            self.counters["sent"] += 1
            answer = wire.decode(await conn.request(wire.encode(claim), REQUEST_TIMEOUT))
        except (TimeoutError, ControlError, OSError, wire.ClaimDecodeError) as exc:
            self.last_error = f"LB agent {self.cfg.agent}:{self.cfg.port}: {exc or 'timeout'}"
            log.warning("route claim for vIP %s not sent: %s", claim.vip, self.last_error)
            await self.close()
            return None
        if not isinstance(answer, RouteClaimAck):
            self.last_error = "the LB agent answered with something other than an ack"
            return None
        self.last_error = None
        if answer.accepted:
            log.info(
                "vIP %s: %s by the LB agent (next hop %s)",
                claim.vip,
                "withdrawn" if claim.withdraw else f"claim accepted for {answer.lifetime} s",
                claim.next_hop,
            )
        else:
            log.warning(
                "vIP %s: the LB agent refused our claim: %s %s",
                claim.vip,
                answer.code.value,
                answer.reason,
            )
        return answer

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)
