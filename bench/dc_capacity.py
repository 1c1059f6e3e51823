"""DC capacity: the sans-IO Coordinator in-process, and the real DcServer over QUIC.

Each part runs in a child process (`python -m bench.dc_capacity MODE`) so memory figures
start from a clean interpreter and the QUIC server gets a core of its own: the server is
pinned to CPU 0 and the load generator to CPU 1. Logging stays at WARNING (the daemon's
default INFO writes a line per registration and per direction; not measured here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import json
import os
import random
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import procstat
from .stats import summary

ZONE = "ntm.example.com"
VIP_POOL = ipaddress.IPv4Network("100.64.0.0/12")  # room for 10^6 nodes inside the /10
VIP_ROUTE = ipaddress.IPv4Network("100.64.0.0/10")
NAMES_PER_CLIENT = 16


# --- the sans-IO coordinator ---------------------------------------------------------------


def _coordinator() -> Any:
    from dc.coordinator import Coordinator
    from dc.registry import Registry
    from ntm_proto.pool import VipPool

    return Coordinator(ZONE, Registry(VipPool(VIP_POOL), 300), VIP_ROUTE)


def _node(i: int) -> tuple[str, Any, tuple[str, int]]:
    """Node i: even ones behind NAT (IPv4), odd ones global and dual-stack."""
    from ntm_proto.messages import RegistrationRequest

    fqdn = f"n{i}.{ZONE}"
    reported: tuple[tuple[str, int], ...]
    if i % 2 == 0:
        reported = ((f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 7400),)
        seen = (f"203.0.113.{i % 250 + 1}", 40000 + i % 20000)
    else:
        v4 = f"198.51.100.{i % 250 + 1}"  # documentation prefixes count as global
        reported = ((v4, 7400), (f"2001:db8:{(i >> 16) & 0xFFFF:x}:{i & 0xFFFF:x}::1", 7400))
        seen = (v4, 7400)
    return fqdn, RegistrationRequest(fqdn, os.urandom(32), 7400, reported), seen


def coordinator_bench(nodes: int, plans: int) -> dict[str, Any]:
    from dc.coordinator import DirectionPlan
    from ntm_proto.messages import DirectionRequest, RegistrationResponse

    pid = os.getpid()
    clock = time.perf_counter_ns
    # 1. In a fresh interpreter: RSS grows by what the registry keeps. Only the register
    #    call is timed (building the request is the server's decode work).
    gc.collect()
    rss0 = procstat.rss_bytes(pid)
    coord = _coordinator()
    handles: list[object] = []
    reg_ns: list[int] = []
    accepted = 0
    t0 = time.perf_counter()
    for i in range(nodes):
        fqdn, req, seen = _node(i)
        handle = object()  # stands for the node's control connection
        handles.append(handle)
        names = frozenset((fqdn,))
        t = clock()
        answer = coord.register(names, "node", req, seen, handle, 0.0)
        reg_ns.append(clock() - t)
        accepted += isinstance(answer, RegistrationResponse)
    wall_s = time.perf_counter() - t0
    gc.collect()
    rss1 = procstat.rss_bytes(pid)
    registered = len(coord.registry)

    # 2. Direction Requests against the full registry: any node to a global one.
    rng = random.Random(7)
    work = []
    for _ in range(plans):
        src = rng.randrange(nodes)
        dst = rng.randrange(1, nodes, 2)
        if dst == src:
            dst = (dst + 2) % nodes | 1
        s_name = f"n{src}.{ZONE}"
        work.append(
            (frozenset((s_name,)), DirectionRequest(s_name, f"n{dst}.{ZONE}"), handles[src])
        )
    plan_ns: list[int] = []
    planned = 0
    t0 = time.perf_counter()
    for names, req, handle in work:
        t = clock()
        result = coord.plan(names, req, handle)
        plan_ns.append(clock() - t)
        planned += isinstance(result, DirectionPlan)
    plan_s = time.perf_counter() - t0

    return {
        "nodes": nodes,
        "registered": registered,
        "memory": {
            "rss_delta_mib": round((rss1 - rss0) / 2**20, 1),
            "bytes_per_node": round((rss1 - rss0) / max(registered, 1)),
            "how": "RSS delta of a fresh process after registering every node (gc'd); "
            "registry, vIP pool and records only, no QUIC connections",
        },
        "register": {
            "per_s": round(nodes / (sum(reg_ns) / 1e9)),
            "accepted": accepted,
            "latency_us": summary([n / 1000 for n in reg_ns], 2),
            "wall_per_s_with_request_building": round(nodes / wall_s),
        },
        "plan": {
            "per_s": round(plans / plan_s),
            "planned": planned,
            "requests": plans,
            "latency_us": summary([n / 1000 for n in plan_ns], 2),
        },
    }


# --- the real DcServer over QUIC ----------------------------------------------------------


def client_names(index: int) -> list[str]:
    return [f"c{index}-{j}.{ZONE}" for j in range(NAMES_PER_CLIENT)]


def make_dc_pki(directory: Path, clients: int) -> None:
    from ntm_pki import ca

    ca.init_ca(directory, "ntm bench DC CA", force=True)
    ca.issue(directory, "dc", "dc", dns=[f"dc1.{ZONE}"], ips=["127.0.0.1"])
    for i in range(clients):
        ca.issue(directory, f"c{i}", "node", dns=client_names(i))


def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu % (os.cpu_count() or 1)})


async def serve(pki: Path, port: int, work: Path) -> None:
    from dc import config as dc_config
    from dc.server import DcServer

    # Through the documented TOML format: features added to the DC later keep their
    # defaults (off) without this benchmark knowing about them.
    path = work / "dcbench.toml"
    path.write_text(
        "[dc]\n"
        'name = "dcbench"\n'
        f'zone = "{ZONE}"\n'
        'listen = ["127.0.0.1"]\n'
        f"quic_port = {port}\n"
        "dns_port = 0\n"
        f'vip_pool = "{VIP_POOL}"\n'
        f'vip_route = "{VIP_ROUTE}"\n'
        f'ns_name = "dc1.{ZONE}"\n'
        'ns_addresses = ["127.0.0.1"]\n'
        "registration_lifetime = 300\n"
        f'status_socket = "{work / "dc.sock"}"\n'
        "[tls]\n"
        f'ca = "{pki / "ca.pem"}"\n'
        f'cert = "{pki / "dc.pem"}"\n'
        f'key = "{pki / "dc.key"}"\n'
    )
    cfg = dc_config.load(path)
    server = DcServer(cfg)
    await server.start()
    print("ready", flush=True)
    try:
        # Until the parent closes our stdin (also when it dies): no orphan server.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await server.close()


async def load(
    pki: Path, port: int, conns: int, inflight: int, seconds: float, server_pid: int
) -> dict[str, Any]:
    from ntm_io.control import ControlConnection, connect_control
    from ntm_proto import messages as m

    async def ack(_conn: ControlConnection, payload: bytes) -> bytes:
        rd = m.decode_as(payload, m.RouteDirection)
        return m.encode(m.RouteDirectionAck(rd.path_id))

    connections = [
        await connect_control(
            "127.0.0.1",
            port,
            server_name=f"dc1.{ZONE}",
            ca=str(pki / "ca.pem"),
            cert=str(pki / f"c{i}.pem"),
            key=str(pki / f"c{i}.key"),
            handler=ack,
        )
        for i in range(conns)
    ]
    key = bytes(32)
    endpoint = (("127.0.0.1", 7400),)

    def registration(i: int, k: int) -> bytes:
        name = client_names(i)[k % NAMES_PER_CLIENT]
        return m.encode(m.RegistrationRequest(name, key, 7400, endpoint))

    def direction(i: int, _k: int) -> bytes:
        target = client_names((i + 1) % conns)[0]
        return m.encode(m.DirectionRequest(client_names(i)[0], target))

    async def phase(make: Callable[[int, int], bytes], expect: type[m.Message]) -> dict[str, Any]:
        latencies: list[float] = []
        errors: list[str] = []
        deadline = time.monotonic() + seconds

        async def worker(i: int, w: int) -> None:
            k = w
            conn = connections[i]
            while time.monotonic() < deadline:
                payload = make(i, k)
                k += inflight
                t = time.perf_counter()
                try:
                    answer = m.decode(await conn.request(payload, 5.0))
                except Exception as exc:  # a failed request is a figure, not a crash
                    errors.append(type(exc).__name__)
                    continue
                if isinstance(answer, expect):
                    latencies.append((time.perf_counter() - t) * 1000)
                else:
                    errors.append(getattr(answer, "reason", type(answer).__name__)[:80])

        cpu0, own0 = procstat.cpu_seconds(server_pid), procstat.cpu_seconds(os.getpid())
        udp0 = _udp_datagrams()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i, w) for i in range(conns) for w in range(inflight)))
        elapsed = time.perf_counter() - t0
        cpu = procstat.cpu_seconds(server_pid) - cpu0
        own = procstat.cpu_seconds(os.getpid()) - own0
        udp = _udp_datagrams() - udp0
        done = len(latencies)
        return {
            "completed": done,
            "errors": len(errors),
            "error_kinds": sorted(set(errors))[:5],
            "seconds": round(elapsed, 2),
            "per_s": round(done / elapsed),
            "latency_ms": summary(latencies, 3),
            "server_cpu_percent": round(100 * cpu / elapsed, 1),
            "per_server_cpu_s": round(done / cpu) if cpu > 0 else None,
            "load_generator_cpu_percent": round(100 * own / elapsed, 1),
            "udp_datagrams_per_request": round(udp / done, 2) if done else None,
        }

    try:
        # Every client registers its first name, so directions between them can be planned.
        for i, conn in enumerate(connections):
            answer = m.decode(await conn.request(registration(i, 0), 5.0))
            if not isinstance(answer, m.RegistrationResponse):
                raise RuntimeError(f"client {i} could not register: {answer}")
        rss_connected = procstat.rss_bytes(server_pid)
        reg = await phase(registration, m.RegistrationResponse)
        for i, conn in enumerate(connections):  # re-register name 0 on its own connection
            await conn.request(registration(i, 0), 5.0)
        dirs = await phase(direction, m.RouteDirection)
    finally:
        for conn in connections:
            with contextlib.suppress(Exception):
                await conn.close()
    return {
        "server_rss_mib_connected": round(rss_connected / 2**20, 1),
        "registrations": reg,
        "directions": dirs,
        "note": "a Direction Request includes the DC's push of the Route Direction to the "
        "responder (another client connection) and its ack",
    }


def _udp_datagrams() -> int:
    """UDP datagrams received in this network namespace (both ends of every loopback
    exchange count once); other UDP traffic in the namespace adds to it."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        udp = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()]
        rows = [r for r in udp if r and r[0] == "Udp:"]
        return int(rows[1][rows[0].index("InDatagrams")])
    return 0


