"""nftables backend without a kernel: slot tables and the rules generated from them."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb_integration import slots
from lb_integration.model import (
    LbState,
    Protocol,
    RealServer,
    Scheduler,
    ServiceKey,
    VirtualService,
)
from lb_integration.nft_backend import (
    NftBackend,
    _Kernel,
    _vmap,
    dispatch_rule,
    ep_chain,
    unsupported,
)
from lb_integration.reconcile import diff
from ntm_io.config import ConfigError

R = RealServer
THREE = (R("10.0.1.11", 80), R("10.0.1.12", 80), R("10.0.1.13", 80))
KEY = ServiceKey("10.99.0.10", 80, Protocol.TCP)


def test_rr_and_wrr_tables() -> None:
    assert slots.rr(THREE) == [0, 1, 2]
    assert slots.rr((THREE[0], dataclasses.replace(THREE[1], weight=0), THREE[2])) == [0, 2]
    seq = slots.wrr((R("a", 1, 4), R("b", 1, 3), R("c", 1, 2)))
    assert collections.Counter(seq) == {0: 4, 1: 3, 2: 2}
    assert seq == [0, 0, 1, 0, 1, 2, 0, 1, 2]  # IPVS wrr's interleaving
    assert slots.wrr((R("a", 1, 2), R("b", 1, 4))) == [1, 0, 1]  # gcd-reduced


@pytest.mark.parametrize("table", [slots.sh, slots.mh])
def test_hash_tables_spread_and_weight0_moves_only_its_own_slots(
    table: Callable[[tuple[RealServer, ...]], list[int]],
) -> None:
    full = table(THREE)
    counts = collections.Counter(full)
    assert set(counts) == {0, 1, 2} and max(counts.values()) - min(counts.values()) <= 2
    quiet = (THREE[0], dataclasses.replace(THREE[1], weight=0), THREE[2])
    after = table(quiet)
    assert 1 not in after
    assert all(a == b for a, b in zip(full, after, strict=True) if a != 1)


def test_mh_removal_moves_few_other_clients() -> None:
    full = slots.mh(THREE)
    assert len(full) == slots.mh_size(3) >= 300
    without = slots.mh((THREE[0], THREE[2]))  # indexes 0, 1 now mean .11, .13
    rename = {0: 0, 2: 1}
    moved = sum(1 for a, b in zip(full, without, strict=True) if a != 1 and rename[a] != b)
    assert moved / len(full) < 0.02  # Maglev: near-minimal disruption


@given(st.lists(st.integers(0, 5), min_size=1, max_size=6))
def test_tables_only_name_available_servers(weights: list[int]) -> None:
    reals = tuple(R(f"10.0.1.{i}", 80, w) for i, w in enumerate(weights))
    for fn in (slots.rr, slots.wrr, slots.sh, slots.mh):
        table = fn(reals)
        assert all(reals[i].weight > 0 for i in table)
        assert bool(table) == any(w > 0 for w in weights)


def test_vmap_folds_runs() -> None:
    assert _vmap(["a", "a", "b", "a"]) == "{ 0-1 : goto a, 2 : goto b, 3 : goto a }"


def test_dispatch_rules() -> None:
    rr = VirtualService(KEY, Scheduler.RR, reals=THREE)
    rule = dispatch_rule(rr)
    assert rule is not None and rule.startswith("numgen inc mod 3 vmap { 0 : goto ep-")
    sh = dataclasses.replace(rr, scheduler=Scheduler.SH)
    rule = dispatch_rule(sh)
    assert rule is not None and rule.startswith("jhash ip saddr mod 256 seed 0x4e544d31 vmap")
    v6 = VirtualService(
        ServiceKey("2001:db8::10", 80, Protocol.TCP), Scheduler.MH, reals=(R("2001:db8::1", 80),)
    )
    rule = dispatch_rule(v6)
    assert rule is not None and "jhash ip6 saddr mod 4093" in rule
    none = dataclasses.replace(rr, reals=tuple(dataclasses.replace(r, weight=0) for r in THREE))
    assert dispatch_rule(none) is None


def test_lc_is_refused_with_the_alternatives_or_falls_back_when_asked() -> None:
    lc = LbState((VirtualService(KEY, Scheduler.WLC, reals=THREE),))
    [problem] = unsupported(lc, lc_fallback=False)
    assert "nftables cannot see" in problem and "IPVS" in problem
    assert "nft_lc_fallback = true" in problem and "wrr" in problem
    with pytest.raises(ConfigError, match="wlc"):
        NftBackend(argv=("/bin/false",)).apply(lc)
    assert unsupported(lc, lc_fallback=True) == []
    rule = dispatch_rule(lc.services[0], lc_fallback=True)
    assert rule is not None and rule.startswith("numgen inc mod 3")


def test_script_from_nothing_and_no_snat_anywhere() -> None:
    svc = VirtualService(KEY, Scheduler.RR, 300, "255.255.255.0", THREE)
    backend = NftBackend()
    desired = LbState((svc,))
    script = backend.script(_Kernel(), desired, diff(LbState(), desired))
    text = "\n".join(script)
    assert script[0].startswith("add table inet ntm_lb")
    assert "snat" not in text and "masquerade" not in text
    assert "type nat hook prerouting priority dstnat" in text
    assert "add element inet ntm_lb svc4 { 10.99.0.10 . tcp . 80 : goto svc-" in text
    ep = ep_chain(KEY, THREE[0])
    assert f"update @aff-{ep[3:]} {{ ip saddr & 255.255.255.0 }}" in text
    assert f"ip saddr & 255.255.255.0 @aff-{ep[3:]} goto {ep}" in text
    assert "timeout 300s" in text
    assert 'counter drop comment "svc tcp 10.99.0.10 80 rr p=300 m=24"' in text


def test_agent_refuses_lc_on_nftables_naming_the_scheduler_line() -> None:
    from lb_integration import config
    from lb_integration.agent import check_fits

    text = (
        '[agent]\nname = "lb1"\n\n[[service]]\nname = "www"\naddress = "10.99.0.10"\n'
        'port = 80\nscheduler = "lc"\n  [[service.real]]\n  address = "10.0.1.11"\n'
    )
    cfg = config.parse(text, "lb.toml")
    with pytest.raises(ConfigError, match=r"^lb\.toml:8: \[\[service\]\] 'www': .*lc balances"):
        check_fits(cfg, NftBackend())
    check_fits(config.parse(text.replace('"lb1"', '"lb1"\nnft_lc_fallback = true')), NftBackend())
