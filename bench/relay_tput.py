"""Relayed TCP throughput as a share of direct throughput, from the same client, same run.

mn1 (behind nat-a) sends iperf3 TCP to cn1's vIP (cn1 behind nat-b: the DC relays the path)
and to cn2's vIP (global: a direct path), in interleaved rounds with the same options; the
median round of each is reported with the CPU time of every process that carries it
(both nodes, and the relay for the relayed path).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .iperf import IperfError
from .labctl import CN, BenchLab, LabFailure
from .nsproc import Processes
from .setup_time import path_of
from .tunnel import (
    MARKED_NAME,
    Pair,
    Settings,
    iperf_once,
    median_run,
    ratio,
    start_iperf_server,
    tunnel_to,
)

CLIENT = "mn1"
RELAYED_PEER = "cn1"
RELAYED_NAME = "peer.example.com"  # CNAME to cn1.ntm.example.com
RELAYS = {"198.51.100.50": "rs1", "2001:db8:100::50": "rs1"}
RELAYS |= {"198.51.100.51": "rs2", "2001:db8:100::51": "rs2"}


def relay_of(path: Mapping[str, Any] | None) -> str | None:
    """The lab relay a client's path goes through, from its status entry."""
    relay = (path or {}).get("relay")
    if not isinstance(relay, Mapping) or not relay.get("endpoint"):
        return None
    return RELAYS.get(str(relay["endpoint"][0]))


def run_relay(
    lab: BenchLab,
    procs: Processes,
    work: Path,
    s: Settings,
    server_started: bool,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    if not server_started:
        start_iperf_server(lab, procs, work, CN)
    start_iperf_server(lab, procs, work, RELAYED_PEER)
    targets = {
        "direct": tunnel_to(lab, CLIENT, MARKED_NAME, CN),
        "relay": tunnel_to(lab, CLIENT, RELAYED_NAME, RELAYED_PEER),
    }
    status = lab.status(CLIENT)
    paths = {
        "direct": path_of(status, f"{CN}.ntm.example.com"),
        "relay": path_of(status, f"{RELAYED_PEER}.ntm.example.com"),
    }
    kinds = {k: (p or {}).get("kind") for k, p in paths.items()}
    if kinds != {"direct": "direct", "relay": "relay"}:
        raise LabFailure(f"{CLIENT}'s paths came up as {kinds}, not direct and relay")
    relay = relay_of(paths["relay"])
    if relay is None:
        raise LabFailure(f"{CLIENT}'s relayed path names no lab relay: {paths['relay']}")
    client_pid = lab.node_pid(CLIENT)
    pair = Pair(
        "relay",
        CLIENT,
        True,
        f"{CLIENT} -> {CN} direct vs {CLIENT} -> {RELAYED_PEER} through {relay}",
        targets,
        {
            "direct": [client_pid, lab.node_pid(CN)],
            "relay": [client_pid, lab.node_pid(RELAYED_PEER), lab.node_pid(relay, "relay")],
        },
    )
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "relay": []}
    progress(f"relay: iperf3 TCP, {s.rounds} x {s.seconds} s each, direct and via {relay}")
    for _ in range(s.rounds):
        for key in runs:
            try:
                runs[key].append(iperf_once(lab, pair, key, False, s))
            except (IperfError, subprocess.TimeoutExpired, OSError) as exc:
                runs[key].append({"error": str(exc)})
    out: dict[str, Any] = {key: median_run(r) for key, r in runs.items()}
    out["ratio_relay/direct"] = ratio(
        out["relay"].get("mbps_received"), out["direct"].get("mbps_received")
    )
    out["relay"]["through"] = relay
    out["note"] = pair.note
    out["tunnel_processes"] = {"direct": [CLIENT, CN], "relay": [CLIENT, RELAYED_PEER, relay]}
    return out
