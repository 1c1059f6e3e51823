"""The failover benchmark without a lab: the probe's lines, one event's figures, the goals,
the table, the lab it builds, and the probe itself over a socketpair."""

from __future__ import annotations

import argparse
import io
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench import failover as fo
from bench.cli import Plan, add_arguments, parse_only
from bench.gaps import (
    GATEWAY_GOAL,
    HANDOVER_GOAL,
    LOST_BEFORE,
    MBB_GOAL,
    StreamLog,
    event_figures,
    server_at,
    summarize,
)
from bench.labctl import (
    MN_ACCESS_C,
    NAT_C_ADDRESS,
    SAME_FAMILY_NAT,
    SAME_FAMILY_NET,
    LabFailure,
    bench_compose,
    lab_mn1_seconds,
    node_seconds,
)
from bench.report import goals, render
from bench.udpprobe import PAYLOAD, Probe
from ntm_io.config import ConfigError
from ntm_io.status import AdminError
from ntm_node.multihome_client import UplinkSwitch


def stream(*lines: str) -> StreamLog:
    log = StreamLog(gap_threshold=0.002)
    for line in lines:
        log.feed(line + "\n")
    return log


def test_stream_log_reads_every_line_kind_and_keeps_the_rest() -> None:
    log = stream(
        "V 100.64.1.2",
        "S 10.000000 web2",
        "G 10.100000 10.350000",
        "T 11.000000 11.040000",
        "P 12.000000 11.999000 2000",
        "L 10.200000",
        'END {"sent": 3000, "lost": 1}',
        "G not-a-number 1",
        "noise",
    )
    assert log.vip == "100.64.1.2"
    assert log.servers == [(10.0, "web2")]
    assert log.gaps == [(10.1, 10.35)]
    assert log.stalls == [(11.0, 11.04)]
    assert (log.last_echo, log.received) == (11.999, 2000)
    assert log.lost == [10.2]
    assert log.totals == {"sent": 3000, "lost": 1}
    assert log.other == ["G not-a-number 1", "noise"]


def test_event_takes_the_longest_silence_overlapping_the_window() -> None:
    log = stream(
        "S 1.0 web1",
        "G 4.990 5.010",  # before the event: 20 ms, ends before t0
        "G 9.998 10.420",  # the event's gap (began just before t0)
        "G 10.500 10.530",
        "G 13.000 14.000",  # after t1
        *(f"L {t:.3f}" for t in (9.899, 9.9, 9.95, 10.0, 10.1, 10.41, 12.5)),
    )
    fig = event_figures(log, 10.0, 12.0)
    assert fig["gap_ms"] == pytest.approx(422.0)
    assert not fig["gap_below_threshold"] and not fig["censored"]
    # sent from t0 - LOST_BEFORE (9.9) to t1: 9.9, 9.95, 10.0, 10.1, 10.41
    assert LOST_BEFORE == 0.1 and fig["lost"] == 5
    # 9.95 left 48 ms before the silence (in flight); 9.9 left 98 ms before it, with echoes
    assert fig["lost_scattered"] == 1
    assert fig["same_server"] and fig["server_before"] == "web1"


def test_no_reported_silence_means_at_most_the_threshold() -> None:
    fig = event_figures(stream("S 1.0 web1", "G 1.0 1.5"), 10.0, 12.0)
    assert fig["gap_ms"] == 2.0 and fig["gap_below_threshold"] and fig["lost"] == 0


def test_an_unhandled_event_is_censored_at_the_window_end() -> None:
    fig = event_figures(stream("S 1.0 web1", "G 9.0 9.3"), 10.0, 40.0, censored_from=10.05)
    assert fig["censored"] and fig["gap_ms"] == pytest.approx(29950.0)


def test_server_change_and_sender_stall_are_reported() -> None:
    log = stream("S 1.0 web1", "S 10.5 web3", "T 10.2 10.26", "T 20.0 20.5")
    fig = event_figures(log, 10.0, 12.0)
    assert (fig["server_before"], fig["server_after"], fig["same_server"]) == (
        "web1",
        "web3",
        False,
    )
    assert fig["sender_stall_ms"] == pytest.approx(60.0)
    assert server_at(log.servers, 0.5) is None


