"""The client side of a session: DNS from a vIP, HTTP keep-alive to /whoami, UDP echo.

Plain blocking sockets; under Locust they are gevent's (Locust patches the stdlib), so one
process runs hundreds of users. Every socket is bound to the identity's vIP: that is what
sends the traffic through this identity's tunnel (and what the DNS stub answers by).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, DNSRecord

MAX_DATAGRAM = 2048


class ProbeError(Exception):
    """A request got no usable answer (the message says why)."""


class SessionBroken(ProbeError):
    """The session cannot go on (connection closed or reset): open a new one."""


# -- DNS -----------------------------------------------------------------------------------


def build_query(name: str, qid: int) -> bytes:
    q = DNSRecord.question(name, "A")
    q.header.id = qid
    return bytes(q.pack())


def answer_address(data: bytes, qid: int) -> str:
    """The last A record of an answer (the end of the CNAME chain), or ProbeError."""
    try:
        reply = DNSRecord.parse(data)
    except Exception as exc:  # dnslib raises several types on garbage
        raise ProbeError(f"malformed DNS answer: {exc}") from None
    if reply.header.id != qid:
        raise ProbeError("DNS answer to another query")
    if reply.header.rcode != RCODE.NOERROR:
        raise ProbeError(f"DNS answer {RCODE[reply.header.rcode]}")
    addresses = [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]
    if not addresses:
        raise ProbeError("DNS answer without an A record")
    return addresses[-1]


def resolve(
    name: str, vip: str, resolver: tuple[str, int], timeout: float = 10.0, tries: int = 2
) -> str:
    """Ask `resolver` for `name` A with the query coming FROM `vip`.

    A node may take seconds to answer (a direction to the DC, then the tunnel), so each try
    waits long: an early retry would only add load to a resolver that is busy already.
    An IPv4 address as `name` needs no lookup (the untunnelled baseline of `make bench`
    sends the same load straight to the LB's VIP)."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.IPv4Address(name))
    last = "no answer"
    for _ in range(tries):
        qid = random.randrange(1 << 16)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((vip, 0))
            s.settimeout(timeout)
            try:
                s.sendto(build_query(name, qid), resolver)
                deadline = time.monotonic() + timeout
                while True:
                    s.settimeout(max(0.01, deadline - time.monotonic()))
                    data, _ = s.recvfrom(4096)
                    try:
                        return answer_address(data, qid)
                    except ProbeError as exc:
                        last = str(exc)
                        if "another query" not in last:
                            break
            except TimeoutError:
                last = f"no DNS answer from {resolver[0]} within {timeout:g} s"
            except OSError as exc:
                last = f"DNS query to {resolver[0]} failed: {exc}"
    raise ProbeError(last)


# -- HTTP ----------------------------------------------------------------------------------


def parse_whoami(body: bytes) -> tuple[str, str | None]:
    """`server=web1 client=100.64.0.7` -> ("web1", "100.64.0.7")."""
    fields = dict(
        part.split("=", 1) for part in body.decode(errors="replace").split() if "=" in part
    )
    server = fields.get("server")
    if not server:
        raise ProbeError(f"no server= in the answer {body[:60]!r}")
    return server, fields.get("client")


@dataclass
class HttpAnswer:
    server: str
    client: str | None
    late: bool  # it came after the request had been counted as failed


class HttpSession:
    """One keep-alive connection from `vip`; a request that stalls is a failure, but the
    connection is kept and its answer awaited (up to `abandon` s), since surviving exactly
    such a stall is what a handover must allow."""

    def __init__(
        self, target: str, port: int, vip: str, host: str, timeout: float, abandon: float
    ) -> None:
        self.timeout, self.abandon, self.host = timeout, abandon, host
        self.conn = http.client.HTTPConnection(
            target, port, timeout=timeout, source_address=(vip, 0)
        )
        self.closing = False

    def request(self, path: str, on_stall: Callable[[], None] | None = None) -> HttpAnswer:
        """GET path; calls on_stall() once if no answer came within `timeout`."""
        try:
            self.conn.request("GET", path, headers={"Host": self.host})
        except OSError as exc:
            raise SessionBroken(f"send failed: {exc}") from None
        sock = self.conn.sock
        assert sock is not None
        deadline = time.monotonic() + self.abandon
        late = False
        while True:
            sock.settimeout(self.timeout)
            try:
                peeked = sock.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise SessionBroken(f"no answer within {self.abandon:g} s") from None
                if not late:
                    late = True
                    if on_stall is not None:
                        on_stall()
                continue
            except OSError as exc:
                raise SessionBroken(f"receive failed: {exc}") from None
            if not peeked:
                raise SessionBroken("the server closed the connection")
            break
        sock.settimeout(self.abandon)
        try:
            resp = self.conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise SessionBroken(f"bad answer: {exc}") from None
        if resp.will_close:
            self.closing = True
        if resp.status != 200:
            raise ProbeError(f"HTTP {resp.status}")
        server, client = parse_whoami(body)
        return HttpAnswer(server, client, late)

    def close(self) -> None:
        self.conn.close()


# -- UDP echo ------------------------------------------------------------------------------


def parse_echo(data: bytes, payload: bytes) -> str | None:
    """The server name in `<name> <payload>`, or None if it echoes something else."""
    name, sep, rest = data.partition(b" ")
    if not sep or rest != payload or not name:
        return None
    return name.decode(errors="replace")


class UdpSession:
    """One UDP socket from `vip` to the service: the flow a source-hash scheduler pins."""

    def __init__(self, target: str, port: int, vip: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((vip, 0))
        self.sock.connect((target, port))

    def exchange(self, payload: bytes, timeout: float) -> str:
        """Send one datagram; the name of the server that echoed it, or ProbeError."""
        try:
            self.sock.send(payload)
        except OSError as exc:
            raise ProbeError(f"send failed: {exc}") from None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProbeError(f"no echo within {timeout:g} s")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except TimeoutError:
                raise ProbeError(f"no echo within {timeout:g} s") from None
            except OSError as exc:  # e.g. ICMP port unreachable
                raise ProbeError(f"receive failed: {exc}") from None
            server = parse_echo(data, payload)
            if server is not None:
                return server
            # a late echo of an earlier datagram: keep waiting for ours

    def close(self) -> None:
        self.sock.close()
