"""A small closed-loop HTTP load generator: `python -m bench.httpload URL ...`.

`concurrency` workers each open a new TCP connection per request (like `ab` without -k, so
the load balancer schedules every request and every one crosses the tunnel's connection
set-up), send `GET <path> HTTP/1.1` with `Connection: close`, read the whole response and
start over, for `duration` seconds after an untimed warm-up. Every request started inside
the window counts (so a slow last one is not cut from the tail); its latency is the time
from connect to the last byte. Prints one JSON document: completed requests per
second, latency percentiles, errors by kind, and which server answered and which client
address it saw (the `server=webN client=IP` body of `ntm lab httpd`).

Each run starts as its own process in the client's namespace; the work is bounded by the
duration and a per-request timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .stats import summary

_WHOAMI = re.compile(rb"server=(\S+) client=(\S+)")


@dataclass
class Tally:
    """What the workers saw during the timed window."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    servers: Counter[str] = field(default_factory=Counter)
    clients: Counter[str] = field(default_factory=Counter)

    def response(self, raw: bytes, ms: float) -> None:
        status, server, client = parse_response(raw)
        if status != 200:
            self.errors[f"status {status}"] += 1
            return
        self.latencies_ms.append(ms)
        if server:
            self.servers[server] += 1
        if client:
            self.clients[client] += 1


def parse_response(raw: bytes) -> tuple[int | None, str | None, str | None]:
    """(status, server, client) of one HTTP response; None where it has none."""
    head, _, body = raw.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    found = _WHOAMI.search(body)
    if found is None:
        return status, None, None
    return status, found.group(1).decode(), found.group(2).decode()


def report(tally: Tally, seconds: float, concurrency: int) -> dict[str, Any]:
    done = len(tally.latencies_ms)
    return {
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "completed": done,
        "requests_per_s": round(done / seconds, 1) if seconds > 0 else None,
        "latency_ms": summary(tally.latencies_ms),
        "errors": dict(tally.errors),
        "error_count": sum(tally.errors.values()),
        "servers": dict(sorted(tally.servers.items())),
        "clients_seen": dict(tally.clients),
    }


async def _one(host: str, port: int, request: bytes, timeout: float) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()


async def _worker(
    host: str, port: int, request: bytes, timeout: float, t_start: float, t_end: float, tally: Tally
) -> None:
    loop = asyncio.get_running_loop()
    while (now := loop.time()) < t_end:
        try:
            raw = await _one(host, port, request, timeout)
        except TimeoutError:
            kind: str | None = "timeout"
        except OSError as exc:
            kind = type(exc).__name__
        else:
            kind = None
        done = loop.time()
        if now < t_start:
            continue  # started during the warm-up
        if kind is not None:
            tally.errors[kind] += 1
            if kind != "timeout":
                await asyncio.sleep(0.01)  # refused at once: do not spin
        else:
            tally.response(raw, (done - now) * 1000)


async def run(url: str, concurrency: int, duration: float, warmup: float, timeout: float) -> Any:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: ntm-bench\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    t_start = loop.time() + warmup
    t_end = t_start + duration
    tally = Tally()
    workers = [
        _worker(host, port, request, timeout, t_start, t_end, tally) for _ in range(concurrency)
    ]
    await asyncio.wait_for(asyncio.gather(*workers), warmup + duration + timeout + 5)
    return report(tally, duration, concurrency)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.httpload")
    parser.add_argument("url", help="e.g. http://10.30.0.100/whoami")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0, help="timed seconds")
    parser.add_argument("--warmup", type=float, default=0.5, help="untimed seconds first")
    parser.add_argument("--timeout", type=float, default=3.0, help="per request")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    out = asyncio.run(run(args.url, args.concurrency, args.duration, args.warmup, args.timeout))
    out["url"] = args.url
    out["wall_s"] = round(time.monotonic() - t0, 2)
    print(json.dumps(out))
    return 0 if out["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
