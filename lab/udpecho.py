"""`ntm lab udpecho`: a UDP echo that prefixes its name, so a client sees which server answered.

`hello` sent to web1's port 9000 comes back as `web1 hello`. IPv4 and IPv6 on one socket.
"""

from __future__ import annotations

import socket
import sys

MAX_DATAGRAM = 65535


def reply_for(name: str, data: bytes) -> bytes:
    return name.encode() + b" " + data


def serve(name: str, port: int, host: str = "::") -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    print(f"udpecho {name}: listening on [{host}]:{port}", file=sys.stderr, flush=True)
    with sock:
        while True:
            data, addr = sock.recvfrom(MAX_DATAGRAM)
            try:
                sock.sendto(reply_for(name, data)[:MAX_DATAGRAM], addr)
            except OSError as exc:  # e.g. the client's route went away: keep serving
                print(f"udpecho {name}: reply to {addr[0]} failed: {exc}", file=sys.stderr)
