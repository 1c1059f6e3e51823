"""Tunnel set-up time (name lookup to first byte) for direct, relayed and reverse paths.

Each run restarts the client's node (`ntm lab kill/start`), so it holds no tunnel, waits
for its registration, then the probe (bench.probe) times, per marked name: a plain lookup of
the same name straight at the recursive resolver, the name through the node's stub with no
tunnel yet (cold: DNS query -> DC direction -> handshake -> answer -> first HTTP byte through
the new tunnel) and again with the tunnel up (warm); then a plain name through the stub.
After each probe the client's status must show the expected path kind, or the run does not
count. Both of mn1's names are probed after one restart, in alternating order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ntm_io.status import StatusError

from .labctl import DC_ADDRESS, RESOLVER, BenchLab, LabFailure
from .nsproc import run_in
from .stats import parse_ping, summary
from .tunnel import PLAIN_NAME, probe_env

DNS_REDIRECT_MARK = 0x4E544D  # ntm_node.dns_redirect.MARK: the stub's upstream queries pass
GOAL_SLACK_MS = 5.0
MAX_FAILED_RESTARTS = 3  # in a row, for one client: the lab is broken, stop


@dataclass(frozen=True)
class SetupKind:
    key: str  # "direct", "relayed", "reverse"
    client: str  # lab service whose node resolves the name (restarted before each run)
    name: str  # the marked name the client resolves
    peer: str  # lab service at the other end (serves HTTP on :80)
    peer_fqdn: str
    path_kind: str  # what the client's status must show for the path
    goal_rtts: int | None  # goal: adds at most this many lab round trips + 5 ms at p50


KINDS = (
    SetupKind("direct", "mn1", "global.example.com", "cn2", "cn2.ntm.example.com", "direct", 1),
    SetupKind("relayed", "mn1", "peer.example.com", "cn1", "cn1.ntm.example.com", "relay", 2),
    SetupKind("reverse", "cn2", "peer.example.com", "cn1", "cn1.ntm.example.com", "reverse", None),
)
SAMPLES = (
    "plain_lookup_ms",
    "cold_dns_ms",
    "cold_first_byte_ms",
    "warm_dns_ms",
    "warm_first_byte_ms",
)


def probe_argv(names: Sequence[str]) -> list[str]:
    argv = [sys.executable, "-m", "bench.probe", "setup", "--plain", PLAIN_NAME]
    argv += ["--upstream", RESOLVER, "--mark", hex(DNS_REDIRECT_MARK)]
    for name in names:
        argv += ["--marked", name]
    return argv


def goal_check(kind: SetupKind, extra_ms: float | None, rtt_ms: float | None) -> dict[str, Any]:
    """Issue 3's goal for one path kind: `met` is None when there is no goal or no figure."""
    if kind.goal_rtts is None:
        return {"target_ms": None, "met": None, "goal": "none set (issue 3)"}
    if rtt_ms is None:
        return {"target_ms": None, "met": None, "goal": f"{kind.goal_rtts} RTT + 5 ms"}
    target = round(kind.goal_rtts * rtt_ms + GOAL_SLACK_MS, 3)
    met = None if extra_ms is None else extra_ms <= target
    return {"target_ms": target, "met": met, "goal": f"{kind.goal_rtts} RTT + 5 ms"}


def kind_result(
    kind: SetupKind, samples: Mapping[str, Sequence[float]], rtt_ms: float | None
) -> dict[str, Any]:
    """Summaries of one kind's samples, the time added over a plain lookup, and the goal.

    Added = cold first byte p50 - plain lookup p50 (the issue's "name lookup to first byte
    ... next to a plain DNS lookup"); dns_hold = cold DNS answer p50 - plain lookup p50 is
    the part the stub held the answer for the tunnel.
    """
    out: dict[str, Any] = {
        "client": kind.client,
        "name": kind.name,
        "peer": kind.peer,
        "path_kind": kind.path_kind,
    }
    for key in SAMPLES:
        out[key] = summary(samples.get(key, []))
    plain, cold_fb, cold_dns = (
        out[k].get("p50") for k in ("plain_lookup_ms", "cold_first_byte_ms", "cold_dns_ms")
    )
    extra = None if plain is None or cold_fb is None else round(cold_fb - plain, 3)
    out["added_ms_p50"] = extra
    out["dns_hold_ms_p50"] = (
        None if plain is None or cold_dns is None else round(cold_dns - plain, 3)
    )
    out["ratio_p50"] = round(cold_fb / plain, 2) if cold_fb is not None and plain else None
    out["lab_rtt_ms_p50"] = rtt_ms
    out["goal"] = goal_check(kind, extra, rtt_ms)
    return out


def path_of(status: Mapping[str, Any], peer_fqdn: str) -> Mapping[str, Any] | None:
    """The client's established path to `peer_fqdn` (the last one listed, if several)."""
    found = None
    for path in status.get("paths") or []:
        if path.get("peer_fqdn") == peer_fqdn and path.get("state") == "established":
            found = path
    return found


