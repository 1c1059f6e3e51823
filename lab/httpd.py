"""`ntm lab httpd`: a tiny dual-stack HTTP server that tells who is asking.

Every GET answers `server=<name> client=<client ip>` so tests and load runs can see the client
address a server observes (the property NTMobile must keep stable across handovers).
"""

from __future__ import annotations

import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
            body = self._body()
            self._head(body)
            self.wfile.write(body)

        def do_HEAD(self) -> None:
            self._head(self._body())

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write(f"httpd {name}: {client_ip(self.client_address[0])} {format % args}\n")

    return WhoAmI


def serve(name: str, port: int, host: str = "::") -> None:
    with DualStackServer((host, port), make_handler(name)) as server:
        print(f"httpd {name}: listening on [{host}]:{port}", file=sys.stderr, flush=True)
        server.serve_forever()