def test_steady_needs_fresh_echoes_and_no_recent_long_silence() -> None:
    log = stream("P 10.0 9.99 100", "G 9.0 9.5")
    assert log.steady(10.0, since=0.0, settle=0.4)
    assert not log.steady(10.0, since=0.0, settle=1.0)  # the 0.5 s silence ended 0.5 s ago
    assert not log.steady(10.2, since=0.0, settle=0.1)  # no echo for 210 ms
    assert not log.steady(10.0, since=10.0, settle=0.1)  # nothing since the event yet


def run(gap_ms: float, lost: int = 0, same: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "gap_ms": gap_ms,
        "lost": lost,
        "same_server": same,
        "sender_stall_ms": 0.0,
        "censored": False,
        **extra,
    }


def test_summary_checks_the_issue_goals_on_the_distribution() -> None:
    ok = summarize([run(g) for g in (10, 20, 30, 40, 150)], HANDOVER_GOAL)
    assert ok["gap_ms"]["p50"] == 30 and ok["goal"]["met"] is True
    slow_tail = summarize([run(g) for g in (10, 20, 30, 40, 400)], HANDOVER_GOAL)
    assert slow_tail["goal"]["met"] is False  # p99 over 200 ms: one bad run is enough
    gw = summarize([run(900, 900), run(1200, 1200, same=False, censored=True)], GATEWAY_GOAL)
    assert gw["goal"]["met"] is False and gw["goal"]["text"] == "p99 <= 1000 ms"
    assert (gw["lost_total"], gw["server_changed_runs"], gw["censored_runs"]) == (2100, 1, 1)
    assert summarize([], GATEWAY_GOAL)["goal"]["met"] is None
    assert summarize([run(5)], None)["goal"] == {"text": "none set", "met": None}


def failover_doc() -> dict[str, Any]:
    labels = {k: v[0] for k, v in fo.EVENTS.items()}
    return {
        "machine": {},
        "failover": {
            "labels": labels,
            "goals": {k: (v[1].text() if v[1] else "none set") for k, v in fo.EVENTS.items()},
            "published_s": {"vrrp_s": 3.6, "seed_paper_s": 5.3},
            "failback_hold_down_s": 10.0,
            "handover_make_before_break": {"built": False, "note": "not built"},
            "handover_same_family": {
                "per_run": [],
                **summarize([run(g) for g in (30, 40, 45)], HANDOVER_GOAL),
            },
            "gateway_failure": {
                "per_run": [],
                **summarize([run(g, int(g)) for g in (980, 1010, 1100)], GATEWAY_GOAL),
                "node_detection_s": {"p50": 0.98},
                "node_switch_s": {"p50": 0.04},
            },
            "uplink_cut": {"error": "LabFailure: mn1 is on ?, not ntma2"},
            "handover_different_family": {
                "per_run": [],
                **summarize([run(300, 400, lost_scattered=100)], HANDOVER_GOAL),
            },
            "failback": {"per_run": [], **summarize([run(70, 70)], None)},
        },
    }


def test_goals_and_table_show_not_built_and_published_figures_as_such() -> None:
    doc = failover_doc()
    checks = {c["goal"]: c for c in goals(doc)}
    mbb = checks["handover, make-before-break, two interfaces (mn3) (issue 5)"]
    assert mbb["measured"] == "not built yet" and mbb["met"] is None  # no number, no verdict
    assert "0 lost" in mbb["target"]
    same = checks["handover, same family (IPv4 NAT a <-> IPv4 NAT c) (issue 5)"]
    assert same["met"] is True and same["measured"] == "p50 40.0 ms, p99 44.9 ms"
    assert checks["gateway failure (kill ntma1 -> ntma2) (issue 5)"]["met"] is False
    assert not any("fail-back" in g for g in checks)  # no goal set for it
    doc["goals"] = goals(doc)
    text = render(doc)
    (mbb_row,) = [
        ln
        for ln in text.splitlines()
        if ln.startswith("handover, make-before") and "(issue 5)" not in ln
    ]
    assert mbb_row.split()[-2:] == ["(no", "figure)"] and " not built yet " in mbb_row
    assert not any(ch.isdigit() for ch in mbb_row.split("not built yet")[1].split("p50")[0])
    (gateway_row,) = [
        ln
        for ln in text.splitlines()
        if ln.startswith("gateway failure (kill") and "(issue 5)" not in ln
    ]
    assert gateway_row.endswith("VRRP 3.6 s, seed 5.3 s")  # published, side by side
    assert "not measured here (../shared/REFERENCES.md): VRRP 3.6 s" in text
    assert "seed paper's VPN failover 5.3 s" in text
    assert "uplink cut of ntma2 (isp1 <-> isp2)" in text and "error" in text
    assert "detection p50 0.980 s, switch p50 0.040 s" in text
    assert "Goals (issues 3, 5 and 7)" in text
    assert "100 probes lost while echoes still came" in text


