"""`ntm swarm`: one process plays many mobile nodes (identities), for load tests.

Each identity is a :class:`~ntm_node.daemon.NodeDaemon` (its own static key, tunnel port,
TUN device, DC connection and registration, so it re-registers, hands over and fails over
exactly like a single node) without the parts a host has only once, which the swarm shares:

- one address watcher, started once the identities are up (N watchers would each re-dump
  every interface on every event, and the TUNs' own events would make that quadratic), that
  never dumps the TUNs (:mod:`ntm_node.swarm_netwatch`); a move is passed to every identity;
- one stub resolver (:mod:`ntm_node.swarm_dns`): a query's source vIP picks the identity;
- one status socket: ``role = "swarm"``, a summary per identity and totals;
- a few slots for DC connections (``CONNECT_SLOTS``): after a move every identity
  reconnects, a TLS handshake each (~25 ms of CPU here and as much in the DC). Hundreds
  at once all outlast the connect timeout and start over; a few at a time finish one
  after the other, so the first identities are back at once and the median halfway.

Routing: packets from identity k's vIP leave through TUN k (:mod:`ntm_node.swarm_routing`).
Identities start ``start_concurrency`` at a time; when all are registered (or the start-up
bound has passed), the identities file lists fqdn, vIP and TUN per identity for the load
generator (:mod:`ntm_node.swarm_client` reads it); it is rewritten when a vIP changes.
``ready`` in the status means: file written and every identity registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ntm_io.daemon import serve_until_signalled
from ntm_io.netwatch import AddressSet, current_addresses
from ntm_io.status import serve_status
from ntm_proto.marker import MarkerRule
from ntm_proto.messages import RegistrationResponse
from ntm_proto.path import PathState

from .config import NodeConfig
from .daemon import NodeDaemon
from .swarm_config import SwarmConfig
from .swarm_dns import Directions, SwarmResolver
from .swarm_netwatch import SwarmAddressWatcher
from .swarm_routing import PolicyRoute, PolicyRouting

log = logging.getLogger("ntm.swarm")

FDS_PER_IDENTITY = 8  # tunnel v4+v6, TUN, QUIC, netlink during set-up, and some slack
CONNECT_SLOTS = 8  # DC handshakes under way at once: enough to keep the swarm and DC busy


class SwarmMember(NodeDaemon):
    """One identity: a NodeDaemon whose host-level parts belong to the swarm."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        index: int,
        table: int,
        priority: int,
        swarm_ifaces: tuple[str, ...],
        addresses: AddressSet,
        routing: PolicyRouting,
        on_ready: Callable[[SwarmMember], None],
    ) -> None:
        self.index = index
        self._routing = routing
        self._swarm_ifaces = swarm_ifaces  # before NodeDaemon.__init__ asks for them
        self._table = table
        self._priority = priority
        self._on_ready = on_ready
        self.policy: PolicyRoute | None = None
        self._policy_lock = asyncio.Lock()  # one change at a time (registrations may overlap)
        self.ready = asyncio.Event()  # registered and routed
        self.started_at: float | None = None
        self.ready_after: float | None = None  # seconds from start to first ready
        super().__init__(config, addresses)

    def ignored_interfaces(self) -> tuple[str, ...]:
        # Every swarm TUN: another identity's vIP is no tunnel endpoint for this one.
        return self._swarm_ifaces

    async def start(self) -> None:
        # Only the identity part: the watcher, resolver and status socket are the swarm's.
        self.started_at = time.monotonic()
        await self.start_identity()

    async def close(self) -> None:
        # Deleting a TUN device waits ~20 ms in the kernel; closed in a worker thread, the
        # swarm's identities wait for that side by side instead of one after the other.
        tun, self.tun = self.tun, None
        await super().close()
        if tun is not None:
            await asyncio.to_thread(tun.close)

    def host_addresses_changed(self, addresses: AddressSet) -> None:
        """The swarm's watcher saw the host's addresses change (a move)."""
        self._addresses_changed(addresses)

    def _on_registered(self, resp: RegistrationResponse) -> None:
        new_tun = self.tun is None
        super()._on_registered(resp)  # TUN up with the vIP (or a changed vIP followed)
        assert self.tun is not None
        if new_tun:
            _no_ipv6(self.tun.name)
        route = PolicyRoute(
            table=self._table,
            priority=self._priority,
            vip=resp.vip,
            network=f"{resp.vip_network}/{resp.vip_prefix_len}",
            tun=self.tun.name,
        )
        self._spawn(self._route_vip(route))

    async def _route_vip(self, route: PolicyRoute) -> None:
        try:
            async with self._policy_lock:
                if route != self.policy:
                    if self.policy is not None and self.policy.vip != route.vip:
                        await self._routing.remove([self.policy])
                    await self._routing.install(route)
                    self.policy = route
        except Exception:  # the next registration refresh tries again
            log.exception("%s: policy routing for %s failed", self.config.fqdn, route.vip)
            return
        if not self.ready.is_set():
            self.ready_after = time.monotonic() - (self.started_at or time.monotonic())
            self.ready.set()
        self._on_ready(self)

    def summary(self) -> dict[str, Any]:
        """One line of the swarm's status, read from the parts: building the full node
        status of every identity held the event loop ~50 ms per status request."""
        reg = self.dc.registration
        paths = self.engine.endpoint.paths
        return {
            "index": self.index,
            "fqdn": self.config.fqdn,
            "vip": reg.vip if reg else None,
            "tun": self.config.tun_name,
            "tunnel_port": self.config.tunnel_port,
            "registered": self.dc.registered.is_set(),
            "paths": len(paths),
            "established": sum(1 for p in paths if p.state is PathState.ESTABLISHED),
            "dc_error": self.dc.last_error,
            "failover": self.failover.brief(),
        }


