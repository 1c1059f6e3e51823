"""Issue 5's performance figures: the gap a 1 kHz UDP stream sees on each mobility event.

mn1 sends a datagram every millisecond to www.example.com udp/9000 (through its tunnel to an
NTMA, the LB's `sh` service, a web server's echo) and timestamps the echoes
(`bench.udpprobe`). Each run causes one event and waits until mn1's status shows it handled
and the stream has been steady for SETTLE seconds; `bench.gaps` then takes the longest
silence around it and the probes lost. Events, RUNS each:

- handover, same family: `ntm lab move mn1 --to access-c` (IPv4 behind nat-c, the
  benchmark's own network) and back to access-a (IPv4 behind nat-a), alternately;
- handover, different family: access-a (IPv4 behind NAT) <-> access-b (IPv6 only);
- gateway failure: `ntm lab kill ntma1` (mn1 fails over to ntma2); then ntma1 is started
  again (it takes seconds) and meanwhile
- uplink cut: `ntm lab link ntma2 <uplink mn1 uses> down` (mn1 moves to ntma2's other
  address), then up again; then the run waits for mn1's fail-back to ntma1 after its
  hold-down (measured too: "fail-back") before the next run.

- make-before-break, two interfaces: mn3 sits on access-a (IPv4 behind nat-a) and access-b
  (IPv6 only) at once with a path ready on each; each run asks its node to prefer the other
  uplink (`ntm_node.multihome_client.prefer_uplink`, the admin request `prefer`),
  access-a -> access-b and back, alternately. mn3 runs the same probe stream.

`--failover-events` (EVENT_GROUPS) runs some of these only.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ntm_io.status import AdminError, StatusError
from ntm_node.multihome_client import UplinkSwitch, prefer_uplink

from .gaps import (
    GATEWAY_GOAL,
    HANDOVER_GOAL,
    LOST_BEFORE,
    MBB_GOAL,
    PUBLISHED,
    Goal,
    StreamLog,
    event_figures,
    summarize,
)
from .labctl import (
    MN_ACCESS_C,
    SAME_FAMILY_NET,
    UP_TIMEOUT,
    BenchLab,
    LabFailure,
    lab_mn1_seconds,
)
from .nsproc import in_ns, run_in
from .options import pick
from .stats import summary
from .tunnel import probe_env

CLIENT = "mn1"
SERVICE_NAME = "www.example.com"  # a CNAME to the service's NTM name
SERVICE_FQDN = "www.ntm.example.com"
UDP_PORT = 9000
RATE = 1000
GAP_MS = 2.0  # the probe reports every silence longer than this
PRIMARY, BACKUP = "ntma1", "ntma2"
HOME = ("access-a", "10.10.1.100")
ROAMS = {
    "same_family": (SAME_FAMILY_NET, MN_ACCESS_C),
    "different_family": ("access-b", "2001:db8:b::100"),
}
UPLINKS = {
    "isp1": ("192.0.2.10", "2001:db8:201::10", "192.0.2.1"),
    "isp2": ("203.0.113.10", "2001:db8:202::10", "203.0.113.1"),
}
SETTLE = 0.5  # s of steady echoes (and handled status) that end a run
EVENT_BOUND = 30.0  # s for one event to be handled
FAILBACK_SLACK = 30.0  # s beyond the hold-down for a fail-back (ntma1's start, a retry)
MAX_FAILED = 3  # runs in a row of one kind: the lab is broken, stop that kind

MBB_KEY = "handover_make_before_break"
MBB_CLIENT = "mn3"  # on access-a and access-b at once (compose.yaml, lab/config/mn3.toml)
MBB_UPLINKS = ("access-a", "access-b")  # mn3's interfaces are named after the networks
MBB_READY_BOUND = 30.0  # s for mn3's path to be ready on both uplinks
SWITCH_BOUND = 10.0  # s for the paths to move once asked
STEADY_BOUND = 10.0  # s after the move for the stream to be steady again

# What `--failover-events` picks from, in the order they run; "gateway" is the gateway
# failure, the uplink cut and the fail-back (one run causes all three).
EVENT_GROUPS = ("same_family", "different_family", "mbb", "gateway")

EVENTS: dict[str, tuple[str, Goal | None]] = {
    "handover_same_family": ("handover, same family (IPv4 NAT a <-> IPv4 NAT c)", HANDOVER_GOAL),
    "handover_different_family": (
        "handover, different family (IPv4 NAT <-> IPv6 only)",
        HANDOVER_GOAL,
    ),
    "handover_make_before_break": (
        "handover, make-before-break, two interfaces (mn3)",
        MBB_GOAL,
    ),
    "gateway_failure": ("gateway failure (kill ntma1 -> ntma2)", GATEWAY_GOAL),
    "failback": ("fail-back to ntma1 after its hold-down", None),
    "uplink_cut": ("uplink cut of ntma2 (isp1 <-> isp2)", GATEWAY_GOAL),
}


def probe_argv() -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.udpprobe",
        "--name",
        SERVICE_NAME,
        "--port",
        str(UDP_PORT),
        "--rate",
        str(RATE),
        "--gap-ms",
        str(GAP_MS),
    ]


class Stream:
    """The probe running in a client's namespace (mn1, or mn3 for make-before-break); its
    lines land in `log` as they come."""

    def __init__(self, lab: BenchLab, name: str, client: str = CLIENT) -> None:
        self.client = client
        self.log = StreamLog(gap_threshold=GAP_MS / 1000)
        self.lock = threading.Lock()
        # Everything the probe said, for a look afterwards (`--keep-work`).
        raw = lab.work / "logs" / f"udpprobe-{name}.txt"
        raw.parent.mkdir(parents=True, exist_ok=True)
        self.raw = raw.open("w")
        self.proc = subprocess.Popen(
            in_ns(lab.ns(client), probe_argv()),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=probe_env(),
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.write(line)
            with self.lock:
                self.log.feed(line)
        self.raw.close()

    def wait_flowing(self, bound: float = 20.0) -> None:
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            with self.lock:
                if self.log.received > 100 and self.log.steady(time.monotonic(), 0.0, 0.5):
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        err = self.stop_and_read_errors()
        raise LabFailure(
            f"the UDP probe in {self.client} got no steady echo within {bound:g} s: {err}"
        )

    def steady(self, since: float, settle: float) -> bool:
        with self.lock:
            return self.log.steady(time.monotonic(), since, settle)

    def last_echo(self) -> float:
        with self.lock:
            return self.log.last_echo

    def stop(self) -> StreamLog:
        """SIGTERM, then the probe reports its lost probes and totals."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        return self.log

    def stop_and_read_errors(self) -> str:
        self.stop()
        assert self.proc.stderr is not None
        return self.proc.stderr.read().strip()[-500:] or f"exit {self.proc.returncode}"


