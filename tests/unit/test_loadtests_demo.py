"""The demo's scenario and its SNAT counter-proof rule (pure parts of loadtests/demo.py)."""

from __future__ import annotations

from loadtests.demo import SCENARIO, schedule, snat_rules
from loadtests.driver import parse_schedule


def test_events_start_after_the_ramp_and_stay_inside_the_run() -> None:
    events = schedule(duration=240.0, ramp=25.0)
    offsets = [float(e.split(":", 1)[0]) for e in events]
    assert len(events) == len(SCENARIO)
    assert offsets == sorted(offsets)
    assert offsets[0] >= 25.0 and offsets[-1] < 240.0
    # the driver accepts every one of them
    assert len(parse_schedule(events, 240.0)) == len(SCENARIO)


def test_the_scenario_has_handovers_and_a_gateway_failure() -> None:
    actions = [a for _, a in SCENARIO]
    assert "move:mn2:access-b" in actions and "move:mn2:access-a" in actions
    assert actions.index("kill:ntma1") < actions.index("start:ntma1")


def test_snat_rule_masquerades_only_vips_toward_the_lb() -> None:
    rules = snat_rules("100.64.0.0/10")
    assert 'oifname "dmz" ip saddr 100.64.0.0/10 masquerade' in rules
    assert "hook postrouting" in rules
