"""The tunnel engine: TUN <-> UDP, asyncio glue over `ntm_proto.endpoint`.

Per wake-up each side is drained until EAGAIN (bounded, so neither side starves the
other), and sockets get large buffers: syscalls and the interpreter, not AES, bound a
userspace tunnel (see docs/performance.md). So packets move in batches: a TUN burst is
sealed, then sent per path in as few `sendmsg` calls as UDP GSO allows; a GRO read is
split into its datagrams; what they carry goes into the TUN through `write_batch`, which
merges TCP segments (`ntm_io.udp_batch`, `ntm_io.tun_offload`). Nothing waits for more
packets to arrive: a batch is what one wake-up found. All protocol decisions live in
ntm_proto.

Sockets: by default one wildcard socket per family. With `addresses` (`[node]
tunnel_addresses`, a host with several uplinks) one socket per address instead, and each
path sends from the socket its latest authenticated packet arrived on, so a reply leaves
by the uplink the request came in on (split access, with `ip rule from <address>`).
A multihomed node (`ntm_node.multihome`) instead chooses each path's socket itself
(`use_leg`) and keeps its other sockets ready with standby probes (`send_standby`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from ntm_io.sockets import big_buffers
from ntm_io.udp_batch import BatchSender, enable_gro, recv_segments, split_segments
from ntm_proto.crypto import EphemeralSource, StaticKey
from ntm_proto.endpoint import TunnelEndpoint
from ntm_proto.errors import LocalProtocolError
from ntm_proto.messages import Endpoint, PathRole, RouteDirection, RouteKind
from ntm_proto.path import (
    HandshakeFailed,
    PathConfig,
    PathEstablished,
    PathEvent,
    PathIdle,
    PathState,
    PeerAddressChanged,
    ProbeResult,
    StandbyProbeResult,
    TunnelPath,
)
from ntm_proto.relay_binding import BindingType, RelayBinder

log = logging.getLogger("ntm.engine")

MAX_BATCH = 256  # packets handled per wake-up and direction before yielding
TUN_BATCH = 64  # packets read from the TUN before they are sealed and sent (GSO runs)
BIND_ACK = bytes([BindingType.BIND_ACK])
IP_FREEBIND = 15  # linux/in.h; bind an address that is not (yet) configured, e.g. tentative v6

ProbeListener = Callable[[bytes, ProbeResult], None]
StandbyListener = Callable[[bytes, StandbyProbeResult], None]
SendListener = Callable[[list[TunnelPath], float], None]  # the paths that sealed data, and when


class PacketDevice(Protocol):
    def fileno(self) -> int: ...
    def read_batch(self, max_packets: int = 64) -> list[bytes]: ...
    def write(self, packet: bytes) -> bool: ...


class PathError(Exception):
    """A tunnel could not be built (handshake failed or timed out)."""


class TunnelEngine:
    def __init__(
        self,
        static_key: StaticKey,
        port: int,
        keepalive_interval: float = 15.0,
        on_path_change: Callable[[], None] | None = None,
        addresses: tuple[str, ...] = (),
    ) -> None:
        self.static_key = static_key
        self.port = port
        self.addresses = addresses  # empty: wildcard sockets
        self.keepalive_interval = keepalive_interval
        self.endpoint = TunnelEndpoint()
        self.local_vip: str | None = None
        self._local_vip_bytes = b""
        self.tun: PacketDevice | None = None
        self.counters: dict[str, int] = {}
        self._socks: dict[int, socket.socket] = {}  # family -> the default socket
        self._bound: list[socket.socket] = []  # every socket we read
        # path id -> the socket its latest authenticated packet came in on (with addresses)
        self._path_sock: dict[bytes, socket.socket] = {}
        # path id -> the socket a multihomed node chose for it (wins over _path_sock)
        self._leg_sock: dict[bytes, socket.socket] = {}
        self._by_address: dict[str, socket.socket] = {}  # with addresses: address -> socket
        self.probe_listeners: list[ProbeListener] = []
        self.standby_listeners: list[StandbyListener] = []
        self.send_listeners: list[SendListener] = []  # failover without idle probing
        # inner destination address (packed) -> the path that carries it now
        self._route: dict[bytes, TunnelPath] = {}
        self._meta: dict[bytes, RouteDirection] = {}
        self._peer_vip: dict[bytes, bytes] = {}  # path id -> the only inner source it may use
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._binders: dict[bytes, RelayBinder] = {}  # relayed paths: proof toward the relay
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_path_change = on_path_change
        self._sender = BatchSender(self.counters)
        # Handshake ephemerals made ahead, refilled on the loop pass after one is taken:
        # a set-up does not wait for key generation.
        self.ephemerals = EphemeralSource(on_low=self._refill_soon)
        self._refilling = False

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    # --- set-up --------------------------------------------------------------------------

    def open(self) -> None:
        """Bind the tunnel port on IPv4 and IPv6 (separately: no v4-mapped addresses), or
        on each of `addresses`."""
        self._loop = asyncio.get_running_loop()
        self.ephemerals.refill()
        binds = [(socket.AF_INET6 if ":" in a else socket.AF_INET, a) for a in self.addresses] or [
            (socket.AF_INET, "0.0.0.0"),
            (socket.AF_INET6, "::"),
        ]
        for family, host in binds:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if self.addresses:
                sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            big_buffers(sock)
            enable_gro(sock)
            sock.setblocking(False)
            try:
                sock.bind((host, self.port))
            except OSError as exc:
                sock.close()
                if family == socket.AF_INET6 and not socket.has_ipv6 and not self.addresses:
                    continue
                self.close()
                raise OSError(
                    f"cannot bind the tunnel port {host}:{self.port}: {exc}; "
                    "is another node running, or pick another [node] tunnel_port"
                ) from exc
            self._socks.setdefault(family, sock)
            self._bound.append(sock)
            if self.addresses:
                self._by_address[host] = sock
            self._loop.add_reader(sock.fileno(), self._on_udp, sock)

    def attach_tun(self, tun: PacketDevice, local_vip: str) -> None:
        assert self._loop is not None
        if self.tun is not None:
            self._loop.remove_reader(self.tun.fileno())
        self.tun = tun
        self.set_local_vip(local_vip)
        self._loop.add_reader(tun.fileno(), self._on_tun)

    def set_local_vip(self, vip: str) -> None:
        self.local_vip = vip
        self._local_vip_bytes = ipaddress.IPv4Address(vip).packed

    def close(self) -> None:
        if self._loop is not None:
            for sock in self._bound:
                self._loop.remove_reader(sock.fileno())
                self._sender.forget(sock)
                sock.close()
            if self.tun is not None:
                self._loop.remove_reader(self.tun.fileno())
        self._socks.clear()
        self._bound.clear()
        self._path_sock.clear()
        self._leg_sock.clear()
        self._by_address.clear()
        if self._timer:
            self._timer.cancel()

    # --- paths ---------------------------------------------------------------------------

    def add_path(self, rd: RouteDirection, handshake_retry: float | None = None) -> TunnelPath:
        """Install the path a Route Direction describes; the initiator starts the handshake.

        `handshake_retry` overrides the first INIT retry (a failover cannot wait 1 s)."""
        if self.local_vip is None:
            raise LocalProtocolError("no vIP yet: register with the DC first")
        now, wall = time.monotonic(), time.time_ns()
        config = PathConfig(
            path_id=rd.path_id,
            role=rd.role,
            local_static=self.static_key,
            peer_static_public=rd.peer_key,
            local_vip=self.local_vip,
            peer_vip=rd.peer_vip,
            peer_endpoints=self._usable(rd.peer_endpoints),
            keepalive_interval=self.keepalive_interval,
            ephemerals=self.ephemerals,
        )
        if handshake_retry is not None:
            config = dataclasses.replace(config, handshake_retry=handshake_retry)
        if rd.kind is RouteKind.RELAY and rd.relay is not None:
            # Bind our side at the relay first: the RS forwards nothing to or from an end
            # that has not proved it holds a side of the path.
            binder = RelayBinder(rd.path_id, rd.role, rd.relay_key, rd.relay)
            binder.bind(now, wall)
            self._binders[rd.path_id] = binder
        path = self.endpoint.add_path(config, now, wall)
        self._meta[rd.path_id] = rd
        self._peer_vip[rd.path_id] = ipaddress.IPv4Address(rd.peer_vip).packed
        if rd.role is PathRole.INITIATOR:
            path.connect(now, wall)
        self._flush()  # the INIT (or an early INIT's answer) leaves before the log line
        log.info(
            "path %s to %s (%s) %s as %s via %s",
            rd.path_id.hex(),
            rd.peer_fqdn,
            rd.peer_vip,
            rd.kind.name.lower(),
            rd.role.name.lower(),
            ", ".join(f"{a}:{p}" for a, p in config.peer_endpoints) or "(waiting)",
        )
        return path

    def _refill_soon(self) -> None:
        if not self._refilling and self._loop is not None:
            self._refilling = True
            self._loop.call_soon(self._refill)

    def _refill(self) -> None:
        self._refilling = False
        self.ephemerals.refill()

    def _usable(self, endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
        families = {
            socket.AF_INET if ipaddress.ip_address(a).version == 4 else socket.AF_INET6
            for a, _ in endpoints
        }
        ok = families & set(self._socks)
        return tuple(
            ep
            for ep in endpoints
            if (socket.AF_INET if ipaddress.ip_address(ep[0]).version == 4 else socket.AF_INET6)
            in ok
        )

    async def wait_established(self, path_id: bytes, timeout: float) -> None:
        path = self.endpoint.path(path_id)
        if path is None:
            raise PathError("the path is gone")
        if path.state is PathState.ESTABLISHED:
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.setdefault(path_id, []).append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            waiters = self._waiters.get(path_id, [])
            if fut in waiters:
                waiters.remove(fut)

    def path_to(self, peer_vip: str) -> TunnelPath | None:
        return self._route.get(ipaddress.IPv4Address(peer_vip).packed)

    def path_for_fqdn(self, fqdn: str) -> TunnelPath | None:
        """The path that carries traffic to `fqdn` now (the newest established one)."""
        for rd in self._meta.values():
            if rd.peer_fqdn == fqdn:
                path = self.path_to(rd.peer_vip)
                if path is not None:
                    return path
        return None

    def route_direction(self, path_id: bytes) -> RouteDirection | None:
        return self._meta.get(path_id)

    def remove_path(self, path_id: bytes) -> None:
        self.endpoint.remove_path(path_id)
        rd = self._meta.pop(path_id, None)
        self._peer_vip.pop(path_id, None)
        self._path_sock.pop(path_id, None)
        self._leg_sock.pop(path_id, None)
        self._drop_binder(path_id)
        if rd is not None:
            key = ipaddress.IPv4Address(rd.peer_vip).packed
            route = self._route.get(key)
            if route is not None and route.path_id == path_id:
                del self._route[key]
        for fut in self._waiters.pop(path_id, []):
            if not fut.done():
                fut.set_exception(PathError("path removed"))

    def local_address_changed(self) -> None:
        now, wall = time.monotonic(), time.time_ns()
        for binder in self._binders.values():
            binder.bind(now, wall)  # the relay learns our new address from a fresh proof
        for path in list(self.endpoint.paths):
            path.set_local_address_changed(now, wall)
        self._flush()

    # --- several uplinks (make-before-break) ----------------------------------------------

    def local_address_of(self, path_id: bytes) -> str | None:
        """The local address a path sends from now; None when it is a wildcard socket."""
        path = self.endpoint.path(path_id)
        if path is None or path.peer_address is None:
            return None
        sock = self._sock_for(path_id, path.peer_address)
        if sock is None:
            return None
        host = str(sock.getsockname()[0])
        return None if host in ("0.0.0.0", "::") else host

    def send_standby(self, path_id: bytes, local: str, to: Endpoint, now: float) -> int | None:
        """One StandbyProbe from the socket of `local` to `to`: its seq, None if not sent."""
        path = self.endpoint.path(path_id)
        sock = self._by_address.get(local)
        if path is None or sock is None:
            return None
        probe = path.standby_probe(now, to)
        if probe is None:
            return None
        seq, datagram = probe
        try:
            sock.sendto(datagram, to)
        except OSError as exc:  # the leg's link is down: that is what the probe finds out
            self._count("standby_tx_errors")
            log.debug("standby probe %s -> %s failed: %s", local, to, exc)
            return None
        self._count("standby_probes")
        return seq

    def use_leg(self, path_id: bytes, local: str, to: Endpoint, now: float, hold: float) -> bool:
        """Send the path's traffic from the socket of `local` to `to` from now on; the peer
        follows on the Keepalive this sends at once."""
        path = self.endpoint.path(path_id)
        sock = self._by_address.get(local)
        if path is None or sock is None:
            return False
        previous = self._leg_sock.get(path_id)
        self._leg_sock[path_id] = sock
        if not path.move_to(to, now, hold):
            if previous is None:
                self._leg_sock.pop(path_id, None)
            else:
                self._leg_sock[path_id] = previous
            return False
        self._flush()
        return True

    # --- data path -----------------------------------------------------------------------

    def _on_tun(self) -> None:
        tun = self.tun
        assert tun is not None
        now = time.monotonic()
        route = self._route
        out: dict[TunnelPath, list[bytes]] = {}
        touched: dict[TunnelPath, None] = {}  # paths that sealed data (ordered set)
        handled = not_ipv4 = no_path = 0
        while handled < MAX_BATCH:
            packets = tun.read_batch(TUN_BATCH)
            if not packets:
                break
            handled += len(packets)
            for pkt in packets:
                if len(pkt) < 20 or pkt[0] >> 4 != 4:
                    not_ipv4 += 1
                    continue
                path = route.get(pkt[16:20])
                if path is None:
                    no_path += 1
                    continue
                sealed = path.seal(pkt, now)
                if sealed is None:
                    self._count("tun_dropped_not_established")
                    continue
                batch = out.get(path)
                if batch is None:
                    out[path] = [sealed]
                else:
                    batch.append(sealed)
            if out:  # per read batch, so a burst never waits for the next one
                self._send_sealed(out)
                touched.update(dict.fromkeys(out))
                out.clear()
            if len(packets) < TUN_BATCH:
                break
        if not_ipv4:
            self._count("tun_dropped_not_ipv4", not_ipv4)
        if no_path:
            self._count("tun_dropped_no_path", no_path)
        # Sealing queues no datagram and no event, but a spent packet budget makes a rekey
        # due at once: re-arm only if a path we sealed on wants the timer sooner.
        self._rearm_for(touched)
        if touched and self.send_listeners:
            paths = list(touched)
            for listener in self.send_listeners:
                try:
                    listener(paths, now)
                except Exception:  # a listener's bug must not stop the data path
                    log.exception("send listener failed")

    def _send_sealed(self, out: dict[TunnelPath, list[bytes]]) -> None:
        for path, datagrams in out.items():
            addr = path.peer_address
            if addr is None:
                self._count("tun_dropped_not_established", len(datagrams))
                continue
            sock = self._sock_for(path.path_id, addr)
            if sock is None:
                self._count("tx_dropped_no_family", len(datagrams))
                continue
            self._sender.send(sock, datagrams, addr)

    def _on_udp(self, sock: socket.socket) -> None:
        now, wall = time.monotonic(), time.time_ns()
        receive = self.endpoint.receive_datagram
        peer_vip = self._peer_vip
        local_vip = self._local_vip_bytes
        tun = self.tun
        write_batch = getattr(tun, "write_batch", None)  # a test's device may lack it
        path_of = self.endpoint.path
        inners: list[bytes] = []
        touched: dict[TunnelPath, None] = {}  # paths that took input (ordered set)
        pair_of: TunnelPath | None = None  # the path `pair` (its vIP + ours) was made for
        pair = b""
        delivered = bound = False
        pin = bool(self.addresses)
        budget = MAX_BATCH
        while budget > 0:
            try:
                buf, segment, addr = recv_segments(sock)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ICMP port unreachable surfaced as ECONNREFUSED
                self._count("udp_errors")
                log.debug("udp receive error: %s", exc)
                budget -= 1
                continue
            src: Endpoint = (addr[0], addr[1])
            datagrams = split_segments(buf, segment) if segment else (buf,)
            budget -= len(datagrams)
            for data in datagrams:
                if data[:1] == BIND_ACK:
                    binder = self._binders.get(data[4:12])
                    if binder is None or not binder.receive_ack(data, src, now):
                        self._count("rx_dropped_bind_ack")
                    bound = True
                    continue
                if pin:
                    known = path_of(data[4:12])
                    heard = known.last_received if known is not None else 0.0
                    result = receive(data, src, now, wall)
                    if known is not None and known.last_received != heard:
                        self._path_sock[known.path_id] = sock  # it authenticated: answer here
                    elif known is not None and result is None:
                        # A standby probe (it moves no pin): its answer leaves by the
                        # uplink the probe came in on.
                        for out, to in known.datagrams_to_send(now):
                            self._send_from(sock, out, to)
                else:
                    result = receive(data, src, now, wall)
                if result is None:  # not DATA (or dropped): it may have queued an answer
                    other = path_of(data[4:12])
                    if other is not None:
                        touched[other] = None
                    continue
                path, inner = result
                touched[path] = None
                if not inner:
                    continue
                # The peer may only speak for its own vIP, and only to ours: source and
                # destination, bytes 12..20 of its IPv4 header (a shorter packet fails).
                if path is not pair_of:
                    pair_of = path
                    pair = (peer_vip.get(path.path_id) or b"-") + local_vip
                if inner[12:20] != pair or inner[0] >> 4 != 4:
                    self._count("rx_dropped_inner_address")
                    continue
                inners.append(inner)
            if len(inners) >= TUN_BATCH:
                self._deliver(inners, write_batch)
                inners = []
                delivered = True
        if inners:
            self._deliver(inners, write_batch)
            delivered = True
        if bound:
            self._flush()
        else:
            self._flush_paths(touched)
        if delivered and tun is not None:
            # The local stack often answers inside our write (an echo reply, a TCP ACK):
            # read it now instead of going round the event loop first.
            self._on_tun()

    def _deliver(
        self, packets: list[bytes], write_batch: Callable[[list[bytes]], int] | None
    ) -> None:
        """Into the TUN, several at a time where the device can merge them."""
        if write_batch is not None:
            write_batch(packets)
        elif self.tun is not None:
            for pkt in packets:
                self.tun.write(pkt)

    def _sock_for(self, path_id: bytes, addr: Endpoint) -> socket.socket | None:
        """The socket toward `addr`: the one the path's peer last reached us on (with
        `addresses`), else the default one of its family."""
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        if self._leg_sock:
            sock = self._leg_sock.get(path_id)
            if sock is not None and sock.family == family:
                return sock
        if self._path_sock:
            sock = self._path_sock.get(path_id)
            if sock is not None and sock.family == family:
                return sock
        return self._socks.get(family)

    def _send(self, data: bytes, addr: Endpoint) -> None:
        # tunnel and relay-binding packets carry the path id at 4..12
        sock = self._sock_for(data[4:12], addr)
        if sock is None:
            self._count("tx_dropped_no_family")
            return
        self._send_from(sock, data, addr)

    def _send_from(self, sock: socket.socket, data: bytes, addr: Endpoint) -> None:
        try:
            sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self._count("tx_dropped_full")
        except OSError as exc:
            self._count("tx_errors")
            log.debug("send to %s failed: %s", addr, exc)

    def _rearm_for(self, paths: dict[TunnelPath, None]) -> None:
        """Re-arm the timer if one of `paths` needs it before it fires now."""
        timer = self._timer
        when = timer.when() if timer is not None else float("inf")
        for path in paths:
            t = path.get_timer()
            if t is not None and t < when - 0.001:
                self._arm_timer()
                return

    # --- timers and events -------------------------------------------------------------

    def flush(self) -> None:
        """Send what the paths queued (after `send_probe` and the like) and handle events."""
        self._flush()

    def _flush(self) -> None:
        now = time.monotonic()
        for binder in self._binders.values():  # BINDs before the handshake they enable
            for data, addr in binder.datagrams_to_send(now):
                self._send(data, addr)
        for data, addr in self.endpoint.datagrams_to_send(now):
            self._send(data, addr)
        self._handle_events()
        self._arm_timer()

    def _flush_paths(self, paths: dict[TunnelPath, None]) -> None:
        """`_flush` for the paths a wake-up fed: no other path can have queued anything,
        so the cost stays with the traffic, not with the number of paths (a gateway)."""
        if not paths:
            return
        now = time.monotonic()
        events: list[tuple[bytes, PathEvent]] = []
        for path in paths:
            for data, addr in path.datagrams_to_send(now):
                self._send(data, addr)
            while (event := path.next_event()) is not None:
                events.append((path.path_id, event))
        if events:  # rare (a handshake, a move): they may queue BINDs and change timers
            self._handle_events(events)
            self._flush()
            return
        self._rearm_for(paths)

    def _arm_timer(self) -> None:
        timers = [t for b in self._binders.values() if (t := b.get_timer()) is not None]
        if (t := self.endpoint.get_timer()) is not None:
            timers.append(t)
        when = min(timers) if timers else None
        if self._timer is not None:
            # Under traffic the keepalive and idle deadlines move later with every packet;
            # a timer that fires early only re-arms (`_on_timer`), which is far cheaper
            # than replacing it on every wake-up.
            if when is not None and when >= self._timer.when() - 0.001:
                return
            self._timer.cancel()
            self._timer = None
        if when is not None and self._loop is not None:
            self._timer = self._loop.call_at(max(when, self._loop.time()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now, wall = time.monotonic(), time.time_ns()
        for binder in self._binders.values():
            timer = binder.get_timer()
            if timer is not None and timer <= now:
                binder.handle_timer(now, wall)
        self.endpoint.handle_timer(now, wall)
        self._flush()

    def _handle_events(self, events: list[tuple[bytes, PathEvent]] | None = None) -> None:
        changed = False
        for path_id, event in self.endpoint.events() if events is None else events:
            rd = self._meta.get(path_id)
            name = rd.peer_fqdn if rd else path_id.hex()
            if isinstance(event, PathEstablished):
                path = self.endpoint.path(path_id)
                if path is not None and rd is not None:
                    key = ipaddress.IPv4Address(rd.peer_vip).packed
                    old = self._route.get(key)
                    self._route[key] = path
                    if old is not None and old.path_id != path_id:
                        self._retire(old.path_id)
                log.info(
                    "path %s to %s established via %s", path_id.hex(), name, event.peer_address
                )
                for fut in self._waiters.pop(path_id, []):
                    if not fut.done():
                        fut.set_result(None)
                changed = True
            elif isinstance(event, PathIdle) and path_id in self._binders:
                now, wall = time.monotonic(), time.time_ns()
                self._binders[path_id].bind(now, wall)  # the relay may have lost us
            elif isinstance(event, ProbeResult | StandbyProbeResult):
                listeners: list[Any] = (
                    self.probe_listeners
                    if isinstance(event, ProbeResult)
                    else self.standby_listeners
                )
                for listener in listeners:
                    try:
                        listener(path_id, event)
                    except Exception:  # a listener's bug must not stop the data path
                        log.exception("probe listener failed")
            elif isinstance(event, PeerAddressChanged):
                log.info("path %s: %s moved %s -> %s", path_id.hex(), name, event.old, event.new)
                changed = True
            elif isinstance(event, HandshakeFailed):
                log.warning("path %s to %s failed: %s", path_id.hex(), name, event.reason)
                for fut in self._waiters.pop(path_id, []):
                    if not fut.done():
                        fut.set_exception(PathError(event.reason))
                self.remove_path(path_id)
                changed = True
        if changed and self.on_path_change:
            self.on_path_change()

    def _retire(self, path_id: bytes) -> None:
        """A newer path to the same peer took over: drop the old one."""
        log.info("path %s replaced by a newer one", path_id.hex())
        self.endpoint.remove_path(path_id)
        self._meta.pop(path_id, None)
        self._peer_vip.pop(path_id, None)
        self._path_sock.pop(path_id, None)
        self._leg_sock.pop(path_id, None)
        self._drop_binder(path_id)

    def _drop_binder(self, path_id: bytes) -> None:
        binder = self._binders.pop(path_id, None)
        if binder is not None:
            binder.close()

    def status(self) -> list[dict[str, Any]]:
        out = []
        for path in self.endpoint.paths:
            rd = self._meta.get(path.path_id)
            out.append(
                {
                    "path_id": path.path_id.hex(),
                    "peer_fqdn": rd.peer_fqdn if rd else None,
                    "peer_vip": rd.peer_vip if rd else None,
                    "kind": rd.kind.name.lower() if rd else None,
                    "role": rd.role.name.lower() if rd else None,
                    "state": path.state.name.lower(),
                    "peer_address": list(path.peer_address) if path.peer_address else None,
                    "local_address": (
                        sock.getsockname()[0]
                        if (
                            sock := self._leg_sock.get(path.path_id)
                            or self._path_sock.get(path.path_id)
                        )
                        else None
                    ),
                    "relay": (
                        {"endpoint": list(b.relay), "bound": b.bound, "counters": dict(b.counters)}
                        if (b := self._binders.get(path.path_id))
                        else None
                    ),
                    "counters": dict(path.counters),
                }
            )
        return out
