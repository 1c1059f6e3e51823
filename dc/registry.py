"""The DC's registry of nodes (sans-IO): who is registered, where they are, what they hold.

A plain node has one record per FQDN; a newer registration replaces the older one (the node
moved or reconnected). A multi-gateway service has one record per gateway name under its
FQDN; all of them share the FQDN's vIP (the pool allocates by FQDN), and each connects,
disconnects and expires on its own. One FQDN is either kind: a registration of the other
kind is refused while a record of the first kind is still connected.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress

from ntm_proto.messages import Endpoint
from ntm_proto.pool import VipPool

from .gateways import Gateway, Health


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
    gateway: str = ""  # its gateway name when it is one of several fronting `fqdn`
    weight: int = 100
    connected_since: float = 0.0  # start of its current run of being connected
    health: Health | None = None  # its latest GatewayReport
    ordinary_clients: bool = True  # DNS may send non-NTM clients to its public addresses

    @property
    def label(self) -> str:
        return f"{self.fqdn} via {self.gateway}" if self.gateway else self.fqdn

    def as_gateway(self) -> Gateway:
        return Gateway(
            self.gateway, self.weight, self.handle is not None, self.connected_since, self.health
        )

    @property
    def behind_nat(self) -> bool:
        """NAT is detected when the DC sees the node from an address it did not report."""
        return self.seen[0] not in {addr for addr, _ in self.reported}

    @property
    def families(self) -> frozenset[int]:
        """IP families the node can use for tunnels (those it has an address of)."""
        addrs = [a for a, _ in self.reported] + [self.seen[0]]
        return frozenset(ip_of(a).version for a in addrs)

    def public_endpoints(self) -> tuple[Endpoint, ...]:
        """Where others can reach the node's tunnel port.

        Not behind NAT, the DC reached the node at one of the addresses it reported, so
        those are reachable (global or not: a private network without NAT works too).
        Behind NAT, only its global addresses and the NAT's public address count; the
        latter is a hint, since the NAT's mapping for the tunnel port is unknown.
        """
        seen_ip = ip_of(self.seen[0])
        behind_nat = self.behind_nat
        out: list[Endpoint] = []
        for addr, _ in self.reported:
            ip = ip_of(addr)
            if ip.is_link_local or (ip.is_loopback and not seen_ip.is_loopback):
                continue
            if not behind_nat or _is_global(addr):
                out.append((addr, self.tunnel_port))
        if behind_nat and _is_global(self.seen[0]):
            out.append((self.seen[0], self.tunnel_port))
        return tuple(out)

    def public_addresses(self) -> list[str]:
        return [addr for addr, _ in self.public_endpoints()]


# Parsing an address string is most of what planning a direction costs; every request
# asks again about the same few addresses. Bounded caches: addresses come from the network.
@functools.lru_cache(maxsize=8192)
def ip_of(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """`ipaddress.ip_address`, cached (the objects are immutable)."""
    return ipaddress.ip_address(addr)


# Documentation prefixes count as global here: the lab's "internet" uses them.
_DOC_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("198.51.100.0/24", "203.0.113.0/24", "192.0.2.0/24", "2001:db8::/32")
)


@functools.lru_cache(maxsize=8192)
def _is_global(addr: str) -> bool:
    ip = ip_of(addr)
    doc = any(ip in net for net in _DOC_NETS)
    return doc or (ip.is_global and not ip.is_multicast)


class KindConflict(Exception):
    """A plain registration for a multi-gateway service's FQDN, or the reverse."""


