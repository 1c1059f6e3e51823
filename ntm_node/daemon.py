"""`ntm node`: the NTM endpoint daemon, wiring the engine, the DC client, DNS and netlink."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

from ntm_io.daemon import serve_until_signalled
from ntm_io.netwatch import AddressSet, AddressWatcher, current_addresses
from ntm_io.status import AdminError, admin_socket_path, serve_admin, serve_status
from ntm_io.tun import TunDevice
from ntm_proto.crypto import StaticKey
from ntm_proto.marker import MarkerRule
from ntm_proto.messages import (
    ErrorCode,
    ErrorMessage,
    Message,
    PathRole,
    RegistrationResponse,
    RouteDirection,
    RouteDirectionAck,
)
from ntm_proto.multihome import MultihomePolicy
from ntm_proto.path import PathState, TunnelPath

from . import dns_redirect, dns_server
from .config import NodeConfig
from .dc_client import DcClient, DirectionError
from .dns_server import StubResolver
from .engine import PathError, TunnelEngine
from .failover import FailoverManager, probe_other_families
from .multihome import MultihomeManager
from .renewal import PathRenewer

log = logging.getLogger("ntm.node")

REFRESH_ATTEMPTS = 3
REFRESH_WAIT = 10.0  # for a registration to come back after a move


def load_or_create_key(path: str) -> StaticKey:
    """The node's static X25519 key: its public half is what the DC vouches for."""
    p = Path(path)
    if p.is_file():
        return StaticKey.from_private_bytes(p.read_bytes())
    key = StaticKey.generate()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes())
    log.info("created static key %s", p)
    return key


