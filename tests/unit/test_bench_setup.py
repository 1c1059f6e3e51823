"""Set-up time and relay benchmarks without a lab: goals, per-kind figures, path checks."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from bench.labctl import LabFailure
from bench.relay_tput import relay_of
from bench.setup_time import (
    DNS_REDIRECT_MARK,
    KINDS,
    SAMPLES,
    goal_check,
    kind_result,
    path_of,
    probe_argv,
    record_run,
    run_setup,
)
from bench.setup_trace import ALL_STEPS, STEPS, Packet, parse_line, steps, summarize
from bench.stats import summary
from ntm_node.dns_redirect import MARK

DIRECT, RELAYED, REVERSE = KINDS


def test_the_three_kinds_are_the_lab_pairs_of_issue_3() -> None:
    assert (DIRECT.client, DIRECT.peer, DIRECT.path_kind, DIRECT.goal_rtts) == (
        "mn1",
        "cn2",
        "direct",
        1,
    )
    assert (RELAYED.client, RELAYED.peer, RELAYED.path_kind, RELAYED.goal_rtts) == (
        "mn1",
        "cn1",
        "relay",
        2,
    )
    assert (REVERSE.client, REVERSE.peer, REVERSE.path_kind, REVERSE.goal_rtts) == (
        "cn2",
        "cn1",
        "reverse",
        None,
    )


def test_goal_is_round_trips_plus_five_ms() -> None:
    assert goal_check(DIRECT, 5.1, 0.1) == {
        "target_ms": 5.1,
        "met": True,
        "goal": "1 RTT + 5 ms",
    }  # exactly on the target counts
    assert goal_check(RELAYED, 5.3, 0.1)["met"] is False  # 2 x 0.1 + 5 = 5.2
    assert goal_check(RELAYED, None, 0.1)["met"] is None
    assert goal_check(DIRECT, 3.0, None)["met"] is None
    assert goal_check(REVERSE, 3.0, 0.1) == {
        "target_ms": None,
        "met": None,
        "goal": "none set (issue 3)",
    }


def samples(**values: list[float]) -> dict[str, list[float]]:
    return {key: values.get(key, []) for key in SAMPLES}


def test_added_time_is_cold_first_byte_over_the_plain_lookup_at_p50() -> None:
    out = kind_result(
        DIRECT,
        samples(
            plain_lookup_ms=[1.0, 2.0, 3.0],
            cold_dns_ms=[10.0, 12.0, 30.0],
            cold_first_byte_ms=[14.0, 16.0, 40.0],
            warm_dns_ms=[2.0],
            warm_first_byte_ms=[4.0],
        ),
        rtt_ms=0.2,
    )
    assert out["plain_lookup_ms"]["p50"] == 2.0
    assert out["added_ms_p50"] == 14.0 and out["dns_hold_ms_p50"] == 10.0
    assert out["ratio_p50"] == 8.0
    assert out["goal"] == {"target_ms": 5.2, "met": False, "goal": "1 RTT + 5 ms"}
    empty = kind_result(RELAYED, samples(), rtt_ms=0.2)
    assert empty["added_ms_p50"] is None and empty["goal"]["met"] is None
    assert empty["cold_first_byte_ms"] == {"n": 0}


STATUS: dict[str, Any] = {
    "paths": [
        {"peer_fqdn": "cn1.ntm.example.com", "kind": "relay", "state": "handshaking"},
        {
            "peer_fqdn": "cn1.ntm.example.com",
            "kind": "relay",
            "state": "established",
            "relay": {"endpoint": ["198.51.100.51", 7500], "bound": True},
        },
        {"peer_fqdn": "cn2.ntm.example.com", "kind": "direct", "state": "established"},
    ]
}


def test_the_client_status_names_the_established_path_and_its_relay() -> None:
    relayed = path_of(STATUS, "cn1.ntm.example.com")
    assert relayed is not None and relayed["state"] == "established"
    assert relay_of(relayed) == "rs2"
    assert relay_of(path_of(STATUS, "cn2.ntm.example.com")) is None
    assert path_of(STATUS, "cn3.ntm.example.net") is None
    assert path_of({}, "cn1.ntm.example.com") is None


def probe_result(cold_fb: float) -> dict[str, Any]:
    return {
        "plain_lookup": {"dns_ms": 1.0},
        "cold": {"dns_ms": cold_fb - 3.0, "first_byte_ms": cold_fb},
        "warm": {"dns_ms": 2.0, "first_byte_ms": 4.0},
    }


def test_a_run_counts_only_when_the_path_is_of_the_expected_kind() -> None:
    got = samples()
    seen: Counter[str] = Counter()
    relays: Counter[str] = Counter()
    assert record_run(RELAYED, probe_result(20.0), STATUS, got, seen, relays) is None
    assert got["cold_first_byte_ms"] == [20.0] and got["plain_lookup_ms"] == [1.0]
    assert relays == {"198.51.100.51:7500": 1}
    # cn2 -> cn1 must be reverse; a relayed path there is reported, not counted
    problem = record_run(REVERSE, probe_result(30.0), STATUS, got, seen, relays)
    assert problem == "peer.example.com: path is relay, expected reverse"
    assert got["cold_first_byte_ms"] == [20.0]
    assert seen == {"relay": 2}
    assert record_run(DIRECT, {"error": "ProbeError: no tunnel"}, STATUS, got, seen, relays) == (
        "ProbeError: no tunnel"
    )
    missing = record_run(DIRECT, probe_result(9.0), {"paths": []}, got, seen, relays)
    assert missing == "global.example.com: path is no established path, expected direct"


def test_probe_bypasses_the_dns_redirect_for_its_plain_lookups() -> None:
    argv = probe_argv(["global.example.com", "peer.example.com"])
    assert argv[argv.index("--mark") + 1] == "0x4e544d"  # ntm_node.dns_redirect.MARK
    assert argv[argv.index("--upstream") + 1] == "198.51.100.11"
    names = [argv[i + 1] for i, a in enumerate(argv) if a == "--marked"]
    assert names == ["global.example.com", "peer.example.com"]


def test_the_redirect_mark_matches_the_node() -> None:
    assert DNS_REDIRECT_MARK == MARK


def test_tcpdump_lines_become_packets() -> None:
    udp = parse_line(
        "1795273128.469892 ifb0  Out IP 10.10.1.100.39214 > 198.51.100.20.4433: UDP, length 1200",
        "mn1",
    )
    assert udp == Packet(
        1795273128.469892,
        "mn1",
        True,
        "10.10.1.100.39214",
        "198.51.100.20.4433",
        1200,
        udp.text if udp else "",
    )
    dns = parse_line(
        "1795273129.806439 ifb0  In  IP 198.51.100.11.53 > 10.10.1.100.48374: 59323 2/0/0 "
        "CNAME cn2.ntm.example.com., A 198.51.100.30 (74)",
        "mn1",
    )
    assert dns is not None and not dns.out and dns.src == "198.51.100.11.53" and dns.length == 0
    assert parse_line("reading from file mn1.pcap, link-type LINUX_SLL2", "mn1") is None


def timeline(start: float) -> list[Packet]:
    """One direct set-up as the three captures see it, 1 ms per step, 0.1 ms per wire."""
    rows = [
        ("mn1", True, "10.10.1.100.5000", "198.51.100.11.53", 0, "A? global.example.com."),
        ("mn1", False, "198.51.100.11.53", "10.10.1.100.5000", 0, ""),
        ("mn1", True, "10.10.1.100.6000", "198.51.100.20.4433", 79, ""),
        ("dc1", False, "198.51.100.2.6000", "198.51.100.20.4433", 79, ""),
        ("dc1", True, "198.51.100.20.4433", "198.51.100.30.7000", 144, ""),
        ("cn2", False, "198.51.100.20.4433", "198.51.100.30.7000", 144, ""),
        ("cn2", True, "198.51.100.30.7000", "198.51.100.20.4433", 49, ""),
        ("dc1", False, "198.51.100.30.7000", "198.51.100.20.4433", 49, ""),
        ("dc1", True, "198.51.100.20.4433", "198.51.100.2.6000", 151, ""),
        ("mn1", False, "198.51.100.20.4433", "10.10.1.100.6000", 151, ""),
        ("mn1", True, "10.10.1.100.7400", "198.51.100.30.7400", 108, ""),
        ("cn2", False, "198.51.100.2.7400", "198.51.100.30.7400", 108, ""),
        ("cn2", True, "198.51.100.30.7400", "198.51.100.2.7400", 108, ""),
        ("mn1", False, "198.51.100.30.7400", "10.10.1.100.7400", 108, ""),
    ]
    packets, t = [], start
    for i, (where, out, src, dst, length, text) in enumerate(rows):
        t += 0.001 if i % 2 == 0 else 0.0001
        packets.append(Packet(round(t, 6), where, out, src, dst, length, text))
    return packets


def test_a_set_up_is_cut_into_its_steps() -> None:
    start = 1000.0
    packets = timeline(start)
    # noise the sequence must skip: an ACK-only datagram from dc1 to mn1 before the reply
    ack_only = Packet(
        start + 0.0049, "dc1", True, "198.51.100.20.4433", "198.51.100.2.6000", 33, ""
    )
    packets.append(ack_only)
    got = steps(packets, start, dns_ms=9.0, first_byte_ms=12.0)
    assert len(got) == len(ALL_STEPS)
    assert got[0] == 1.0 and got[1] == 0.1  # stub, then the resolver's round trip
    # the DC waited for the ack: push 1.0, wire 0.1, cn2 1.0, wire 0.1, answer 1.0
    assert got[STEPS.index("dc1: Direction Request in -> Route Direction to mn1 out")] == 3.2
    assert got[len(STEPS) :] == [1.0, 0.1, 1.0, 0.1, 1.0]
    assert got[len(STEPS) - 2] == pytest.approx(9.0 - 7.7)  # RESP in at 7.7 ms
    assert got[len(STEPS) - 1] == 3.0
    assert sum(got[: len(STEPS)]) == pytest.approx(12.0)  # the main steps add up
    with pytest.raises(LookupError):
        steps(packets[:5], start, 9.0, 12.0)
    rows = summarize([got, got])
    assert rows[0] == {"step": STEPS[0], **summary([1.0, 1.0])}
    assert [r["step"] for r in rows] == list(ALL_STEPS)


def test_an_answer_before_the_ack_shows_as_a_negative_last_push_step() -> None:
    start = 1000.0
    packets = timeline(start)
    # dc1 answers mn1 0.2 ms after the Direction Request, before it pushes to cn2
    rd_out = packets[8]
    packets[8] = Packet(start + 0.0024, rd_out.where, rd_out.out, rd_out.src, rd_out.dst, 151, "")
    got = steps(packets, start, dns_ms=9.0, first_byte_ms=12.0)
    assert got[STEPS.index("dc1: Direction Request in -> Route Direction to mn1 out")] == 0.2
    assert got[-1] == pytest.approx(2.4 - 4.4)  # the ack came in at 4.4 ms


class FakeLab:
    """What run_setup uses of BenchLab; restarts of `flaky` fail `fail_restarts` times."""

    def __init__(self, flaky: str = "", fail_restarts: int = 0) -> None:
        self.flaky, self.fail_restarts = flaky, fail_restarts
        self.calls: list[str] = []

    def ns(self, service: str) -> str:
        return f"lab-{service}"

    def socket(self, service: str) -> str:
        return f"/state/run/{service}.sock"

    def kill(self, service: str) -> None:
        self.calls.append(f"kill {service}")

    def start(self, service: str) -> None:
        self.calls.append(f"start {service}")

    def wait_registered(self, service: str) -> dict[str, Any]:
        if service == self.flaky and self.fail_restarts:
            self.fail_restarts -= 1
            raise LabFailure(f"{service} did not register")
        return {}

    def status(self, service: str) -> dict[str, Any]:
        return STATUS if service == "mn1" else CN2_STATUS


CN2_STATUS: dict[str, Any] = {
    "paths": [{"peer_fqdn": "cn1.ntm.example.com", "kind": "reverse", "state": "established"}]
}


def fake_run_in(orders: list[list[str]]) -> Any:
    def run_in(ns: str, argv: list[str], timeout: float, env: Any = None) -> Any:
        if argv[0] == "ping":
            out = "64 bytes: icmp_seq=1 ttl=64 time=0.100 ms\n1 packets transmitted, 1 received"
            return subprocess.CompletedProcess(argv, 0, out, "")
        names = [argv[i + 1] for i, a in enumerate(argv) if a == "--marked"]
        orders.append(names)
        doc = {
            "names": {n: probe_result(20.0) for n in names},
            "plain": {"dns_ms": 2.0, "first_byte_ms": 3.0},
        }
        return subprocess.CompletedProcess(argv, 0, json.dumps(doc), "")

    return run_in


def option(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


class FakeProbe:
    """`python -m bench.probe runs` as the lab would answer it: one JSON line per run.

    `forget_fails`: runs (by index) whose forget-paths fails; `stop_after`: the probe exits
    after that many lines; `paths`: what the node's status shows after each run."""

    made: list[list[str]] = []
    forget_fails: set[int] = set()
    stop_after: int | None = None
    paths: dict[str, list[dict[str, Any]]] = {}

    def __init__(self, argv: list[str], bound: float) -> None:
        self.argv = argv
        FakeProbe.made.append(argv)

    def lines(self) -> Iterator[str]:
        argv = self.argv
        assert argv[:3] == ["ip", "netns", "exec"] and "runs" in argv
        client = argv[3].removeprefix("lab-")
        names = option(argv, "--marked")
        for i in range(int(option(argv, "--runs")[0])):
            if self.stop_after is not None and i >= self.stop_after:
                return
            if i in self.forget_fails:
                yield json.dumps({"run": i, "error": "ProbeError: forget-paths: no daemon"})
                continue
            order = names if i % 2 == 0 else names[::-1]
            doc = {
                "run": i,
                "forget_ms": 1.5,
                "names": {n: probe_result(20.0) for n in order},
                "order": order,
                "plain": {"dns_ms": 2.0, "first_byte_ms": 3.0},
                "paths": self.paths.get(
                    client, (STATUS if client == "mn1" else CN2_STATUS)["paths"]
                ),
            }
            yield json.dumps(doc) + "\n"

    def finish(self) -> tuple[int, str]:
        return (0 if self.stop_after is None else 1), ""


