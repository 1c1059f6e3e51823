"""loadtests.driver (schedule, commands, timing), expect (LB config), identities, runner plan."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pytest

from loadtests import cli
from loadtests.driver import Driver, Event, event_argv, parse_event, parse_schedule
from loadtests.expect import (
    ServiceExpectation,
    address_names,
    load_expectations,
    service_expectation,
    with_persistence,
)
from loadtests.identities import (
    Identity,
    node_identities,
    parse_identities,
    parse_resolver,
    resolv_conf_nameserver,
    take_slice,
)
from loadtests.model import EventRecord
from loadtests.runner import RunOptions, plan
from ntm_io.config import ConfigError

REPO = Path(__file__).resolve().parents[2]

# -- schedule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "lab_args"),
    [
        ("30:move:mn2:access-b", ["move", "mn2", "--to", "access-b"]),
        ("60:kill:ntma1", ["kill", "ntma1"]),
        ("75:start:ntma1", ["start", "ntma1"]),
        ("90:link:ntma2:isp1:down", ["link", "ntma2", "isp1", "down"]),
        ("95:impair:access-a:5", ["impair", "access-a", "--loss", "5"]),
        ("99.5:lab:logs:mn1", ["logs", "mn1"]),
    ],
)
def test_events_map_to_lab_verbs(text: str, lab_args: list[str]) -> None:
    assert parse_event(text).lab_args() == lab_args


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("move:mn2", "not a number"),
        ("-1:kill:ntma1", ">= 0"),
        ("30:fly:mn2", "unknown action"),
        ("30:move:mn2", "OFFSET:move:SERVICE:NETWORK"),
        ("30:kill:ntma1:now", "OFFSET:kill:SERVICE"),
        ("30:link:ntma2:isp1:sideways", "down"),
        ("30:impair:access-a:150", "percentage"),
        ("30:move::access-b", "empty"),
        ("30", "OFFSET:ACTION"),
        ("30:lab", "OFFSET:lab:VERB"),
    ],
)
def test_bad_events_say_how_to_write_them(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_event(text)


def test_schedule_is_sorted_and_must_fit_the_run() -> None:
    events = parse_schedule(["60:kill:ntma1", "30:move:mn2:access-b"], duration=120)
    assert [e.offset for e in events] == [30, 60]
    with pytest.raises(ConfigError, match="inside the 50 s run"):
        parse_schedule(["60:kill:ntma1"], duration=50)


def test_event_argv_names_the_lab() -> None:
    argv = event_argv(parse_event("30:move:mn2:access-b"), "ltlab", "/tmp/st")
    tail = ["lab", "move", "--name", "ltlab", "--state", "/tmp/st", "mn2", "--to", "access-b"]
    assert argv[-len(tail) :] == tail
    assert "--state" not in event_argv(parse_event("1:kill:x"), "ltlab", None)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_driver_runs_events_in_order_and_stamps_them() -> None:
    clock = FakeClock()
    ran: list[list[str]] = []

    def runner(argv: list[str]) -> tuple[int, str]:
        ran.append(argv)
        clock.now += 2.0  # the command takes 2 s
        return (1 if "kill" in argv else 0), "said something"

    events = [Event(0.0, "move", ("mn2", "access-b")), Event(0.0, "kill", ("ntma1",))]
    seen: list[EventRecord] = []
    d = Driver(events, "lab1", None, runner=runner, clock=clock, on_event=seen.append)
    d.run(t0=1000.0)  # offsets already due: no waiting
    assert [r.action for r in d.records] == ["move", "kill"]
    first, second = d.records
    assert (first.started_at, first.ended_at, first.rc) == (1000.0, 1002.0, 0)
    assert (second.started_at, second.rc, second.output) == (1002.0, 1, "said something")
    assert seen == d.records and len(ran) == 2


def test_driver_stops_before_a_pending_event() -> None:
    d = Driver([Event(3600.0, "kill", ("x",))], "lab1", None, runner=lambda a: (0, ""))
    d.start(t0=time.time())
    d.stop()
    d.join(5.0)
    assert d.records == []


# -- expectations --------------------------------------------------------------------------


def test_expectations_from_the_lab_configs() -> None:
    exps = load_expectations(
        REPO / "lab/config/lb.toml", REPO / "compose.yaml", http_port=8080, udp_port=9000
    )
    http, udp = exps
    assert (http.kind, http.port, http.scheduler, http.persistence) == ("http", 8080, "rr", True)
    assert http.weights == {"web1": 1, "web2": 1, "web3": 1}
    assert (udp.scheduler, udp.persistence, udp.client_sticky) == ("sh", False, True)
    (plain,) = load_expectations(REPO / "lab/config/lb.toml", REPO / "compose.yaml", 80, None)
    assert plain.scheduler == "rr" and not plain.client_sticky


def test_expectation_errors_and_weights() -> None:
    lb = {
        "service": [
            {
                "port": 80,
                "protocol": "tcp",
                "scheduler": "wrr",
                "real": [{"address": "10.0.0.1", "weight": 3}, {"address": "10.0.0.2"}],
            }
        ]
    }
    exp = service_expectation(lb, {"10.0.0.1": "a"}, "http", 80)
    assert exp.weights == {"a": 3, "10.0.0.2": 1}
    with pytest.raises(ConfigError, match="no udp/80 service"):
        service_expectation(lb, {}, "udp", 80)
    assert with_persistence(exp, "on").client_sticky
    assert ServiceExpectation.from_json(exp.to_json()) == exp
    names = address_names({"services": {"w": {"networks": {"n": {"ipv4_address": "1.2.3.4"}}}}})
    assert names == {"1.2.3.4": "w"}


# -- identities ----------------------------------------------------------------------------


def test_swarm_identities_file() -> None:
    doc = {
        "swarm": "mn2",
        "dns": "127.0.0.53:53",
        "complete": False,
        "identities": [
            {"index": 0, "fqdn": "s0.swarm.ntm.example.com", "vip": "100.64.1.1", "tun": "t0"},
            {"index": 1, "fqdn": "s1.swarm.ntm.example.com", "vip": None, "tun": "t1"},
            {"fqdn": "s2", "vip": "100.64.1.3", "resolver": "127.0.0.1"},
        ],
    }
    ids = parse_identities(doc, "f")
    assert ids == [
        Identity("s0.swarm.ntm.example.com", "100.64.1.1", ("127.0.0.53", 53)),
        Identity("s2", "100.64.1.3", ("127.0.0.1", 53)),
    ]
    assert parse_identities([{"fqdn": "a", "vip": "100.64.0.1"}], "f")[0].resolver is None


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ({"x": 1}, "JSON list"),
        ([{"fqdn": "a"}], "needs `vip`"),
        ([{"fqdn": "a", "vip": "fe80::1"}], "not IPv4"),
        ([{"fqdn": "a", "vip": None}], "no identity with a vIP"),
    ],
)
def test_bad_identities(doc: Any, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_identities(doc, "f")


def test_resolvers_slices_and_local_nodes() -> None:
    assert parse_resolver("127.0.0.53:5353") == ("127.0.0.53", 5353)
    assert parse_resolver("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_resolver("[::1]:53") == ("::1", 53)
    assert parse_resolver("2001:db8::1") == ("2001:db8::1", 53)
    assert resolv_conf_nameserver("# x\nsearch lab\nnameserver 127.0.0.1\n") == ("127.0.0.1", 53)
    with pytest.raises(ConfigError):
        resolv_conf_nameserver("search lab\n")
    ids = [Identity(f"s{i}", f"100.64.0.{i}") for i in range(5)]
    assert [i.fqdn for i in take_slice(ids, "1/2")] == ["s1", "s3"]
    assert take_slice(ids, None) == ids
    for bad in ("2/2", "x", "1"):
        with pytest.raises(ConfigError):
            take_slice(ids, bad)
    status = {
        "/run/a.sock": {"fqdn": "mn1.ntm.example.com", "vip": "127.0.0.1", "role": "node"},
        "/run/b.sock": {"fqdn": "cn2.ntm.example.com", "vip": "192.0.2.77", "role": "node"},
        "/run/c.sock": {"error": "no answer"},
    }
    assert node_identities(status) == [Identity("mn1.ntm.example.com", "127.0.0.1")]


# -- CLI arguments and the process plan ----------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_thresholds_from_flags_and_bad_values() -> None:
    args = parse("verdict", "/x", "--max-failed-ratio", "0.2", "--max-interruption", "5")
    th = cli.thresholds(args)
    assert (th.max_failed_ratio, th.max_interruption, th.alpha) == (0.2, 5.0, 0.001)
    with pytest.raises(ConfigError, match="fraction"):
        cli.thresholds(parse("verdict", "/x", "--max-failed-ratio", "3"))
    with pytest.raises(ConfigError, match="significance"):
        cli.thresholds(parse("verdict", "/x", "--alpha", "0"))


def test_the_request_interval_reaches_the_verdict() -> None:
    """It decides which event a gap is attributed to (verdict.gap_owner)."""
    assert cli.thresholds(parse("run", "--interval", "0.25")).request_interval == 0.25
    saved = cli.vd.Thresholds(request_interval=0.5)  # as run.json keeps it for `verdict`
    assert cli.thresholds(parse("verdict", "/x"), saved).request_interval == 0.5


def test_locust_args_carry_the_traffic_options() -> None:
    args = parse("run", "--interval", "0.5", "--http-port", "80")
    out = cli.locust_args(args, http_sticky=False, udp_sticky=True)
    assert out[out.index("--ntm-interval") + 1] == "0.5"
    assert out[out.index("--ntm-http-port") + 1] == "80"
    assert "--ntm-udp-persistence" in out and "--ntm-http-persistence" not in out


def options(tmp_path: Path, **kw: Any) -> RunOptions:
    base: dict[str, Any] = {
        "lab": "lt",
        "state": None,
        "services": ["mn2"],
        "users": 10,
        "spawn_rate": 5.0,
        "duration": 30.0,
        "events": [],
        "out": tmp_path,
    }
    base.update(kw)
    return RunOptions(**base)


def test_plan_standalone_runs_locust_inside_the_service(tmp_path: Path) -> None:
    (only,) = plan(options(tmp_path, identities={"mn2": tmp_path / "ids.json"}))
    assert only.main
    argv = only.argv
    i = argv.index("exec")
    assert argv[i + 1 : i + 4] == ["--name", "lt", "mn2"]
    assert f"NTM_LOADTEST_IDENTITIES={tmp_path / 'ids.json'}" in argv
    assert "--headless" in argv and argv[argv.index("-u") + 1] == "10"
    assert argv[argv.index("--ntm-run-time") + 1] == "30"
    assert "--master" not in argv and "--worker" not in argv


def test_plan_distributed_bridges_only_other_hosts(tmp_path: Path) -> None:
    launches = plan(options(tmp_path, services=["mn2", "mn1"], workers=3))
    names = [x.name for x in launches]
    assert names == [
        "bridge-mn2",
        "bridge-mn1",
        "locust-master",
        "worker0-mn2",
        "worker1-mn1",
        "worker2-mn2",
    ]
    by = {x.name: x.argv for x in launches}
    assert [x.name for x in launches if x.main] == ["locust-master"]
    assert "--expect-workers" in by["locust-master"] and "-u" in by["locust-master"]
    assert "NTM_LOADTEST_SLICE=0/2" in by["worker0-mn2"]
    assert "NTM_LOADTEST_SLICE=1/2" in by["worker2-mn2"]
    assert "NTM_LOADTEST_SLICE=0/1" in by["worker1-mn1"]
    assert "-u" not in by["worker1-mn1"]  # the master tells workers what to run
    sock = str(tmp_path / "locust-master.sock")
    assert f"unix:{sock}" in by["bridge-mn2"] and f"unix:{sock}" in by["bridge-mn1"]
    # everything on one host: no bridge at all
    assert all(not x.name.startswith("bridge") for x in plan(options(tmp_path, workers=2)))


def test_identities_map_requires_files(tmp_path: Path) -> None:
    f = tmp_path / "ids.json"
    f.write_text(json.dumps([]))
    assert cli.identities_map([f"mn2={f}", str(f)]) == {"mn2": f, "": f}
    with pytest.raises(ConfigError, match="no such file"):
        cli.identities_map([str(tmp_path / "nope.json")])
