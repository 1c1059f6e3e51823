"""The load balancer's desired and observed state, independent of the backend.

Both backends (IPVS through netlink, nftables) read and apply these same values, so the
reconciler that diffs them is shared and the config file means the same on either kernel.
"""

from __future__ import annotations

import dataclasses
import enum


class Protocol(enum.Enum):
    TCP = "tcp"
    UDP = "udp"


class Scheduler(enum.Enum):
    RR = "rr"
    WRR = "wrr"
    LC = "lc"
    WLC = "wlc"
    SH = "sh"
    MH = "mh"


class Forwarding(enum.Enum):
    NAT = "nat"  # masquerading: the only method the suite uses (see README)


@dataclasses.dataclass(frozen=True, order=True)
class ServiceKey:
    """A virtual service is identified by address, port and protocol (as in ipvsadm)."""

    address: str
    port: int
    protocol: Protocol


@dataclasses.dataclass(frozen=True)
class RealServer:
    address: str
    port: int
    weight: int = 1  # 0 = quiescent: no new clients (health check failed, inhibit mode)
    forwarding: Forwarding = Forwarding.NAT


@dataclasses.dataclass(frozen=True)
class VirtualService:
    key: ServiceKey
    scheduler: Scheduler
    persistence: int | None = None  # seconds; None = no persistence
    persistence_netmask: str | None = None  # e.g. "255.255.255.255" or "/128"
    reals: tuple[RealServer, ...] = ()


@dataclasses.dataclass(frozen=True)
class LbState:
    services: tuple[VirtualService, ...] = ()

    def by_key(self) -> dict[ServiceKey, VirtualService]:
        return {s.key: s for s in self.services}
