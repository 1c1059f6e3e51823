"""A small asyncio DNS client for daemons (a DC finding another DC through NS delegation)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from dnslib import QTYPE, RCODE, DNSRecord


class DnsLookupError(Exception):
    pass


async def query(name: str, qtype: str, servers: list[str], timeout: float) -> list[str]:
    """Answer records of `qtype` for `name` (text form, trailing dots stripped).

    Tries each server in turn within one overall `timeout`; NXDOMAIN or an empty answer
    gives [], no answer at all raises DnsLookupError.
    """
    q = DNSRecord.question(name, qtype)
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    async with asyncio.timeout(timeout):
        for server in servers:
            family = socket.AF_INET6 if ":" in server else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (server, 53))
                await loop.sock_sendall(sock, q.pack())
                share = max(timeout / len(servers), 0.2)
                while True:
                    data = await asyncio.wait_for(loop.sock_recv(sock, 4096), share)
                    with contextlib.suppress(Exception):
                        reply = DNSRecord.parse(data)
                        if reply.header.id == q.header.id and reply.q.qname == q.q.qname:
                            break
            except (OSError, TimeoutError) as exc:
                errors.append(f"{server}: {exc or 'timeout'}")
                continue
            finally:
                sock.close()
            if reply.header.rcode not in (RCODE.NOERROR, RCODE.NXDOMAIN):
                errors.append(f"{server}: {RCODE[reply.header.rcode]}")
                continue
            want = getattr(QTYPE, qtype)
            return [str(rr.rdata).rstrip(".") for rr in reply.rr if rr.rtype == want]
    raise DnsLookupError(f"no answer for {name} {qtype} ({'; '.join(errors) or 'no servers'})")
