"""The round trip a Python tunnel cannot beat here: `sudo python -m bench.rtt_floor`.

Two namespaces joined by one veth, each running the smallest possible TUN <-> UDP
forwarder in Python (read a packet, optionally AES-256-GCM seal it, send it; receive,
optionally open, write it): no protocol, no routing, no counters. Its ping round trip and
CPU per ping (both ends, from /proc/PID/schedstat) are the floor under our engine's figures,
with the event loop (a bare `select.epoll` loop or asyncio's) and the AEAD switched on and
off one at a time. The variants run one after another in every round, in alternating order,
so each round compares them under the same machine load.

Diagnostic only; `ntm bench` measures the real tunnel and OpenVPN.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import select
import socket
import statistics
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .nsproc import in_ns, run_in, wait_for
from .stats import parse_ping

VARIANTS = ("epoll", "epoll+aead", "asyncio", "asyncio+aead")
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
PORT = 53999
OUTER = ("10.203.0.1", "10.203.0.2")
INNER = ("100.126.0.1", "100.126.0.2")


# --- the forwarder (one per namespace) -------------------------------------------------------


def forward(variant: str, tun: str, local: str, peer: str) -> None:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tun.encode(), IFF_TUN | IFF_NO_PI))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((local, PORT))
    sock.setblocking(False)
    dst = (peer, PORT)
    seal: Callable[[bytes], bytes] = bytes
    unseal: Callable[[bytes], bytes] = bytes
    if "aead" in variant:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        aead, nonce = AESGCM(bytes(32)), bytes(12)  # a fixed key: a measurement, no secret

        def seal(p: bytes) -> bytes:
            return aead.encrypt(nonce, p, None)

        def unseal(p: bytes) -> bytes:
            return aead.decrypt(nonce, p, None)

    def on_tun() -> None:
        while True:
            try:
                packet = os.read(fd, 2048)
            except BlockingIOError:
                return
            sock.sendto(seal(packet), dst)

    def on_udp() -> None:
        while True:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                return
            with contextlib.suppress(OSError):  # EIO: our TUN is not up yet
                os.write(fd, unseal(data))

    if variant.startswith("asyncio"):

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.add_reader(fd, on_tun)
            loop.add_reader(sock.fileno(), on_udp)
            await asyncio.Event().wait()

        asyncio.run(main())
        return
    ep = select.epoll()
    ep.register(fd, select.EPOLLIN)
    ep.register(sock.fileno(), select.EPOLLIN)
    while True:
        for ready, _ in ep.poll():
            if ready == fd:
                on_tun()
            else:
                on_udp()


# --- the driver --------------------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def _one(variant: str, ns: tuple[str, str], pings: int) -> dict[str, Any]:
    procs = []
    try:
        for i in (1, 0):  # the answering side first
            argv = [sys.executable, "-m", "bench.rtt_floor", "forward", variant, "rf0"]
            argv += [OUTER[i], OUTER[1 - i]]
            procs.append(
                subprocess.Popen(
                    in_ns(ns[i], argv),
                    cwd=Path(__file__).resolve().parents[1],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for i in (0, 1):

            def tun_there(i: int = i) -> bool:
                return run_in(ns[i], ["ip", "link", "show", "rf0"], 5).returncode == 0

            if not wait_for(tun_there, 10.0, 0.02):
                raise RuntimeError(f"{variant}: the forwarder in {ns[i]} made no TUN")
            for cmd in (
                ["ip", "addr", "add", f"{INNER[i]}/32", "dev", "rf0"],
                ["ip", "link", "set", "rf0", "mtu", "1400", "up"],
                ["ip", "route", "replace", f"{INNER[1 - i]}/32", "dev", "rf0"],
            ):
                done = run_in(ns[i], cmd, 5)
                if done.returncode != 0:
                    raise RuntimeError(f"{variant}: {' '.join(cmd)} in {ns[i]}: {done.stderr}")
        target = INNER[1]
        if not wait_for(
            lambda: run_in(ns[0], ["ping", "-c1", "-W0.2", target], 5).returncode == 0, 10.0
        ):
            raise RuntimeError(f"{variant}: no answer through the forwarders")
        c0 = sum(_cpu_ns(p.pid) for p in procs)
        done = run_in(ns[0], ["ping", "-i", "0.01", "-c", str(pings), target], pings * 0.1 + 30)
        c1 = sum(_cpu_ns(p.pid) for p in procs)
        result = parse_ping(done.stdout)
        return {
            "p50_ms": statistics.median(result.rtts_ms) if result.rtts_ms else None,
            "cpu_us_per_ping": round((c1 - c0) / 1000 / max(1, result.received), 1),
            "lost": result.transmitted - result.received,
        }
    finally:
        for p in procs:
            p.kill()
            p.wait(5)


def run(pings: int, rounds: int) -> dict[str, Any]:
    tag = secrets.token_hex(3)
    ns = (f"rf{tag}a", f"rf{tag}b")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in (*VARIANTS, "plain veth")}
    try:
        for n in ns:
            _ip("netns", "add", n)
        _ip(
            "-n", ns[0], "link", "add", "rfv", "type", "veth", "peer", "name", "rfv", "netns", ns[1]
        )
        for i, n in enumerate(ns):
            _ip("-n", n, "addr", "add", f"{OUTER[i]}/24", "dev", "rfv")
            _ip("-n", n, "link", "set", "rfv", "up")
            _ip("-n", n, "link", "set", "lo", "up")
        for r in range(rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                runs[variant].append(_one(variant, ns, pings))
                print(f"round {r} {variant}: {runs[variant][-1]}", flush=True)
            plain = run_in(ns[0], ["ping", "-i", "0.01", "-c", str(pings), OUTER[1]], 60)
            rtts = parse_ping(plain.stdout).rtts_ms
            runs["plain veth"].append({"p50_ms": statistics.median(rtts) if rtts else None})
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, check=False)
    summary = {}
    for name, got in runs.items():
        p50s = [x["p50_ms"] for x in got if x.get("p50_ms") is not None]
        cpus = [x["cpu_us_per_ping"] for x in got if "cpu_us_per_ping" in x]
        summary[name] = {
            "p50_ms_median": statistics.median(p50s) if p50s else None,
            "cpu_us_per_ping_median": statistics.median(cpus) if cpus else None,
        }
    return {"pings": pings, "rounds": rounds, "runs": runs, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rtt_floor")
    sub = parser.add_subparsers(dest="cmd")
    f = sub.add_parser("forward", help=argparse.SUPPRESS)
    for name in ("variant", "tun", "local", "peer"):
        f.add_argument(name)
    parser.add_argument("--pings", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "forward":
        forward(args.variant, args.tun, args.local, args.peer)
        return 0
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    doc = run(args.pings, args.rounds)
    print(f"{'variant':<14} {'p50 ms':>8} {'CPU us/ping':>12}  (median of {args.rounds} rounds)")
    for name, s in doc["summary"].items():
        cpu = s["cpu_us_per_ping_median"]
        print(f"{name:<14} {s['p50_ms_median']!s:>8} {'-' if cpu is None else cpu:>12}")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
