"""The DC's gateway choice (dc/gateways.py): a pure function, tested by table and by shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from dc import config as dc_config
from dc.gateways import (
    REPORT_TTL,
    Choice,
    Gateway,
    Health,
    choose,
    effective_weight,
    hold_down_left,
    unit_hash,
    unusable,
)
from ntm_io.config import ConfigError

LAB = Path(__file__).resolve().parents[2] / "lab" / "config"

NOW = 1000.0
HOLD = 30.0
MN = "mn1.ntm.example.com"


def gw(name: str, weight: int = 100, connected: bool = True, since: float = 0.0, **health: int):
    h = Health(at=NOW, **{"tunnels": 0, "rtt_us": 0, "jitter_us": 0, "loss_ppm": 0, **health})
    return Gateway(name, weight, connected, since, h if health else None)


A, B, C = "a.ntm.example.com", "b.ntm.example.com", "c.ntm.example.com"


def first_for(requester: str, *gws: Gateway) -> str | None:
    return choose(gws, requester, NOW, HOLD).chosen


@pytest.mark.parametrize(
    ("gateways", "preferred", "expected"),
    [
        # nothing usable
        ((), "", Choice(None, ())),
        ((gw(A, connected=False), gw(B, weight=0)), "", Choice(None, ())),
        # the only usable one, whatever the others are
        ((gw(A, connected=False), gw(B)), "", Choice(B, ())),
        ((gw(A, weight=0), gw(B)), "", Choice(B, ())),
        # hold-down: a just-reconnected one ranks after the settled one...
        ((gw(A, since=NOW - 5), gw(B)), "", Choice(B, (A,))),
        # ...is used when nothing else is...
        ((gw(A, since=NOW - 5), gw(B, connected=False)), "", Choice(A, ())),
        # ...and counts as settled once the hold-down has passed
        ((gw(A, since=NOW - HOLD), gw(B, weight=1)), "", Choice(A, (B,))),
        # a preferred gateway is honoured when usable, even in hold-down...
        ((gw(A), gw(B, since=NOW - 1)), B, Choice(B, (A,))),
        # ...and ignored when it is not
        ((gw(A), gw(B, weight=0)), B, Choice(A, ())),
        ((gw(A), gw(B, connected=False)), B, Choice(A, ())),
        ((gw(A),), "z.ntm.example.com", Choice(A, ())),
    ],
)
def test_choice_table(gateways: tuple[Gateway, ...], preferred: str, expected: Choice) -> None:
    assert choose(gateways, MN, NOW, HOLD, preferred) == expected


def test_an_mn_keeps_its_gateway_while_the_set_is_stable() -> None:
    gws = [gw(A), gw(B), gw(C)]
    first = choose(gws, MN, NOW, HOLD)
    for later in (NOW + 1, NOW + 500):
        assert choose(list(reversed(gws)), MN, later, HOLD) == first


def test_removing_a_gateway_moves_only_its_own_mns() -> None:
    mns = [f"mn{i}.ntm.example.com" for i in range(300)]
    before = {mn: first_for(mn, gw(A), gw(B), gw(C)) for mn in mns}
    after = {mn: first_for(mn, gw(A), gw(B), gw(C, connected=False)) for mn in mns}
    moved = [mn for mn in mns if before[mn] != after[mn]]
    assert moved and all(before[mn] == C for mn in moved)
    assert all(after[mn] in (A, B) for mn in mns)


def test_alternative_is_where_the_mn_goes_when_its_gateway_fails() -> None:
    for i in range(50):
        mn = f"mn{i}.ntm.example.com"
        choice = choose([gw(A), gw(B), gw(C)], mn, NOW, HOLD)
        assert choice.chosen is not None
        gws = [gw(n, connected=n != choice.chosen) for n in (A, B, C)]
        assert choose(gws, mn, NOW, HOLD) == Choice(choice.alternatives[0], choice.alternatives[1:])


def test_shares_follow_the_weights() -> None:
    mns = [f"host{i}.ntm.example.com" for i in range(3000)]
    picks = [first_for(mn, gw(A, weight=300), gw(B, weight=100)) for mn in mns]
    share_a = picks.count(A) / len(picks)
    assert 0.70 < share_a < 0.80  # 3:1 weights, 3000 hashed names


def test_weight_0_drains_but_stays_out_of_alternatives() -> None:
    choice = choose([gw(A, weight=0), gw(B), gw(C)], MN, NOW, HOLD)
    assert A not in (choice.chosen, *choice.alternatives)


def test_effective_weight_formula() -> None:
    assert effective_weight(gw(A), NOW) == 100  # no report: the configured weight
    assert effective_weight(gw(A, weight=0, loss_ppm=0), NOW) == 0
    assert effective_weight(gw(A, loss_ppm=97_500), NOW) == 100  # 5 % each way: ordinary
    assert effective_weight(gw(A, loss_ppm=200_000), NOW) == pytest.approx(50)  # 20 % loss
    assert effective_weight(gw(A, loss_ppm=1_000_000), NOW) == pytest.approx(1)  # floor 0.01
    assert effective_weight(gw(A, tunnels=1000), NOW) == pytest.approx(50)  # 10 per weight unit
    assert effective_weight(gw(A, rtt_us=100_000, jitter_us=25_000), NOW) == pytest.approx(50)
    stale = dataclasses.replace(gw(A, loss_ppm=1_000_000), health=Health(0, 0, 0, 10**6, 0.0))
    assert NOW - 0.0 > REPORT_TTL and effective_weight(stale, NOW) == 100


def test_a_lossy_gateway_gets_fewer_new_mns_but_still_serves_alone() -> None:
    mns = [f"host{i}.ntm.example.com" for i in range(1000)]
    lossy = gw(A, loss_ppm=250_000)  # 25 % loss: weight x 0.25
    picks = [first_for(mn, lossy, gw(B)) for mn in mns]
    assert 0.1 < picks.count(A) / len(picks) < 0.3
    assert first_for(MN, gw(A, loss_ppm=1_000_000)) == A


def test_hold_down_left_and_unusable_reasons() -> None:
    assert hold_down_left(gw(A, since=NOW - 10), NOW, HOLD) == pytest.approx(20)
    assert hold_down_left(gw(A, since=NOW - 40), NOW, HOLD) == 0
    assert hold_down_left(gw(A, since=NOW, connected=False), NOW, HOLD) == 0
    assert unusable(gw(A)) is None
    assert unusable(gw(A, connected=False)) == "not connected to the DC"
    assert "weight 0" in (unusable(gw(A, weight=0)) or "")


def test_hash_is_stable_and_in_the_open_unit_interval() -> None:
    # Fixed across processes (no PYTHONHASHSEED): DCs restarted or replicated agree.
    assert unit_hash(MN, A) == unit_hash(MN, A)
    assert unit_hash(MN, A) != unit_hash(MN, B)
    assert all(0 < unit_hash(f"h{i}", A) < 1 for i in range(100))


def test_at_most_eight_alternatives() -> None:
    gws = [gw(f"g{i}.ntm.example.com") for i in range(12)]
    choice = choose(gws, MN, NOW, HOLD)
    assert choice.chosen is not None and len(choice.alternatives) == 8


# --- [dc] gateway_hold_down ---------------------------------------------------------------


@pytest.fixture()
def dc_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    pki = tmp_path / "pki"
    pki.mkdir()
    for name in ("ca.pem", "dc1.pem", "dc1.key"):
        (pki / name).write_text("placeholder")
    monkeypatch.setenv("NTM_LAB_STATE", str(tmp_path))
    text = (LAB / "dc1.toml").read_text()

    def write(setting: str) -> Path:
        out = tmp_path / "dc1.toml"
        out.write_text(
            text.replace('zone = "ntm.example.com"', f'zone = "ntm.example.com"\n{setting}', 1)
        )
        return out

    return write


def test_hold_down_defaults_to_30_seconds(dc_toml: Callable[[str], Path]) -> None:
    assert dc_config.load(dc_toml("")).gateway_hold_down == 30.0
    assert dc_config.load(dc_toml("gateway_hold_down = 0")).gateway_hold_down == 0.0
    assert dc_config.load(dc_toml("gateway_hold_down = 2.5")).gateway_hold_down == 2.5


@pytest.mark.parametrize(
    ("setting", "match"),
    [("gateway_hold_down = -1", "is negative"), ('gateway_hold_down = "30s"', "not a number")],
)
def test_hold_down_errors(dc_toml: Callable[[str], Path], setting: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dc_config.load(dc_toml(setting))
