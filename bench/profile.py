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
        return {"samples": 0, "self": [], "inclusive": []}

    def pct(n: int) -> float:
        return round(100.0 * n / total, 1)

    return {
        "samples": total,
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
