"""bench.swarm_load: the section's lab and how its rate is read from the runs' records."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from bench.cli import LAB_SECTIONS, parse_only
from bench.labctl import DMZ_CLIENT, DMZ_CLIENT_ADDRESS
from bench.swarm_load import SERVICES, SWARM, load_compose, steady_rate


def test_compose_has_the_swarm_with_its_count_and_the_plain_host(tmp_path: Path) -> None:
    doc = yaml.safe_load(load_compose(tmp_path, count=123).read_text())
    services = doc["services"]
    assert set(services) == {*SERVICES, SWARM, DMZ_CLIENT}
    assert services[SWARM]["command"][-2:] == ["--count", "123"]
    assert services[DMZ_CLIENT]["networks"] == {"dmz": {"ipv4_address": DMZ_CLIENT_ADDRESS}}
    kept = set(services)
    for spec in services.values():  # no dependency on a service left out
        assert set(spec.get("depends_on", {})) <= kept


def timeline(
    answers: dict[str, dict[int, dict[str, int]]], failures: dict[str, dict[int, int]]
) -> str:
    return json.dumps({"type": "timeline", "answers": answers, "failures": failures})


def test_steady_rate_sums_kinds_backends_and_processes_in_the_window(tmp_path: Path) -> None:
    (tmp_path / "records-a.jsonl").write_text(
        json.dumps({"type": "meta"})
        + "\n"
        + timeline(
            {"http": {100: {"web1": 5}, 101: {"web1": 10, "web2": 10}, 102: {"web3": 20}}},
            {"udp": {102: 1}},
        )
        + "\n"
    )
    (tmp_path / "records-b.jsonl").write_text(
        timeline({"udp": {101: {"web2": 10}, 102: {"web2": 10}, 150: {"web1": 99}}}, {}) + "\n"
    )
    r = steady_rate(tmp_path, 100.0, 103.0)  # whole seconds 101 and 102 only
    assert r == {"rps": 30.0, "rps_min": 30, "rps_max": 30, "seconds": 2, "failures": 1}
    assert steady_rate(tmp_path, 200.0, 210.0)["rps"] is None


def test_load_is_a_section_of_its_own() -> None:
    assert parse_only("load") == ["load"]
    assert "load" not in LAB_SECTIONS  # it builds its own lab, not the other sections' one