@pytest.fixture
def fake_probe(monkeypatch: pytest.MonkeyPatch) -> type[FakeProbe]:
    monkeypatch.setattr("bench.setup_time.run_in", fake_run_in([]))
    monkeypatch.setattr("bench.setup_time.LineProcess", FakeProbe)
    FakeProbe.made, FakeProbe.forget_fails, FakeProbe.stop_after = [], set(), None
    FakeProbe.paths = {}
    return FakeProbe


def test_run_setup_restart_mode_restarts_each_client(monkeypatch: pytest.MonkeyPatch) -> None:
    orders: list[list[str]] = []
    monkeypatch.setattr("bench.setup_time.run_in", fake_run_in(orders))
    lab = FakeLab()
    out = run_setup(lab, 2, 1, lambda _: None, fresh="restart")  # type: ignore[arg-type]
    assert lab.calls == ["kill mn1", "start mn1", "kill cn2", "start cn2"] * 2
    assert orders == [
        ["global.example.com", "peer.example.com"],
        ["peer.example.com"],
        ["peer.example.com", "global.example.com"],  # the other name first this time
        ["peer.example.com"],
    ]
    assert out["fresh"] == "restart" and "restarts" in out["how"]
    assert out["kinds"]["direct"]["cold_first_byte_ms"]["n"] == 2
    with pytest.raises(ValueError, match="fresh='reboot'"):
        run_setup(lab, 1, 1, lambda _: None, fresh="reboot")  # type: ignore[arg-type]