def test_bench_lab_for_failover_adds_ntma2_routers_and_an_ipv4_access_of_its_own(
    tmp_path: Path,
) -> None:
    data = yaml.safe_load(bench_compose(tmp_path, with_direct=False, failover=True).read_text())
    services = data["services"]
    assert {"ntma1", "ntma2", "lb", "rtr-b", "rtr-isp1", "rtr-isp2", SAME_FAMILY_NAT} <= set(
        services
    )
    assert SAME_FAMILY_NET in data["networks"]
    nat = services[SAME_FAMILY_NAT]
    assert nat["networks"]["internet"] == {"ipv4_address": NAT_C_ADDRESS}
    assert "-6" not in nat["environment"]["NTM_LAB_ROUTES"]
    assert "192.0.2.0/24 via 198.51.100.71" in nat["environment"]["NTM_LAB_ROUTES"]
    mn1 = services["mn1"]
    assert mn1["x-ntm-roam"][SAME_FAMILY_NET]["ipv4_address"] == MN_ACCESS_C
    assert {"access-a", "access-b"} <= set(mn1["x-ntm-roam"])
    # mn1 runs the lab's own config: the hold-down the report names is the lab's.
    assert "--config" not in mn1.get("command", []) or "lab/config" in str(mn1["command"])
    for spec in services.values():
        assert set(spec.get("depends_on") or {}) <= set(services)
    addresses = [
        (net, spec.get("ipv4_address"))
        for svc in services.values()
        for net, spec in (svc.get("networks") or {}).items()
        if isinstance(spec, dict) and spec.get("ipv4_address")
    ]
    assert len(addresses) == len(set(addresses))


def test_node_timers_are_read_from_the_node_section() -> None:
    text = '[node]\nname = "mn1"\nfailback_hold_down = 10\n[dc]\nport = 1\n'
    assert node_seconds(text, "failback_hold_down") == 10
    assert node_seconds(text, "allowed_outage") == 1.0  # the node's default
    assert node_seconds('[node]\nname = "mn1"\n', "failback_hold_down") == 60.0
    assert lab_mn1_seconds("failback_hold_down") > 0  # lab/config/mn1.toml parses
    with pytest.raises(LabFailure, match="not a number"):
        node_seconds('[node]\nfailback_hold_down = "ten"\n', "failback_hold_down")
    with pytest.raises(LabFailure, match="not valid TOML"):
        node_seconds("[node\n", "allowed_outage")


def test_where_mn1_is_read_from_its_status() -> None:
    status: dict[str, Any] = {
        "registered": True,
        "addresses": {"ipv4": [MN_ACCESS_C], "ipv6": []},
        "failover": {
            "paused": False,
            "services": {
                fo.SERVICE_FQDN: {
                    "peer_address": "203.0.113.10:7400",
                    "gateway": {"current": "ntma2.ntm.example.com"},
                    "switching": False,
                }
            },
        },
    }
    assert fo.gateway_of(status) == "ntma2" and fo.uplink_of(status) == "isp2"
    assert fo.on_gateway("ntma2")(status) and not fo.on_gateway("ntma1")(status)
    assert fo.on_other_uplink("isp1")(status) and not fo.on_other_uplink("isp2")(status)
    assert fo.moved_to(MN_ACCESS_C)(status) and not fo.moved_to("10.10.1.100")(status)
    status["failover"]["paused"] = True  # the node still refreshes its paths
    assert not fo.moved_to(MN_ACCESS_C)(status)
    v6: dict[str, Any] = {
        "failover": {"services": {fo.SERVICE_FQDN: {"peer_address": "[2001:db8:201::10]:7400"}}}
    }
    assert fo.uplink_of(v6) == "isp1" and fo.uplink_of({}) is None and fo.gateway_of({}) == ""


