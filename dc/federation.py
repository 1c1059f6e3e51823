"""DC-to-DC federation: find the DC of another NTM zone through DNS and ask it.

DC_MN looks up the NS records of the target's zone (the same delegation ordinary resolvers
follow), connects to that DC over QUIC with mutual TLS (its certificate must name the NS
host and carry the `dc` role), and sends a Node Information Request. Connections are kept
and reused. Every step is bounded by one timeout, shorter than a node's direction timeout,
so a delegation that points nowhere still lets the MN's application fall back in time.

A federated relayed path is relayed by DC_CN, the DC of the target: it makes the route
decision (it alone has both ends in view, `Coordinator.plan_remote`), so it picks the relay
from its own `[[relay]]` list and installs it before pushing to its node, as for a local
path. It therefore sees the relay die, and moves the path. It cannot push to the requester
(DC_MN's node), so it asks DC_MN to rebuild: a DirectionRequest(source = DC_MN's node,
target = DC_CN's node) over the connection the Node Information Request came on (else to
the DC found through the requester zone's delegation). DC_MN takes it only from a DC
certificate that speaks for the target's zone, for a node of its own that it asked a path
to that target for within a path lifetime (`FederatedPaths`); it then runs the ordinary
federated request for its node (a new Node Information Request, for which DC_CN picks a
healthy relay) and pushes the answer to its node. Requests from the other DC arrive on our
client connection too, so `handler` serves them like the server does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable

from ntm_io.control import ControlConnection, ControlError, connect_control
from ntm_io.dnsclient import DnsLookupError, query
from ntm_proto.errors import DecodeError
from ntm_proto.messages import (
    DirectionRequest,
    ErrorCode,
    ErrorMessage,
    Message,
    NodeInformationRequest,
    decode,
    encode,
)

from .config import TlsConfig

log = logging.getLogger("ntm.dc.federation")


class FederationError(Exception):
    pass


Handler = Callable[[ControlConnection, bytes], Awaitable[bytes]]


class Federation:
    def __init__(
        self,
        resolvers: tuple[str, ...],
        timeout: float,
        peer_port: int,
        tls: TlsConfig,
        handler: Handler | None = None,
    ) -> None:
        self.resolvers = list(resolvers)
        self.timeout = timeout
        self.peer_port = peer_port
        self.tls = tls
        self.handler: Handler = handler or _refuse  # requests the other DC sends us
        self._conns: dict[str, ControlConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.counters: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    async def ask(
        self,
        zone: str,
        msg: NodeInformationRequest | DirectionRequest,
        timeout: float | None = None,
    ) -> Message:
        """The other DC's answer (a Route Direction or an ErrorMessage), or our own error;
        within `timeout` (default: the configured one)."""
        bound = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(bound):
                conn = await self._connection(zone)
                answer = decode(await conn.request(encode(msg), bound))
        except (
            FederationError,
            ControlError,
            DnsLookupError,
            DecodeError,
            TimeoutError,
            OSError,
        ) as exc:
            self._count("failed")
            reason = str(exc) or "timed out"
            log.warning("federation with zone %s for %s: %s", zone, msg.target, reason)
            return ErrorMessage(
                ErrorCode.PEER_UNREACHABLE, f"cannot reach the DC of zone {zone}: {reason}"
            )
        self._count("answered")
        return answer

    async def _connection(self, zone: str) -> ControlConnection:
        lock = self._locks.setdefault(zone, asyncio.Lock())
        async with lock:  # concurrent requests for one zone share one connection
            conn = self._conns.get(zone)
            if conn is not None and not conn.closed.is_set():
                return conn
            conn = await self._connect(zone)
            self._conns[zone] = conn
            return conn

    async def _connect(self, zone: str) -> ControlConnection:
        hosts = await query(zone, "NS", self.resolvers, self.timeout)
        if not hosts:
            raise FederationError(f"{zone} has no NS records: it is not delegated to a DC")
        errors: list[str] = []
        for host in hosts:
            addrs: list[str] = []
            for qtype in ("A", "AAAA"):
                try:
                    addrs += await query(host, qtype, self.resolvers, self.timeout)
                except DnsLookupError as exc:
                    errors.append(str(exc))
            for addr in addrs:
                try:
                    conn = await connect_control(
                        addr,
                        self.peer_port,
                        server_name=host,
                        ca=self.tls.ca,
                        cert=self.tls.cert,
                        key=self.tls.key,
                        handler=self.handler,
                    )
                except (ControlError, OSError, TimeoutError) as exc:
                    errors.append(f"{host} at {addr}: {exc or 'timeout'}")
                    continue
                if conn.peer_role != "dc":
                    await conn.close()
                    errors.append(f"{host} at {addr} is a {conn.peer_role}, not a DC")
                    continue
                log.info("federated with %s (zone %s) at %s", host, zone, addr)
                self._count("connections")
                return conn
        raise FederationError("; ".join(errors) or f"no address for the DC of {zone}")

    async def close(self) -> None:
        for conn in self._conns.values():
            await conn.close()
        self._conns.clear()


@dataclasses.dataclass(frozen=True)
class FederatedPath:
    zone: str  # the target's zone, whose DC answered
    at: float  # when that DC last gave our node a path to the target


class FederatedPaths:
    """Which of our nodes got a path to which node of another zone, within a path lifetime
    (sans-IO): the only paths another DC may ask us to rebuild."""

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._paths: dict[tuple[str, str], FederatedPath] = {}

    def __len__(self) -> int:
        return len(self._paths)

    def remember(self, source: str, target: str, zone: str, now: float) -> None:
        self._paths[(source, target)] = FederatedPath(zone, now)

    def expire(self, now: float) -> None:
        cutoff = now - self.lifetime
        self._paths = {k: v for k, v in self._paths.items() if v.at > cutoff}

    def may_rebuild(
        self,
        peer_names: frozenset[str],
        peer_role: str,
        msg: DirectionRequest,
        now: float,
    ) -> str | ErrorMessage:
        """The target's zone when the peer DC may ask us to rebuild this path, else why not."""
        known = self._paths.get((msg.source, msg.target))
        if peer_role != "dc":
            why = f"a {peer_role!r} certificate cannot ask for another node's path"
        elif known is None or known.at <= now - self.lifetime:
            why = (
                f"{msg.source} has no path to {msg.target} from this DC within the path "
                "lifetime; only such a path can be rebuilt on another DC's request"
            )
        elif not any(n == known.zone or n.endswith("." + known.zone) for n in peer_names):
            why = (
                f"a DC certificate naming {', '.join(sorted(peer_names)) or 'nothing'} "
                f"does not speak for zone {known.zone} of {msg.target}"
            )
        else:
            return known.zone
        return ErrorMessage(ErrorCode.NOT_AUTHORIZED, why)


async def _refuse(_conn: ControlConnection, _payload: bytes) -> bytes:
    return encode(ErrorMessage(ErrorCode.UNEXPECTED, "a federation connection takes no requests"))
