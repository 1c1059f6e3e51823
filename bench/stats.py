"""Small pure helpers: percentiles, summaries and parsing of `ping` output."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_PING_TIME = re.compile(r"\bicmp_seq=(\d+)\b.*\btime=([0-9.]+) ms")
_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) received")


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not samples:
        raise ValueError("no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(samples: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """n, p50, p90, p99, mean, min, max of `samples` (rounded); only n when empty."""
    if not samples:
        return {"n": 0}
    return {
        "n": len(samples),
        "p50": round(percentile(samples, 50), digits),
        "p90": round(percentile(samples, 90), digits),
        "p99": round(percentile(samples, 99), digits),
        "mean": round(sum(samples) / len(samples), digits),
        "min": round(min(samples), digits),
        "max": round(max(samples), digits),
    }


@dataclass(frozen=True)
class PingResult:
    transmitted: int
    received: int
    rtts_ms: tuple[float, ...]

    @property
    def loss_percent(self) -> float:
        if self.transmitted == 0:
            return 100.0
        return 100.0 * (self.transmitted - self.received) / self.transmitted


def parse_ping(text: str) -> PingResult:
    """Per-reply round trips from iputils `ping` output (not -q), plus the totals line."""
    rtts = tuple(float(m.group(2)) for m in _PING_TIME.finditer(text))
    counts = _PING_COUNTS.search(text)
    if counts is None:
        # Interrupted before the summary: count what we saw.
        return PingResult(len(rtts), len(rtts), rtts)
    return PingResult(int(counts.group(1)), int(counts.group(2)), rtts)
