"""Timing probe run inside a lab namespace: `python -m bench.probe setup ...`.

Measures from the first DNS query byte to the first HTTP response byte, for a marked name
(the node's stub builds the tunnel before it answers) and for a plain name, through the
same stub. Runs as its own process so the timed part excludes interpreter start-up.
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

VIP_NET = ipaddress.ip_network("100.64.0.0/10")


class ProbeError(Exception):
    pass


def dns_a(name: str, server: str, port: int, timeout: float) -> str:
    """One UDP query for an A record; the last A in the answer (after any CNAME)."""
    query = DNSRecord.question(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
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


def timed(name: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    address = dns_a(name, args.server, args.dns_port, args.timeout)
    t_dns = time.perf_counter()
    first_byte(address, args.http_port, name, args.timeout)
    t_fb = time.perf_counter()
    return {
        "name": name,
        "answer": address,
        "via_tunnel": ipaddress.ip_address(address) in VIP_NET,
        "dns_ms": round((t_dns - t0) * 1000, 3),
        "first_byte_ms": round((t_fb - t0) * 1000, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("setup", help="marked name (cold, then warm), then plain name")
    p.add_argument("--marked", required=True)
    p.add_argument("--plain", required=True)
    p.add_argument("--server", default="127.0.0.1")
    p.add_argument("--dns-port", type=int, default=53)
    p.add_argument("--http-port", type=int, default=80)
    p.add_argument("--timeout", type=float, default=8.0)
    args = parser.parse_args(argv)
    out: dict[str, Any] = {}
    try:
        out["marked_cold"] = timed(args.marked, args)
        out["marked_warm"] = timed(args.marked, args)  # the tunnel exists now
        out["plain"] = timed(args.plain, args)
    except (OSError, ProbeError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main())