def test_plan_and_sections() -> None:
    assert Plan.make(False).failover_runs == 20 and Plan.make(True).failover_runs == 5
    assert Plan.make(False, failover_runs=3).failover_runs == 3
    assert Plan.make(False).setup_fresh == "forget"
    assert parse_only("dc,failover,setup") == ["setup", "failover", "dc"]


def test_probe_counts_echoes_servers_duplicates_and_losses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    with ours, theirs:
        ours.setblocking(False)
        probe = Probe(ours, rate=1000.0, gap=0.002, stall=0.02)
        for t in (1.0, 1.001, 1.002, 1.003):
            probe.send_one(t)
        sent = [theirs.recv(100) for _ in range(4)]
        assert [PAYLOAD.unpack(d)[0] for d in sent] == [0, 1, 2, 3]
        theirs.send(b"web1 " + sent[0])
        theirs.send(b"web1 " + sent[0])  # duplicate
        theirs.send(b"web3 " + sent[2])  # another server; seq 1 and 3 never come back
        theirs.send(b"garbage")
        probe.receive()
        probe.finish(grace=0.0)
    lines = out.getvalue().splitlines()
    assert [ln.split()[2] for ln in lines if ln.startswith("S ")] == ["web1", "web3"]
    assert [ln for ln in lines if ln.startswith("L ")] == ["L 1.001000", "L 1.003000"]
    totals = json.loads(lines[-1].removeprefix("END "))
    assert totals == {
        "sent": 4,
        "received": 2,
        "lost": 2,
        "duplicates": 1,
        "foreign": 1,
        "send_errors": {},
    }


# --- make-before-break (mn3) ----------------------------------------------------------------

V4, V6 = "10.10.1.103", "2001:db8:b::103"


def mh_status(local: str, ago: float | None = 0.3, answered: int = 5) -> dict[str, Any]:
    other = V6 if local == V4 else V4
    legs = [
        {"local": local, "answered": 9, "answered_ago_s": 0.01},
        {"local": other, "answered": answered, "answered_ago_s": ago},
    ]
    return {"multihome": {"paths": [{"local": local, "legs": legs}], "counters": {"x": 1}}}


def test_standby_ready_needs_a_recent_answer_on_the_other_uplink() -> None:
    assert fo.standby_ready(mh_status(V4))
    assert not fo.standby_ready(mh_status(V4, ago=3.0))  # answered, but not lately
    assert not fo.standby_ready(mh_status(V4, ago=None, answered=0))  # never answered
    assert not fo.standby_ready({}) and not fo.standby_ready({"multihome": {"paths": []}})
    only_active = {"multihome": {"paths": [{"local": V4, "legs": [{"local": V4}]}]}}
    assert not fo.standby_ready(only_active)  # no standby leg at all


def test_stream_on_an_uplink_allows_standby_probes_on_the_other() -> None:
    assert fo.stream_on({"access-a": 2, "access-b": 510}, "access-b")
    assert not fo.stream_on({"access-a": 300, "access-b": 510}, "access-b")  # both carried it
    assert not fo.stream_on({"access-a": 0, "access-b": 20}, "access-b")  # no stream at all
    assert fo.mbb_targets(4) == ["access-b", "access-a", "access-b", "access-a"]


def test_probes_lost_outside_the_runs_are_placed() -> None:
    windows = [{"t0": 10.0, "t1": 11.0}, {"t0": 12.0, "t1": 13.0}]
    lost = [5.0, 9.95, 10.5, 11.5, 11.95, 14.0, 14.1]
    # 9.95 and 11.95 fall in the LOST_BEFORE margin of a run: counted there
    assert fo.lost_outside(lost, windows) == {"before_first": 1, "between": 1, "after_last": 2}
    assert fo.lost_outside([1.0], []) == {"before_first": 1, "between": 0, "after_last": 0}