def test_run_setup_forgets_paths_in_one_probe_per_client(fake_probe: type[FakeProbe]) -> None:
    lab = FakeLab()
    out = run_setup(lab, 2, 1, lambda _: None)  # type: ignore[arg-type]
    assert lab.calls == []  # no restarts
    mn1, cn2 = fake_probe.made
    assert option(mn1, "--forget") == ["cn1.ntm.example.com", "cn2.ntm.example.com"]
    assert option(mn1, "--status") == ["/state/run/mn1.sock"] and option(mn1, "--runs") == ["2"]
    assert option(cn2, "--forget") == ["cn1.ntm.example.com"]
    assert option(cn2, "--marked") == ["peer.example.com"]
    assert out["fresh"] == "forget" and "forget-paths" in out["how"]
    kinds = out["kinds"]
    assert kinds["relayed"]["cold_first_byte_ms"]["n"] == 2
    assert kinds["reverse"]["path_kinds_seen"] == {"reverse": 2}
    assert kinds["direct"]["added_ms_p50"] == 19.0  # 20 ms first byte over a 1 ms lookup
    assert kinds["direct"]["goal"]["target_ms"] == 5.1  # 1 x 0.1 ms ping + 5
    assert out["relays_used"] == {"198.51.100.51:7500": 2}
    assert out["plain_stub"]["mn1"]["dns_ms"]["p50"] == 2.0
    assert out["fresh_wait_s"]["mn1"]["p50"] == 0.0015


