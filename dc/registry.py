"""The DC's registry of nodes (sans-IO): who is registered, where they are, what they hold."""

from __future__ import annotations

import dataclasses
import ipaddress

from ntm_proto.messages import Endpoint
from ntm_proto.pool import VipPool


@dataclasses.dataclass
class NodeRecord:
    fqdn: str
    vip: str
    static_key: bytes
    tunnel_port: int
    reported: tuple[Endpoint, ...]  # the node's own addresses, as it reported them
    seen: Endpoint  # its control connection's source, as the DC sees it
    registered_at: float
    expires_at: float
    handle: object = None  # the control connection the node is reachable on

    @property
    def behind_nat(self) -> bool:
        """NAT is detected when the DC sees the node from an address it did not report."""
        return self.seen[0] not in {addr for addr, _ in self.reported}

    @property
    def families(self) -> frozenset[int]:
        """IP families the node can use for tunnels (those it has an address of)."""
        addrs = [a for a, _ in self.reported] + [self.seen[0]]
        return frozenset(ipaddress.ip_address(a).version for a in addrs)

    def public_endpoints(self) -> tuple[Endpoint, ...]:
        """Where others can reach the node's tunnel port.

        Not behind NAT, the DC reached the node at one of the addresses it reported, so
        those are reachable (global or not: a private network without NAT works too).
        Behind NAT, only its global addresses and the NAT's public address count; the
        latter is a hint, since the NAT's mapping for the tunnel port is unknown.
        """
        seen_ip = ipaddress.ip_address(self.seen[0])
        out: list[Endpoint] = []
        for addr, _ in self.reported:
            ip = ipaddress.ip_address(addr)
            if ip.is_link_local or (ip.is_loopback and not seen_ip.is_loopback):
                continue
            if not self.behind_nat or _is_global(addr):
                out.append((addr, self.tunnel_port))
        if self.behind_nat and _is_global(self.seen[0]):
            out.append((self.seen[0], self.tunnel_port))
        return tuple(out)

    def public_addresses(self) -> list[str]:
        return [addr for addr, _ in self.public_endpoints()]


def _is_global(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    # Documentation prefixes count as global here: the lab's "internet" uses them.
    doc = (
        ip in ipaddress.ip_network("198.51.100.0/24")
        or ip in ipaddress.ip_network("203.0.113.0/24")
        or ip in ipaddress.ip_network("192.0.2.0/24")
        or ip in ipaddress.ip_network("2001:db8::/32")
    )
    return doc or (ip.is_global and not ip.is_multicast)


class Registry:
    def __init__(self, pool: VipPool, lifetime: int = 300) -> None:
        self.pool = pool
        self.lifetime = lifetime
        self._nodes: dict[str, NodeRecord] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def register(
        self,
        fqdn: str,
        static_key: bytes,
        tunnel_port: int,
        reported: tuple[Endpoint, ...],
        seen: Endpoint,
        now: float,
        handle: object = None,
    ) -> NodeRecord:
        vip = self.pool.allocate(fqdn)  # stable: same FQDN, same vIP
        record = NodeRecord(
            fqdn=fqdn,
            vip=vip,
            static_key=static_key,
            tunnel_port=tunnel_port,
            reported=reported,
            seen=seen,
            registered_at=now,
            expires_at=now + self.lifetime * 2,  # a missed refresh is not yet an expiry
            handle=handle,
        )
        self._nodes[fqdn] = record
        return record

    def lookup(self, fqdn: str) -> NodeRecord | None:
        return self._nodes.get(fqdn)

    def by_handle(self, handle: object) -> list[NodeRecord]:
        return [r for r in self._nodes.values() if r.handle is handle]

    def disconnected(self, handle: object) -> None:
        """The node's control connection closed: keep its vIP, forget how to reach it."""
        for record in self.by_handle(handle):
            record.handle = None

    def expire(self, now: float) -> list[str]:
        gone = [name for name, r in self._nodes.items() if r.expires_at <= now]
        for name in gone:
            del self._nodes[name]  # the vIP stays reserved for the name in the pool
        return gone

    def records(self) -> list[NodeRecord]:
        return list(self._nodes.values())
