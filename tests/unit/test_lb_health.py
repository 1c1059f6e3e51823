"""Health checks against fake servers on loopback; a silent UDP server is DOWN."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

from lb_integration.agent import LbAgent
from lb_integration.config import HealthCheck, LbConfig, ServiceConfig
from lb_integration.health import Monitor, Verdict, probe
from lb_integration.model import (
    LbState,
    Protocol,
    RealServer,
    Scheduler,
    ServiceKey,
    VirtualService,
)

FAST = HealthCheck(kind="tcp", interval=0.05, timeout=0.2, rise=2, fall=2)
WAIT = 5.0  # bound for "eventually"


def test_verdict_rise_and_fall() -> None:
    v = Verdict(rise=2, fall=3)
    assert v.up
    assert [v.observe(False) for _ in range(3)] == [False, False, True] and not v.up
    assert v.observe(True) is False and not v.up  # one success is not enough
    assert v.observe(False) is False  # and resets the rise count
    assert [v.observe(True), v.observe(True)] == [False, True] and v.up
    v.observe(False)
    v.observe(True)  # a success in between resets the fall count
    assert [v.observe(False), v.observe(False)] == [False, False] and v.up


def test_detection_time_is_reported() -> None:
    h = HealthCheck(kind="http", interval=1.0, timeout=0.5, rise=3, fall=2)
    assert h.detection_s == 2.5 and h.recovery_s == 3.5


@asynccontextmanager
async def http_server(status: int = 200, body: bytes = b"server=web1") -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            writer.close()  # a TCP check: connect and go
            return
        writer.write(f"HTTP/1.0 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, prefix: bytes | None) -> None:
        self.prefix = prefix

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.prefix is not None:  # None: a silent server (keepalived would call it UP)
            self.transport.sendto(self.prefix + data, addr)  # type: ignore[attr-defined]


@asynccontextmanager
async def udp_server(prefix: bytes | None, port: int = 0) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Echo(prefix), local_addr=("127.0.0.1", port)
    )
    try:
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


def closed_port(kind: int = socket.SOCK_STREAM) -> int:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def test_tcp_check() -> None:
    async def main() -> None:
        async with http_server() as port:
            assert await probe(FAST, "127.0.0.1", port) == (True, "connected")
        ok, why = await probe(FAST, "127.0.0.1", closed_port())
        assert not ok and "refused" in why.lower()

    asyncio.run(main())


def test_http_check_status_and_body() -> None:
    http = dataclasses.replace(FAST, kind="http", path="/whoami", expect="server=")

    async def main() -> None:
        async with http_server() as port:
            assert (await probe(http, "127.0.0.1", port))[0]
        async with http_server(status=503) as port:
            assert await probe(http, "127.0.0.1", port) == (False, "status 503, expected 200")
        async with http_server(body=b"maintenance") as port:
            ok, why = await probe(http, "127.0.0.1", port)
            assert not ok and "body lacks" in why

    asyncio.run(main())


def test_http_check_against_a_hung_server_is_bounded() -> None:
    http = dataclasses.replace(FAST, kind="http", timeout=0.2)

    async def main() -> None:
        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(10)

        server = await asyncio.start_server(hang, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ok, why = await probe(http, "127.0.0.1", port)
        assert not ok and "within 0.2 s" in why and loop.time() - t0 < 1.0
        server.close()

    asyncio.run(main())


def test_udp_check_requires_a_reply() -> None:
    udp = dataclasses.replace(FAST, kind="udp", payload="ping", expect="web1")

    async def main() -> None:
        async with udp_server(b"web1 ") as port:
            assert await probe(udp, "127.0.0.1", port) == (True, "replied")
        async with udp_server(b"web2 ") as port:
            ok, why = await probe(udp, "127.0.0.1", port)
            assert not ok and "reply lacks" in why
        async with udp_server(None) as port:  # silent: DOWN, unlike keepalived's default
            ok, why = await probe(udp, "127.0.0.1", port)
            assert not ok and why == "no reply within 0.2 s"
        ok, why = await probe(udp, "127.0.0.1", closed_port(socket.SOCK_DGRAM))
        assert not ok  # ICMP port unreachable (or silence): never UP

    asyncio.run(main())


def test_monitor_goes_down_and_back_up() -> None:
    changes: list[bool] = []

    async def main() -> None:
        async with udp_server(b"") as port:
            check = dataclasses.replace(FAST, kind="udp", payload="ping")
            mon = Monitor("echo real", check, "127.0.0.1", port, lambda: changes.append(mon.up))
            mon.start()
            await _until(lambda: mon.health.checks >= 2)
            assert mon.up and changes == []
        # server gone: DOWN after `fall` checks
        await _until(lambda: changes == [False])
        async with udp_server(b"", port):
            await _until(lambda: changes == [False, True])
        await mon.stop()

    asyncio.run(main())


async def _until(cond: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class FakeBackend:
    name = "fake"

    def __init__(self) -> None:
        self.applied: list[LbState] = []

    def read(self) -> LbState:
        return self.applied[-1] if self.applied else LbState()

    def apply(self, desired: LbState) -> None:
        self.applied.append(desired)

    def close(self) -> None:
        pass


def _changed(backend: FakeBackend, reals: tuple[RealServer, ...]) -> bool:
    return backend.applied[-1].services[0].reals != reals


def test_agent_removes_or_weights_down_failed_reals() -> None:
    """Health drives the effective state; on_failure picks remove or weight 0."""

    async def main() -> None:
        async with http_server() as live:
            dead = closed_port()
            key = ServiceKey("10.99.0.10", 80, Protocol.TCP)
            reals = (RealServer("127.0.0.1", live), RealServer("127.0.0.1", dead))
            svc = VirtualService(key, Scheduler.RR, reals=reals)
            cases: list[tuple[str, tuple[RealServer, ...] | None]] = [
                ("remove", (reals[0],)),
                ("weight0", None),
            ]
            for on_failure, expect in cases:
                health = dataclasses.replace(FAST, on_failure=on_failure)
                cfg = LbConfig(
                    "x.toml",
                    "lb1",
                    "/tmp/x.sock",
                    "nftables",
                    "ntm_lb",
                    False,
                    (ServiceConfig("www", svc, health, 1),),
                    None,
                )
                backend = FakeBackend()
                agent = LbAgent(cfg, backend)
                await agent.apply()
                assert backend.applied[-1].services[0].reals == reals  # start: all UP
                agent._sync_monitors()
                agent._spawn(agent._applier())
                await _until(partial(_changed, backend, reals))
                got = backend.applied[-1].services[0].reals
                if expect is not None:
                    assert got == expect
                else:
                    assert [r.weight for r in got] == [1, 0]
                status = agent.status()["services"][0]
                assert [r["health"] for r in status["reals"]] == ["up", "down"]
                assert status["health"]["detection_s"] == FAST.detection_s
                for mon in agent.monitors.values():
                    await mon.stop()
                for task in list(agent._tasks):
                    task.cancel()

    asyncio.run(main())
