"""`ntm loadtest run` in the netns lab: short Locust runs that end with a passing verdict, the
plots and the reports; one standalone with handovers of mn1, one distributed (a master and
workers on the swarm host mn2 and on mn1, joined by unix socket bridges).

That the verdict FAILS on a persistence violation is proven on a fake result set in
tests/unit/test_loadtests_report.py (and check by check in test_loadtests_verdict.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtests.report import PLOTS

from .conftest import REPO, Lab

pytestmark = pytest.mark.lab

RUN_TIMEOUT = 420.0  # the run itself, a swarm still registering, Locust start-up, plots


def loadtest(lab: Lab, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ntm_cli.main", "loadtest", "run", "--lab", lab.name]
    argv += ["--state", str(lab.state), "--out", str(out), "--quiet", *args]
    return subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )


def summary_of(out: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return doc


def assert_reports(out: Path) -> None:
    for name in PLOTS:
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name
    assert (out / "locust.html").stat().st_size > 1000
    assert (out / "locust_stats.csv").read_text().startswith("Type,Name")


def test_handovers_of_mn1_keep_every_session_on_its_backend(lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "run"
    try:
        done = loadtest(
            lab,
            out,
            *("--service", "mn1", "--users", "3", "--spawn-rate", "3", "--duration", "20"),
            *("--interval", "0.25", "--event", "6:move:mn1:access-b"),
            *("--event", "13:move:mn1:access-a"),
            *("--max-failed-ratio", "0.1", "--max-interruption", "10"),
        )
    finally:
        lab.move("mn1", "access-a")  # the session lab stays as other tests expect it
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-2] == "verdict: PASS"
    s = summary_of(out)
    assert s["verdict"] == "pass"
    checks = {c["name"]: c["status"] for c in s["checks"]}
    assert checks["persistence violations"] == "PASS"
    assert checks["client address is the vIP"] == "PASS"
    assert checks["driver events"] == "PASS" and checks["interruption"] == "PASS"
    # both handovers ran, were time-stamped, and every stream was judged around them
    events = s["events"]
    assert [e["label"] for e in events] == ["6s move mn1 access-b", "13s move mn1 access-a"]
    assert all(e["rc"] == 0 and e["ended_at"] >= e["started_at"] > 0 for e in events)
    assert [i["streams"] for i in s["interruptions"]] == [6, 6]  # 3 users x (http + udp)
    assert s["totals"]["answers"] > 100 and s["totals"]["clients"] == 1
    assert {b["kind"] for b in s["balance"]} == {"http", "udp"}
    assert_reports(out)


def test_distributed_run_over_the_swarm_and_mn1(lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = loadtest(
        lab,
        out,
        *("--service", "mn2", "--service", "mn1", "--workers", "2"),
        *("--users", "8", "--spawn-rate", "8", "--duration", "15", "--interval", "0.5"),
        # rr on port 80 without persistence: balance per session (long sessions, one per
        # user), which earlier tests' persistence templates on 8080 cannot skew
        *("--http-port", "80"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    s = summary_of(out)
    assert s["verdict"] == "pass"
    records = sorted(p.name for p in (out / "records").glob("records-*.jsonl"))
    assert records == ["records-mn1-w1.jsonl", "records-mn2-w0.jsonl"]
    (http,) = [b for b in s["balance"] if b["kind"] == "http"]
    assert http["unit"] == "session" and sum(http["counts"].values()) == 8
    assert max(http["counts"].values()) - min(http["counts"].values()) <= 1
    # 4 swarm identities (each its own vIP) plus mn1's one vIP shared by its 4 users; the
    # failed-requests check (<= 1 %) is part of the passing verdict above
    assert s["totals"]["clients"] == 5 and s["totals"]["users"] == 8
    assert_reports(out)