def service_view(status: Mapping[str, Any]) -> Mapping[str, Any]:
    view = ((status.get("failover") or {}).get("services") or {}).get(SERVICE_FQDN)
    return view if isinstance(view, Mapping) else {}


def gateway_of(status: Mapping[str, Any]) -> str:
    """The short name (ntma1) of the gateway carrying the service now, or ""."""
    current = str((service_view(status).get("gateway") or {}).get("current") or "")
    return current.split(".", 1)[0]


def uplink_of(status: Mapping[str, Any]) -> str | None:
    """Which uplink of ntma2 mn1's path uses now (from the peer address), or None."""
    peer = str(service_view(status).get("peer_address") or "")
    host = peer.rsplit(":", 1)[0].strip("[]")
    for name, (v4, v6, _router) in UPLINKS.items():
        if host in (v4, v6):
            return name
    return None


def moved_to(address: str) -> Callable[[Mapping[str, Any]], bool]:
    """Handled: registered from the new address and the paths refreshed (not paused)."""

    def done(status: Mapping[str, Any]) -> bool:
        addrs = status.get("addresses") or {}
        have = [*(addrs.get("ipv4") or []), *(addrs.get("ipv6") or [])]
        paused = (status.get("failover") or {}).get("paused")
        view = service_view(status)
        return bool(status.get("registered")) and address in have and not paused and bool(view)

    return done


def on_gateway(name: str) -> Callable[[Mapping[str, Any]], bool]:
    def done(status: Mapping[str, Any]) -> bool:
        view = service_view(status)
        return gateway_of(status) == name and not view.get("switching")

    return done


def on_other_uplink(old: str) -> Callable[[Mapping[str, Any]], bool]:
    def done(status: Mapping[str, Any]) -> bool:
        now = uplink_of(status)
        return now is not None and now != old and gateway_of(status) == BACKUP

    return done


