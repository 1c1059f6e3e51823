"""Tunnel set-up time (name lookup to first byte) for direct, relayed and reverse paths.

Before each run the client holds no tunnel to the peers it is about to look up: by default
the probe (one process for all of a client's runs) asks the node to drop them (forget-paths
on the node's admin socket, like `ntm status --forget-paths`), or with `fresh="restart"` the
client's node is restarted before each run (`ntm lab kill/start`, then its registration is
awaited). Then the probe (bench.probe) times, per marked name: a plain lookup of
the same name straight at the recursive resolver, the name through the node's stub with no
tunnel yet (cold: DNS query -> DC direction -> handshake -> answer -> first HTTP byte through
the new tunnel) and again with the tunnel up (warm); then a plain name through the stub.
After each probe the client's status must show the expected path kind, or the run does not
count. Both of mn1's names are probed in one run, in alternating order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ntm_io.status import StatusError

from .labctl import DC_ADDRESS, RESOLVER, BenchLab, LabFailure
from .nsproc import in_ns, run_in
from .stats import parse_ping, summary
from .tunnel import PLAIN_NAME, probe_env

DNS_REDIRECT_MARK = 0x4E544D  # ntm_node.dns_redirect.MARK: the stub's upstream queries pass
GOAL_SLACK_MS = 5.0
MAX_FAILED_RESTARTS = 3  # in a row, for one client: the lab is broken, stop
PER_RUN_BOUND = 20.0  # s: a forget-mode probe gets this per run (plus a minute) to finish
FRESH_MODES = ("forget", "restart")
HOW = {
    "forget": "before each run the client's node drops its paths to the peers it is about to "
    "look up (admin request forget-paths on the admin socket beside its status socket, as "
    "`ntm status --socket S --forget-paths FQDN` does), so no path exists; the node keeps "
    "running and registered; one probe process does all of a client's runs",
    "restart": "each run restarts the client's node (ntm lab kill/start) and waits for its "
    "registration, so no path exists",
}


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


def runs_argv(lab: BenchLab, client: str, kinds: Sequence[SetupKind], runs: int) -> list[str]:
    """The probe doing all of one client's runs, the node forgetting its paths before each."""
    argv = probe_argv([k.name for k in kinds])
    argv[argv.index("setup")] = "runs"
    argv += ["--runs", str(runs), "--status", lab.socket(client)]
    for peer in sorted({k.peer_fqdn for k in kinds}):
        argv += ["--forget", peer]
    return argv


class Tally:
    """Every run's figures, per kind; a run counts only with the expected path kind."""

    def __init__(self, kinds: Sequence[SetupKind]) -> None:
        clients = list(dict.fromkeys(k.client for k in kinds))
        self.samples: dict[str, dict[str, list[float]]] = {
            k.key: {s: [] for s in SAMPLES} for k in kinds
        }
        self.plain_stub: dict[str, dict[str, list[float]]] = {
            c: {"dns_ms": [], "first_byte_ms": []} for c in clients
        }
        self.failures: dict[str, list[str]] = {k.key: [] for k in kinds}
        self.seen: dict[str, Counter[str]] = {k.key: Counter() for k in kinds}
        self.relays: Counter[str] = Counter()
        self.fresh_s: dict[str, list[float]] = {c: [] for c in clients}

    def fail(self, i: int, kinds: Sequence[SetupKind], problem: str) -> None:
        for kind in kinds:
            self.failures[kind.key].append(f"run {i}: {problem}")

    def add(
        self,
        i: int,
        client: str,
        kinds: Sequence[SetupKind],
        doc: Mapping[str, Any],
        status: Mapping[str, Any],
    ) -> None:
        if "plain" in doc:
            for key in ("dns_ms", "first_byte_ms"):
                self.plain_stub[client][key].append(float(doc["plain"][key]))
        for kind in kinds:
            one = (doc.get("names") or {}).get(kind.name) or {"error": doc.get("error")}
            problem = record_run(
                kind, one, status, self.samples[kind.key], self.seen[kind.key], self.relays
            )
            if problem:
                self.failures[kind.key].append(f"run {i}: {problem}")


def _restart_runs(
    lab: BenchLab,
    runs: int,
    kinds: Sequence[SetupKind],
    tally: Tally,
    progress: Callable[[str], None],
) -> None:
    """Each run restarts each client's node first, then runs the probe once."""
    clients = list(dict.fromkeys(k.client for k in kinds))
    broken: Counter[str] = Counter()  # failed restarts in a row, per client
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
                tally.fail(i, mine, f"restart of {client}: {exc}")
                if broken[client] >= MAX_FAILED_RESTARTS:
                    raise
                continue
            broken[client] = 0
            tally.fresh_s[client].append(time.monotonic() - t0)
            try:
                done = run_in(lab.ns(client), probe_argv([k.name for k in mine]), 60, probe_env())
                doc = json.loads(done.stdout or "{}")
                status = lab.status(client)
            except (subprocess.TimeoutExpired, json.JSONDecodeError, StatusError) as exc:
                doc, status = {"error": f"probe: {exc}"}, {}
            tally.add(i, client, mine, doc, status)
        if (i + 1) % 10 == 0:
            progress(f"setup: {i + 1}/{runs} runs")


