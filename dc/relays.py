"""The DC's view of its Relay Servers: connections, health, load, and installing paths.

Each configured RS gets one control connection (QUIC, mutual TLS, the RS must present a
`relay` certificate). A probe (`RelayDirection` with the reserved all-zero path id) every
`poll_interval` keeps its load fresh and proves it alive; `misses` unanswered probes in a row
or a closed connection mark it down, and the DC moves its paths elsewhere (`on_down`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Callable

from ntm_io.control import ControlConnection, ControlError, connect_control
from ntm_proto.errors import DecodeError
from ntm_proto.messages import (
    Endpoint,
    ErrorCode,
    ErrorMessage,
    RelayDirection,
    RelayDirectionAck,
    decode,
    encode,
)

from .config import RelaySpec, TlsConfig

log = logging.getLogger("ntm.dc.relays")

PROBE_PATH_ID = bytes(8)


@dataclasses.dataclass
class RelayState:
    spec: RelaySpec
    conn: ControlConnection | None = None
    healthy: bool = False
    load: int = 0  # permille, from the latest ack
    active_paths: int = 0
    misses: int = 0


class RelayPool:
    def __init__(
        self,
        specs: tuple[RelaySpec, ...],
        tls: TlsConfig,
        poll_interval: float = 1.0,
        misses: int = 2,
        on_down: Callable[[str], None] | None = None,
    ) -> None:
        self.relays = {s.name: RelayState(s) for s in specs}
        self.tls = tls
        self.poll_interval = poll_interval
        self.max_misses = misses
        self.on_down = on_down
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._keep(r)) for r in self.relays.values()]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for r in self.relays.values():
            if r.conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(r.conn.close(), 1.0)

    def any_healthy(self) -> bool:
        return any(r.healthy for r in self.relays.values())

    def candidates(self, exclude: frozenset[str] = frozenset()) -> list[RelayState]:
        """Healthy relays, least loaded first (ties: fewest paths, then name)."""
        ok = [r for r in self.relays.values() if r.healthy and r.spec.name not in exclude]
        return sorted(ok, key=lambda r: (r.load, r.active_paths, r.spec.name))

    async def install(
        self, relay: RelayState, path_id: bytes, binding_key: bytes, lifetime: int
    ) -> bool:
        """Tell the RS to forward this path; False if it refused or did not answer."""
        answer = await self._ask(relay, RelayDirection(path_id, binding_key, lifetime))
        if isinstance(answer, RelayDirectionAck) and answer.path_id == path_id:
            return True
        reason = answer.reason if isinstance(answer, ErrorMessage) else "no answer"
        log.warning("relay %s refused path %s: %s", relay.spec.name, path_id.hex(), reason)
        return False

    async def _ask(self, relay: RelayState, msg: RelayDirection) -> object:
        conn = relay.conn
        if conn is None or conn.closed.is_set():
            return None
        try:
            answer = decode(await conn.request(encode(msg), self.poll_interval * 2))
        except (ControlError, DecodeError, TimeoutError):
            return None
        if isinstance(answer, RelayDirectionAck):
            relay.load, relay.active_paths = answer.load, answer.active_paths
        elif isinstance(answer, ErrorMessage) and answer.code is ErrorCode.POOL_EXHAUSTED:
            relay.load = max(relay.load, 1000)
        return answer

    async def _keep(self, relay: RelayState) -> None:
        """Connect, probe, reconnect: forever, with a bounded back-off."""
        delay = 0.2
        while True:
            try:
                relay.conn = await self._connect(relay.spec)
                delay = 0.2
                await self._probe_until_down(relay)
            except (ControlError, OSError, TimeoutError) as exc:
                log.debug("relay %s: %s", relay.spec.name, exc)
            self._mark_down(relay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _connect(self, spec: RelaySpec) -> ControlConnection:
        conn = await asyncio.wait_for(
            connect_control(
                spec.host,
                spec.control_port,
                server_name=spec.server_name,
                ca=self.tls.ca,
                cert=self.tls.cert,
                key=self.tls.key,
                handler=_refuse,
            ),
            5.0,
        )
        if conn.peer_role != "relay":
            await conn.close()
            raise ControlError(f"{spec.name} presented a {conn.peer_role} certificate")
        return conn

    async def _probe_until_down(self, relay: RelayState) -> None:
        probe = RelayDirection(PROBE_PATH_ID, bytes(32), 0)
        while True:
            answer = await self._ask(relay, probe)
            if isinstance(answer, RelayDirectionAck):
                relay.misses = 0
                if not relay.healthy:
                    relay.healthy = True
                    log.info("relay %s up (load %d‰)", relay.spec.name, relay.load)
            else:
                relay.misses += 1
                if (
                    relay.misses >= self.max_misses
                    or relay.conn is None
                    or relay.conn.closed.is_set()
                ):
                    return
            await asyncio.sleep(self.poll_interval)

    def _mark_down(self, relay: RelayState) -> None:
        was = relay.healthy
        relay.healthy = False
        relay.misses = 0
        if relay.conn is not None:
            relay.conn.abort()
            relay.conn = None
        if was:
            log.warning("relay %s down", relay.spec.name)
            if self.on_down:
                self.on_down(relay.spec.name)

    def status(self) -> list[dict[str, object]]:
        return [
            {
                "name": r.spec.name,
                "healthy": r.healthy,
                "load_permille": r.load,
                "active_paths": r.active_paths,
                "endpoints": [list(ep) for ep in r.spec.endpoints],
            }
            for r in self.relays.values()
        ]


@dataclasses.dataclass(frozen=True)
class RelayedPath:
    """A relayed path this DC installed: what it needs to move the path off a dead relay."""

    path_id: bytes
    relay: str
    requester: str
    responder: str  # the target FQDN (a multi-gateway service: the service)
    gateway: str
    expires_at: float  # the relay forgets the path then; so do we
    # A requester of another DC's zone (the path came in as a Node Information Request):
    # its zone, and the connection that DC asked on (to ask it back first).
    requester_zone: str = ""
    origin: object = None
    seq: int = 0  # installation order


class RelayedPaths:
    """The relayed paths this DC installed, until their lifetime ends (sans-IO).

    When a relay dies only the newest path of each (requester, responder) pair is moved:
    an older one was replaced (renewed, or moved after a failover) and its ends dropped it.
    """

    def __init__(self) -> None:
        self._paths: dict[bytes, RelayedPath] = {}
        self._seq = itertools.count(1)

    def __len__(self) -> int:
        return len(self._paths)

    def add(self, path: RelayedPath) -> None:
        self._paths[path.path_id] = dataclasses.replace(path, seq=next(self._seq))

    def get(self, path_id: bytes) -> RelayedPath | None:
        return self._paths.get(path_id)

    def expire(self, now: float) -> int:
        gone = [pid for pid, p in self._paths.items() if p.expires_at <= now]
        for pid in gone:
            del self._paths[pid]
        return len(gone)

    def take_on(self, relay: str, now: float) -> list[RelayedPath]:
        """Forget every path through `relay`; the ones to move elsewhere, oldest first."""
        self.expire(now)
        newest: dict[tuple[str, str], RelayedPath] = {}
        for p in self._paths.values():
            key = (p.requester, p.responder)
            if key not in newest or p.seq > newest[key].seq:
                newest[key] = p
        on_relay = [p for p in self._paths.values() if p.relay == relay]
        for p in on_relay:
            del self._paths[p.path_id]
        return [p for p in on_relay if newest[(p.requester, p.responder)] is p]


def endpoints_of(relay: RelayState) -> tuple[Endpoint, ...]:
    return relay.spec.endpoints


async def _refuse(_conn: ControlConnection, _payload: bytes) -> bytes:
    return encode(
        ErrorMessage(ErrorCode.UNEXPECTED, "a relay control connection takes no requests")
    )