class NodeDaemon:
    def __init__(self, config: NodeConfig, addresses: AddressSet | None = None) -> None:
        self.config = config
        self.started = time.monotonic()
        self.static_key = load_or_create_key(config.key_file)
        self.engine = TunnelEngine(
            self.static_key,
            config.tunnel_port,
            config.keepalive_interval,
            addresses=config.tunnel_addresses,
        )
        # A swarm passes what its one watcher knows: a dump per identity costs ~150 ms.
        self.addresses: AddressSet = (
            addresses
            if addresses is not None
            else current_addresses(ignore_ifaces=self.ignored_interfaces())
        )
        self.dc = DcClient(
            config,
            self.static_key.public_bytes(),
            addresses=self.tunnel_address_set,
            on_push=self._on_push,
            on_registered=self._on_registered,
        )
        self.failover = FailoverManager(
            self.engine,
            lambda fqdn, gateway: self.dc.request_direction(fqdn, gateway=gateway),
            config.liveness_timers(),
            probe_idle=config.probe_idle_paths,
        )
        # Renew the paths we asked for before their lifetime ends (ntm_proto/renewal.py).
        self.renewal = PathRenewer(
            self.engine, lambda fqdn, gateway: self.dc.request_direction(fqdn, gateway=gateway)
        )
        # Several uplinks, each path ready on all of them (make-before-break).
        self.multihome: MultihomeManager | None = None
        if config.make_before_break:
            policy = MultihomePolicy(config.tunnel_addresses, config.standby_interval)
            policy.set_available(self.addresses.interface_of())
            self.multihome = MultihomeManager(self.engine, policy)
        self.tun: TunDevice | None = None
        self.resolver: StubResolver | None = None
        self.watcher: AddressWatcher | None = None
        self._moved = False
        self._closers: list[Any] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def ignored_interfaces(self) -> tuple[str, ...]:
        """Interfaces whose addresses are never offered to the DC as tunnel endpoints: our
        TUN (an NTMA subclass adds its private service side)."""
        return (self.config.tun_name,)

    def tunnel_address_set(self) -> AddressSet:
        """The addresses we offer the DC as tunnel endpoints: with [node] tunnel_addresses,
        only those of them the host has now (our sockets are bound to them alone)."""
        only = self.config.tunnel_addresses
        if not only:
            return self.addresses
        a = self.addresses
        return dataclasses.replace(
            a,
            ipv4=tuple(x for x in a.ipv4 if x in only),
            ipv6=tuple(x for x in a.ipv6 if x in only),
        )

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start_identity(self) -> None:
        """What makes this node an identity: the engine, the DC client, gateway failover.
        A swarm starts only this per identity and shares the host-level rest."""
        self.engine.open()
        self._spawn(self.dc.run())
        self._spawn(self.failover.run())
        self._spawn(self.renewal.run())
        if self.multihome is not None:
            self.multihome.policy.set_available(self.addresses.interface_of())
            self._spawn(self.multihome.run())

    async def start(self) -> None:
        cfg = self.config
        self.watcher = AddressWatcher(
            self._addresses_changed, ignore_ifaces=self.ignored_interfaces()
        )
        self.addresses = await self.watcher.start()
        await self.start_identity()
        if cfg.dns.enabled:
            self.resolver = StubResolver(
                listen=cfg.dns.listen,
                upstreams=[(u, 53) for u in cfg.dns.upstreams],
                marker=MarkerRule(cfg.mark),
                directions=self.directions,
                direction_timeout=cfg.dns.direction_timeout,
                upstream_timeout=cfg.dns.upstream_timeout,
            )
            await self.resolver.start()
            if cfg.dns.redirect:
                dns_server.UPSTREAM_MARK = dns_redirect.MARK
                dns_redirect.install(cfg.name, cfg.dns.listen[1])
                log.info(
                    "catching port 53 with nftables (table %s)", dns_redirect.table_name(cfg.name)
                )
        self._closers.append(await serve_status(cfg.status_socket, self.status))
        admin = {"forget-paths": self.forget_paths}
        if self.multihome is not None:
            admin["prefer"] = self.multihome.prefer
        self._closers.append(await serve_admin(admin_socket_path(cfg.status_socket), admin))
        log.info("node %s (%s) started; tunnel port %d", cfg.name, cfg.fqdn, cfg.tunnel_port)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.resolver is not None:
            await self.resolver.close()
            if self.config.dns.redirect:
                dns_redirect.remove(self.config.name)
        if self.watcher is not None:
            self.watcher.close()
        for closer in self._closers:
            closer.close()
        self.engine.close()
        if self.tun is not None:
            self.tun.close()
        with contextlib.suppress(Exception):
            await self.dc._drop_connection()

    # --- control plane -------------------------------------------------------------------

    def _on_registered(self, resp: RegistrationResponse) -> None:
        route = f"{resp.vip_network}/{resp.vip_prefix_len}"
        if self.tun is None:
            self.tun = TunDevice(self.config.tun_name, self.config.mtu)
            self.tun.configure(resp.vip, 32, mtu=self.config.mtu, routes=[route])
            self.engine.attach_tun(self.tun, resp.vip)
        elif self.engine.local_vip != resp.vip:
            # The DC lost our assignment: follow it, old paths are useless now.
            log.warning("vIP changed %s -> %s", self.engine.local_vip, resp.vip)
            self.tun.configure(resp.vip, 32, mtu=self.config.mtu, routes=[route])
            self.engine.set_local_vip(resp.vip)
        if self._moved:
            self._moved = False
            self._spawn(self._refresh_paths())

    async def _on_push(self, rd: RouteDirection) -> Message:
        try:
            self.engine.add_path(rd)
        except Exception as exc:  # never let one bad direction take the daemon down
            log.warning("cannot install path %s: %s", rd.path_id.hex(), exc)
            return ErrorMessage(ErrorCode.INTERNAL, str(exc)[:200])
        return RouteDirectionAck(rd.path_id)

    async def directions(self, fqdn: str) -> str:
        """Called by the stub resolver for a marked name: the peer's vIP once the tunnel is up."""
        existing = self.engine.path_for_fqdn(fqdn)
        if existing is not None and self._usable(existing):
            rd = self.engine.route_direction(existing.path_id)
            if rd is not None:
                return rd.peer_vip
        try:
            return await self._build_path(fqdn)
        except (TimeoutError, DirectionError, PathError) as exc:
            log.warning("no tunnel to %s: %s", fqdn, exc or "timeout")
            raise

    def _usable(self, path: TunnelPath) -> bool:
        """Established, and we still have an address of the family its peer uses."""
        if path.state is not PathState.ESTABLISHED or path.peer_address is None:
            return False
        v6 = ":" in path.peer_address[0]
        return bool(self.addresses.ipv6 if v6 else self.addresses.ipv4)

    async def _build_path(self, fqdn: str, gateway: str = "") -> str:
        started = time.monotonic()
        rd = await self.dc.request_direction(fqdn, gateway=gateway)
        self.engine.add_path(rd)
        await self.engine.wait_established(rd.path_id, self.config.dns.direction_timeout)
        if rd.gateway:
            # Direction round trip + handshake with a gateway, and until traffic comes
            # back through it: what a switch costs (C).
            self.failover.path_built(rd.path_id, started)
        return rd.peer_vip

    async def _refresh_paths(self) -> None:
        """After a move, ask again for every tunnel we initiated: the route may change
        (new family, new NAT). A registration superseded mid-way is simply retried."""
        peers = {
            rd.peer_fqdn
            for path in self.engine.endpoint.paths
            if (rd := self.engine.route_direction(path.path_id)) is not None
            and rd.role is PathRole.INITIATOR
        }
        try:
            for fqdn in sorted(peers):
                # Through the gateway we use now: a move is no reason to change gateways.
                gateway = self.failover.gateway_for(fqdn)
                for _attempt in range(REFRESH_ATTEMPTS):
                    try:
                        await asyncio.wait_for(self.dc.registered.wait(), REFRESH_WAIT)
                        await self._build_path(fqdn, gateway)
                        break
                    except (TimeoutError, DirectionError, PathError) as exc:
                        log.info(
                            "refreshing the tunnel to %s: %s; retrying", fqdn, exc or "timeout"
                        )
        finally:
            self.failover.resume(time.monotonic())

    def _addresses_changed(self, addresses: AddressSet) -> None:
        log.info("addresses now v4=%s v6=%s", list(addresses.ipv4), list(addresses.ipv6))
        self.addresses = addresses
        # With several uplinks the paths move to another leg at once; when every one of
        # them still has a leg, nothing needs rebuilding (and no silence is coming).
        covered = self.multihome is not None and self.multihome.addresses_changed(addresses)
        if covered:
            self.dc.addresses_changed()
            return
        # Our own move silences paths for a while: not a gateway failure.
        self.failover.pause(time.monotonic())
        if not addresses.all:
            return  # between networks: nothing to register from yet
        self._moved = True
        self.dc.addresses_changed()
        try:
            self.engine.local_address_changed()
            if probe_other_families(self.engine.endpoint, addresses, time.monotonic()):
                self.engine.flush()
        except Exception:
            log.exception("telling the tunnels about the new address failed")

    def forget_paths(self, request: dict[str, Any]) -> dict[str, Any]:
        """Admin `forget-paths`: drop every path to one peer, so the next lookup of its name
        builds a new tunnel (the benchmark's fresh set-ups, without restarting the node)."""
        fqdn = request.get("fqdn")
        if not isinstance(fqdn, str) or not fqdn.strip("."):
            raise AdminError('forget-paths needs "fqdn", the peer\'s name (cn2.ntm.example.com)')
        fqdn = fqdn.lower().rstrip(".")
        gone = [
            path.path_id
            for path in self.engine.endpoint.paths
            if (rd := self.engine.route_direction(path.path_id)) is not None
            and rd.peer_fqdn.lower().rstrip(".") == fqdn
        ]
        for path_id in gone:
            self.engine.remove_path(path_id)
        log.info("admin: forgot %d path(s) to %s", len(gone), fqdn)
        return {"fqdn": fqdn, "removed": [p.hex() for p in gone]}

    def status(self) -> dict[str, Any]:
        reg = self.dc.registration
        return {
            "role": "node",
            "name": self.config.name,
            "fqdn": self.config.fqdn,
            "vip": reg.vip if reg else None,
            "registered": self.dc.registered.is_set(),
            "behind_nat": reg.behind_nat if reg else None,
            "seen_by_dc": list(reg.seen) if reg else None,
            "dc_error": self.dc.last_error,
            "addresses": {"ipv4": list(self.addresses.ipv4), "ipv6": list(self.addresses.ipv6)},
            "paths": self.engine.status(),
            "tunnel_addresses": list(self.config.tunnel_addresses),
            "failover": self.failover.status(),
            "multihome": self.multihome.status() if self.multihome is not None else None,
            "renewal": self.renewal.status(),
            "counters": {
                "engine": dict(self.engine.counters),
                "multihome": dict(self.multihome.counters) if self.multihome else {},
                "tunnel": dict(self.engine.endpoint.counters),
                "dc": dict(self.dc.counters),
                "dns": dict(self.resolver.counters) if self.resolver else {},
            },
        }


async def run(config: NodeConfig) -> None:
    await serve_until_signalled(NodeDaemon(config))