# --- the parent side ----------------------------------------------------------------------


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(mode: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "bench.dc_capacity", mode, *args]


def _env() -> dict[str, str]:
    repo = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": str(repo)}


def _json_child(argv: list[str], timeout: float) -> dict[str, Any]:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=_env()
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[2:4])} failed: {done.stderr.strip()[-1500:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# Load levels for the QUIC test: one request at a time on two connections (latency without
# queueing), and 32 in flight over 8 connections (what a busy DC sees).
LOADS = {"light": (2, 1), "concurrent": (8, 4)}


def run_dc(work: Path, nodes: int, plans: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "coordinator": _json_child(
            _child("coordinator", "--nodes", str(nodes), "--plans", str(plans)), 600
        )
    }
    out["quic"] = run_quic(work, seconds)
    return out


def run_quic(
    work: Path, seconds: float, levels: tuple[str, ...] = tuple(LOADS), profile: Path | None = None
) -> dict[str, Any]:
    """The DcServer over QUIC at each load level; `profile`: cProfile the server into it."""
    pki = work / "dc-pki"
    make_dc_pki(pki, max(conns for conns, _ in LOADS.values()))
    port = _free_udp_port()
    extra = ("--profile", str(profile)) if profile is not None else ()
    server = subprocess.Popen(
        _child(
            "server",
            *("--pki", str(pki), "--port", str(port), "--work", str(work), "--cpu", "0"),
            *extra,
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    quic: dict[str, Any] = {
        "pinning": "DcServer process on CPU 0, load generator (aioquic clients) on CPU 1",
        "loads": {
            k: {"connections": c, "in_flight_per_connection": f}
            for k, (c, f) in LOADS.items()
            if k in levels
        },
    }
    try:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 30)
        if not ready or server.stdout.readline().strip() != b"ready":
            err = server.stderr.read().decode(errors="replace")[-1500:] if server.stderr else ""
            raise RuntimeError(f"the DC server did not start within 30 s: {err}")
        for level in levels:
            conns, inflight = LOADS[level]
            quic[level] = _json_child(
                _child(
                    "clients",
                    *("--pki", str(pki), "--port", str(port), "--cpu", "1"),
                    *("--conns", str(conns), "--inflight", str(inflight)),
                    *("--seconds", str(seconds), "--server-pid", str(server.pid)),
                ),
                seconds * 2 + 120,
            )
        quic["server_rss_mib_end"] = round(procstat.rss_bytes(server.pid) / 2**20, 1)
    finally:
        if server.stdin is not None:
            with contextlib.suppress(OSError):
                server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
    return quic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dc_capacity")
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("coordinator")
    p.add_argument("--nodes", type=int, default=100_000)
    p.add_argument("--plans", type=int, default=50_000)
    p = sub.add_parser("server")
    p.add_argument("--pki", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--cpu", type=int)
    p.add_argument("--profile", type=Path, help="cProfile the server into this file")
    p = sub.add_parser("quic", help="only the QUIC part (a server and its clients)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--level", action="append", choices=sorted(LOADS))
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--profile", type=Path, help="cProfile the server into this file")
    p = sub.add_parser("clients")
    p.add_argument("--pki", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=8)
    p.add_argument("--inflight", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--server-pid", type=int, required=True)
    p.add_argument("--cpu", type=int)
    args = parser.parse_args(argv)
    if args.mode == "coordinator":
        print(json.dumps(coordinator_bench(args.nodes, args.plans)))
    elif args.mode == "server":
        _pin(args.cpu)
        if args.profile is None:
            asyncio.run(serve(args.pki, args.port, args.work))
        else:
            import cProfile

            with cProfile.Profile(time.process_time) as prof:
                asyncio.run(serve(args.pki, args.port, args.work))
            prof.dump_stats(args.profile)
    elif args.mode == "quic":
        args.work.mkdir(parents=True, exist_ok=True)
        levels = tuple(args.level or LOADS)
        print(json.dumps(run_quic(args.work, args.seconds, levels, args.profile), indent=2))
    else:
        _pin(args.cpu)
        result = asyncio.run(
            load(args.pki, args.port, args.conns, args.inflight, args.seconds, args.server_pid)
        )
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
