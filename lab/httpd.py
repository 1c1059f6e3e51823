"""`ntm lab httpd`: a tiny dual-stack HTTP server that tells who is asking.

Every GET answers `server=<name> client=<client ip>` so tests and load runs can see the client
address a server observes (the property NTMobile must keep stable across handovers), except
`GET /bytes?n=N`: N deterministic bytes (`pattern`), so a client can check a long transfer
byte for byte across an event; its `X-Server` header names the server.
"""

from __future__ import annotations

import hashlib
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_BYTES = 1 << 30  # /bytes?n= at most 1 GiB
BLOCK = 32  # pattern block: sha256 of its index, so no two blocks of a transfer are alike
CHUNK = 16384


def pattern(offset: int, length: int) -> bytes:
    """Bytes offset..offset+length of the /bytes stream (the same for every server)."""
    first, last = offset // BLOCK, (offset + length + BLOCK - 1) // BLOCK
    blocks = b"".join(
        hashlib.sha256(b"ntm-lab-bytes" + i.to_bytes(8, "big")).digest() for i in range(first, last)
    )
    start = offset - first * BLOCK
    return blocks[start : start + length]


def bytes_wanted(path: str) -> int | None:
    """N of `/bytes?n=N`; None for any other path; -1 when N is missing or out of range."""
    parts = urlsplit(path)
    if parts.path != "/bytes":
        return None
    values = parse_qs(parts.query).get("n", [])
    if len(values) != 1 or not values[0].isdigit() or int(values[0]) > MAX_BYTES:
        return -1
    return int(values[0])


def client_ip(address: str) -> str:
    """The peer address as the server sees it, without the IPv4-mapped IPv6 prefix."""
    return address.removeprefix("::ffff:") if "." in address else address


class DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        # One socket for IPv4 and IPv6 clients (IPv4 arrives as ::ffff:a.b.c.d).
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def make_handler(name: str) -> type[BaseHTTPRequestHandler]:
    class WhoAmI(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection may carry many requests
        server_version = "ntm-lab-httpd"

        def _body(self) -> bytes:
            return f"server={name} client={client_ip(self.client_address[0])}\n".encode()

        def _head(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()

        def do_GET(self) -> None:
            n = bytes_wanted(self.path)
            if n is not None:
                self._bytes(n, send_body=True)
                return
            body = self._body()
            self._head(body)
            self.wfile.write(body)

        def do_HEAD(self) -> None:
            n = bytes_wanted(self.path)
            if n is not None:
                self._bytes(n, send_body=False)
                return
            self._head(self._body())

        def _bytes(self, n: int, send_body: bool) -> None:
            if n < 0:
                self.send_error(400, f"give /bytes?n=N with N from 0 to {MAX_BYTES}")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.send_header("X-Server", name)
            self.end_headers()
            for offset in range(0, n if send_body else 0, CHUNK):
                self.wfile.write(pattern(offset, min(CHUNK, n - offset)))

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write(f"httpd {name}: {client_ip(self.client_address[0])} {format % args}\n")

    return WhoAmI


def serve(name: str, port: int, host: str = "::") -> None:
    with DualStackServer((host, port), make_handler(name)) as server:
        print(f"httpd {name}: listening on [{host}]:{port}", file=sys.stderr, flush=True)
        server.serve_forever()
