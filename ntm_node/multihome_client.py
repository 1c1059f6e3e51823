"""Switching a running node's uplink from outside (`ntm node --prefer`, tests, the bench).

`prefer_uplink` sends the admin command `prefer` and waits until the node's status shows
every multihomed path sending from that uplink. Times are CLOCK_MONOTONIC, the same clock
in every network namespace of a host, so a caller can line them up with a probe stream's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ntm_io.status import StatusError, admin_socket_path, read_status, request_admin


@dataclass(frozen=True)
class UplinkSwitch:
    uplink: str  # as asked: interface name or address
    address: str  # the tunnel address it names
    requested_at: float  # monotonic, just before the request
    done_at: float  # monotonic, when the status first showed every path on `address`
    switched_at: float | None  # the node's time of its last move onto `address`, if any
    paths: int  # multihomed paths seen on `address`


def paths_on(status: Mapping[str, Any], address: str) -> int | None:
    """How many multihomed paths send from `address`; None while any sends elsewhere (or
    the node has none yet)."""
    multihome = status.get("multihome") or {}
    paths = multihome.get("paths") or []
    if not paths or any(p.get("local") != address for p in paths):
        return None
    return len(paths)


def last_switch_to(status: Mapping[str, Any], address: str) -> float | None:
    events = (status.get("multihome") or {}).get("events") or []
    times = [float(e["at"]) for e in events if e.get("to") == address]
    return max(times) if times else None


def prefer_uplink(
    status_socket: str, uplink: str, *, bound: float = 10.0, poll: float = 0.02
) -> UplinkSwitch:
    """Prefer `uplink` on the node behind `status_socket` and wait (at most `bound` s) until
    its paths use it. AdminError if the node refuses; TimeoutError if they do not move."""
    requested = time.monotonic()
    reply = request_admin(admin_socket_path(status_socket), "prefer", uplink=uplink)
    address = str(reply["address"])
    deadline = requested + bound
    last: Mapping[str, Any] = {}
    while True:
        try:
            last = read_status(status_socket)
        except StatusError:
            last = {}
        n = paths_on(last, address)
        if n is not None:
            return UplinkSwitch(
                uplink, address, requested, time.monotonic(), last_switch_to(last, address), n
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the node's paths were not all on {uplink} ({address}) within {bound:g} s: "
                f"{(last.get('multihome') or {}).get('paths')}"
            )
        time.sleep(poll)
