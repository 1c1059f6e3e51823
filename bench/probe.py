"""Timing probe run inside a lab namespace: `python -m bench.probe setup|runs ...`.

For each marked name, in the order given: a plain DNS lookup of that name straight to the
recursive resolver (the query the node's stub makes upstream, carrying the stub's firewall
mark so the node's DNS redirect lets it pass), then the name through the node's stub with no
tunnel yet ("cold": DNS query -> DC direction -> handshake -> answer -> first HTTP byte
through the new tunnel), then the same name again ("warm", tunnel up). Last, a plain name
through the same stub. Runs as its own process so the timed part excludes interpreter
start-up; wall-clock stamps let a trace line the probe up with daemon logs or captures.
`runs` does all of a client's runs in one process: before each, the node drops its paths to
the peers (`forget-paths` on its admin socket, reachable from inside the namespace), and
after each the node's paths are read from its status socket.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import time
from typing import Any

from dnslib import QTYPE, DNSRecord

from ntm_io.status import (  # the repo is on PYTHONPATH inside the namespace
    AdminError,
    StatusError,
    admin_socket_path,
    read_status,
    request_admin,
)

VIP_NET = ipaddress.ip_network("100.64.0.0/10")


class ProbeError(Exception):
    pass


def dns_a(name: str, server: str, port: int, timeout: float, mark: int = 0) -> str:
    """One UDP query for an A record; the last A in the answer (after any CNAME)."""
    query = DNSRecord.question(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.settimeout(timeout)
        sock.sendto(query.pack(), (server, port))
        while True:
            data = sock.recv(4096)
            reply = DNSRecord.parse(data)
            if reply.header.id == query.header.id:
                break
    addresses = [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]
    if not addresses:
        raise ProbeError(f"{name}: no A record in the answer (rcode {reply.header.rcode})")
    return addresses[-1]


def first_byte(address: str, port: int, host: str, timeout: float) -> None:
    with socket.create_connection((address, port), timeout=timeout) as conn:
        conn.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        if not conn.recv(1):
            raise ProbeError(f"{address}:{port} closed without answering")


def timed(name: str, args: argparse.Namespace, marked: bool = True) -> dict[str, Any]:
    """DNS through the stub, then the first HTTP byte from the answer's address."""
    wall = time.time()
    t0 = time.perf_counter()
    address = dns_a(name, args.server, args.dns_port, args.timeout)
    t_dns = time.perf_counter()
    via_tunnel = ipaddress.ip_address(address) in VIP_NET
    if marked and not via_tunnel:
        # The stub gave the ordinary answer: no tunnel within its direction timeout.
        raise ProbeError(f"{name} answered {address}, not a vIP (no tunnel)")
    first_byte(address, args.http_port, name, args.timeout)
    t_fb = time.perf_counter()
    return {
        "answer": address,
        "via_tunnel": via_tunnel,
        "wall_start": round(wall, 6),
        "dns_ms": round((t_dns - t0) * 1000, 3),
        "first_byte_ms": round((t_fb - t0) * 1000, 3),
    }


def plain_lookup(name: str, args: argparse.Namespace) -> dict[str, Any]:
    # Untimed first: the resolver's cache then holds what the stub's own upstream query
    # will find a moment later, so both lookups see the same cache.
    dns_a(name, args.upstream, 53, args.timeout, args.mark)
    t0 = time.perf_counter()
    address = dns_a(name, args.upstream, 53, args.timeout, args.mark)
    return {"answer": address, "dns_ms": round((time.perf_counter() - t0) * 1000, 3)}


def one_run(names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Per marked name: plain lookup, cold, warm; then the plain name through the stub."""
    out: dict[str, Any] = {"names": {}}
    for name in names:
        one: dict[str, Any] = {}
        out["names"][name] = one
        try:
            one["plain_lookup"] = plain_lookup(name, args)
            one["cold"] = timed(name, args)
            one["warm"] = timed(name, args)  # the tunnel exists now
        except (OSError, ProbeError) as exc:
            one["error"] = f"{type(exc).__name__}: {exc}"
    try:
        out["plain"] = timed(args.plain, args, marked=False)
    except (OSError, ProbeError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def forget(args: argparse.Namespace) -> None:
    """Make the node drop its paths to the peers (admin request), and check it did."""
    try:
        for fqdn in args.forget:
            request_admin(admin_socket_path(args.status), "forget-paths", fqdn=fqdn)
        paths = read_status(args.status).get("paths") or []
    except (AdminError, StatusError) as exc:
        raise ProbeError(f"forget-paths: {exc}") from None
    left = [p for p in paths if p.get("peer_fqdn") in args.forget]
    if left:
        raise ProbeError(
            f"still {len(left)} path(s) to {', '.join(args.forget)} after forget-paths"
        )


def paths_now(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The node's paths as its status shows them (what the benchmark checks a run by)."""
    keys = ("peer_fqdn", "kind", "state", "relay")
    return [{k: p.get(k) for k in keys} for p in read_status(args.status).get("paths") or []]


def many_runs(args: argparse.Namespace) -> int:
    """`runs`: one JSON line per run; before each, the node forgets its paths to the peers.
    One process for all runs: no interpreter start-up between them."""
    failed_in_a_row = 0
    for i in range(args.runs):
        names = list(args.marked)
        if i % 2:
            names.reverse()  # neither name always goes first
        t0 = time.perf_counter()
        try:
            forget(args)
        except ProbeError as exc:
            print(json.dumps({"run": i, "error": f"ProbeError: {exc}"}), flush=True)
            failed_in_a_row += 1
            if failed_in_a_row >= args.max_failed:
                return 1
            continue
        failed_in_a_row = 0
        forget_ms = round((time.perf_counter() - t0) * 1000, 3)
        out = one_run(names, args)
        out["run"] = i
        out["forget_ms"] = forget_ms
        try:
            out["paths"] = paths_now(args)
        except StatusError as exc:  # the run then fails: its path is not checked
            out["paths_error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("setup", help="per marked name: plain lookup, cold, warm; then plain")
    r = sub.add_parser("runs", help="`setup` N times, the node forgetting its paths before each")
    for q in (p, r):
        q.add_argument("--marked", action="append", required=True, help="repeat for more names")
        q.add_argument("--plain", required=True)
        q.add_argument("--server", default="127.0.0.1", help="the node's stub resolver")
        q.add_argument("--upstream", required=True, help="the recursive resolver (plain lookups)")
        q.add_argument("--mark", type=lambda v: int(v, 0), default=0, help="SO_MARK, e.g. 0x4e544d")
        q.add_argument("--dns-port", type=int, default=53)
        q.add_argument("--http-port", type=int, default=80)
        q.add_argument("--timeout", type=float, default=8.0)
    r.add_argument("--runs", type=int, required=True)
    r.add_argument("--status", required=True, help="the node's status socket")
    r.add_argument("--forget", action="append", required=True, help="peer FQDN; repeat")
    r.add_argument("--max-failed", type=int, default=3, help="forget failures in a row: stop")
    args = parser.parse_args(argv)
    if args.cmd == "runs":
        return many_runs(args)
    out = one_run(list(args.marked), args)
    print(json.dumps(out))
    failed = "error" in out or any("error" in one for one in out["names"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
