"""A py-spy sample of the tunnel under iperf3 load, folded into top frames."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# Frames every sample passes through (interpreter entry, event loop): not worth listing.
SCAFFOLD_PERCENT = 97.0
# A sample whose innermost frame is the event loop's poll is the node waiting for work
# (py-spy --nonblocking cannot tell idle threads apart): kept out of the "busy" shares.
WAITING = "(selectors.py:"


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def fold(collapsed: str) -> tuple[int, Counter[str], Counter[str]]:
    """Total samples, self counts and inclusive counts from py-spy's raw (collapsed) output."""
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return total, own, inclusive


def top_frames(collapsed: str, limit: int = 15) -> dict[str, Any]:
    total, own, inclusive = fold(collapsed)
    if not total:
        return {"samples": 0, "waiting_percent": 0.0, "busy_self": [], "self": [], "inclusive": []}

    def pct(n: int) -> float:
        return round(100.0 * n / total, 1)

    waiting = sum(n for f, n in own.items() if WAITING in f)
    busy = total - waiting
    return {
        "samples": total,
        "waiting_percent": pct(waiting),
        # Where the node spends the time it is not waiting: shares of the busy samples.
        "busy_self": [
            {"frame": f, "percent": round(100.0 * n / busy, 1)}
            for f, n in own.most_common()
            if WAITING not in f
        ][:limit]
        if busy
        else [],
        "self": [{"frame": f, "percent": pct(n)} for f, n in own.most_common(limit)],
        "inclusive": [
            {"frame": f, "percent": pct(n)}
            for f, n in inclusive.most_common()
            if pct(n) < SCAFFOLD_PERCENT
        ][:limit],
    }


def record(pid: int, seconds: int, out: Path, rate: int = 250) -> subprocess.Popen[bytes]:
    """Start sampling `pid` without pausing it (--nonblocking); raw collapsed stacks."""
    tool = py_spy()
    if tool is None:
        raise FileNotFoundError("py-spy is not installed (pip install py-spy)")
    argv = [tool, "record", "--pid", str(pid), "--nonblocking", "--duration", str(seconds)]
    argv += ["--rate", str(rate), "--format", "raw", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
