"""Virtual IP allocation: one address per FQDN, stable across re-registration and restarts.

A name's first choice is derived from a hash of the FQDN, probing forward on collision, so
the same node gets the same vIP again even when the DC restarted and lost its memory (as
long as the pool is not crowded). A DC may also persist `assignments()` and `restore()` them.
"""

from __future__ import annotations

import hashlib
import ipaddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class PoolExhausted(Exception):
    pass


class VipPool:
    def __init__(self, network: IPNetwork, reserved: tuple[str, ...] = ()) -> None:
        if network.num_addresses < 4:
            raise ValueError(f"vIP pool {network} is too small")
        self.network = network
        self._first = int(network.network_address) + 1  # skip the network address
        self._size = network.num_addresses - 2  # and the broadcast (or last v6) address
        self._by_name: dict[str, int] = {}
        self._by_addr: dict[int, str] = {}
        self._reserved = {int(ipaddress.ip_address(a)) for a in reserved}

    def __len__(self) -> int:
        return len(self._by_name)

    def lookup(self, fqdn: str) -> str | None:
        value = self._by_name.get(fqdn)
        return None if value is None else str(ipaddress.ip_address(value))

    def owner(self, vip: str) -> str | None:
        return self._by_addr.get(int(ipaddress.ip_address(vip)))

    def allocate(self, fqdn: str) -> str:
        if (known := self._by_name.get(fqdn)) is not None:
            return str(ipaddress.ip_address(known))
        digest = hashlib.sha256(fqdn.encode()).digest()
        start = int.from_bytes(digest[:8], "big") % self._size
        for i in range(self._size):
            value = self._first + (start + i) % self._size
            if value not in self._by_addr and value not in self._reserved:
                self._assign(fqdn, value)
                return str(ipaddress.ip_address(value))
        raise PoolExhausted(f"vIP pool {self.network} has no free address")

    def release(self, fqdn: str) -> None:
        value = self._by_name.pop(fqdn, None)
        if value is not None:
            del self._by_addr[value]

    def assignments(self) -> dict[str, str]:
        return {name: str(ipaddress.ip_address(v)) for name, v in self._by_name.items()}

    def restore(self, assignments: dict[str, str]) -> None:
        for name, addr in assignments.items():
            value = int(ipaddress.ip_address(addr))
            if ipaddress.ip_address(addr) in self.network and value not in self._by_addr:
                self._assign(name, value)

    def _assign(self, fqdn: str, value: int) -> None:
        self._by_name[fqdn] = value
        self._by_addr[value] = fqdn
