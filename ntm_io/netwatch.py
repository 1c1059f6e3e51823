"""Watch the host's usable addresses with rtnetlink; the trigger for handover.

`current_addresses()` answers "what can I send from right now" synchronously;
`AddressWatcher` calls back whenever that answer changes. Usable means: a unicast
address with global scope (public or private) on an interface that is up and running,
not on an ignored interface (our own TUN), not loopback or link-local, and for IPv6
neither tentative (DAD still running), DAD-failed nor deprecated (a prefix being
withdrawn is exactly what a move to another network looks like).
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ntm_io.tun import run_sync_netlink

log = logging.getLogger(__name__)

# rtnetlink multicast groups (linux/rtnetlink.h); link changes matter because an
# address on an interface that lost carrier is not usable any more.
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
WATCH_GROUPS = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
)

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_RUNNING = 0x40
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
RT_SCOPE_UNIVERSE = 0
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTNH_F_DEAD = 0x1
RTNH_F_LINKDOWN = 0x10

DEBOUNCE_S = 0.01


@dataclass(frozen=True)
class AddressSet:
    """Usable addresses of the host, sorted; compare with == to detect a change."""

    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    has_default_route_v4: bool = False
    has_default_route_v6: bool = False
    # (address, interface name) of each usable address: a multihomed node names its
    # uplinks by interface. Not compared: the addresses are what changes mean.
    interfaces: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def all(self) -> tuple[str, ...]:
        return self.ipv4 + self.ipv6

    def interface_of(self) -> dict[str, str]:
        """address -> interface name, for the usable addresses."""
        return dict(self.interfaces)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for status output."""
        return {
            "ipv4": list(self.ipv4),
            "ipv6": list(self.ipv6),
            "has_default_route_v4": self.has_default_route_v4,
            "has_default_route_v6": self.has_default_route_v6,
        }


def build_address_set(
    links: Iterable[Any], addrs: Iterable[Any], routes: Iterable[Any], ignore_ifaces: Iterable[str]
) -> AddressSet:
    """Pure selection logic over pyroute2 link/addr/route messages (testable offline)."""
    ignore = set(ignore_ifaces)
    usable_links: set[int] = set()
    names: dict[int, str] = {}
    for link in links:
        flags = int(link["flags"])
        if link.get("IFLA_IFNAME") in ignore or flags & IFF_LOOPBACK:
            continue
        if flags & IFF_UP and flags & IFF_RUNNING:
            usable_links.add(int(link["index"]))
            names[int(link["index"])] = str(link.get("IFLA_IFNAME") or "")

    v4: set[ipaddress.IPv4Address] = set()
    v6: set[ipaddress.IPv6Address] = set()
    iface: dict[str, str] = {}
    for msg in addrs:
        if msg["index"] not in usable_links or msg["scope"] != RT_SCOPE_UNIVERSE:
            continue
        flags = msg.get("IFA_FLAGS")
        flags = int(msg["flags"] if flags is None else flags)  # IFA_FLAGS: 32-bit version
        if flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED | IFA_F_DEPRECATED):
            continue
        local = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")  # IFA_ADDRESS is the peer on p2p
        if not local:
            continue
        ip = ipaddress.ip_address(local)
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            continue
        if isinstance(ip, ipaddress.IPv4Address):
            v4.add(ip)
        else:
            v6.add(ip)
        iface[str(ip)] = names.get(int(msg["index"]), "")

    default = {socket.AF_INET: False, socket.AF_INET6: False}
    for rt in routes:
        if rt["dst_len"] != 0 or rt["type"] != RTN_UNICAST or rt["family"] not in default:
            continue
        table = rt.get("RTA_TABLE")
        if (rt["table"] if table is None else table) != RT_TABLE_MAIN:
            continue
        if rt["flags"] & (RTNH_F_DEAD | RTNH_F_LINKDOWN):
            continue
        oif = rt.get("RTA_OIF")
        # multipath routes carry no RTA_OIF; accept them rather than parse nexthops
        if oif is not None and oif not in usable_links:
            continue
        default[rt["family"]] = True

    return AddressSet(
        ipv4=tuple(str(a) for a in sorted(v4)),
        ipv6=tuple(str(a) for a in sorted(v6)),
        has_default_route_v4=default[socket.AF_INET],
        has_default_route_v6=default[socket.AF_INET6],
        interfaces=tuple(sorted(iface.items())),
    )