def test_a_failed_restart_costs_a_run_and_a_broken_lab_stops_the_section(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("bench.setup_time.run_in", fake_run_in([]))
    out = run_setup(FakeLab("mn1", 1), 3, 1, lambda _: None, fresh="restart")  # type: ignore[arg-type]
    assert out["kinds"]["direct"]["cold_first_byte_ms"]["n"] == 2
    assert out["kinds"]["direct"]["failures"] == ["run 0: restart of mn1: mn1 did not register"]
    assert out["kinds"]["reverse"]["cold_first_byte_ms"]["n"] == 3
    with pytest.raises(LabFailure, match="did not register"):
        run_setup(FakeLab("cn2", 3), 5, 1, lambda _: None, fresh="restart")  # type: ignore[arg-type]


def test_a_failed_forget_costs_a_run_and_a_probe_that_stops_fails_the_section(
    fake_probe: type[FakeProbe],
) -> None:
    fake_probe.forget_fails = {1}
    out = run_setup(FakeLab(), 3, 1, lambda _: None)  # type: ignore[arg-type]
    assert out["kinds"]["direct"]["cold_first_byte_ms"]["n"] == 2
    assert out["kinds"]["direct"]["failures"] == [
        "run 1: forget on mn1: ProbeError: forget-paths: no daemon"
    ]
    fake_probe.forget_fails, fake_probe.stop_after = set(), 1
    with pytest.raises(LabFailure, match=r"setup probe in mn1 stopped after 1 of 3 runs"):
        run_setup(FakeLab(), 3, 1, lambda _: None)  # type: ignore[arg-type]


def test_a_wrong_path_kind_costs_the_run(fake_probe: type[FakeProbe]) -> None:
    fake_probe.paths = {
        "cn2": [{"peer_fqdn": "cn1.ntm.example.com", "kind": "relay", "state": "established"}]
    }
    out = run_setup(FakeLab(), 2, 1, lambda _: None)  # type: ignore[arg-type]
    assert out["kinds"]["reverse"]["cold_first_byte_ms"]["n"] == 0
    assert out["kinds"]["reverse"]["failures"][0] == (
        "run 0: peer.example.com: path is relay, expected reverse"
    )
    fake_probe.paths = {"mn1": [], "cn2": []}
    with pytest.raises(LabFailure, match="every set-up run failed"):
        run_setup(FakeLab(), 2, 1, lambda _: None)  # type: ignore[arg-type]


def test_probe_runs_forgets_before_each_run_and_stops_when_the_node_never_forgets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import bench.probe as probe

    calls: list[str] = []
    fails = {1}

    def forget(args: Any) -> None:
        calls.append("forget")
        if calls.count("forget") - 1 in fails:  # by run: the n-th forget is run n's
            raise probe.ProbeError("forget-paths: no daemon")

    def one_run(names: list[str], args: Any) -> dict[str, Any]:
        calls.append(",".join(names))
        return {"names": {n: {} for n in names}}

    monkeypatch.setattr(probe, "forget", forget)
    monkeypatch.setattr(probe, "one_run", one_run)
    monkeypatch.setattr(probe, "paths_now", lambda args: [{"peer_fqdn": "x"}])
    argv = ["runs", "--runs", "3", "--status", "/s.sock", "--forget", "cn2.ntm.example.com"]
    argv += ["--marked", "a", "--marked", "b", "--plain", "p", "--upstream", "198.51.100.11"]
    assert probe.main(argv) == 0
    assert calls == ["forget", "a,b", "forget", "forget", "a,b"]  # no run 1; run 2: a first
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["run"] for x in lines] == [0, 1, 2]
    assert lines[1] == {"run": 1, "error": "ProbeError: forget-paths: no daemon"}
    assert lines[2]["paths"] == [{"peer_fqdn": "x"}] and "forget_ms" in lines[2]
    calls.clear()
    fails.update({0, 2})
    assert probe.main([*argv[:2], "5", *argv[3:]]) == 1  # three in a row: stop
    assert calls == ["forget"] * 3
