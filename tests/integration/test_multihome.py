"""Make-before-break with two uplinks: mn3 on access-a (IPv4 behind nat-a) and access-b
(IPv6 only) at once, a 1 kHz UDP probe stream (bench.udpprobe) to www.example.com udp/9000
through its tunnel (ntma1, the LB, a web server's echo).

- Preferring access-b, then access-a again (`ntm node --prefer`): the path moves while the
  old uplink still works, and not one probe is lost.
- Pulling access-a's cable: the path moves to access-b at once (netlink); the gap is
  printed (`pytest -s`) and only checked to be bounded. Plugging it back: the path returns
  make-before-break, again without a lost probe.

A smaller lab (compose_subset): what mn3 and the service need, nothing else.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.gaps import StreamLog
from ntm_io.status import read_status
from ntm_node.multihome_client import UplinkSwitch, paths_on, prefer_uplink
from tests.integration.conftest import Lab, compose_subset, poll

pytestmark = pytest.mark.lab

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]
SERVICES = [
    "pki",
    "dns",
    "resolver",
    "nat-a",
    "rtr-b",
    "dc1",
    "web1",
    "web2",
    "web3",
    "lb",
    "ntma1",
    "mn3",
]
V4, V6 = "10.10.1.103", "2001:db8:b::103"
NAT_A = "198.51.100.2"  # what ntma1 sees of mn3's access-a leg (nat-a masquerades)
NETS = ("access-a", "access-b")  # mn3's interfaces are named after the networks
CUT_BOUND = 5.0  # s: the gap of a pulled cable must end well within this (sanity bound)


class Stream:
    """bench.udpprobe in mn3's namespace, its lines parsed as they come."""

    def __init__(self, lab: Lab) -> None:
        argv = [PY, "-m", "ntm_cli.main", "lab", "exec", "--name", lab.name, "--state"]
        argv += [str(lab.state), "mn3", "--", PY, "-m", "bench.udpprobe"]
        argv += ["--name", "www.example.com", "--port", "9000", "--rate", "1000"]
        self.log = StreamLog(gap_threshold=0.002)
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.lock:
                self.log.feed(line)

    def received(self) -> int:
        with self.lock:
            return self.log.received

    def steady(self, since: float = 0.0, settle: float = 0.5) -> bool:
        with self.lock:
            return self.log.received > 100 and self.log.steady(time.monotonic(), since, settle)

    def stop(self) -> StreamLog:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(10)
        return self.log

    def errors(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()[-2000:] if self.proc.poll() is not None else ""


@pytest.fixture(scope="module")
def mnlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    from tests.integration.conftest import lab_unavailable_reason, running_lab

    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with running_lab(compose_subset(SERVICES), tmp_path_factory.mktemp("mn3")) as lab:
        yield lab


def mn3_socket(lab: Lab) -> str:
    return str(lab.state / "run" / "mn3.sock")


def mn3_status(lab: Lab) -> dict[str, Any]:
    return read_status(mn3_socket(lab))


def ready_on_both(lab: Lab) -> bool:
    """A multihomed path exists and its standby leg has answered lately."""
    mh = mn3_status(lab).get("multihome") or {}
    paths = mh.get("paths") or []
    return bool(paths) and all(
        any(leg["answered"] > 0 and (leg["answered_ago_s"] or 99) < 2 for leg in p["legs"])
        for p in paths
    )


def tx_packets(lab: Lab) -> dict[str, int]:
    """Frames mn3 sent on each uplink so far (the kernel's interface counters)."""
    out = lab.exec("mn3", "cat", *(f"/sys/class/net/{n}/statistics/tx_packets" for n in NETS))
    return dict(zip(NETS, (int(x) for x in out.stdout.split()), strict=True))


def ntma1_sees(lab: Lab) -> list[str]:
    """The outer address ntma1 sends mn3's tunnel traffic to."""
    doc = read_status(str(lab.state / "run" / "ntma1.sock"))
    return [
        p["peer_address"][0]
        for p in doc["paths"]
        if p["peer_fqdn"] == "mn3.ntm.example.com" and p["peer_address"]
    ]


def dwell(lab: Lab, stream: Stream, uplink: str) -> None:
    """Half a second of echoes (~500 probes) on `uplink`: they left by that interface, and
    ntma1 answers to mn3's address there (nat-a's for access-a)."""
    before, got = tx_packets(lab), stream.received()
    poll(lambda: stream.received() >= got + 500, 20, f"500 echoes on {uplink}")
    sent = {n: c - before[n] for n, c in tx_packets(lab).items()}
    other = next(n for n in NETS if n != uplink)
    assert sent[uplink] >= 400 and sent[other] < 100, sent
    assert ntma1_sees(lab) == [NAT_A if uplink == "access-a" else V6]


def lost_between(log: StreamLog, a: float, b: float) -> list[float]:
    return [t for t in log.lost if a <= t <= b]


def longest_gap(log: StreamLog, a: float, b: float) -> float:
    return max((y - x for x, y in log.gaps if y >= a and x <= b), default=0.0)


def say(*a: object) -> None:
    print("[multihome]", *a, flush=True)


def test_make_before_break_switches_lose_nothing_and_a_pulled_cable_is_bridged(
    mnlab: Lab,
) -> None:
    lab = mnlab
    poll(lambda: bool(mn3_status(lab).get("registered")), 60, "mn3 registered")
    stream = Stream(lab)
    try:
        poll(stream.steady, 30, f"a steady echo stream from mn3 {stream.errors()}")
        poll(lambda: ready_on_both(lab), 20, "mn3's path ready on both uplinks")
        # Start from access-a (the configured preference), whichever answered first.
        first = prefer_uplink(mn3_socket(lab), "access-a")
        assert first.address == V4
        poll(lambda: stream.steady(settle=0.5), 20, "steady on access-a")

        t0 = time.monotonic()
        switches: list[UplinkSwitch] = []
        # Through the CLI once, as a user would; then through the helper the bench uses.
        cli = [PY, "-m", "ntm_cli.main", "node", "--prefer", "access-b"]
        done = lab.exec("mn3", *cli, "--socket", mn3_socket(lab))
        assert '"address": "2001:db8:b::103"' in done.stdout
        poll(lambda: paths_on(mn3_status(lab), V6) is not None, 10, "paths on access-b")
        dwell(lab, stream, "access-b")
        switches.append(prefer_uplink(mn3_socket(lab), "access-a"))
        dwell(lab, stream, "access-a")
        switches.append(prefer_uplink(mn3_socket(lab), V6))
        dwell(lab, stream, "access-b")
        switches.append(prefer_uplink(mn3_socket(lab), "access-a"))
        dwell(lab, stream, "access-a")
        t1 = time.monotonic()
        for s in switches:
            say(f"prefer {s.uplink}: paths moved {1000 * (s.done_at - s.requested_at):.1f} ms")

        # Pull access-a's cable: the node moves to access-b at once (break, then make).
        t_cut = time.monotonic()
        lab.link("mn3", "access-a", up=False)
        poll(lambda: paths_on(mn3_status(lab), V6) is not None, 10, "paths on access-b after cut")
        poll(lambda: stream.steady(since=t_cut, settle=0.5), 20, "steady after the cut")
        dwell(lab, stream, "access-b")
        t_cut_end = time.monotonic()

        # Plug it back: the path returns once access-a has answered, losing nothing.
        t_back = time.monotonic()
        lab.link("mn3", "access-a", up=True)
        poll(lambda: paths_on(mn3_status(lab), V4) is not None, 20, "paths back on access-a")
        poll(lambda: stream.steady(since=t_back, settle=0.5), 20, "steady after plug-in")
        dwell(lab, stream, "access-a")
        t_back_end = time.monotonic()
    finally:
        log = stream.stop()
    assert log.totals is not None, f"the probe ended without totals: {stream.errors()}"
    status = mn3_status(lab)
    mh = status["multihome"]
    lost_switching = lost_between(log, t0, t1)
    lost_back = lost_between(log, t_back, t_back_end)
    cut_gap = longest_gap(log, t_cut, t_cut_end)
    say(
        f"totals {log.totals}; lost while switching {len(lost_switching)}, after the cut "
        f"{len(lost_between(log, t_cut, t_cut_end))} (gap {1000 * cut_gap:.1f} ms), after the "
        f"plug-in {len(lost_back)}; longest gap while switching "
        f"{1000 * longest_gap(log, t0, t1):.1f} ms; counters {mh['counters']}"
    )
    moves = [float(e["at"]) for e in mh["events"]]
    for x, y in log.gaps:
        if y - x > 0.02 and t0 <= y and x <= t_back_end:
            near = min((x - m for m in moves), key=abs, default=0.0)
            say(f"gap {1000 * (y - x):.1f} ms, {1000 * near:+.1f} ms after the nearest switch")
    cut_moves = [round(1000 * (m - t_cut), 1) for m in moves if t_cut <= m <= t_cut_end]
    cut_lost = [round(1000 * (t - t_cut), 1) for t in lost_between(log, t_cut, t_cut_end)]
    say(f"after the cut (ms): moves at {cut_moves}, lost probes sent at {cut_lost}")
    stalls = [b - a for a, b in log.stalls if t0 <= b and a <= t_back_end]
    say(f"sender stalls over 20 ms: {len(stalls)}, longest {1000 * max(stalls, default=0):.1f} ms")
    assert lost_switching == [], "make-before-break switches lost probes"
    assert lost_back == [], "the return to a plugged-in uplink lost probes"
    assert cut_gap < CUT_BOUND
    reasons = [e["reason"] for e in mh["events"]]
    assert "lost" in reasons and reasons.count("preferred") >= 5
    assert mh["counters"].get("standby_answered", 0) > 0
    # Never rebuilt: the same path carried the stream throughout.
    assert len({e["path_id"] for e in mh["events"]}) == 1
