"""Name-to-tunnel set-up time vs a plain lookup, through the same stub resolver.

Each run restarts the MN's node (`ntm lab kill/start`), so it holds no tunnel, waits for
its registration, then the probe (bench.probe) times: marked name cold (DNS query -> DC
direction -> handshake -> answer -> first HTTP byte through the tunnel), the same name
again (tunnel up), and a plain name to the plain web server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from .labctl import BenchLab, LabFailure
from .nsproc import run_in
from .stats import summary
from .tunnel import MARKED_NAME, PLAIN_NAME, probe_env

KINDS = ("marked_cold", "marked_warm", "plain")


def probe_argv() -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.probe",
        "setup",
        "--marked",
        MARKED_NAME,
        "--plain",
        PLAIN_NAME,
    ]


def run_setup(
    lab: BenchLab, client: str, runs: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    samples: dict[str, dict[str, list[float]]] = {
        k: {"dns_ms": [], "first_byte_ms": []} for k in KINDS
    }
    failures: list[str] = []
    restart_s: list[float] = []
    for i in range(runs):
        t0 = time.monotonic()
        lab.kill(client)
        lab.start(client)
        lab.wait_registered(client)
        restart_s.append(time.monotonic() - t0)
        try:
            done = run_in(lab.ns(client), probe_argv(), timeout=60, env=probe_env())
            doc = json.loads(done.stdout or "{}")
        except (subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            doc = {"error": f"probe: {exc}"}
        if "error" in doc:
            failures.append(f"run {i}: {doc['error']}")
            continue
        if not doc["marked_cold"]["via_tunnel"]:
            # The stub gave the plain answer: no tunnel within its direction timeout.
            failures.append(f"run {i}: {MARKED_NAME} answered {doc['marked_cold']['answer']}")
            continue
        for kind in KINDS:
            for key in ("dns_ms", "first_byte_ms"):
                samples[kind][key].append(float(doc[kind][key]))
        if (i + 1) % 10 == 0:
            progress(f"setup: {i + 1}/{runs} runs")
    if runs and len(failures) == runs:
        raise LabFailure(f"every set-up run failed; first: {failures[0]}")
    out: dict[str, Any] = {
        "runs": runs,
        "client": client,
        "marked_name": MARKED_NAME,
        "plain_name": PLAIN_NAME,
        "failures": failures,
        "restart_wait_s": summary(restart_s),
    }
    for kind in KINDS:
        out[kind] = {key: summary(vals) for key, vals in samples[kind].items()}
    cold = out["marked_cold"]["first_byte_ms"]
    plain = out["plain"]["first_byte_ms"]
    if cold.get("n") and plain.get("n"):
        out["extra_ms_p50"] = round(cold["p50"] - plain["p50"], 3)
        out["ratio_p50"] = round(cold["p50"] / plain["p50"], 2) if plain["p50"] else None
    return out
