"""For programs that speak as one swarm identity (Locust users, tests): read the identities
file that `ntm swarm` writes, and resolve a name through the swarm's resolver *as* an
identity (the query leaves from its vIP, which is how the swarm knows who asks).

Blocking sockets only, so it works as is under gevent's monkey patching (Locust)::

    ids = load_identities("/state/mn2/identities.json")
    me = ids.identities[7]
    addr = resolve("www.example.com", me.vip, ids.dns)[0]
    sock = socket.create_connection((addr, 80), source_address=(me.vip, 0))
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from dnslib import QTYPE, DNSRecord


class SwarmClientError(Exception):
    """The identities file is unusable, or the swarm's resolver gave no address."""


@dataclass(frozen=True)
class Identity:
    index: int
    fqdn: str
    vip: str
    tun: str


@dataclass(frozen=True)
class Identities:
    swarm: str
    dns: tuple[str, int]  # the swarm's resolver
    complete: bool  # every identity of the swarm is registered
    identities: tuple[Identity, ...]


def load_identities(path: str | os.PathLike[str]) -> Identities:
    try:
        doc = json.loads(Path(path).read_text())
        host, _, port = doc["dns"].rpartition(":")
        return Identities(
            swarm=doc["swarm"],
            dns=(host.strip("[]"), int(port)),
            complete=bool(doc["complete"]),
            identities=tuple(
                Identity(int(i["index"]), i["fqdn"], i["vip"], i["tun"])
                for i in doc["identities"]
                if i.get("vip")
            ),
        )
    except FileNotFoundError:
        raise SwarmClientError(
            f"{path}: no identities file yet; `ntm swarm` writes it once its identities are "
            "registered (wait for `ready` in its `ntm status`)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SwarmClientError(f"{path}: not an identities file of `ntm swarm` ({exc})") from None


def resolve(
    name: str, vip: str, server: tuple[str, int] = ("127.0.0.53", 53), timeout: float = 5.0
) -> list[str]:
    """The IPv4 addresses of `name`, asked from `vip` (so for that identity)."""
    query = DNSRecord.question(name, "A")
    query.header.id = secrets.randbelow(65536)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((vip, 0))
        sock.settimeout(timeout)
        sock.connect(server)
        sock.send(query.pack())
        try:
            while True:
                reply = DNSRecord.parse(sock.recv(4096))
                if reply.header.id == query.header.id and reply.q.qname == query.q.qname:
                    break
        except TimeoutError:
            raise SwarmClientError(f"no answer for {name} from {server[0]}:{server[1]}") from None
    addresses = [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]
    if not addresses:
        raise SwarmClientError(f"{name}: no A record (rcode {reply.header.rcode})")
    return addresses