def test_failover_events_option_parses_and_refuses_unknown_names() -> None:
    assert fo.parse_events("gateway,mbb") == ("mbb", "gateway")  # run order
    with pytest.raises(ConfigError, match="pick from same_family"):
        fo.parse_events("mbb,nope")
    with pytest.raises(ConfigError, match="none given"):
        fo.parse_events(" , ")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert fo.parse_events(parser.parse_args([]).failover_events) == fo.EVENT_GROUPS
    assert parser.parse_args(["--failover-events", "mbb"]).failover_events == "mbb"
    assert Plan.make(False).failover_events == fo.EVENT_GROUPS
    assert Plan.make(True, failover_events=("mbb",)).failover_events == ("mbb",)


def test_bench_lab_for_failover_has_mn3_on_both_uplinks(tmp_path: Path) -> None:
    data = yaml.safe_load(bench_compose(tmp_path, with_direct=False, failover=True).read_text())
    services = data["services"]
    mn3 = services[fo.MBB_CLIENT]
    assert set(mn3["networks"]) == set(fo.MBB_UPLINKS)
    assert set(mn3["depends_on"]) <= set(services)
    assert {"nat-a", "rtr-b", "ntma1", "lb"} <= set(services)  # its two ways to the service
    plain = yaml.safe_load(bench_compose(tmp_path, with_direct=False, lb=True).read_text())
    assert fo.MBB_CLIENT not in plain["services"]


class FakeLab:
    def __init__(self, tmp: Path) -> None:
        self.work = tmp
        self.local = V4

    def socket(self, service: str) -> str:
        return f"/nowhere/{service}.sock"

    def ns(self, service: str) -> str:
        return f"lab-{service}"

    def status(self, service: str) -> dict[str, Any]:
        assert service == fo.MBB_CLIENT
        return mh_status(self.local)


class FakeStream:
    """Always steady; its log says what the test feeds it."""

    made: list[FakeStream] = []

    def __init__(self, lab: Any, name: str, client: str = fo.CLIENT) -> None:
        self.client = client
        self.log = StreamLog(gap_threshold=0.002)
        self.stopped = False
        FakeStream.made.append(self)

    def wait_flowing(self, bound: float = 20.0) -> None:
        pass

    def steady(self, since: float, settle: float) -> bool:
        return True

    def last_echo(self) -> float:
        return 0.0

    def stop(self) -> StreamLog:
        self.stopped = True
        self.log.totals = {"sent": 1, "lost": 0}
        return self.log


def fake_mn3(
    monkeypatch: pytest.MonkeyPatch, lab: FakeLab, refuse: set[int] | None = None
) -> list[str]:
    """prefer_uplink and the interface counters of a node that moves as asked (or refuses
    the calls numbered in `refuse`); returns the uplinks asked for."""
    asked: list[str] = []
    counters = {"access-a": 0, "access-b": 0}

    def prefer(sock: str, uplink: str, *, bound: float = 10.0, poll: float = 0.02) -> UplinkSwitch:
        assert sock == "/nowhere/mn3.sock"
        asked.append(uplink)
        if refuse and len(asked) - 1 in refuse:
            raise AdminError("no such uplink")
        lab.local = V4 if uplink == "access-a" else V6
        now = time.monotonic()
        return UplinkSwitch(uplink, lab.local, now - 0.01, now, now - 0.005, 1)

    def tx(self: fo.Multihomed) -> dict[str, int]:
        counters["access-a" if lab.local == V4 else "access-b"] += 500
        return dict(counters)

    monkeypatch.setattr(fo, "prefer_uplink", prefer)
    monkeypatch.setattr(fo.Multihomed, "tx_packets", tx)
    monkeypatch.setattr(fo, "Stream", FakeStream)
    monkeypatch.setattr(fo, "SETTLE", 0.0)
    return asked


