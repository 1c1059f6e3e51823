"""Faults in a running lab: a pulled cable (`ntm lab link`) and random loss (`ntm lab impair`).

Both act in the hub namespace only, so services see them as a real network would show them:

- link: the hub end of the service's veth goes down. The service keeps its interface,
  addresses and routes and sees its carrier go; nothing passes either way until `up`.
- impair: one nftables table per network in the hub's bridge family drops each frame
  forwarded across that network's bridge with probability PCT, whichever its direction (this
  kernel has no netem). A round trip is two frames, so it is lost with 1 - (1 - p)^2. Rules
  match the network's link group (see names.network_group): this kernel lacks `meta ibrname`.
  Counters (frames seen, frames dropped) count since the last `impair` of that network.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import names, netns
from lab.errors import LabError
from lab.runner import load_lab_project
from lab.state import LabState, require_state

TABLE_PREFIX = "ntm_lab_impair_"
SCALE = 1000  # numgen modulus: loss in steps of 0.1 %


@dataclass(frozen=True)
class Impairment:
    """What an impaired network's table says: the loss and its two counters."""

    loss: float  # percent
    seen: int  # frames that entered the bridge's forwarding path
    dropped: int

    def as_dict(self) -> dict[str, float | int]:
        return {"loss": self.loss, "seen": self.seen, "dropped": self.dropped}


def table_name(network: str) -> str:
    return TABLE_PREFIX + names.bridge_name(network)


def parse_loss(value: float) -> int:
    """A loss in percent (0..100, steps of 0.1) as a threshold out of SCALE."""
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise LabError(f"--loss {value}: give a percentage from 0 to 100 (0 removes the loss)")
    steps = round(value * SCALE / 100)
    if abs(steps * 100 / SCALE - value) > 1e-9:
        raise LabError(f"--loss {value}: the resolution is 0.1 %; write e.g. 5 or 2.5")
    return steps


def loss_ruleset(network: str, threshold: int) -> str:
    """nft input replacing any earlier loss on `network`; threshold 0 only removes it."""
    table = table_name(network)
    lines = [f"table bridge {table}", f"delete table bridge {table}"]
    if threshold:
        group = names.network_group(network)
        lines += [
            f"table bridge {table} {{",
            "    chain forward {",
            "        type filter hook forward priority 0; policy accept;",
            f"        meta iifgroup {group} counter",
            # `<=`, since `< 1000` is out of range for a value that is at most 999
            f"        meta iifgroup {group} numgen random mod {SCALE} <= {threshold - 1}"
            " counter drop",
            "    }",
            "}",
        ]
    return "\n".join([*lines, ""])


def parse_impairments(listing: dict[str, Any]) -> dict[str, Impairment]:
    """Our tables in `nft -j list ruleset bridge` output, by table name."""
    seen: dict[str, int] = {}
    found: dict[str, Impairment] = {}
    for item in listing.get("nftables", []):
        rule = item.get("rule")
        if not rule or not str(rule.get("table", "")).startswith(TABLE_PREFIX):
            continue
        table = str(rule["table"])
        exprs: list[dict[str, Any]] = rule.get("expr", [])
        packets = next((int(e["counter"]["packets"]) for e in exprs if "counter" in e), 0)
        if not any("drop" in e for e in exprs):
            seen[table] = packets
            continue
        threshold = 1 + next(
            int(e["match"]["right"])
            for e in exprs
            if "match" in e and "numgen" in e["match"].get("left", {})
        )
        found[table] = Impairment(threshold * 100 / SCALE, 0, packets)
    return {t: Impairment(i.loss, seen.get(t, 0), i.dropped) for t, i in found.items()}


def _nft(hub: str, *args: str, stdin: str = "") -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", hub, "nft", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise LabError(f"nft {' '.join(args)} in {hub}: {done.stderr.strip() or 'failed'}")
    return done.stdout


def _network_names(state: LabState) -> list[str]:
    return list(load_lab_project(state).networks)


def impairments(state: LabState) -> dict[str, dict[str, float | int]]:
    """Every impaired network of the lab with its loss and counters (for `status`)."""
    listing = json.loads(_nft(state.hub, "-j", "list", "ruleset", "bridge") or "{}")
    tables = parse_impairments(listing)
    return {
        net: tables[table_name(net)].as_dict()
        for net in _network_names(state)
        if table_name(net) in tables
    }


def impair(name: str, state_dir: Path, network: str, loss: float | None) -> dict[str, Any]:
    """Set (or with loss None, only report) the random loss on a network."""
    netns.require_root()
    state = require_state(state_dir, name)
    known = _network_names(state)
    if network not in known:
        raise LabError(f"lab {name} has no network {network!r} (networks: {', '.join(known)})")
    if loss is not None:
        _nft(state.hub, "-f", "-", stdin=loss_ruleset(network, parse_loss(loss)))
    current = impairments(state).get(network, {"loss": 0.0, "seen": 0, "dropped": 0})
    return {"network": network, **current}


def link(name: str, state_dir: Path, service: str, network: str, up: bool) -> None:
    """Plug (up) or pull (down) a service's cable on one of its networks."""
    netns.require_root()
    state = require_state(state_dir, name)
    ss = state.service(service)
    if network not in ss.networks:
        raise LabError(
            f"{service} is not on {network} (it is on {', '.join(ss.networks) or 'nothing'})"
        )
    netns.set_link(state.hub, service, network, up)


def link_states(state: LabState) -> dict[str, dict[str, str]]:
    """For each service, "up" or "down" per attached network."""
    ports = netns.hub_ports_up(state.hub)
    return {
        svc: {
            net: "up" if ports.get(names.hub_port_name(svc, net), False) else "down"
            for net in ss.networks
        }
        for svc, ss in state.services.items()
    }
