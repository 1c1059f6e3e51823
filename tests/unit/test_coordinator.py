"""The DC's decisions without sockets: registration rules and Direction Requests."""

from __future__ import annotations

import ipaddress

from dc.coordinator import Coordinator, DirectionPlan
from dc.registry import Registry
from ntm_proto.messages import (
    DirectionRequest,
    ErrorCode,
    ErrorMessage,
    PathRole,
    RegistrationRequest,
    RegistrationResponse,
    RouteKind,
)
from ntm_proto.pool import VipPool

MN, CN = "mn1.ntm.example.com", "cn2.ntm.example.com"


def make() -> Coordinator:
    pool = VipPool(ipaddress.IPv4Network("100.64.0.0/16"))
    return Coordinator("ntm.example.com", Registry(pool), ipaddress.IPv4Network("100.64.0.0/10"))


def reg(c: Coordinator, fqdn: str, handle: object, eps: tuple, seen: tuple, names=None):
    return c.register(
        frozenset(names if names is not None else {fqdn}),
        "node",
        RegistrationRequest(fqdn, bytes(32), 7400, eps),
        seen,
        handle,
        0.0,
    )


def test_registration_detects_nat_and_keeps_vip() -> None:
    c = make()
    a = reg(c, MN, "h1", (("10.10.1.100", 7400),), ("198.51.100.2", 5555))
    assert isinstance(a, RegistrationResponse) and a.behind_nat
    assert a.seen == ("198.51.100.2", 5555) and a.vip_prefix_len == 10
    b = reg(c, MN, "h2", (("2001:db8:b::100", 7400),), ("2001:db8:b::100", 6000))
    assert isinstance(b, RegistrationResponse) and not b.behind_nat
    assert b.vip == a.vip  # moved, same vIP


def test_registration_outside_certificate_is_refused() -> None:
    c = make()
    a = reg(c, MN, "h", (), ("198.51.100.2", 1), names={"other.ntm.example.com"})
    assert isinstance(a, ErrorMessage) and a.code is ErrorCode.NOT_AUTHORIZED
    assert MN in a.reason and "certificate" in a.reason
    assert c.registry.lookup(MN) is None


def test_registration_outside_zone_and_wrong_role_refused() -> None:
    c = make()
    a = reg(c, "x.ntm.example.net", "h", (), ("198.51.100.2", 1))
    assert isinstance(a, ErrorMessage) and "zone" in a.reason
    b = c.register(
        frozenset({MN}), "dc", RegistrationRequest(MN, bytes(32), 1, ()), ("1.2.3.4", 1), "h", 0
    )
    assert isinstance(b, ErrorMessage) and b.code is ErrorCode.NOT_AUTHORIZED


def test_direction_direct_from_nat_to_global() -> None:
    c = make()
    reg(c, MN, "hm", (("10.10.1.100", 7400),), ("198.51.100.2", 5555))
    reg(c, CN, "hc", (("198.51.100.30", 7400), ("2001:db8:100::30", 7400)), ("198.51.100.30", 4000))
    plan = c.plan(frozenset({MN}), DirectionRequest(MN, CN), "hm")
    assert isinstance(plan, DirectionPlan)
    assert plan.kind is RouteKind.DIRECT
    assert plan.to_requester.role is PathRole.INITIATOR
    assert plan.to_responder.role is PathRole.RESPONDER
    assert plan.to_requester.peer_endpoints == (
        ("198.51.100.30", 7400),
    )  # IPv4 only: mn1 has no v6
    assert plan.to_requester.path_id == plan.to_responder.path_id
    assert plan.to_responder.peer_vip == c.registry.lookup(MN).vip  # type: ignore[union-attr]


def test_direction_errors() -> None:
    c = make()
    reg(c, MN, "hm", (("10.10.1.100", 7400),), ("198.51.100.2", 5555))
    # not registered on this connection
    e = c.plan(frozenset({MN}), DirectionRequest(MN, CN), "other-handle")
    assert isinstance(e, ErrorMessage) and e.code is ErrorCode.NOT_REGISTERED
    # unknown target
    e = c.plan(frozenset({MN}), DirectionRequest(MN, CN), "hm")
    assert isinstance(e, ErrorMessage) and e.code is ErrorCode.UNKNOWN_TARGET
    # target that lost its connection
    reg(c, CN, "hc", (("198.51.100.30", 7400),), ("198.51.100.30", 4000))
    c.registry.disconnected("hc")
    e = c.plan(frozenset({MN}), DirectionRequest(MN, CN), "hm")
    assert isinstance(e, ErrorMessage) and e.code is ErrorCode.PEER_UNREACHABLE
    # both behind NAT and no relay configured
    reg(c, CN, "hc", (("10.9.0.5", 7400),), ("203.0.113.9", 4000))
    e = c.plan(frozenset({MN}), DirectionRequest(MN, CN), "hm")
    assert isinstance(e, ErrorMessage) and "relay" in e.reason
