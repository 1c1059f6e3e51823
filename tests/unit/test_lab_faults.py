"""`ntm lab link` / `ntm lab impair` and NTM_LAB_RULES without root: rulesets, parsing, CLI."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab import cli, faults, names
from lab.errors import LabError
from lab.service_init import Step, parse_routes, plan, rule_steps

# `nft -j list ruleset bridge` after `loss_ruleset("access-a", 300)` and some traffic
# (captured from nftables 1.0.6).
GROUP = names.network_group("access-a")
LISTING: dict[str, Any] = {
    "nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "bridge", "name": "ntm_lab_impair_access-a", "handle": 2}},
        {"table": {"family": "bridge", "name": "someone_else", "handle": 3}},
        {
            "rule": {
                "family": "bridge",
                "table": "ntm_lab_impair_access-a",
                "chain": "forward",
                "handle": 2,
                "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": "iifgroup"}}, "right": GROUP}},
                    {"counter": {"packets": 335, "bytes": 28112}},
                ],
            }
        },
        {
            "rule": {
                "family": "bridge",
                "table": "ntm_lab_impair_access-a",
                "chain": "forward",
                "handle": 3,
                "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": "iifgroup"}}, "right": GROUP}},
                    {
                        "match": {
                            "op": "<=",
                            "left": {"numgen": {"mode": "random", "mod": 1000, "offset": 0}},
                            "right": 299,
                        }
                    },
                    {"counter": {"packets": 116, "bytes": 9744}},
                    {"drop": None},
                ],
            }
        },
        {
            "rule": {
                "family": "bridge",
                "table": "someone_else",
                "chain": "c",
                "handle": 2,
                "expr": [{"counter": {"packets": 9, "bytes": 9}}, {"drop": None}],
            }
        },
    ]
}


def test_loss_ruleset_replaces_the_networks_table_and_matches_its_ports_group() -> None:
    text = faults.loss_ruleset("access-a", 300)
    lines = text.splitlines()
    assert lines[:2] == [
        "table bridge ntm_lab_impair_access-a",
        "delete table bridge ntm_lab_impair_access-a",
    ]
    assert f"meta iifgroup {GROUP} counter" in text
    assert f"meta iifgroup {GROUP} numgen random mod 1000 <= 299 counter drop" in text
    assert "type filter hook forward priority 0; policy accept;" in text


def test_loss_100_drops_every_frame() -> None:
    assert "numgen random mod 1000 <= 999 counter drop" in faults.loss_ruleset("isp1", 1000)


def test_loss_zero_only_removes_the_table() -> None:
    assert faults.loss_ruleset("isp1", 0) == (
        "table bridge ntm_lab_impair_isp1\ndelete table bridge ntm_lab_impair_isp1\n"
    )


@pytest.mark.parametrize(("pct", "steps"), [(0, 0), (5, 50), (2.5, 25), (30, 300), (100, 1000)])
def test_loss_in_percent_becomes_a_numgen_threshold(pct: float, steps: int) -> None:
    assert faults.parse_loss(pct) == steps


@pytest.mark.parametrize(
    ("pct", "message"),
    [(-1, "0 to 100"), (100.5, "0 to 100"), (float("nan"), "0 to 100"), (0.05, "0.1 %")],
)
def test_bad_losses_are_explained(pct: float, message: str) -> None:
    with pytest.raises(LabError, match=message):
        faults.parse_loss(pct)


@given(st.integers(0, 1000))
def test_every_tenth_of_a_percent_is_accepted_exactly(steps: int) -> None:
    pct = steps / 10
    assert faults.parse_loss(pct) == steps


def test_impairments_are_read_from_the_listing_with_their_counters() -> None:
    assert faults.parse_impairments(LISTING) == {
        "ntm_lab_impair_access-a": faults.Impairment(loss=30.0, seen=335, dropped=116)
    }
    assert faults.parse_impairments({}) == {}


def test_network_groups_are_stable_nonzero_and_distinct() -> None:
    nets = ["internet", "access-a", "access-b", "site-b", "isp1", "isp2", "dmz", "backend"]
    groups = [names.network_group(n) for n in nets]
    assert groups == [names.network_group(n) for n in nets]
    assert len(set(groups)) == len(groups)
    assert all(0 < g < 2**32 for g in groups)


# --- NTM_LAB_RULES ------------------------------------------------------------------------


def test_rules_are_deleted_then_added_so_a_rerun_is_harmless() -> None:
    assert rule_steps("from 192.0.2.10 lookup 101; -6 from 2001:db8:201::10 lookup 101") == [
        Step(("ip", "rule", "del", "from", "192.0.2.10", "lookup", "101"), check=False),
        Step(("ip", "rule", "add", "from", "192.0.2.10", "lookup", "101")),
        Step(("ip", "-6", "rule", "del", "from", "2001:db8:201::10", "lookup", "101"), check=False),
        Step(("ip", "-6", "rule", "add", "from", "2001:db8:201::10", "lookup", "101")),
    ]


def test_rules_come_after_the_routes_and_before_nat() -> None:
    steps = plan(
        {
            "NTM_LAB_ROUTES": "default via 192.0.2.1 table 101",
            "NTM_LAB_RULES": "from 192.0.2.10 lookup 101",
            "NTM_LAB_MASQUERADE": "10.0.0.0/8",
        }
    )
    assert [s.argv[1:3] for s in steps] == [
        ("route", "replace"),
        ("rule", "del"),
        ("rule", "add"),
        ("-f", "-"),
    ]


def test_a_rule_with_options_only_names_the_variable() -> None:
    with pytest.raises(LabError, match=r"NTM_LAB_RULES: .* no rule"):
        parse_routes("-6", "NTM_LAB_RULES")


# --- the CLI ------------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_link_and_impair_parse() -> None:
    args = _parse("link", "ntma2", "isp1", "down", "--name", "t1")
    assert (args.lab_command, args.service, args.network, args.updown) == (
        "link",
        "ntma2",
        "isp1",
        "down",
    )
    assert _parse("impair", "access-a", "--loss", "5").loss == 5.0
    assert _parse("impair", "access-a").loss is None
    with pytest.raises(SystemExit):
        _parse("link", "ntma2", "isp1", "sideways")
