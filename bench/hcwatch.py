"""Watcher for the health-check benchmark: `python -m bench.hcwatch ...` in the LB's namespace.

Every `poll` seconds it asks the real server itself (`GET <path>`, as the agent's HTTP check
does) and the LB agent's status (is the real server in the applied state, and when did the
agent's health verdict last flip), and prints a JSON line whenever either answer changes:

    {"t": <time.time()>, "serving": true, "in_service": false, "health": "down",
     "last_change": <agent's time.time() of the flip>}

It stops after `limit` seconds or when stdin closes (the benchmark ends it that way).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ntm_io.status import StatusError, read_status


def serving(address: str, port: int, path: str, timeout: float) -> bool:
    """One HTTP GET straight to the real server: did it answer 200?"""
    try:
        with socket.create_connection((address, port), timeout=timeout) as conn:
            conn.sendall(f"GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
            head = conn.recv(64)
    except OSError:
        return False
    parts = head.split(b"\r\n", 1)[0].split()
    return len(parts) >= 2 and parts[1] == b"200"


def real_state(doc: Mapping[str, Any], service: str, address: str, port: int) -> dict[str, Any]:
    """in_service / health / last_change of one real server in `ntm lb` status."""
    for svc in doc.get("services") or []:
        if svc.get("name") != service:
            continue
        for real in svc.get("reals") or []:
            if real.get("address") == address and real.get("port") == port:
                return {
                    "in_service": bool(real.get("in_service")),
                    "health": real.get("health"),
                    "last_change": real.get("last_change"),
                }
    return {"in_service": None, "health": None, "last_change": None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hcwatch")
    parser.add_argument("--socket", required=True, help="the LB agent's status socket")
    parser.add_argument("--service", required=True, help="service name in the agent's config")
    parser.add_argument("--real", required=True, help="ADDRESS:PORT of the real server")
    parser.add_argument("--path", default="/whoami")
    parser.add_argument("--poll", type=float, default=0.02)
    parser.add_argument("--limit", type=float, default=300.0, help="stop after this long")
    args = parser.parse_args(argv)
    address, _, port_text = args.real.rpartition(":")
    port = int(port_text)
    last: dict[str, Any] | None = None
    deadline = time.monotonic() + args.limit
    while time.monotonic() < deadline:
        try:
            agent = real_state(read_status(args.socket, timeout=1.0), args.service, address, port)
        except StatusError as exc:
            agent = {"in_service": None, "health": None, "last_change": None, "error": str(exc)}
        state = {"serving": serving(address, port, args.path, args.poll * 5), **agent}
        if state != last:
            # stamped after both looks: each answer is at most one look old at this time
            print(json.dumps({"t": round(time.time(), 6), **state}), flush=True)
            last = state
        # stdin closing (EOF) is the benchmark's "stop"; it doubles as the poll sleep.
        ready, _, _ = select.select([sys.stdin], [], [], args.poll)
        if ready and not os.read(sys.stdin.fileno(), 1):
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