@dataclass
class Outcome:
    """One event: caused at t0, over at t1 (handled and steady, or the bound ran out)."""

    t0: float
    t1: float
    censored_from: float | None  # the stream had not recovered by t1: silent since then
    handled: bool  # mn1's status showed the event handled
    status: dict[str, Any]

    def window(self, **extra: Any) -> dict[str, Any]:
        return {
            "t0": self.t0,
            "t1": self.t1,
            "censored_from": self.censored_from,
            "handled": self.handled,
            **extra,
        }


class Runner:
    def __init__(self, lab: BenchLab, progress: Callable[[str], None]) -> None:
        self.lab = lab
        self.progress = progress

    def status(self) -> dict[str, Any]:
        try:
            return self.lab.status(CLIENT)
        except StatusError:
            return {}

    def wait_handled(
        self,
        stream: Stream,
        t0: float,
        done: Callable[[Mapping[str, Any]], bool],
        bound: float,
        on_done: Callable[[], None] | None = None,
    ) -> Outcome:
        """Until `done(status)` has held and the stream has been steady for SETTLE seconds,
        at most until t0 + bound. `on_done` runs once, when `done` first holds."""
        deadline = t0 + bound
        since: float | None = None
        status: dict[str, Any] = {}
        while True:
            now = time.monotonic()
            status = self.status()
            if done(status):
                if since is None and on_done is not None:
                    on_done()
                    on_done = None
                since = now if since is None else since
                if now - since >= SETTLE and stream.steady(since, SETTLE):
                    return Outcome(t0, now, None, True, status)
            else:
                since = None
            if now >= deadline:
                cut_short = None if stream.steady(t0, SETTLE) else stream.last_echo()
                return Outcome(t0, now, cut_short, done(status), status)
            time.sleep(0.05)

    def one(
        self,
        stream: Stream,
        act: Callable[[], None],
        done: Callable[[Mapping[str, Any]], bool],
        bound: float = EVENT_BOUND,
        on_done: Callable[[], None] | None = None,
    ) -> Outcome:
        t0 = time.monotonic()
        act()
        return self.wait_handled(stream, t0, done, bound, on_done)


