"""A byte pipe between a TCP port and a unix socket, to join Locust master and workers that
live in different network namespaces of the lab without using the lab's networks.

The namespaces share the filesystem, so a unix socket crosses them: in the master's namespace
`--listen unix:PATH --connect tcp:127.0.0.1:5557`, in each worker's namespace
`--listen tcp:127.0.0.1:5557 --connect unix:PATH`, and the worker connects to 127.0.0.1 as if
the master were local. Handovers of the MN hosts then never cut the harness's own control
traffic, and that traffic never shows up in what is being measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass

from ntm_io.config import ConfigError

CHUNK = 65536


@dataclass(frozen=True)
class Endpoint:
    kind: str  # "tcp" | "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    kind, _sep, rest = text.partition(":")
    if kind == "unix" and rest:
        return Endpoint("unix", path=rest)
    if kind == "tcp" and rest:
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return Endpoint("tcp", host=host.strip("[]"), port=int(port))
    raise ConfigError(f"endpoint {text!r}: write tcp:HOST:PORT or unix:PATH")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def _open(ep: Endpoint) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if ep.kind == "unix":
        return await asyncio.open_unix_connection(ep.path)
    return await asyncio.open_connection(ep.host, ep.port)


async def serve(listen: Endpoint, connect: Endpoint, ready: asyncio.Event | None = None) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await _open(connect)
        except OSError:
            w.close()
            return
        await asyncio.gather(_pipe(r, w2), _pipe(r2, w))

    if listen.kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen.path)
        server = await asyncio.start_unix_server(handle, listen.path)
    else:
        server = await asyncio.start_server(handle, listen.host, listen.port)
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()


def run(listen: str, connect: str) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(parse_endpoint(listen), parse_endpoint(connect)))
    return 0
