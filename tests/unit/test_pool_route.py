"""vIP allocation and the route decision table."""

from __future__ import annotations

import ipaddress

import pytest

from dc.route import EndView, decide
from ntm_proto.messages import RouteKind
from ntm_proto.pool import PoolExhausted, VipPool


def test_same_name_same_vip_even_after_restart() -> None:
    a = VipPool(ipaddress.IPv4Network("100.64.0.0/16"))
    vip = a.allocate("mn1.ntm.example.com")
    assert a.allocate("mn1.ntm.example.com") == vip
    b = VipPool(ipaddress.IPv4Network("100.64.0.0/16"))  # a DC that lost its memory
    assert b.allocate("mn1.ntm.example.com") == vip
    assert ipaddress.ip_address(vip) in a.network


def test_distinct_names_distinct_vips_and_exhaustion() -> None:
    pool = VipPool(ipaddress.IPv4Network("100.64.0.0/29"))  # 6 usable
    vips = {pool.allocate(f"n{i}.ntm.example.com") for i in range(6)}
    assert len(vips) == 6
    assert "100.64.0.0" not in vips and "100.64.0.7" not in vips
    with pytest.raises(PoolExhausted):
        pool.allocate("n7.ntm.example.com")
    pool.release("n0.ntm.example.com")
    assert pool.allocate("n7.ntm.example.com") in vips


def test_restore_keeps_assignments() -> None:
    a = VipPool(ipaddress.IPv4Network("100.64.0.0/24"))
    for i in range(20):
        a.allocate(f"n{i}.ntm.example.com")
    b = VipPool(ipaddress.IPv4Network("100.64.0.0/24"))
    b.restore(a.assignments())
    assert b.assignments() == a.assignments()


def end(fam: set[int], nat: bool, seen: str = "198.51.100.2", eps: tuple = ()) -> EndView:
    if not eps:
        eps = tuple((a, 7400) for a in (("198.51.100.30",) if 4 in fam else ()))
        eps += tuple((a, 7400) for a in (("2001:db8:100::30",) if 6 in fam else ()))
    return EndView(frozenset(fam), nat, seen, eps)


# (initiator families, initiator NAT, responder families, responder NAT) -> kind
TABLE = [
    ({4}, True, {4, 6}, False, RouteKind.DIRECT),  # mn1 behind nat-a -> global cn2
    ({6}, False, {4, 6}, False, RouteKind.DIRECT),  # mn1 on IPv6-only access-b -> cn2
    ({4}, False, {4}, True, RouteKind.REVERSE),  # only the responder behind NAT
    ({4}, True, {4}, True, RouteKind.RELAY),  # both behind NAT
    ({6}, False, {4}, False, RouteKind.RELAY),  # no common family
    ({4}, False, {6}, True, RouteKind.RELAY),  # no common family, NAT too
]


@pytest.mark.parametrize("ifam,inat,rfam,rnat,kind", TABLE)
def test_route_table(
    ifam: set[int], inat: bool, rfam: set[int], rnat: bool, kind: RouteKind
) -> None:
    d = decide(end(ifam, inat, "203.0.113.1"), end(rfam, rnat, "203.0.113.2"))
    assert d.kind is kind
    if kind is RouteKind.DIRECT:
        assert d.initiator_targets and not d.responder_targets
        fams = [ipaddress.ip_address(a).version for a, _ in d.initiator_targets]
        # The initiator's families first, then the responder's others (where a node that
        # moves to another family probes the same path), nothing the responder lacks.
        assert fams[0] in ifam and set(fams) == rfam
        assert fams == sorted(fams, key=lambda f: f not in ifam)
    if kind is RouteKind.REVERSE:
        assert d.responder_targets and not d.initiator_targets


def test_same_nat_needs_relay() -> None:
    d = decide(end({4}, True, "198.51.100.2"), end({4}, True, "198.51.100.2"))
    assert d.kind is RouteKind.RELAY


def test_direct_lists_the_other_family_after_the_common_one() -> None:
    """mn2 on IPv4 (behind NAT) toward a dual-stack gateway: the v4 address first, the v6
    one after it, so mn2's move to the IPv6-only access-b can move the path at once."""
    gw = end({4, 6}, False, "198.51.100.60", (("2001:db8:100::60", 7400), ("198.51.100.60", 7400)))
    d = decide(end({4}, True, "203.0.113.1"), gw)
    assert d.kind is RouteKind.DIRECT
    assert d.initiator_targets == (("198.51.100.60", 7400), ("2001:db8:100::60", 7400))