def lab_rtt(lab: BenchLab, client: str, pings: int) -> dict[str, Any]:
    """Plain round trip from the client to the DC: the lab round trip the goals count in."""
    argv = ["ping", "-n", "-i", "0.01", "-c", str(pings), "-W", "1", DC_ADDRESS]
    done = run_in(lab.ns(client), argv, timeout=pings * 0.01 + 30)
    out: dict[str, Any] = summary(parse_ping(done.stdout).rtts_ms)
    out["to"] = f"dc1 {DC_ADDRESS}"
    return out


def run_setup(
    lab: BenchLab,
    runs: int,
    pings: int,
    progress: Callable[[str], None],
    kinds: Sequence[SetupKind] = KINDS,
) -> dict[str, Any]:
    clients = list(dict.fromkeys(k.client for k in kinds))
    samples: dict[str, dict[str, list[float]]] = {k.key: {s: [] for s in SAMPLES} for k in kinds}
    plain_stub: dict[str, dict[str, list[float]]] = {
        c: {"dns_ms": [], "first_byte_ms": []} for c in clients
    }
    failures: dict[str, list[str]] = {k.key: [] for k in kinds}
    seen: dict[str, Counter[str]] = {k.key: Counter() for k in kinds}
    relays: Counter[str] = Counter()
    restart_s: dict[str, list[float]] = {c: [] for c in clients}
    broken: Counter[str] = Counter()  # failed restarts in a row, per client
    rtts = {c: lab_rtt(lab, c, pings) for c in clients}
    for i in range(runs):
        for client in clients:
            mine = [k for k in kinds if k.client == client]
            if i % 2:
                mine.reverse()  # neither name always gets the fresh DC connection first
            t0 = time.monotonic()
            try:
                lab.kill(client)
                lab.start(client)
                lab.wait_registered(client)
            except LabFailure as exc:
                # One failed restart costs this run, not the section; a lab that keeps
                # failing does.
                broken[client] += 1
                for kind in mine:
                    failures[kind.key].append(f"run {i}: restart of {client}: {exc}")
                if broken[client] >= MAX_FAILED_RESTARTS:
                    raise
                continue
            broken[client] = 0
            restart_s[client].append(time.monotonic() - t0)
            try:
                done = run_in(lab.ns(client), probe_argv([k.name for k in mine]), 60, probe_env())
                doc = json.loads(done.stdout or "{}")
                status = lab.status(client)
            except (subprocess.TimeoutExpired, json.JSONDecodeError, StatusError) as exc:
                doc, status = {"error": f"probe: {exc}"}, {}
            if "plain" in doc:
                for key in ("dns_ms", "first_byte_ms"):
                    plain_stub[client][key].append(float(doc["plain"][key]))
            for kind in mine:
                one = (doc.get("names") or {}).get(kind.name) or {"error": doc.get("error")}
                problem = record_run(kind, one, status, samples[kind.key], seen[kind.key], relays)
                if problem:
                    failures[kind.key].append(f"run {i}: {problem}")
        if (i + 1) % 10 == 0:
            progress(f"setup: {i + 1}/{runs} runs")
    if runs and all(len(f) == runs for f in failures.values()):
        first = next(iter(failures.values()))[0]
        raise LabFailure(f"every set-up run failed; first: {first}")
    out: dict[str, Any] = {
        "runs": runs,
        "how": "each run restarts the client's node (ntm lab kill/start) and waits for its "
        "registration, so no path exists; plain = the same name looked up straight at the "
        "resolver from the same namespace",
        "plain_name": PLAIN_NAME,
        "upstream": RESOLVER,
        "lab_rtt_ms": rtts,
        "restart_wait_s": {c: summary(v) for c, v in restart_s.items()},
        "plain_stub": {c: {k: summary(v) for k, v in per.items()} for c, per in plain_stub.items()},
        "kinds": {},
        "relays_used": dict(relays),
    }
    for kind in kinds:
        res = kind_result(kind, samples[kind.key], rtts[kind.client].get("p50"))
        res["path_kinds_seen"] = dict(seen[kind.key])
        res["failures"] = failures[kind.key]
        out["kinds"][kind.key] = res
    return out


def record_run(
    kind: SetupKind,
    one: Mapping[str, Any],
    status: Mapping[str, Any],
    samples: dict[str, list[float]],
    seen: Counter[str],
    relays: Counter[str],
) -> str | None:
    """Add one probe's figures if the path came up as the expected kind; else why not."""
    if one.get("error"):
        return str(one["error"])
    path = path_of(status, kind.peer_fqdn)
    got = str(path.get("kind")) if path else "no established path"
    seen[got] += 1
    if got != kind.path_kind:
        return f"{kind.name}: path is {got}, expected {kind.path_kind}"
    relay = path.get("relay") if path else None
    if isinstance(relay, Mapping) and relay.get("endpoint"):
        relays[":".join(str(p) for p in relay["endpoint"])] += 1
    samples["plain_lookup_ms"].append(float(one["plain_lookup"]["dns_ms"]))
    for phase in ("cold", "warm"):
        for key in ("dns_ms", "first_byte_ms"):
            samples[f"{phase}_{key}"].append(float(one[phase][key]))
    return None
