"""Health checks for real servers (asyncio): TCP connect, HTTP GET, UDP request/reply.

A UDP check passes only on a reply (containing `expect`, when set). keepalived's UDP_CHECK
trusts silence unless `require_reply` is set, so a dead UDP server looks healthy there;
here silence is a failure, and an ICMP port unreachable fails at once.

Every probe runs under `asyncio.wait_for(…, timeout)`, so a hung server costs at most the
timeout and the loop is never blocked. `Verdict` (sans-IO) turns results into UP/DOWN with
rise/fall hysteresis. Probes run on a fixed schedule (every `interval`, which config keeps
>= timeout), so the worst-case detection time is interval x fall + timeout (reported).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable

from .config import HealthCheck

log = logging.getLogger("ntm.lb.health")

MAX_HTTP_RESPONSE = 64 * 1024  # read at most this much of a health response


@dataclasses.dataclass
class Verdict:
    """rise/fall counting (sans-IO). A real server starts UP: a restarted agent must not
    pull live servers out of service while it waits for their first checks."""

    rise: int
    fall: int
    up: bool = True
    successes: int = 0
    failures: int = 0

    def observe(self, ok: bool) -> bool:
        """Count one result; True when the state flips."""
        if ok:
            self.failures = 0
            self.successes += 1
            if not self.up and self.successes >= self.rise:
                self.up = True
                return True
        else:
            self.successes = 0
            self.failures += 1
            if self.up and self.failures >= self.fall:
                self.up = False
                return True
        return False


async def probe(check: HealthCheck, address: str, port: int) -> tuple[bool, str]:
    """One check, bounded by check.timeout. Returns (passed, what happened)."""
    target = check.port or port
    try:
        return await asyncio.wait_for(_probe(check, address, target), check.timeout)
    except TimeoutError:
        what = "no reply" if check.kind == "udp" else "no answer"
        return False, f"{what} within {check.timeout:g} s"
    except OSError as exc:
        # asyncio's connect error text is "Connect call failed (...)"; the errno says why
        return False, os.strerror(exc.errno) if exc.errno else str(exc)


async def _probe(check: HealthCheck, address: str, port: int) -> tuple[bool, str]:
    if check.kind == "none":
        return True, "not checked"
    if check.kind == "udp":
        return await _udp(check, address, port)
    reader, writer = await asyncio.open_connection(address, port)
    try:
        if check.kind == "tcp":
            return True, "connected"
        host = f"[{address}]" if ":" in address else address
        writer.write(
            f"GET {check.path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: ntm-lb-health\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        data = await reader.read(MAX_HTTP_RESPONSE)
        while data and len(data) < MAX_HTTP_RESPONSE:
            more = await reader.read(MAX_HTTP_RESPONSE - len(data))
            if not more:
                break
            data += more
        return _judge_http(check, data)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _judge_http(check: HealthCheck, data: bytes) -> tuple[bool, str]:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return False, f"not an HTTP response: {status_line[:60]!r}"
    if int(parts[1]) != check.expect_status:
        return False, f"status {parts[1]}, expected {check.expect_status}"
    if check.expect and check.expect.encode() not in body:
        return False, f"body lacks {check.expect!r}"
    return True, f"status {parts[1]}"


class _UdpReply(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable arrives here on a connected socket: down, no need to wait
        if not self.reply.done():
            self.reply.set_exception(exc)


async def _udp(check: HealthCheck, address: str, port: int) -> tuple[bool, str]:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    transport, proto = await loop.create_datagram_endpoint(
        _UdpReply, remote_addr=(address, port), family=family
    )
    try:
        transport.sendto(check.payload.encode())
        data = await proto.reply
    finally:
        transport.close()
    if check.expect and check.expect.encode() not in data:
        return False, f"reply lacks {check.expect!r}"
    return True, "replied"


@dataclasses.dataclass
class RealHealth:
    """What status shows for one real server."""

    up: bool = True
    last_result: str = "not checked yet"
    last_change: float | None = None  # time.time() of the last flip
    checks: int = 0
    failures_total: int = 0


Listener = Callable[[], None]


class Monitor:
    """Checks one real server forever; calls `on_change` when it goes up or down."""

    def __init__(
        self, label: str, check: HealthCheck, address: str, port: int, on_change: Listener
    ) -> None:
        self.label = label
        self.check = check
        self.address = address
        self.port = port
        self.on_change = on_change
        self.verdict = Verdict(check.rise, check.fall)
        self.health = RealHealth()
        self._task: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        return self.verdict.up

    def start(self) -> None:
        if self.check.kind != "none":
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            ok, what = await probe(self.check, self.address, self.port)
            self.record(ok, what)
            # Fixed rate: a slow probe (up to timeout <= interval) does not stretch the period.
            next_at = max(next_at + self.check.interval, loop.time())
            await asyncio.sleep(next_at - loop.time())

    def record(self, ok: bool, what: str) -> None:
        h = self.health
        h.checks += 1
        h.last_result = what
        if not ok:
            h.failures_total += 1
        if self.verdict.observe(ok):
            h.up = self.verdict.up
            h.last_change = time.time()
            if h.up:
                log.info("%s is UP again (%s)", self.label, what)
            else:
                log.warning(
                    "%s is DOWN after %d failed checks (%s); %s",
                    self.label,
                    self.check.fall,
                    what,
                    "weight set to 0" if self.check.on_failure == "weight0" else "removed",
                )
            self.on_change()
