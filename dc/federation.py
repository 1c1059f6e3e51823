"""DC-to-DC federation: find the DC of another NTM zone through DNS and ask it.

DC_MN looks up the NS records of the target's zone (the same delegation ordinary resolvers
follow), connects to that DC over QUIC with mutual TLS (its certificate must name the NS
host and carry the `dc` role), and sends a Node Information Request. Connections are kept
and reused. Every step is bounded by one timeout, shorter than a node's direction timeout,
so a delegation that points nowhere still lets the MN's application fall back in time.
"""

from __future__ import annotations

import asyncio
import logging

from ntm_io.control import ControlConnection, ControlError, connect_control
from ntm_io.dnsclient import DnsLookupError, query
from ntm_proto.messages import (
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


class Federation:
    def __init__(
        self, resolvers: tuple[str, ...], timeout: float, peer_port: int, tls: TlsConfig
    ) -> None:
        self.resolvers = list(resolvers)
        self.timeout = timeout
        self.peer_port = peer_port
        self.tls = tls
        self._conns: dict[str, ControlConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.counters: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    async def ask(self, zone: str, msg: NodeInformationRequest) -> Message:
        """The other DC's answer (a Route Direction or an ErrorMessage), or our own error."""
        try:
            async with asyncio.timeout(self.timeout):
                conn = await self._connection(zone)
                answer = decode(await conn.request(encode(msg), self.timeout))
        except (FederationError, ControlError, DnsLookupError, TimeoutError, OSError) as exc:
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
                        handler=_refuse,
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


async def _refuse(_conn: ControlConnection, _payload: bytes) -> bytes:
    return encode(ErrorMessage(ErrorCode.UNEXPECTED, "a federation connection takes no requests"))