def _figures(log: StreamLog, windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for w in windows:
        fig = event_figures(log, w["t0"], w["t1"], w.get("censored_from"))
        out.append({**{k: v for k, v in w.items() if k not in ("t0", "t1")}, **fig})
    return out


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_handover(runner: Runner, key: str, runs: int) -> dict[str, Any]:
    net, address = ROAMS[key]
    lab = runner.lab
    stream = Stream(lab, f"handover-{key}")
    windows: list[dict[str, Any]] = []
    unhandled: list[str] = []
    error: str | None = None
    away = False
    try:
        stream.wait_flowing()
        for i in range(runs):
            to_net, to_addr = HOME if away else (net, address)

            def act(to_net: str = to_net) -> None:
                lab.move(CLIENT, to_net)

            got = runner.one(stream, act, moved_to(to_addr))
            away = not away
            windows.append(got.window(to=to_net))
            if not got.handled:
                unhandled.append(f"run {i}: move to {to_net} not handled in {EVENT_BOUND:g} s")
                last = windows[-MAX_FAILED:]
                if len(last) == MAX_FAILED and not any(w["handled"] for w in last):
                    error = f"{MAX_FAILED} moves in a row not handled: the lab is broken"
                    break
    except (LabFailure, OSError, subprocess.TimeoutExpired) as exc:
        error = _error(exc)  # the runs so far still count
    finally:
        if away:
            with contextlib.suppress(LabFailure):
                lab.move(CLIENT, HOME[0])
                runner.wait_handled(stream, time.monotonic(), moved_to(HOME[1]), EVENT_BOUND)
        log = stream.stop()
    runs_out = _figures(log, windows)
    out = {
        "event": f"ntm lab move {CLIENT} --to {net} / --to {HOME[0]}, alternately",
        "per_run": runs_out,
        **summarize(runs_out, EVENTS[f"handover_{key}"][1]),
        "by_direction": {
            to: summarize([r for r in runs_out if r["to"] == to], None)["gap_ms"]
            for to in (net, HOME[0])
        },
        "probe_totals": log.totals,
        "unhandled_runs": unhandled,
    }
    return out | ({"error": error} if error else {})


def standby_ready(status: Mapping[str, Any], lately: float = 2.0) -> bool:
    """mn3 has a multihomed path, and on every path a leg on another uplink answered a
    standby probe in the last `lately` s: a switch can be make-before-break."""
    paths = (status.get("multihome") or {}).get("paths") or []

    def ready(path: Mapping[str, Any]) -> bool:
        legs = [g for g in path.get("legs") or [] if g.get("local") != path.get("local")]
        return bool(legs) and all(
            (g.get("answered") or 0) > 0
            and isinstance(g.get("answered_ago_s"), int | float)
            and g["answered_ago_s"] < lately
            for g in legs
        )

    return bool(paths) and all(ready(p) for p in paths)


def stream_on(sent: Mapping[str, int], uplink: str) -> bool:
    """The frames mn3 sent over a settled run (~1 000 probes/s) left by `uplink`: the other
    one carried at most standby probes."""
    other = sum(n for name, n in sent.items() if name != uplink)
    return sent.get(uplink, 0) >= 100 and other * 4 < sent[uplink]


class Multihomed:
    """mn3 in the bench lab: its status, its preference, its interface counters."""

    def __init__(self, lab: BenchLab) -> None:
        self.lab = lab
        self.socket = lab.socket(MBB_CLIENT)

    def status(self) -> dict[str, Any]:
        try:
            return self.lab.status(MBB_CLIENT)
        except StatusError:
            return {}

    def prefer(self, uplink: str) -> UplinkSwitch:
        return prefer_uplink(self.socket, uplink, bound=SWITCH_BOUND)

    def tx_packets(self) -> dict[str, int]:
        """Frames sent so far on each uplink (the kernel's counters in mn3's namespace)."""
        files = [f"/sys/class/net/{n}/statistics/tx_packets" for n in MBB_UPLINKS]
        done = run_in(self.lab.ns(MBB_CLIENT), ["cat", *files], timeout=10)
        values = done.stdout.split()
        if done.returncode != 0 or len(values) != len(MBB_UPLINKS):
            raise LabFailure(f"no interface counters in {MBB_CLIENT}: {done.stderr.strip()}")
        return dict(zip(MBB_UPLINKS, (int(v) for v in values), strict=True))

    def wait_ready(self, bound: float = MBB_READY_BOUND) -> None:
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            if standby_ready(self.status()):
                return
            time.sleep(0.05)
        paths = (self.status().get("multihome") or {}).get("paths")
        raise LabFailure(f"{MBB_CLIENT}'s path not ready on both uplinks in {bound:g} s: {paths}")


def wait_steady(stream: Stream, since: float, bound: float) -> float | None:
    """Until the stream has been steady for SETTLE s after `since` (None), at most `bound`
    s: then the last echo (the silence that began there was still on)."""
    deadline = since + bound
    while time.monotonic() < deadline:
        if time.monotonic() - since >= SETTLE and stream.steady(since, SETTLE):
            return None
        time.sleep(0.02)
    return stream.last_echo()


def lost_outside(lost: list[float], windows: list[dict[str, Any]]) -> dict[str, int]:
    """Probes lost outside every run's window (the probe's totals count the whole stream):
    before the first run (start-up, the unmeasured move to access-a), between runs, after
    the last."""
    spans = [(w["t0"] - LOST_BEFORE, w["t1"]) for w in windows]
    out = {"before_first": 0, "between": 0, "after_last": 0}
    for t in lost:
        if any(a <= t <= b for a, b in spans):
            continue
        if not spans or t < spans[0][0]:
            out["before_first"] += 1
        elif t > spans[-1][1]:
            out["after_last"] += 1
        else:
            out["between"] += 1
    return out


def mbb_targets(runs: int) -> list[str]:
    """access-b, access-a, access-b, ...: from access-a (where each series starts) and back."""
    return [MBB_UPLINKS[(i + 1) % 2] for i in range(runs)]


def run_make_before_break(runner: Runner, runs: int) -> dict[str, Any]:
    """Per run: prefer mn3's other uplink (t0 = the request), wait until its paths use it and
    the stream has been steady for SETTLE s; the interface counters over that settled time
    show which uplink carried the stream."""
    lab = runner.lab
    mn3 = Multihomed(lab)
    stream = Stream(lab, "make-before-break", client=MBB_CLIENT)
    windows: list[dict[str, Any]] = []
    unhandled: list[str] = []
    error: str | None = None
    try:
        stream.wait_flowing()
        mn3.wait_ready()
        # Each series starts on access-a (the configured preference), whichever answered
        # first; not measured.
        mn3.prefer(MBB_UPLINKS[0])
        if wait_steady(stream, time.monotonic(), STEADY_BOUND) is not None:
            raise LabFailure(f"no steady stream from {MBB_CLIENT} on {MBB_UPLINKS[0]}")
        for i, uplink in enumerate(mbb_targets(runs)):
            # Make-before-break needs the standby leg proven: wait for it (not measured).
            mn3.wait_ready()
            asked = time.monotonic()
            try:
                switch = mn3.prefer(uplink)
            except (AdminError, TimeoutError) as exc:
                unhandled.append(f"run {i}: prefer {uplink}: {_error(exc)}")
                cut_short = wait_steady(stream, time.monotonic(), STEADY_BOUND)
                windows.append(
                    {
                        "t0": asked,
                        "t1": time.monotonic(),
                        "censored_from": cut_short,
                        "handled": False,
                        "to": uplink,
                    }
                )
            else:
                before = mn3.tx_packets()
                cut_short = wait_steady(stream, switch.done_at, STEADY_BOUND)
                sent = {n: c - before[n] for n, c in mn3.tx_packets().items()}
                windows.append(
                    {
                        "t0": switch.requested_at,
                        "t1": time.monotonic(),
                        "censored_from": cut_short,
                        "handled": True,
                        "to": uplink,
                        "address": switch.address,
                        "paths_moved_ms": round(1000 * (switch.done_at - switch.requested_at), 2),
                        "node_switched_ms": (
                            None
                            if switch.switched_at is None
                            else round(1000 * (switch.switched_at - switch.requested_at), 2)
                        ),
                        "tx_frames_settled": sent,
                        "stream_on_target": stream_on(sent, uplink),
                    }
                )
                if not stream_on(sent, uplink):
                    unhandled.append(f"run {i}: the stream did not leave by {uplink}: {sent}")
            last = windows[-MAX_FAILED:]
            if len(last) == MAX_FAILED and not any(w["handled"] for w in last):
                error = f"{MAX_FAILED} switches in a row failed: the lab is broken"
                break
    except (LabFailure, AdminError, TimeoutError, OSError, subprocess.TimeoutExpired) as exc:
        error = _error(exc)  # the runs so far still count
    finally:
        log = stream.stop()
    runs_out = _figures(log, windows)
    counters = (mn3.status().get("multihome") or {}).get("counters")
    out = {
        "event": f"{MBB_CLIENT}'s admin request prefer {MBB_UPLINKS[1]} / {MBB_UPLINKS[0]}, "
        "alternately (ntm_node.multihome_client.prefer_uplink); t0 = the request",
        "client": MBB_CLIENT,
        "per_run": runs_out,
        **summarize(runs_out, MBB_GOAL),
        "by_direction": {
            to: summarize([r for r in runs_out if r["to"] == to], None)["gap_ms"]
            for to in MBB_UPLINKS
        },
        "paths_moved_ms": summary(
            [float(r["paths_moved_ms"]) for r in runs_out if "paths_moved_ms" in r], 2
        ),
        "stream_off_target_runs": sum(1 for r in runs_out if r.get("stream_on_target") is False),
        "probe_totals": log.totals,
        "lost_outside_runs": lost_outside(log.lost, windows),
        "node_counters": counters,
        "unhandled_runs": unhandled,
    }
    return out | ({"error": error} if error else {})


def _last_event(status: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    events = [
        e for e in (status.get("failover") or {}).get("events") or [] if e.get("kind") == kind
    ]
    return dict(events[-1]) if events else None


class Starter:
    """`ntm lab start` in a thread: ntma1 takes seconds to start, the uplink run goes on."""

    def __init__(self, lab: BenchLab, service: str) -> None:
        self.lab, self.service = lab, service
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.lab.start(self.service)
        except (LabFailure, OSError) as exc:
            self.error = exc

    def join(self, bound: float = UP_TIMEOUT + 10) -> None:
        if self.thread is None:
            self.start()  # mn1 never showed the switch: start it now all the same
        assert self.thread is not None
        self.thread.join(bound)
        if self.thread.is_alive():
            raise LabFailure(f"ntm lab start {self.service} did not return in {bound:g} s")
        if self.error is not None:
            raise self.error


def _uplink_run(runner: Runner, stream: Stream) -> Outcome:
    """Cut the uplink of ntma2 mn1 uses, wait for the move, plug it back in."""
    lab = runner.lab
    cut = uplink_of(runner.status())
    if cut is None:
        raise LabFailure(f"{CLIENT} is on {gateway_of(runner.status()) or '?'}, not {BACKUP}")
    try:
        got = runner.one(stream, lambda: lab.link(BACKUP, cut, up=False), on_other_uplink(cut))
    finally:
        lab.link(BACKUP, cut, up=True)
    _wait_link(lab, cut)
    got.status["cut"] = cut
    return got


def run_gateway(runner: Runner, runs: int, hold_down: float) -> dict[str, Any]:
    """Per run: kill ntma1 (gateway failure); start it again as soon as mn1 shows the switch,
    and meanwhile cut ntma2's uplink in use and plug it back (uplink cut: mn1 is on ntma2
    then); then wait for the fail-back to ntma1."""
    lab = runner.lab
    bound = hold_down + FAILBACK_SLACK
    stream = Stream(lab, "gateway")
    fail: list[dict[str, Any]] = []
    cuts: list[dict[str, Any]] = []
    back: list[dict[str, Any]] = []
    unhandled: list[str] = []
    error: str | None = None
    try:
        stream.wait_flowing()
        if gateway_of(runner.status()) != PRIMARY:
            raise LabFailure(
                f"{CLIENT} reaches {SERVICE_FQDN} through {gateway_of(runner.status()) or '?'}, "
                f"not {PRIMARY}: the gateway-failure runs need it on {PRIMARY}"
            )
        for i in range(runs):
            starter = Starter(lab, PRIMARY)
            got = runner.one(
                stream, lambda: lab.kill(PRIMARY), on_gateway(BACKUP), on_done=starter.start
            )
            fail.append(got.window(node_event=_last_event(got.status, "gateway")))
            if got.handled:
                cut = _uplink_run(runner, stream)
                node_event = _last_event(cut.status, "uplink")
                cuts.append(cut.window(cut=cut.status["cut"], node_event=node_event))
                if not cut.handled:
                    unhandled.append(f"run {i}: no move off {cut.status['cut']}")
            else:
                unhandled.append(f"run {i}: no switch to {BACKUP} within {EVENT_BOUND:g} s")
            # The fail-back window opens before ntma1 is up: nothing may slip past it.
            got = runner.one(stream, starter.join, on_gateway(PRIMARY), bound)
            back.append(got.window(node_event=_last_event(got.status, "failback")))
            if not got.handled:
                unhandled.append(f"run {i}: no fail-back to {PRIMARY} in {bound:g} s")
                error = "mn1 did not fail back to ntma1: the next run cannot start"
                break
            if (i + 1) % 5 == 0:
                runner.progress(f"failover: gateway failure and uplink cut {i + 1}/{runs}")
    except (LabFailure, OSError, subprocess.TimeoutExpired) as exc:
        error = _error(exc)  # the runs so far still count
    finally:
        log = stream.stop()
    fail_runs, cut_runs, back_runs = (_figures(log, w) for w in (fail, cuts, back))
    return {
        "gateway_failure": {
            "event": f"ntm lab kill {PRIMARY}; mn1 fails over to {BACKUP}",
            "per_run": fail_runs,
            **summarize(fail_runs, GATEWAY_GOAL),
            **_node_figures(fail_runs),
            "published_s": PUBLISHED,
            "probe_totals": log.totals,
            "unhandled_runs": unhandled,
            **({"error": error} if error else {}),
        },
        "uplink_cut": {
            "event": f"right after each gateway failure (mn1 on {BACKUP}, {PRIMARY} starting "
            f"again): ntm lab link {BACKUP} <uplink in use> down; up once mn1 moved",
            "per_run": cut_runs,
            **summarize(cut_runs, GATEWAY_GOAL),
            **_node_figures(cut_runs),
            "published_s": PUBLISHED,
        },
        "failback": {
            "event": f"{PRIMARY} started again; mn1 fails back after its hold-down "
            f"({hold_down:g} s, lab/config/mn1.toml): make-before-break",
            "per_run": back_runs,
            **summarize(back_runs, None),
        },
    }


def _node_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The node's own account (its failover event): silence to verdict, verdict to new path."""
    return {
        "node_detection_s": summary(_node_times(runs, "detection_s"), 4),
        "node_switch_s": summary(_node_times(runs, "switch_s"), 4),
    }


def _node_times(runs: list[dict[str, Any]], key: str) -> list[float]:
    out = []
    for r in runs:
        event = r.get("node_event") or {}
        if isinstance(event.get(key), int | float):
            out.append(float(event[key]))
    return out


def _wait_link(lab: BenchLab, uplink: str, bound: float = 10.0) -> None:
    """After `link up`: ntma2 reaches its router on that uplink again."""
    router = UPLINKS[uplink][2]
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        done = run_in(lab.ns(BACKUP), ["ping", "-n", "-c", "1", "-W", "1", router], timeout=5)
        if done.returncode == 0:
            return
        time.sleep(0.1)
    raise LabFailure(f"{BACKUP} does not reach {router} on {uplink} {bound:g} s after link up")


def parse_events(text: str) -> tuple[str, ...]:
    """`--failover-events`: comma-separated names from EVENT_GROUPS, in their run order."""
    return pick("--failover-events", text, EVENT_GROUPS, "event")


def run_failover(
    lab: BenchLab,
    runs: int,
    progress: Callable[[str], None],
    events: tuple[str, ...] = EVENT_GROUPS,
) -> dict[str, Any]:
    runner = Runner(lab, progress)
    hold_down = lab_mn1_seconds("failback_hold_down")
    out: dict[str, Any] = {
        "runs": runs,
        "events": list(events),
        "probe": f"ip netns exec <lab>-{CLIENT} " + shlex.join(probe_argv()),
        "how": (
            f"{RATE} UDP datagrams/s from {CLIENT} ({MBB_CLIENT} for make-before-break) to "
            f"{SERVICE_NAME}:{UDP_PORT} (through the tunnel to the NTMA, the LB's sh service, "
            "a web server's echo); gap = the longest "
            f"time without an echo overlapping [event caused, event handled + {SETTLE:g} s "
            f"steady]; silences under {GAP_MS:g} ms are not reported by the probe (a gap "
            f"shown as {GAP_MS:g} ms means at most that); lost = probes sent from 0.1 s before "
            "the event to its end that were never echoed"
        ),
        "failback_hold_down_s": hold_down,
        "allowed_outage_s": lab_mn1_seconds("allowed_outage"),
        "published_s": PUBLISHED,
        "labels": {k: v[0] for k, v in EVENTS.items()},
        "goals": {k: (v[1].text() if v[1] else "none set") for k, v in EVENTS.items()},
        "wall_s": {},
    }
    for key in ("same_family", "different_family"):
        if key not in events:
            continue
        progress(f"failover: handover {key.replace('_', ' ')}, {runs} moves")
        started = time.monotonic()
        try:
            out[f"handover_{key}"] = run_handover(runner, key, runs)
        except (LabFailure, OSError, subprocess.TimeoutExpired) as exc:
            out[f"handover_{key}"] = {"error": f"{type(exc).__name__}: {exc}"}
        out["wall_s"][f"handover_{key}"] = round(time.monotonic() - started, 1)
    if "mbb" in events:
        progress(f"failover: make-before-break, {runs} uplink switches of {MBB_CLIENT}")
        started = time.monotonic()
        try:
            out[MBB_KEY] = run_make_before_break(runner, runs)
        except (LabFailure, OSError, subprocess.TimeoutExpired) as exc:
            out[MBB_KEY] = {"error": f"{type(exc).__name__}: {exc}"}
        out["wall_s"][MBB_KEY] = round(time.monotonic() - started, 1)
    if "gateway" not in events:
        return out
    progress(f"failover: {runs} x (kill {PRIMARY}, cut an uplink of {BACKUP}, fail-back)")
    started = time.monotonic()
    try:
        out.update(run_gateway(runner, runs, hold_down))
    except (LabFailure, OSError, subprocess.TimeoutExpired) as exc:
        out["gateway_failure"] = {"error": f"{type(exc).__name__}: {exc}"}
    out["wall_s"]["gateway_failure+uplink_cut+failback"] = round(time.monotonic() - started, 1)
    return out
