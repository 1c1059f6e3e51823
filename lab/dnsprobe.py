"""`ntm lab dnsprobe`: one DNS query, for healthchecks and tests (no dig needed)."""

from __future__ import annotations

import ipaddress
import socket
import struct

from dnslib import QTYPE, RCODE, DNSRecord

from lab.errors import LabError


def query(name: str, qtype: str, server: str, port: int, timeout: float, tcp: bool) -> DNSRecord:
    if qtype not in QTYPE.reverse:
        raise LabError(f"unknown query type {qtype!r}; use A, AAAA, CNAME, NS, SOA, ...")
    request = DNSRecord.question(name, qtype)
    try:
        raw = exchange(request.pack(), server, port, timeout, tcp)
    except (TimeoutError, OSError, ValueError) as exc:
        raise LabError(f"no answer from {server} port {port}: {exc}") from None
    return DNSRecord.parse(raw)


def exchange(query: bytes, server: str, port: int, timeout: float, tcp: bool) -> bytes:
    """Send one query over UDP or TCP, IPv4 or IPv6 (dnslib's own send is IPv4-only)."""
    family = socket.AF_INET6 if ipaddress.ip_address(server).version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        sock.settimeout(timeout)
        sock.connect((server, port))
        if not tcp:
            sock.send(query)
            return sock.recv(65535)
        sock.sendall(struct.pack("!H", len(query)) + query)
        (length,) = struct.unpack("!H", _recv_exact(sock, 2))
        return _recv_exact(sock, length)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("connection closed mid-answer")
        data += chunk
    return data


def answer_lines(reply: DNSRecord) -> list[str]:
    """One line per answer record: `name type value` (e.g. `plain.example.com. A 198.51.100.40`)."""
    return [f"{rr.rname} {QTYPE[rr.rtype]} {rr.rdata}" for rr in reply.rr]


def verdict(reply: DNSRecord, expect: str | None) -> bool:
    if reply.header.rcode != RCODE.NOERROR or not reply.rr:
        return False
    if expect is None:
        return True
    return any(str(rr.rdata).rstrip(".") == expect.rstrip(".") for rr in reply.rr)