def current_addresses(ignore_ifaces: Iterable[str] = ()) -> AddressSet:
    """The usable addresses now (blocking; safe to call with or without a running loop)."""
    ignore = tuple(ignore_ifaces)

    def dump() -> AddressSet:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return build_address_set(ipr.link("dump"), ipr.addr("dump"), ipr.route("dump"), ignore)

    return run_sync_netlink(dump)


OnChange = Callable[[AddressSet], Awaitable[None] | None]


class AddressWatcher:
    """Calls `on_change(AddressSet)` when the usable address set changes.

    The first event after a quiet period is evaluated at once (a move must be seen
    quickly); events arriving while or shortly after that are coalesced into one
    more evaluation at most every `debounce` seconds.

    The event socket is a plain rtnetlink socket read in `loop.add_reader`: the
    messages themselves are not parsed, any of them just means "dump again", which
    also covers ENOBUFS (lost events). Dumps use pyroute2's AsyncIPRoute because its
    sync IPRoute cannot run inside a running loop.
    """

    def __init__(
        self,
        on_change: OnChange,
        *,
        ignore_ifaces: Iterable[str] = (),
        debounce: float = DEBOUNCE_S,
    ) -> None:
        self.on_change = on_change
        self.ignore_ifaces = tuple(ignore_ifaces)
        self.debounce = debounce
        self.current: AddressSet | None = None
        self.changes = 0
        self.last_change: float | None = None  # monotonic time of the last report
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._ipr: Any = None
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[Any]] = set()

    async def start(self) -> AddressSet:
        """Subscribe, take the baseline (not reported), and return it."""
        from pyroute2 import AsyncIPRoute

        if self._sock is not None:
            raise RuntimeError("AddressWatcher already started")
        self._loop = asyncio.get_running_loop()
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            socket.NETLINK_ROUTE,
        )
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, WATCH_GROUPS))
            self._ipr = AsyncIPRoute()
            # Subscribe before the baseline dump so no change can fall in between.
            self._sock = sock
            self._loop.add_reader(sock.fileno(), self._on_readable)
            self.current = await self._dump()
            if self._dirty:  # something changed during the baseline dump
                self._kick()
        except BaseException:
            self.close()
            sock.close()
            raise
        return self.current

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:  # drain: one wake-up per burst, not per message
            try:
                if not sock.recv(65536):
                    break
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:  # ENOBUFS: events lost; a dump repairs it
                    log.warning("netlink watch socket: %s", exc)
                    break
        self._dirty = True
        if self.current is not None:  # before the baseline exists, start() kicks
            self._kick()

    def _kick(self) -> None:
        if self._task is None or self._task.done():
            assert self._loop is not None
            self._task = self._loop.create_task(self._run(), name="ntm-netwatch")

    async def _run(self) -> None:
        hurried = False
        while self._dirty:
            self._dirty = False
            try:
                new = await self._dump()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # e.g. dump interrupted by a concurrent change
                log.debug("address dump failed (%s); retrying", exc)
                self._dirty = True
            else:
                if new != self.current:
                    self.current = new
                    self._report(new)
                if not new.all and self._dirty and not hurried:
                    # Between networks (the old one gone mid-move): what changed during
                    # this dump is most likely the new one arriving; look once more at once.
                    hurried = True
                    continue
            hurried = False
            await asyncio.sleep(self.debounce)

    async def _dump(self) -> AddressSet:
        ipr = self._ipr
        links = [m async for m in await ipr.link("dump")]
        addrs = [m async for m in await ipr.addr("dump")]
        routes = [m async for m in await ipr.route("dump")]
        return build_address_set(links, addrs, routes, self.ignore_ifaces)

    def _report(self, new: AddressSet) -> None:
        self.changes += 1
        self.last_change = time.monotonic()
        log.info(
            "addresses now v4=%s v6=%s default v4=%s v6=%s",
            ",".join(new.ipv4) or "-",
            ",".join(new.ipv6) or "-",
            new.has_default_route_v4,
            new.has_default_route_v6,
        )
        try:
            result = self.on_change(new)
        except Exception:
            log.exception("address change callback failed")
            return
        if inspect.isawaitable(result) and self._loop is not None:
            task = self._loop.create_task(_guard(result))
            self._callbacks.add(task)  # keep a reference until done
            task.add_done_callback(self._callbacks.discard)

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in self._callbacks:
            task.cancel()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    async def __aenter__(self) -> AddressWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def _guard(aw: Awaitable[None]) -> None:
    try:
        await aw
    except Exception:
        log.exception("address change callback failed")
