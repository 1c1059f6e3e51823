"""Reports and `ntm loadtest verdict` on saved results: a fake run with a persistence violation
must fail (exit 1) and the same run without it must pass (exit 0), plots and summary written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests.expect import ServiceExpectation
from loadtests.model import EventRecord, Gap, SessionRecord, Timeline, UserRecord
from loadtests.records import RunData, parse_lines, read_events, read_records, write_events
from loadtests.report import PLOTS, verdict_lines
from ntm_cli.main import main

WEB = {"web1": 1, "web2": 1, "web3": 1}
EXPECT = [
    ServiceExpectation("http", 8080, "rr", True, WEB),
    ServiceExpectation("udp", 9000, "sh", False, WEB),
]
T0 = 1_800_000_000.0


def session(i: int, kind: str, backends: list[tuple[float, str]], **kw: object) -> SessionRecord:
    rec = SessionRecord(
        user=f"mn2-w0-{i}",
        client=f"s{i}.swarm.ntm.example.com",
        vip=f"100.64.3.{i}",
        kind=kind,
        port=8080 if kind == "http" else 9000,
        target="100.64.200.1",
        sid=1,
        start=T0 + 1,
        end=T0 + 60,
        end_reason="stopped",
        answers=50,
        first_ok=backends[0][0],
        last_ok=T0 + 59,
        backends=backends,
    )
    for k, v in kw.items():
        setattr(rec, k, v)
    return rec


def fake_results(folder: Path, violate: bool) -> Path:
    """A 60 s run of 30 identities with a move at 30 s, written as `ntm loadtest run` does."""
    (folder / "records").mkdir(parents=True)
    lines = [json.dumps({"type": "meta", "tag": "mn2-w0"})]
    tl = Timeline()
    for i in range(30):
        web = f"web{i % 3 + 1}"
        http = [(T0 + 2, web)]
        if violate and i == 5:
            http.append((T0 + 31, "web1" if web != "web1" else "web2"))  # switched at the move
        gap = [Gap(T0 + 29.8, T0 + 30.6, 1)] if i % 2 else []
        lines.append(json.dumps(session(i, "http", http, gaps=gap, failures=len(gap)).to_json()))
        udp = [(T0 + 2, f"web{(i * 7) % 3 + 1}")]
        lines.append(json.dumps(session(i, "udp", udp).to_json()))
        for s in range(1, 60):
            tl.answer("http", T0 + s, web)
    lines.append(json.dumps(tl.to_json()))
    for i in range(30):
        lines.append(json.dumps(UserRecord(f"mn2-w0-{i}", "c", f"100.64.3.{i}", 1, 0, 2).to_json()))
    lines.append('{"type": "session", "truncated by a kill')  # a process died mid-line
    (folder / "records" / "records-mn2-w0.jsonl").write_text("\n".join(lines) + "\n")
    ev = EventRecord(30.0, "move", ["mn2", "access-b"], ["ntm"], T0 + 30, T0 + 30.8, 0, "")
    write_events(folder / "events.json", [ev])
    run = {
        "expectations": [e.to_json() for e in EXPECT],
        "thresholds": {"max_failed_ratio": 0.01, "max_interruption": 5.0},
        "started_at": T0,
        "locust_exit": 0,
    }
    (folder / "run.json").write_text(json.dumps(run))
    return folder


@pytest.mark.parametrize(("violate", "code"), [(False, 0), (True, 1)])
def test_verdict_cli_on_saved_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], violate: bool, code: int
) -> None:
    out = fake_results(tmp_path / "run", violate)
    assert main(["loadtest", "verdict", str(out)]) == code
    text = capsys.readouterr().out
    assert text.strip().endswith("verdict: FAIL" if violate else "verdict: PASS")
    assert "[PASS] load generator" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == ("fail" if violate else "pass")
    assert summary["violations"]["count"] == (2 if violate else 0)  # session + client level
    (ints,) = summary["interruptions"]
    assert ints["streams"] == 60 and ints["interrupted"] == 15
    assert ints["by_kind"]["http"]["max_s"] == pytest.approx(0.8)
    for name in PLOTS:
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_threshold_flags_override_the_saved_ones(tmp_path: Path) -> None:
    out = fake_results(tmp_path / "run", violate=False)
    argv = ["loadtest", "verdict", str(out), "--no-plots"]
    assert main([*argv, "--max-interruption", "0.5"]) == 1
    assert main([*argv, "--max-interruption", "1"]) == 0
    assert not (out / PLOTS[0]).exists()
    assert main(["loadtest", "verdict", str(tmp_path / "nothing-here")]) == 2


def test_records_reader_skips_bad_lines_and_merges_timelines(tmp_path: Path) -> None:
    out = fake_results(tmp_path / "run", violate=False)
    data = read_records(out / "records")
    assert data.files == 1 and data.bad_lines == 1 and len(data.sessions) == 60
    assert len(data.users) == 30 and data.users[0].dns_ok == 1
    assert data.timeline.answers["http"][int(T0) + 1] == {"web1": 10, "web2": 10, "web3": 10}
    assert read_events(out / "events.json")[0].label == "30s move mn2 access-b"
    assert read_events(out / "missing.json") == []
    into = RunData()
    parse_lines(['{"type": "unknown"}', "", "[1]"], into)
    assert into.bad_lines == 2


def test_verdict_lines_show_counts_and_events(tmp_path: Path) -> None:
    from loadtests.verdict import judge

    out = fake_results(tmp_path / "run", violate=False)
    data = read_records(out / "records")
    v = judge(data.sessions, read_events(out / "events.json"), EXPECT)
    lines = verdict_lines(v)
    assert any("http/8080 clients per backend: web1=10 (exp 10.0)" in x for x in lines)
    assert any(x.startswith("         event 30s move mn2 access-b: http 15/30") for x in lines)