def test_make_before_break_runs_alternate_and_are_summarized(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lab = FakeLab(tmp_path)
    asked = fake_mn3(monkeypatch, lab)
    FakeStream.made.clear()
    out = fo.run_make_before_break(fo.Runner(lab, lambda _: None), 4)  # type: ignore[arg-type]
    (stream,) = FakeStream.made
    assert stream.client == "mn3" and stream.stopped
    # The unmeasured start on access-a, then the four runs.
    assert asked == ["access-a", "access-b", "access-a", "access-b", "access-a"]
    assert out["runs"] == 4 and "error" not in out and out["unhandled_runs"] == []
    assert [r["to"] for r in out["per_run"]] == asked[1:]
    assert all(r["handled"] and r["stream_on_target"] for r in out["per_run"])
    assert out["per_run"][0]["address"] == V6 and out["per_run"][1]["address"] == V4
    assert out["per_run"][0]["paths_moved_ms"] == pytest.approx(10.0, abs=0.5)
    assert out["goal"]["zero_loss"] and out["lost_total"] == 0
    assert set(out["by_direction"]) == {"access-a", "access-b"}
    assert out["stream_off_target_runs"] == 0 and out["client"] == "mn3"
    assert out["lost_outside_runs"] == {"before_first": 0, "between": 0, "after_last": 0}


def test_make_before_break_counts_refusals_and_stops_a_broken_lab(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lab = FakeLab(tmp_path)
    asked = fake_mn3(monkeypatch, lab, refuse={2})
    out = fo.run_make_before_break(fo.Runner(lab, lambda _: None), 3)  # type: ignore[arg-type]
    assert [r["handled"] for r in out["per_run"]] == [True, False, True]
    assert out["unhandled_runs"] == ["run 1: prefer access-a: AdminError: no such uplink"]
    assert "error" not in out
    lab = FakeLab(tmp_path)
    asked = fake_mn3(monkeypatch, lab, refuse={1, 2, 3, 4, 5})
    out = fo.run_make_before_break(fo.Runner(lab, lambda _: None), 20)  # type: ignore[arg-type]
    assert len(asked) == 1 + fo.MAX_FAILED and "the lab is broken" in out["error"]


def test_make_before_break_stream_left_by_the_wrong_uplink_is_listed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lab = FakeLab(tmp_path)
    fake_mn3(monkeypatch, lab)
    monkeypatch.setattr(fo.Multihomed, "tx_packets", lambda self: {"access-a": 0, "access-b": 0})
    out = fo.run_make_before_break(fo.Runner(lab, lambda _: None), 2)  # type: ignore[arg-type]
    assert out["stream_off_target_runs"] == 2
    assert out["unhandled_runs"][0].startswith("run 0: the stream did not leave by access-b")


def test_failover_section_runs_only_the_chosen_events(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []

    def fake(name: str, result: dict[str, Any]) -> Any:
        def run(*args: Any) -> dict[str, Any]:
            called.append(name)
            return result

        return run

    monkeypatch.setattr(fo, "run_handover", fake("handover", {"runs": 1}))
    monkeypatch.setattr(fo, "run_make_before_break", fake("mbb", {"runs": 2}))
    monkeypatch.setattr(fo, "run_gateway", fake("gateway", {"gateway_failure": {}}))
    out = fo.run_failover(None, 2, lambda _: None, ("mbb",))  # type: ignore[arg-type]
    assert called == ["mbb"] and out[fo.MBB_KEY] == {"runs": 2}
    assert out["events"] == ["mbb"] and set(out["wall_s"]) == {fo.MBB_KEY}
    called.clear()
    out = fo.run_failover(None, 2, lambda _: None)  # type: ignore[arg-type]
    assert called == ["handover", "handover", "mbb", "gateway"]


def test_measured_make_before_break_row_has_figures_and_the_loss_check() -> None:
    doc = failover_doc()
    doc["failover"][fo.MBB_KEY] = {
        "per_run": [],
        **summarize([run(g) for g in (12, 20, 31)], MBB_GOAL),
    }
    checks = {c["goal"]: c for c in goals(doc)}
    mbb = checks["handover, make-before-break, two interfaces (mn3) (issue 5)"]
    assert mbb["met"] is True and mbb["measured"] == "p50 20.0 ms, p99 30.8 ms, 0 lost"
    doc["failover"][fo.MBB_KEY] = {"per_run": [], **summarize([run(12, lost=3)], MBB_GOAL)}
    assert {c["goal"]: c for c in goals(doc)}[mbb["goal"]]["met"] is False
    doc["goals"] = goals(doc)
    (row,) = [
        ln
        for ln in render(doc).splitlines()
        if ln.startswith("handover, make-before") and "(issue 5)" not in ln
    ]
    assert "not built" not in row and "0 lost" in row and " 12.0 " in row
