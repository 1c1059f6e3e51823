"""What the kernel says about processes and the machine: CPU seconds, RSS, versions."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its threads included), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")" field 0 is the state (field 3 of proc(5)); utime/stime are 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds_of(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


@dataclass(frozen=True)
class MachineSample:
    """/proc/stat totals: the machine's busy share between two samples (others' load too)."""

    busy: int
    total: int
    at: float

    @classmethod
    def now(cls) -> MachineSample:
        parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(x) for x in parts[:8]]
        idle = ticks[3] + ticks[4]  # idle + iowait
        return cls(sum(ticks) - idle, sum(ticks), time.monotonic())

    def busy_percent_since(self, earlier: MachineSample) -> float:
        total = self.total - earlier.total
        return 100.0 * (self.busy - earlier.busy) / total if total else 0.0


def _first_line(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def source_info(repo: Path) -> dict[str, Any]:
    """Which code was measured: the commit, and how many files differed from it."""
    head = _first_line(["git", "-C", str(repo), "log", "-1", "--oneline"])
    changed = None
    if head is not None:
        try:
            done = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            changed = len(done.stdout.splitlines()) if done.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            changed = None
    return {"commit": head, "uncommitted_changed_files": changed}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Enough to tell two results' machines apart: CPU, cores, kernel, tools, load."""
    load1, load5, load15 = os.getloadavg()
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "tools": {
            "iperf3": _first_line(["iperf3", "-v"]),
            "openvpn": _first_line(["openvpn", "--version"]),
            "ping": _first_line(["ping", "-V"]),
            "openssl": _first_line(["openssl", "version"]),
        },
    }