class LineProcess:
    """A child whose stdout is read line by line as it comes, killed after `bound` seconds."""

    def __init__(self, argv: Sequence[str], bound: float) -> None:
        self.proc = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=probe_env()
        )
        self.watchdog = threading.Timer(bound, self.proc.kill)
        self.watchdog.start()

    def lines(self) -> Iterator[str]:
        assert self.proc.stdout is not None
        yield from self.proc.stdout

    def finish(self) -> tuple[int, str]:
        """Exit status and the end of stderr; the child is gone afterwards."""
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.watchdog.cancel()
        assert self.proc.stderr is not None
        return self.proc.returncode, self.proc.stderr.read().strip()[-500:]


def _forget_runs(
    lab: BenchLab,
    runs: int,
    kinds: Sequence[SetupKind],
    tally: Tally,
    progress: Callable[[str], None],
) -> None:
    """One probe process per client does all its runs; the node forgets before each."""
    for client in dict.fromkeys(k.client for k in kinds):
        mine = [k for k in kinds if k.client == client]
        child = LineProcess(
            in_ns(lab.ns(client), runs_argv(lab, client, mine, runs)), PER_RUN_BOUND * runs + 60
        )
        done: set[int] = set()
        last_error = ""
        try:
            for line in child.lines():
                try:
                    doc = json.loads(line)
                    i = int(doc["run"])
                except (ValueError, KeyError, TypeError):
                    continue
                done.add(i)
                if "forget_ms" in doc:
                    tally.fresh_s[client].append(float(doc["forget_ms"]) / 1000)
                if "names" not in doc:  # the node did not forget: the run did not happen
                    last_error = str(doc.get("error"))
                    tally.fail(i, mine, f"forget on {client}: {last_error}")
                elif "paths_error" in doc:
                    tally.fail(i, mine, f"{client}: no status: {doc['paths_error']}")
                else:
                    tally.add(i, client, mine, doc, {"paths": doc.get("paths") or []})
                if (i + 1) % 20 == 0:
                    progress(f"setup: {client} {i + 1}/{runs} runs")
        finally:
            rc, err = child.finish()
        if len(done) < runs:
            for i in sorted(set(range(runs)) - done):
                tally.fail(i, mine, f"the probe in {client} ended first (exit {rc})")
            raise LabFailure(
                f"setup probe in {client} stopped after {len(done)} of {runs} runs "
                f"(exit {rc}): {last_error or err or 'no output'}"
            )


def run_setup(
    lab: BenchLab,
    runs: int,
    pings: int,
    progress: Callable[[str], None],
    kinds: Sequence[SetupKind] = KINDS,
    fresh: str = "forget",
) -> dict[str, Any]:
    if fresh not in FRESH_MODES:
        raise ValueError(f"fresh={fresh!r}: one of {', '.join(FRESH_MODES)}")
    clients = list(dict.fromkeys(k.client for k in kinds))
    tally = Tally(kinds)
    rtts = {c: lab_rtt(lab, c, pings) for c in clients}
    driver = _forget_runs if fresh == "forget" else _restart_runs
    driver(lab, runs, kinds, tally, progress)
    failures = tally.failures
    if runs and all(len(f) == runs for f in failures.values()):
        first = next(iter(failures.values()))[0]
        raise LabFailure(f"every set-up run failed; first: {first}")
    out: dict[str, Any] = {
        "runs": runs,
        "fresh": fresh,
        "how": HOW[fresh] + "; plain = the same name looked up straight at the resolver from "
        "the same namespace",
        "plain_name": PLAIN_NAME,
        "upstream": RESOLVER,
        "lab_rtt_ms": rtts,
        "fresh_wait_s": {c: summary(v, 4) for c, v in tally.fresh_s.items()},
        "plain_stub": {
            c: {k: summary(v) for k, v in per.items()} for c, per in tally.plain_stub.items()
        },
        "kinds": {},
        "relays_used": dict(tally.relays),
    }
    for kind in kinds:
        res = kind_result(kind, tally.samples[kind.key], rtts[kind.client].get("p50"))
        res["path_kinds_seen"] = dict(tally.seen[kind.key])
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
