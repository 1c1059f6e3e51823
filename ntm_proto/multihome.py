"""Make-before-break over several local uplinks (a node with Wi-Fi and LTE): pure decisions.

The node binds one tunnel socket per local address (a *leg*). Each established path sends
from one leg; on every other leg that can reach the peer (an address of the same family
among the path's peer endpoints) the node sends an authenticated StandbyProbe every
`interval` seconds, which holds that leg's NAT binding and proves the leg works. A leg is
*ready* while its last answer is at most `ready_for` old (the leg in use: while the path
hears its peer).

Which leg a path uses: the first ready leg in preference order (configuration order, or
what `prefer` put first). So a better leg coming back, or the user preferring another,
moves traffic only once that leg has answered, while the old one still works
(make-before-break). When the leg in use loses its address (netlink: link down, address
gone), the path moves at once to the best ready leg, or to the best leg left at all.

Nothing here touches a socket or a clock: `now` is passed in; the glue
(`ntm_node.multihome`) sends what `plan` asks for and switches the paths it names.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping, Sequence

from .messages import Endpoint

MOVE_HOLD = 2.0  # s the address a path left may not move it back (packets in flight)


@dataclasses.dataclass(frozen=True, slots=True)
class PathView:
    """What the policy needs to know of one established path."""

    path_id: bytes
    local: str | None  # the local address it sends from now (None: unknown/wildcard)
    peer: Endpoint | None
    peer_endpoints: tuple[Endpoint, ...]
    last_received: float  # the path's last authenticated packet (life of the leg in use)


@dataclasses.dataclass(frozen=True, slots=True)
class Switch:
    path_id: bytes
    local: str  # the leg (local address) to send from
    peer: Endpoint  # the peer address to send to
    reason: str  # "preferred" (a better leg is ready) or "lost" (the leg in use went away)


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeDue:
    path_id: bytes
    local: str
    peer: Endpoint


@dataclasses.dataclass(slots=True)
class Plan:
    switches: list[Switch] = dataclasses.field(default_factory=list)
    probes: list[ProbeDue] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True)
class LegState:
    """One (path, local address): the standby probes it sent and got answered."""

    last_sent: float | None = None
    last_answer: float | None = None
    sent: int = 0
    answered: int = 0
    rtt: float | None = None  # the latest answer's round trip, s


def family(address: str) -> int:
    return ipaddress.ip_address(address).version


class MultihomePolicy:
    """Leg choice and standby probing for every multihomed path (module docstring)."""

    def __init__(
        self, addresses: Sequence[str], interval: float = 1.0, ready_for: float | None = None
    ) -> None:
        if len(addresses) < 2:
            raise ValueError("make-before-break needs at least two local addresses")
        if interval <= 0:
            raise ValueError("the standby probe interval must be positive")
        self.preference: list[str] = list(addresses)
        self.interval = interval
        # Three intervals: one lost probe (or answer) does not make a leg unready.
        self.ready_for = 3 * interval + 0.5 if ready_for is None else ready_for
        self.available: dict[str, str] = {a: "" for a in addresses}  # address -> interface
        self.legs: dict[tuple[bytes, str], LegState] = {}

    # --- inputs ----------------------------------------------------------------------

    def set_available(self, available: Mapping[str, str]) -> None:
        """The netlink view: which of our addresses the host has now (-> interface name)."""
        self.available = {a: available[a] for a in self.preference if a in available}

    def prefer(self, name: str) -> str:
        """Put a leg first, named by address or interface; returns its address.

        ValueError (saying what exists) for a name that is neither."""
        for address in self.preference:
            if name in (address, self.available.get(address)):
                self.preference.remove(address)
                self.preference.insert(0, address)
                return address
        known = ", ".join(
            f"{a} ({i})" if (i := self.available.get(a)) else a for a in self.preference
        )
        raise ValueError(f"{name!r} is not one of this node's tunnel addresses: {known}")

    def answered(self, path_id: bytes, local: str, now: float, rtt: float) -> None:
        leg = self.legs.get((path_id, local))
        if leg is None:
            return  # a leg we forgot (the path went away meanwhile)
        leg.last_answer = now
        leg.answered += 1
        leg.rtt = rtt

    def forget(self, alive: Iterable[bytes]) -> None:
        keep = set(alive)
        for key in [k for k in self.legs if k[0] not in keep]:
            del self.legs[key]

    # --- decisions -------------------------------------------------------------------

    def peer_for(self, view: PathView, local: str) -> Endpoint | None:
        """Where leg `local` sends for this path: the peer address in use when it is of
        the leg's family (it follows the peer's own moves), else the first one listed."""
        fam = family(local)
        if view.peer is not None and family(view.peer[0]) == fam:
            return view.peer
        return next((ep for ep in view.peer_endpoints if family(ep[0]) == fam), None)

    def ready(self, view: PathView, local: str, now: float) -> bool:
        if local == view.local:
            return now - view.last_received <= self.ready_for
        leg = self.legs.get((view.path_id, local))
        return (
            leg is not None
            and leg.last_answer is not None
            and (now - leg.last_answer <= self.ready_for)
        )

    def plan(self, views: Iterable[PathView], now: float) -> Plan:
        """Switches to make now and standby probes to send now (it counts them sent)."""
        out = Plan()
        for view in views:
            legs = [
                (a, peer)
                for a in self.preference
                if a in self.available and (peer := self.peer_for(view, a)) is not None
            ]
            if not legs:
                continue
            use = view.local
            if view.local in self.available and view.peer is not None:
                # Make-before-break: the first leg that is ready, or the one in use.
                for local, peer in legs:
                    if local == view.local or self.ready(view, local, now):
                        if local != view.local:
                            out.switches.append(Switch(view.path_id, local, peer, "preferred"))
                            self._left(view, now)
                            use = local
                        break
            else:
                # The leg in use is gone: the best ready leg, else the best there is.
                local, peer = next(((a, p) for a, p in legs if self.ready(view, a, now)), legs[0])
                out.switches.append(Switch(view.path_id, local, peer, "lost"))
                use = local
            for local, peer in legs:
                if local == use:
                    continue
                leg = self.legs.setdefault((view.path_id, local), LegState())
                if leg.last_sent is None or now - leg.last_sent >= self.interval:
                    leg.last_sent = now
                    leg.sent += 1
                    out.probes.append(ProbeDue(view.path_id, local, peer))
        return out

    def _left(self, view: PathView, now: float) -> None:
        """The leg a path leaves still worked as long as the path heard its peer."""
        if view.local is None:
            return
        leg = self.legs.setdefault((view.path_id, view.local), LegState())
        if leg.last_answer is None or leg.last_answer < view.last_received:
            leg.last_answer = view.last_received

    def status(self) -> dict[str, object]:
        return {
            "preference": [
                {"address": a, "interface": self.available.get(a, ""), "up": a in self.available}
                for a in self.preference
            ],
            "standby_interval_s": self.interval,
            "ready_for_s": self.ready_for,
        }

    def leg_status(self, path_id: bytes, now: float) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for (pid, local), leg in self.legs.items():
            if pid != path_id:
                continue
            out.append(
                {
                    "local": local,
                    "sent": leg.sent,
                    "answered": leg.answered,
                    "rtt_ms": None if leg.rtt is None else round(leg.rtt * 1000, 2),
                    "answered_ago_s": (
                        None if leg.last_answer is None else round(now - leg.last_answer, 3)
                    ),
                }
            )
        return out


__all__ = [
    "MOVE_HOLD",
    "LegState",
    "MultihomePolicy",
    "PathView",
    "Plan",
    "ProbeDue",
    "Switch",
    "family",
]