def _no_ipv6(tun: str) -> None:
    """The vIP is IPv4: without IPv6 the TUN sends no router solicitations into the tunnel
    and adds no link-local address and routes, so address dumps stay small."""
    try:
        Path(f"/proc/sys/net/ipv6/conf/{tun}/disable_ipv6").write_text("1")
    except OSError as exc:  # e.g. a read-only /proc/sys in a container: only costs noise
        log.debug("cannot disable IPv6 on %s: %s", tun, exc)


class Swarm:
    member_class: type[SwarmMember] = SwarmMember  # tests start fakes

    def __init__(self, config: SwarmConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.members: dict[int, SwarmMember] = {}  # by position k
        self.by_vip: dict[str, SwarmMember] = {}
        self.addresses = AddressSet()
        self.watcher: SwarmAddressWatcher | None = None
        self.resolver: SwarmResolver | None = None
        self.startup_s: float | None = None
        self.rss_kb_before: int | None = None
        self.rss_kb_ready: int | None = None
        self.identities_written = False
        self._tun_names = tuple(f"{config.tun_prefix}{i}" for i in config.indices())
        self.routing = PolicyRouting()
        self.connect_slots = asyncio.Semaphore(min(CONNECT_SLOTS, config.start_concurrency))
        self._closers: list[Any] = []
        self._starter: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        raise_fd_limit(cfg.count * FDS_PER_IDENTITY + 256)
        tables = range(cfg.route_table, cfg.route_table + cfg.count)
        await self.routing.open()
        await self.routing.purge(cfg.rule_priority, tables)
        self.addresses = current_addresses(ignore_ifaces=self._tun_names)
        self.resolver = SwarmResolver(
            listen=cfg.dns.listen,
            upstreams=[(u, 53) for u in cfg.dns.upstreams],
            marker=MarkerRule(cfg.node.mark),
            identity_for=self.identity_for,
            direction_timeout=cfg.dns.direction_timeout,
            upstream_timeout=cfg.dns.upstream_timeout,
        )
        await self.resolver.start()
        self._closers.append(await serve_status(cfg.status_socket, self.status))
        # In the background: status answers (and signals stop us) while identities start.
        self._starter = asyncio.get_running_loop().create_task(self._start_up())
        log.info(
            "swarm %s: starting %d identities (%s .. %s), %d at a time",
            cfg.name,
            cfg.count,
            cfg.fqdn(cfg.first),
            cfg.fqdn(cfg.first + cfg.count - 1),
            cfg.start_concurrency,
        )

    async def close(self) -> None:
        if self._starter is not None:
            self._starter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starter
        if self.resolver is not None:
            await self.resolver.close()
        if self.watcher is not None:
            self.watcher.close()
        for closer in self._closers:
            closer.close()
        members = list(self.members.values())
        t0 = time.monotonic()
        # Rules first, in one go: should we be killed while closing, nothing is left behind.
        try:
            await self.routing.remove([m.policy for m in members if m.policy is not None])
        except Exception:
            log.exception("removing the policy rules failed")
        # Concurrently: each close may wait up to a second for its DC connection.
        await asyncio.gather(*(m.close() for m in members), return_exceptions=True)
        self.routing.close()
        log.info(
            "swarm %s: %d identities closed in %.1f s",
            self.config.name,
            len(members),
            time.monotonic() - t0,
        )

    async def _start_up(self) -> None:
        await self._start_members()
        freeze_heap()
        await self._watch_addresses()

    async def _start_members(self) -> None:
        cfg = self.config
        self.rss_kb_before = rss_kb()
        slots = asyncio.Semaphore(cfg.start_concurrency)
        await asyncio.gather(*(self._start_member(k, slots) for k in range(cfg.count)))
        ready = [m for m in self.members.values() if m.ready.is_set()]
        self.startup_s = time.monotonic() - self.started
        self.rss_kb_ready = rss_kb()
        self.write_identities()
        per = self.rss_kb_per_identity()
        log.info(
            "swarm %s: %d/%d identities registered in %.1f s; RSS %d KiB (%s KiB per identity)",
            cfg.name,
            len(ready),
            cfg.count,
            self.startup_s,
            self.rss_kb_ready,
            f"{per:.0f}" if per is not None else "?",
        )

    async def _watch_addresses(self) -> None:
        """Only now: while TUNs come up, every one of their events would cost a full dump.
        A move during start-up shows as a difference from the first look."""
        self.watcher = SwarmAddressWatcher(self._addresses_changed, ignore_ifaces=self._tun_names)
        now = await self.watcher.start()
        if now != self.addresses:
            self._addresses_changed(now)

    async def _start_member(self, k: int, slots: asyncio.Semaphore) -> None:
        cfg = self.config
        async with slots:
            try:
                member = self.member_class(
                    cfg.identity(k),
                    index=cfg.first + k,
                    table=cfg.route_table + k,
                    priority=cfg.rule_priority,
                    swarm_ifaces=self._tun_names,
                    addresses=self.addresses,
                    routing=self.routing,
                    on_ready=self._member_ready,
                )
                member.dc.connect_slots = self.connect_slots
                self.members[k] = member
                await member.start()
            except Exception:  # one broken identity must not stop the others
                log.exception("identity %s did not start", cfg.fqdn(cfg.first + k))
                return
            try:
                await asyncio.wait_for(member.ready.wait(), cfg.start_timeout)
            except TimeoutError:
                log.warning(
                    "%s not registered within %g s (%s); it keeps trying",
                    member.config.fqdn,
                    cfg.start_timeout,
                    member.dc.last_error or "no answer",
                )

    def _member_ready(self, member: SwarmMember) -> None:
        old = [vip for vip, m in self.by_vip.items() if m is member]
        vip = member.engine.local_vip
        for stale in old:
            if stale != vip:
                del self.by_vip[stale]
        if vip is not None and vip not in self.by_vip:
            self.by_vip[vip] = member
            if self.identities_written:
                self.write_identities()  # a vIP changed after start-up

    def _addresses_changed(self, addresses: AddressSet) -> None:
        self.addresses = addresses
        for member in list(self.members.values()):
            try:
                member.host_addresses_changed(addresses)
            except Exception:
                log.exception("%s: handling the address change failed", member.config.fqdn)

    def identity_for(self, client: str) -> Directions | None:
        member = self.by_vip.get(client)
        return member.directions if member is not None else None

    # --- reporting -----------------------------------------------------------------------

    def identities(self) -> list[dict[str, Any]]:
        out = []
        for k in sorted(self.members):
            m = self.members[k]
            out.append(
                {
                    "index": m.index,
                    "fqdn": m.config.fqdn,
                    "vip": m.engine.local_vip,
                    "tun": m.config.tun_name,
                    "status": "registered" if m.dc.registered.is_set() else "unregistered",
                }
            )
        return out

    def write_identities(self) -> None:
        """The identities file, replaced atomically: readers never see half a file."""
        cfg = self.config
        idents = self.identities()
        host, port = cfg.dns.listen
        doc = {
            "swarm": cfg.name,
            "dns": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            "count": cfg.count,
            "complete": len(idents) == cfg.count and all(i["vip"] for i in idents),
            "identities": idents,
        }
        path = Path(cfg.identities_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(path)
        self.identities_written = True

    def rss_kb_per_identity(self) -> float | None:
        if self.rss_kb_before is None or self.rss_kb_ready is None or not self.members:
            return None
        return (self.rss_kb_ready - self.rss_kb_before) / len(self.members)

    def status(self) -> dict[str, Any]:
        cfg = self.config
        summaries = [self.members[k].summary() for k in sorted(self.members)]
        totals: dict[str, Any] = {
            "paths": sum(s["paths"] for s in summaries),
            "established": sum(s["established"] for s in summaries),
            "counters": {
                "engine": _sum_counters(m.engine.counters for m in self.members.values()),
                "tunnel": _sum_counters(m.engine.endpoint.counters for m in self.members.values()),
                "dc": _sum_counters(m.dc.counters for m in self.members.values()),
            },
        }
        ready_after = [m.ready_after for m in self.members.values() if m.ready_after is not None]
        registered = sum(1 for s in summaries if s["registered"])
        return {
            "role": "swarm",
            "name": cfg.name,
            "fqdn": cfg.fqdn_template,
            "count": cfg.count,
            "started": len(summaries),
            "registered": registered,
            "ready": self.identities_written and registered == cfg.count,
            "identities_file": cfg.identities_file,
            "startup": {
                "all_done_s": round(self.startup_s, 3) if self.startup_s is not None else None,
                "identity_median_s": round(statistics.median(ready_after), 3)
                if ready_after
                else None,
                "identity_max_s": round(max(ready_after), 3) if ready_after else None,
                "concurrency": cfg.start_concurrency,
            },
            "memory": {
                "rss_kb": rss_kb(),
                "rss_kb_before_identities": self.rss_kb_before,
                "rss_kb_when_started": self.rss_kb_ready,
                "rss_kb_per_identity": (
                    round(per, 1) if (per := self.rss_kb_per_identity()) is not None else None
                ),
            },
            "addresses": {"ipv4": list(self.addresses.ipv4), "ipv6": list(self.addresses.ipv6)},
            "dns": {
                "listen": list(cfg.dns.listen),
                "counters": dict(self.resolver.counters) if self.resolver else {},
            },
            "totals": totals,
            "identities": summaries,
        }


def freeze_heap() -> None:
    """Keep the identities' long-lived objects out of the cyclic garbage collector: with
    200 identities a full collection walked ~150k objects, 120-160 ms with the lab host at
    load 2 and 1.3 s at load 9, every tunnel and the resolver stalled meanwhile; frozen, the
    full collections during moves walked 43k-90k (measured with a gc callback). Garbage
    made before start-up ends is collected first; a frozen object that later dies in a
    reference cycle is never freed, a one-time cost bounded by the start-up heap."""
    gc.collect()
    gc.freeze()


def _sum_counters(dicts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for key, value in d.items():
            out[key] = out.get(key, 0) + value
    return dict(sorted(out.items()))


def rss_kb() -> int:
    """Resident set size of this process now (KiB), from /proc/self/status."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def raise_fd_limit(wanted: int) -> None:
    """Every identity holds a few sockets and a TUN: 200 identities pass the usual 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < wanted:
        log.warning(
            "open files limited to %d by the hard limit; the swarm may need %d", new, wanted
        )


async def run(config: SwarmConfig) -> None:
    await serve_until_signalled(Swarm(config))