class Registry:
    def __init__(self, pool: VipPool, lifetime: int = 300) -> None:
        self.pool = pool
        self.lifetime = lifetime
        self._nodes: dict[str, NodeRecord] = {}
        self._gateways: dict[str, dict[str, NodeRecord]] = {}  # fqdn -> gateway -> record

    def __len__(self) -> int:
        return len(self._nodes) + sum(len(g) for g in self._gateways.values())

    def register(
        self,
        fqdn: str,
        static_key: bytes,
        tunnel_port: int,
        reported: tuple[Endpoint, ...],
        seen: Endpoint,
        now: float,
        handle: object = None,
        gateway: str = "",
        weight: int = 100,
        ordinary_clients: bool = True,
    ) -> NodeRecord:
        """Record a registration; KindConflict when the FQDN is live as the other kind."""
        self._check_kind(fqdn, gateway)
        previous = self._gateways.get(fqdn, {}).get(gateway) if gateway else self._nodes.get(fqdn)
        vip = self.pool.allocate(fqdn)  # stable: same FQDN, same vIP
        # A refresh, or a new connection while the old one still lives (an address move),
        # continues the run of being connected; after a gap the hold-down starts afresh.
        still_up = previous is not None and previous.handle is not None
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
            gateway=gateway,
            weight=weight,
            connected_since=previous.connected_since if previous and still_up else now,
            health=previous.health if previous else None,
            ordinary_clients=ordinary_clients,
        )
        if gateway:
            self._nodes.pop(fqdn, None)
            self._gateways.setdefault(fqdn, {})[gateway] = record
        else:
            self._gateways.pop(fqdn, None)
            self._nodes[fqdn] = record
        return record

    def _check_kind(self, fqdn: str, gateway: str) -> None:
        if gateway:
            plain = self._nodes.get(fqdn)
            if plain is not None and plain.handle is not None:
                raise KindConflict(
                    f"{fqdn} is registered by a single-gateway adaptor or node that is still "
                    "connected; give every adaptor of the service a gateway name"
                )
        else:
            live = sorted(n for n, r in self._gateways.get(fqdn, {}).items() if r.handle)
            if live:
                raise KindConflict(
                    f"{fqdn} is served by the gateways {', '.join(live)}; register as one "
                    "of them (set [adaptor] gateway to this gateway's own name)"
                )

    def lookup(self, fqdn: str) -> NodeRecord | None:
        """The node registered as `fqdn`; for a multi-gateway service, a representative
        (the first connected gateway by name): use `gateways` to see them all."""
        if fqdn in self._nodes:
            return self._nodes[fqdn]
        gws = sorted(self._gateways.get(fqdn, {}).values(), key=lambda r: r.gateway)
        connected = [r for r in gws if r.handle is not None]
        return next(iter(connected or gws), None)

    def gateways(self, fqdn: str) -> list[NodeRecord]:
        """The gateways of a multi-gateway service, by name; [] for anything else."""
        return sorted(self._gateways.get(fqdn, {}).values(), key=lambda r: r.gateway)

    def gateway(self, fqdn: str, name: str) -> NodeRecord | None:
        return self._gateways.get(fqdn, {}).get(name)

    def is_multi_gateway(self, fqdn: str) -> bool:
        return bool(self._gateways.get(fqdn))

    def on_handle(self, fqdn: str, handle: object) -> NodeRecord | None:
        """The record for `fqdn` registered on this connection (plain or one gateway)."""
        for record in (self._nodes.get(fqdn), *self._gateways.get(fqdn, {}).values()):
            if record is not None and record.handle is handle:
                return record
        return None

    def addresses(self, name: str) -> list[str]:
        """Public addresses for DNS answers, only of nodes that take ordinary clients: a
        node's own; for a multi-gateway service, those of every connected gateway (falling
        back as the code says rather than going dark); for a gateway's own name, its own."""
        if name in self._nodes:
            records = [r for r in [self._nodes[name]] if r.ordinary_clients]
        elif name in self._gateways:
            gateways = self.gateways(name)
            ordinary = [r for r in gateways if r.ordinary_clients]
            # The name must keep resolving while the ordinary-client gateways are down:
            # an NTM node only needs the answer to exist (its traffic follows the tunnel).
            records = (
                [r for r in ordinary if r.handle is not None]
                or ordinary
                or [r for r in gateways if r.handle is not None]
                or gateways
            )
        else:
            records = [
                r
                for g in self._gateways.values()
                for r in g.values()
                if r.gateway == name and r.ordinary_clients
            ]
        out: list[str] = []
        for record in records:
            out += [a for a in record.public_addresses() if a not in out]
        return out

    def by_handle(self, handle: object) -> list[NodeRecord]:
        return [r for r in self.records() if r.handle is handle]

    def disconnected(self, handle: object) -> None:
        """The node's control connection closed: keep its vIP, forget how to reach it."""
        for record in self.by_handle(handle):
            record.handle = None

    def expire(self, now: float) -> list[str]:
        """Drop lapsed registrations; their labels (`fqdn`, or `fqdn via gateway`)."""
        gone = [r.label for r in self._nodes.values() if r.expires_at <= now]
        self._nodes = {k: r for k, r in self._nodes.items() if r.expires_at > now}
        for fqdn, gws in list(self._gateways.items()):
            gone += [r.label for r in gws.values() if r.expires_at <= now]
            kept = {k: r for k, r in gws.items() if r.expires_at > now}
            if kept:
                self._gateways[fqdn] = kept
            else:
                del self._gateways[fqdn]  # the vIP stays reserved for the name in the pool
        return gone

    def records(self) -> list[NodeRecord]:
        return [*self._nodes.values(), *(r for g in self._gateways.values() for r in g.values())]
