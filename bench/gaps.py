"""What a 1 kHz probe stream (bench.udpprobe) says about one event: pure, unit-tested.

The stream's lines are collected in a `StreamLog`; `event_figures` cuts out one event's
window [t0, t1] (t0 just before the benchmark caused the event, t1 once the stream was
steady again) and gives the gap (the longest time without an echo that overlaps the
window), the probes lost in it, the echoing server before and after, and how long the
sender itself was late (a busy machine, not the network). Goals and published figures are
checked in `summarize`.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .stats import summary

LOST_BEFORE = 0.1  # s: a probe sent this long before t0 can still be lost by the event
STEADY_GAP = 0.05  # s: a silence longer than this means the stream is not steady
IN_FLIGHT = 0.05  # s: a probe sent this long before a silence began may be lost to it


@dataclass
class StreamLog:
    """Everything the probe printed so far (fed line by line, possibly from a thread)."""

    gap_threshold: float = 0.002
    vip: str | None = None
    gaps: list[tuple[float, float]] = field(default_factory=list)
    stalls: list[tuple[float, float]] = field(default_factory=list)
    servers: list[tuple[float, str]] = field(default_factory=list)
    lost: list[float] = field(default_factory=list)  # send times, ascending
    last_echo: float = 0.0
    received: int = 0
    totals: dict[str, Any] | None = None
    other: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        kind, _, rest = line.strip().partition(" ")
        parts = rest.split()
        try:
            if kind == "G":
                a, b = float(parts[0]), float(parts[1])
                self.gaps.append((a, b))
                self.last_echo = max(self.last_echo, b)
            elif kind == "T":
                self.stalls.append((float(parts[0]), float(parts[1])))
            elif kind == "S":
                self.servers.append((float(parts[0]), parts[1]))
                self.last_echo = max(self.last_echo, float(parts[0]))
            elif kind == "P":
                self.last_echo = max(self.last_echo, float(parts[1]))
                self.received = int(parts[2])
            elif kind == "L":
                self.lost.append(float(parts[0]))
            elif kind == "V":
                self.vip = parts[0]
            elif kind == "END":
                self.totals = json.loads(rest)
            else:
                self.other.append(line.rstrip())
        except (IndexError, ValueError):
            self.other.append(line.rstrip())

    def steady(self, now: float, since: float, settle: float) -> bool:
        """Echoes arrive now, and no silence over STEADY_GAP ended in the last `settle` s
        (nor after `since`, within that)."""
        if self.last_echo < max(since, now - STEADY_GAP):
            return False
        return not any(b - a > STEADY_GAP and b > max(since, now - settle) for a, b in self.gaps)


def server_at(servers: Sequence[tuple[float, str]], t: float) -> str | None:
    """The server that echoed last at or before t."""
    found = None
    for when, name in servers:
        if when > t:
            break
        found = name
    return found


def event_figures(
    log: StreamLog, t0: float, t1: float, censored_from: float | None = None
) -> dict[str, Any]:
    """One event's figures. `censored_from`: the stream was not steady by t1, so the gap
    that began at that last echo is at least t1 - censored_from (and counted as such)."""
    inside = [b - a for a, b in log.gaps if b > t0 and a < t1]
    gap = max(inside, default=0.0)
    at_most = not inside  # nothing over the probe's threshold: the gap is below it
    censored = censored_from is not None
    if censored_from is not None:
        gap = max(gap, t1 - censored_from)
        at_most = False
    lo = bisect.bisect_left(log.lost, t0 - LOST_BEFORE)
    hi = bisect.bisect_right(log.lost, t1)
    # Lost while echoes still came (no silence around them): a lossy path, not a gap.
    silences = [(a - IN_FLIGHT, b) for a, b in log.gaps if b > t0 - LOST_BEFORE and a < t1]
    scattered = sum(1 for t in log.lost[lo:hi] if not any(a <= t <= b for a, b in silences))
    stall = max((b - a for a, b in log.stalls if b > t0 and a < t1), default=0.0)
    before, after = server_at(log.servers, t0), server_at(log.servers, t1)
    return {
        "gap_ms": round(max(gap, log.gap_threshold if at_most else 0.0) * 1000, 3),
        "gap_below_threshold": at_most,
        "censored": censored,
        "lost": hi - lo,
        "lost_scattered": scattered,
        "server_before": before,
        "server_after": after,
        "same_server": before is not None and before == after,
        "sender_stall_ms": round(stall * 1000, 3),
        "window_s": round(t1 - t0, 3),
    }


# --- goals (issue 5) -----------------------------------------------------------------------

# Published figures (../shared/REFERENCES.md), shown beside ours, never measured here.
PUBLISHED = {
    "vrrp_s": 3.6,  # RFC 5798: 3 x 1 s advert + skew; users report 3-4 s
    "seed_paper_s": 5.3,  # 5 s detection + 318 ms IPsec re-setup
}


@dataclass(frozen=True)
class Goal:
    p50_ms: float | None
    p99_ms: float | None
    zero_loss: bool = False

    def text(self) -> str:
        parts = []
        if self.p50_ms is not None:
            parts.append(f"p50 <= {self.p50_ms:g} ms")
        if self.p99_ms is not None:
            parts.append(f"p99 <= {self.p99_ms:g} ms")
        if self.zero_loss:
            parts.append("0 lost")
        return ", ".join(parts) or "none set"


HANDOVER_GOAL = Goal(50.0, 200.0)
MBB_GOAL = Goal(50.0, 200.0, zero_loss=True)
GATEWAY_GOAL = Goal(None, 1000.0)


def summarize(runs: Sequence[dict[str, Any]], goal: Goal | None) -> dict[str, Any]:
    """Distribution of the gap and of lost probes over the runs, and the goal check."""
    gaps = [float(r["gap_ms"]) for r in runs]
    lost = [float(r["lost"]) for r in runs]
    out: dict[str, Any] = {
        "runs": len(runs),
        "gap_ms": summary(gaps),
        "lost": summary(lost, 1),
        "lost_total": int(sum(lost)),
        "lost_scattered_total": sum(int(r.get("lost_scattered", 0)) for r in runs),
        "censored_runs": sum(1 for r in runs if r.get("censored")),
        "server_changed_runs": sum(1 for r in runs if not r.get("same_server")),
        "sender_stall_ms_max": max((float(r["sender_stall_ms"]) for r in runs), default=0.0),
    }
    if goal is None:
        out["goal"] = {"text": "none set", "met": None}
        return out
    s = out["gap_ms"]
    checks: list[bool] = []
    if not gaps:
        met: bool | None = None
    else:
        if goal.p50_ms is not None:
            checks.append(s["p50"] <= goal.p50_ms)
        if goal.p99_ms is not None:
            checks.append(s["p99"] <= goal.p99_ms)
        if goal.zero_loss:
            checks.append(out["lost_total"] == 0)
        met = all(checks)
    out["goal"] = {
        "text": goal.text(),
        "p50_ms": goal.p50_ms,
        "p99_ms": goal.p99_ms,
        "zero_loss": goal.zero_loss,
        "met": met,
    }
    return out
