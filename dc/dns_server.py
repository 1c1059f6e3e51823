"""asyncio UDP+TCP server for a DC's NTM zone (the answers come from :class:`NtmZone`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

from dc.dns_zone import NtmZone

__all__ = ["ZoneServer", "serve_zone"]

log = logging.getLogger("ntm.dc.dns")


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, zone: NtmZone) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport does not subclass asyncio.DatagramTransport; it behaves as one.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # The zone is sans-IO and synchronous: answer inline, no task per datagram.
        reply = self.zone.handle(data, udp=True)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("zone UDP socket error: %r", exc)


class ZoneServer:
    """A running zone server; ``address`` is the bound (host, port), shared by UDP and TCP."""

    def __init__(self, zone: NtmZone, tcp_idle_timeout: float) -> None:
        self.zone = zone
        self.counters = zone.counters
        self.tcp_idle_timeout = tcp_idle_timeout
        self.address: tuple[str, int] = ("", 0)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    async def _start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        # With port 0 let UDP pick, then put TCP on the same port; retry on a clash.
        for _attempt in range(10):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self.zone), local_addr=(host, port)
            )
            bound = udp.get_extra_info("sockname")
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound[1])
            except OSError:
                udp.close()
                if port != 0:
                    raise
                continue
            self._udp = udp
            self.address = (bound[0], bound[1])
            log.info("DNS for zone %s on %s:%d (udp+tcp)", self.zone.zone, bound[0], bound[1])
            return
        raise OSError(f"could not bind UDP and TCP on the same port at {host}")

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._conns.add(me)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.tcp_idle_timeout):
                        size = int.from_bytes(await reader.readexactly(2), "big")
                        data = await reader.readexactly(size)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    break
                reply = self.zone.handle(data, udp=False)
                if reply is not None:
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
            if me is not None:
                self._conns.discard(me)

    def close(self) -> None:
        """Stop listening and drop open TCP connections."""
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._conns):
            task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()


async def serve_zone(
    zone: NtmZone, host: str, port: int, *, tcp_idle_timeout: float = 10.0
) -> ZoneServer:
    """Serve ``zone`` on UDP and TCP ``host:port`` (port 0: any free port, see ``address``)."""
    server = ZoneServer(zone, tcp_idle_timeout)
    await server._start(host, port)
    return server
