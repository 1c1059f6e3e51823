"""The load-balanced service: HTTP load through the NTMA vs straight to the VIP, and how fast
the LB agent's health checks take a real server out and bring it back.

Load (bench.httpload, the same options for every target, interleaved rounds, median round):

- `tunnel`: mn1 -> its node -> tunnel -> ntma1 -> DNAT to the VIP -> lb -> web1..3;
- `public`: mn1 -> nat-a -> ntma1's public address (DNAT, no tunnel) -> lb -> web1..3;
- `direct`: dmzc, a plain host on dmz beside ntma1 -> the VIP 10.30.0.100 -> lb -> web1..3.

Health: `ntm lab kill web2`, then `ntm lab start web2`, with bench.hcwatch polling web2 and
the agent's status from the LB's namespace; detection is from web2's last refused request to
the agent's status no longer listing it in service, recovery from web2's first answer to it
being in service again.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from . import procstat
from .labctl import DMZ_CLIENT, DMZ_CLIENT_ADDRESS, LB_VIP, NTMA_PUBLIC, BenchLab, LabFailure
from .nsproc import in_ns, run_in
from .stats import summary
from .tunnel import probe_env, ratio, tunnel_to

CLIENT = "mn1"
NTMA = "ntma1"
LB = "lb"
WWW_NAME = "www.example.com"  # CNAME to www.ntm.example.com, registered by ntma1
SERVICE = "www"  # the LB agent's service 10.30.0.100 tcp/80 (rr, HTTP health check)
DOWN = ("web2", "10.40.0.12", 80)
TARGETS = ("tunnel", "public", "direct")


@dataclass(frozen=True)
class LoadTarget:
    key: str
    client: str  # lab service the load runs in
    url: str
    note: str
    tunnel_procs: tuple[tuple[str, str], ...]  # (service, role) whose CPU is counted


def load_targets(vip: str) -> list[LoadTarget]:
    return [
        LoadTarget(
            "tunnel",
            CLIENT,
            f"http://{vip}/whoami",
            f"{CLIENT} -> tunnel -> {NTMA} (vIP {vip}) -> DNAT -> {LB} VIP {LB_VIP} -> web1..3",
            ((CLIENT, "node"), (NTMA, "adaptor")),
        ),
        LoadTarget(
            "public",
            CLIENT,
            f"http://{NTMA_PUBLIC}/whoami",
            f"{CLIENT} -> nat-a -> {NTMA} public {NTMA_PUBLIC} (DNAT, no tunnel) -> {LB} -> "
            "web1..3",
            (),
        ),
        LoadTarget(
            "direct",
            DMZ_CLIENT,
            f"http://{LB_VIP}/whoami",
            f"{DMZ_CLIENT} {DMZ_CLIENT_ADDRESS}, a plain host on dmz beside {NTMA} -> {LB} VIP "
            f"{LB_VIP} -> web1..3",
            (),
        ),
    ]


def httpload_argv(url: str, concurrency: int, seconds: float) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.httpload",
        url,
        "--concurrency",
        str(concurrency),
        "--duration",
        str(seconds),
    ]


def median_by_rate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The round with the median requests per second (a real round, latencies included)."""
    ok = sorted(
        (r for r in runs if isinstance(r.get("requests_per_s"), int | float)),
        key=lambda r: float(r["requests_per_s"]),
    )
    if not ok:
        return dict(runs[0]) if runs else {"error": "not run"}
    chosen = dict(ok[(len(ok) - 1) // 2])
    chosen["rounds_requests_per_s"] = [r.get("requests_per_s") for r in runs]
    failed = [str(r["error"]) for r in runs if "error" in r]
    if failed:
        chosen["failed_rounds"] = failed
    return chosen


def load_ratios(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    def get(key: str, *path: str) -> float | None:
        node: Any = rows.get(key, {})
        for p in path:
            node = node.get(p) if isinstance(node, Mapping) else None
        return float(node) if isinstance(node, int | float) else None

    return {
        "rps tunnel/direct": ratio(
            get("tunnel", "requests_per_s"), get("direct", "requests_per_s")
        ),
        "rps tunnel/public": ratio(
            get("tunnel", "requests_per_s"), get("public", "requests_per_s")
        ),
        "p99 tunnel/direct": ratio(
            get("tunnel", "latency_ms", "p99"), get("direct", "latency_ms", "p99")
        ),
    }


def load_once(
    lab: BenchLab, target: LoadTarget, concurrency: int, seconds: float
) -> dict[str, Any]:
    pids = [lab.node_pid(svc, role) for svc, role in target.tunnel_procs]
    cpu0, m0 = procstat.cpu_seconds_of(pids), procstat.MachineSample.now()
    done = run_in(
        lab.ns(target.client),
        httpload_argv(target.url, concurrency, seconds),
        timeout=seconds + 30,
        env=probe_env(),
    )
    cpu1, m1 = procstat.cpu_seconds_of(pids), procstat.MachineSample.now()
    try:
        out: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"error": f"httpload wrote no JSON: {done.stderr.strip()[-500:]}"}
    if not out.get("completed"):
        out["error"] = f"no request completed ({out.get('errors')})"
    out["tunnel_cpu_s"] = round(cpu1 - cpu0, 3) if pids else None
    out["machine_busy_percent"] = round(m1.busy_percent_since(m0), 1)
    return out


def run_lb_load(
    lab: BenchLab, concurrency: int, seconds: float, rounds: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    vip = tunnel_to(lab, CLIENT, WWW_NAME, NTMA)
    client_vip = lab.status(CLIENT)["vip"]
    targets = load_targets(vip)
    runs: dict[str, list[dict[str, Any]]] = {t.key: [] for t in targets}
    progress(f"lb: GET /whoami, {rounds} x {seconds:g} s per target, {concurrency} connections")
    for _ in range(rounds):
        for target in targets:  # interleaved: a burst elsewhere hits every target alike
            try:
                runs[target.key].append(load_once(lab, target, concurrency, seconds))
            except (subprocess.TimeoutExpired, OSError, LabFailure) as exc:
                runs[target.key].append({"error": f"{type(exc).__name__}: {exc}"})
    out: dict[str, Any] = {t.key: median_by_rate(runs[t.key]) for t in targets}
    for t in targets:
        out[t.key]["path"] = t.note
    out["ratios"] = load_ratios(out)
    seen = out["tunnel"].get("clients_seen") or {}
    # The point of the suite: the web servers see the MN's vIP, not an NTMA or NAT address.
    out["tunnel_client_seen_is_vip"] = bool(seen) and set(seen) == {client_vip}
    out["client_vip"] = client_vip
    out["tool"] = "python -m bench.httpload (asyncio, a new connection per request)"
    return out


# -- health checks --------------------------------------------------------------------------


def health_cycle(
    events: Sequence[Mapping[str, Any]], t_kill: float, t_start: float
) -> dict[str, Any]:
    """Detection and recovery of one kill/start cycle from the watcher's change events.

    down = first look after the kill at which web2 did not answer; removed = first look after
    that at which the agent's status had it out of service; up/restored likewise after the
    start. `*_verdict_s` use the agent's own time of its health flip (before it applied it).
    """

    def first(after: float, pred: Callable[[Mapping[str, Any]], bool]) -> Mapping[str, Any] | None:
        return next((e for e in events if e["t"] >= after and pred(e)), None)

    out: dict[str, Any] = {}
    down = first(t_kill, lambda e: e.get("serving") is False)
    removed = down and first(down["t"], lambda e: e.get("in_service") is False)
    up = first(t_start, lambda e: e.get("serving") is True)
    back = up and first(up["t"], lambda e: e.get("in_service") is True)
    if down and removed:
        out["detection_s"] = round(removed["t"] - down["t"], 3)
        flip = removed.get("last_change")
        if isinstance(flip, int | float):
            out["detection_verdict_s"] = round(flip - down["t"], 3)
    if up and back:
        out["recovery_s"] = round(back["t"] - up["t"], 3)
        flip = back.get("last_change")
        if isinstance(flip, int | float):
            out["recovery_verdict_s"] = round(flip - up["t"], 3)
    if down is None or removed is None:
        out["error"] = "the agent never took web2 out of service"
    elif up is None or back is None:
        out["error"] = "the agent never brought web2 back"
    return out


class Watcher:
    """bench.hcwatch in the LB's namespace; its change events, collected by a thread."""

    def __init__(self, lab: BenchLab) -> None:
        _, address, port = DOWN
        argv = [sys.executable, "-m", "bench.hcwatch", "--socket", lab.socket(LB)]
        argv += ["--service", SERVICE, "--real", f"{address}:{port}"]
        self.events: list[dict[str, Any]] = []
        self._changed: queue.Queue[None] = queue.Queue()
        self.proc = subprocess.Popen(
            in_ns(lab.ns(LB), argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=probe_env(),
        )
        assert self.proc.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
            self._changed.put(None)

    def wait(self, pred: Callable[[Mapping[str, Any]], bool], bound: float) -> bool:
        """Until the latest event satisfies `pred`, at most `bound` seconds."""
        deadline = time.monotonic() + bound
        while True:
            if self.events and pred(self.events[-1]):
                return True
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                return False
            with contextlib.suppress(queue.Empty):
                self._changed.get(timeout=min(left, 0.5))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # its "stop"
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(2)


def health_config(lab: BenchLab) -> dict[str, Any]:
    for svc in lab.status(LB).get("services") or []:
        if svc.get("name") == SERVICE:
            return {"service": SERVICE, "scheduler": svc.get("scheduler"), **svc["health"]}
    raise LabFailure(f"the LB agent has no service {SERVICE!r}")


def run_health(lab: BenchLab, cycles: int, progress: Callable[[str], None]) -> dict[str, Any]:
    name = DOWN[0]
    config = health_config(lab)
    watcher = Watcher(lab)
    results: list[dict[str, Any]] = []
    try:
        for i in range(cycles):
            if not watcher.wait(lambda e: bool(e.get("serving") and e.get("in_service")), 30):
                raise LabFailure(f"{name} is not serving and in service before cycle {i}")
            t_kill = time.time()
            lab.kill(name)
            removed = watcher.wait(lambda e: e.get("in_service") is False, 30)
            t_start = time.time()
            lab.start(name)
            back = removed and watcher.wait(lambda e: e.get("in_service") is True, 60)
            cycle = health_cycle(list(watcher.events), t_kill, t_start)
            if not (removed and back):
                cycle.setdefault("error", f"cycle {i}: timed out waiting for the agent")
            results.append(cycle)
            progress(f"health: cycle {i + 1}/{cycles}: {cycle}")
    finally:
        watcher.close()
    detect = [c["detection_s"] for c in results if "detection_s" in c]
    recover = [c["recovery_s"] for c in results if "recovery_s" in c]
    return {
        "config": config,
        "real": f"{name} {DOWN[1]}:{DOWN[2]}",
        "how": "ntm lab kill/start; bench.hcwatch in the LB namespace polls web2 (GET /whoami) "
        "and the agent's status every 20 ms",
        "cycles": results,
        "detection_s": summary(detect),
        "recovery_s": summary(recover),
        "failed_cycles": [c["error"] for c in results if "error" in c],
    }
