"""Many tunnel paths over one UDP socket (sans-IO).

`TunnelEndpoint` demultiplexes datagrams by the 8-byte path id every tunnel packet carries
at offset 4 (`ntm_proto.packet`), never by outer address, so a path keeps working when its
peer roams. Input that cannot be used — too short, an unknown path id, random bytes, a
packet that fails authentication, a replay — is dropped and counted in `counters` under
`drop_<reason>`; `receive_datagram` never raises, and a bad datagram for one path leaves
every other path untouched.

The owner's loop (asyncio or anything else) is::

    result = ep.receive_datagram(data, addr, now, wall_ns)   # -> (path, ip_packet) | None
    datagram = path.seal(ip_packet, now)                     # -> send to path.peer_address
    for data, addr in ep.datagrams_to_send(now): sock.sendto(data, addr)
    ep.handle_timer(now, wall_ns) when ep.get_timer() is due
    for path_id, event in ep.events(): ...
"""

from __future__ import annotations

import ipaddress

from .errors import LocalProtocolError, RemoteProtocolError
from .messages import Endpoint
from .packet import HANDSHAKE_SIZE, PREFIX_SIZE, PacketType
from .path import PathConfig, PathEvent, TunnelPath, error_reason

# A handshake may overtake the Route Direction that announces its path: in a reverse path the
# DC tells the initiator first, and its INIT can reach the requester before the requester has
# the answer. Such INITs are held briefly and replayed when the path is added, instead of
# costing a handshake retry. Bounded in count and age; only a delay if an attacker floods it.
EARLY_MAX = 32
EARLY_HOLD = 2.0


class TunnelEndpoint:
    def __init__(self) -> None:
        self._early: dict[bytes, tuple[bytes, Endpoint, float]] = {}
        self._paths: dict[bytes, TunnelPath] = {}
        self._by_vip: dict[str, TunnelPath] = {}
        self._drops: dict[str, int] = {}
        self._rx_datagrams = 0
        self._early_replayed = 0

    # --- paths ---

    def add_path(self, config: PathConfig, now: float, wall_ns: int | None = None) -> TunnelPath:
        """Create the path a Route Direction describes; the newest path owns its peer vIP.

        With `wall_ns`, a handshake INIT that arrived early for this path is replayed now.
        """
        if config.path_id in self._paths:
            raise LocalProtocolError(f"path {config.path_id.hex()} already exists")
        path = TunnelPath(config, now)
        self._paths[config.path_id] = path
        self._by_vip[config.peer_vip] = path
        early = self._early.pop(config.path_id, None)
        if early is not None and wall_ns is not None and now - early[2] <= EARLY_HOLD:
            self._early_replayed += 1
            try:
                path.receive_datagram(early[0], early[1], now, wall_ns)
            except RemoteProtocolError as exc:
                self._drop(error_reason(exc))
        return path

    def remove_path(self, path_id: bytes) -> TunnelPath | None:
        """Close and forget a path; another path to the same vIP takes over its routing."""
        path = self._paths.pop(path_id, None)
        if path is None:
            return None
        path.close()
        vip = path.config.peer_vip
        if self._by_vip.get(vip) is path:
            del self._by_vip[vip]
            for other in reversed(self._paths.values()):
                if other.config.peer_vip == vip:
                    self._by_vip[vip] = other
                    break
        return path

    def path(self, path_id: bytes) -> TunnelPath | None:
        return self._paths.get(path_id)

    def path_for_vip(self, vip: str) -> TunnelPath | None:
        """The path toward a peer vIP (canonical text, as `str(ipaddress.ip_address(...))`)."""
        path = self._by_vip.get(vip)
        if path is None and vip:
            try:
                path = self._by_vip.get(str(ipaddress.ip_address(vip)))
            except ValueError:
                return None
        return path

    @property
    def paths(self) -> tuple[TunnelPath, ...]:
        return tuple(self._paths.values())

    @property
    def counters(self) -> dict[str, int]:
        """Datagrams received and drop_<reason> over all paths (per-path: path.counters)."""
        out = {"rx_datagrams": self._rx_datagrams, "early_replayed": self._early_replayed}
        for reason, n in self._drops.items():
            out["drop_" + reason] = n
        return out

    # --- I/O ---

    def receive_datagram(
        self, data: bytes, addr: Endpoint, now: float, wall_ns: int
    ) -> tuple[TunnelPath, bytes] | None:
        """Route one datagram to its path; (path, inner IP packet) for DATA, else None."""
        self._rx_datagrams += 1
        if len(data) < PREFIX_SIZE:
            self._drop("too_short")
            return None
        path = self._paths.get(data[4:12])
        if path is None:
            if data[0] == PacketType.HANDSHAKE_INIT and len(data) == HANDSHAKE_SIZE:
                self._hold_early(data, addr, now)
            self._drop("unknown_path")
            return None
        try:
            plaintext = path.receive_datagram(data, addr, now, wall_ns)
        except RemoteProtocolError as exc:
            self._drop(error_reason(exc))
            return None
        if plaintext is None:
            return None
        return path, plaintext

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        out: list[tuple[bytes, Endpoint]] = []
        for path in self._paths.values():
            out.extend(path.datagrams_to_send(now))
        return out

    def get_timer(self) -> float | None:
        timers = [t for p in self._paths.values() if (t := p.get_timer()) is not None]
        return min(timers) if timers else None

    def handle_timer(self, now: float, wall_ns: int) -> None:
        for path in list(self._paths.values()):
            timer = path.get_timer()
            if timer is not None and timer <= now:
                path.handle_timer(now, wall_ns)

    def events(self) -> list[tuple[bytes, PathEvent]]:
        """Drain every path's events, as (path_id, event)."""
        out: list[tuple[bytes, PathEvent]] = []
        for path_id, path in self._paths.items():
            while (event := path.next_event()) is not None:
                out.append((path_id, event))
        return out

    def _hold_early(self, data: bytes, addr: Endpoint, now: float) -> None:
        for pid in [p for p, (_, _, t) in self._early.items() if now - t > EARLY_HOLD]:
            del self._early[pid]
        if len(self._early) < EARLY_MAX:
            self._early[data[4:12]] = (data, addr, now)

    def _drop(self, reason: str) -> None:
        self._drops[reason] = self._drops.get(reason, 0) + 1


__all__ = ["TunnelEndpoint"]
