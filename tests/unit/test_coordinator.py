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
    # IPv4 first (mn1 has no v6), then cn2's IPv6 address: after a move to an IPv6-only
    # network mn1 probes it and moves the same path in a round trip, without a new Direction.
    assert plan.to_requester.peer_endpoints == (
        ("198.51.100.30", 7400),
        ("2001:db8:100::30", 7400),
    )
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


# --- several gateways for one service -----------------------------------------------------

WWW = "www.ntm.example.com"
G1, G2 = "ntma1.ntm.example.com", "ntma2.ntm.example.com"
PUBLIC = {G1: "198.51.100.60", G2: "198.51.100.61"}


def reg_gw(c: Coordinator, gateway: str, handle: object, now: float = 0.0, weight: int = 100):
    return c.register(
        frozenset({WWW, gateway}),
        "adaptor",
        RegistrationRequest(
            WWW, bytes([1]) * 32, 7400, ((PUBLIC[gateway], 7400),), gateway, weight
        ),
        (PUBLIC[gateway], 4000),
        handle,
        now,
    )


def with_gateways(hold_down: float = 30.0) -> Coordinator:
    pool = VipPool(ipaddress.IPv4Network("100.64.0.0/16"))
    c = Coordinator(
        "ntm.example.com",
        Registry(pool),
        ipaddress.IPv4Network("100.64.0.0/10"),
        gateway_hold_down=hold_down,
    )
    reg(c, MN, "hm", (("10.10.1.100", 7400),), ("198.51.100.2", 5555))
    return c


def test_gateways_share_the_service_vip_and_dns_lists_the_connected_ones() -> None:
    c = with_gateways()
    a, b = reg_gw(c, G1, "h1"), reg_gw(c, G2, "h2")
    assert isinstance(a, RegistrationResponse) and isinstance(b, RegistrationResponse)
    assert a.vip == b.vip
    assert [r.gateway for r in c.registry.gateways(WWW)] == [G1, G2]
    assert c.registry.addresses(WWW) == [PUBLIC[G1], PUBLIC[G2]]
    assert c.registry.addresses(G2) == [PUBLIC[G2]]
    c.registry.disconnected("h1")
    assert c.registry.addresses(WWW) == [PUBLIC[G2]]
    assert c.registry.lookup(WWW) is c.registry.gateway(WWW, G2)
    c.registry.disconnected("h2")  # none connected: still answer with what we know
    assert c.registry.addresses(WWW) == [PUBLIC[G1], PUBLIC[G2]]


def test_dns_leaves_out_gateways_that_take_no_ordinary_clients() -> None:
    c = with_gateways()
    reg_gw(c, G1, "h1")
    c.register(
        frozenset({WWW, G2}),
        "adaptor",
        RegistrationRequest(WWW, bytes(32), 7400, ((PUBLIC[G2], 7400),), G2, 100, False),
        (PUBLIC[G2], 4000),
        "h2",
        0.0,
    )
    assert c.registry.addresses(WWW) == [PUBLIC[G1]]
    assert c.registry.addresses(G2) == []
    # Only a gateway without public forwarding is left connected: the name keeps resolving
    # (to the last ordinary-client gateway's address) so NTM nodes' lookups still succeed.
    c.registry.disconnected("h1")
    assert c.registry.addresses(WWW) == [PUBLIC[G1]]


def test_gateway_registration_rules() -> None:
    c = with_gateways()
    # a node certificate may not register a gateway
    e = c.register(
        frozenset({WWW, G1}),
        "node",
        RegistrationRequest(WWW, bytes(32), 7400, (), G1),
        ("198.51.100.60", 1),
        "h",
        0.0,
    )
    assert isinstance(e, ErrorMessage) and e.code is ErrorCode.NOT_AUTHORIZED
    assert "adaptor" in e.reason
    # the gateway name must be in the certificate
    e = c.register(
        frozenset({WWW}),
        "adaptor",
        RegistrationRequest(WWW, bytes(32), 7400, (), G1),
        ("198.51.100.60", 1),
        "h",
        0.0,
    )
    assert isinstance(e, ErrorMessage) and f"gateway {G1} is not among" in e.reason
    assert c.registry.lookup(WWW) is None
    # one FQDN is either a plain registration or gateways, while the other kind is live
    assert isinstance(reg_gw(c, G1, "h1"), RegistrationResponse)
    e = reg(c, WWW, "h3", (), ("198.51.100.62", 1))
    assert isinstance(e, ErrorMessage) and G1 in e.reason and "gateway" in e.reason
    c.registry.disconnected("h1")
    assert isinstance(reg(c, WWW, "h3", (), ("198.51.100.62", 1)), RegistrationResponse)
    e = reg_gw(c, G2, "h2")
    assert isinstance(e, ErrorMessage) and "single-gateway" in e.reason


def test_direction_names_the_gateway_and_the_alternatives() -> None:
    c = with_gateways()
    reg_gw(c, G1, "h1")
    reg_gw(c, G2, "h2")
    plan = c.plan(frozenset({MN}), DirectionRequest(MN, WWW), "hm", 100.0)
    assert isinstance(plan, DirectionPlan)
    chosen = plan.to_requester.gateway
    other = G2 if chosen == G1 else G1
    assert plan.to_requester.alternatives == (other,)
    assert plan.to_responder.gateway == chosen and plan.to_responder.alternatives == ()
    assert plan.responder is c.registry.gateway(WWW, chosen)
    assert plan.to_requester.peer_endpoints == ((PUBLIC[chosen], 7400),)
    assert c.assignment_counts(WWW) == {}  # not until the gateway takes the path
    c.assigned(plan, 100.0)
    assert c.assignment_counts(WWW) == {chosen: 1}
    c.forget_assignments(100.0 + c.path_lifetime)
    assert c.assignment_counts(WWW) == {}
    # the same MN asks again: same gateway
    again = c.plan(frozenset({MN}), DirectionRequest(MN, WWW), "hm", 101.0)
    assert isinstance(again, DirectionPlan) and again.to_requester.gateway == chosen
    # asking for the other one goes through it
    asked = c.plan(frozenset({MN}), DirectionRequest(MN, WWW, other), "hm", 102.0)
    assert isinstance(asked, DirectionPlan) and asked.responder.gateway == other
    assert asked.to_requester.alternatives == (chosen,)
    # the chosen one disconnects: the alternative takes over
    c.registry.disconnected("h1" if chosen == G1 else "h2")
    after = c.plan(frozenset({MN}), DirectionRequest(MN, WWW), "hm", 103.0)
    assert isinstance(after, DirectionPlan) and after.to_requester.gateway == other
    assert after.to_requester.alternatives == ()


def test_asking_for_an_unusable_gateway_says_why() -> None:
    c = with_gateways()
    reg_gw(c, G1, "h1")
    reg_gw(c, G2, "h2", weight=0)
    for gateway, why in ((G2, "draining"), ("zz.ntm.example.com", "is not one of its gateways")):
        e = c.plan(frozenset({MN}), DirectionRequest(MN, WWW, gateway), "hm", 1.0)
        assert isinstance(e, ErrorMessage) and e.code is ErrorCode.PEER_UNREACHABLE
        assert why in e.reason
    c.registry.disconnected("h1")
    e = c.plan(frozenset({MN}), DirectionRequest(MN, WWW), "hm", 1.0)
    assert isinstance(e, ErrorMessage) and e.code is ErrorCode.PEER_UNREACHABLE
    assert f"{G1}: not connected" in e.reason and f"{G2}: draining" in e.reason
    # a gateway named for a plain node is an error, not silently ignored
    reg(c, CN, "hc", (("198.51.100.30", 7400),), ("198.51.100.30", 4000))
    e = c.plan(frozenset({MN}), DirectionRequest(MN, CN, G1), "hm", 1.0)
    assert isinstance(e, ErrorMessage) and "not served by several gateways" in e.reason


def test_recovered_gateway_waits_for_the_hold_down() -> None:
    c = with_gateways(hold_down=30.0)
    reg_gw(c, G1, "h1", now=0.0)
    reg_gw(c, G2, "h2", now=0.0)
    home = c.plan(frozenset({MN}), DirectionRequest(MN, WWW), "hm", 100.0)
    assert isinstance(home, DirectionPlan)
    primary = home.to_requester.gateway
    other = G2 if primary == G1 else G1
    c.registry.disconnected("h1" if primary == G1 else "h2")
    reg_gw(c, primary, "h-back", now=200.0)  # back on a new connection
    for now, expected in ((200.0, other), (229.0, other), (230.0, primary)):
        plan = c.plan(frozenset({MN}), DirectionRequest(MN, WWW), "hm", now)
        assert isinstance(plan, DirectionPlan) and plan.to_requester.gateway == expected, now
    # a refresh on the live connection does not restart the hold-down
    reg_gw(c, primary, "h-back", now=240.0)
    plan = c.plan(frozenset({MN}), DirectionRequest(MN, WWW), "hm", 241.0)
    assert isinstance(plan, DirectionPlan) and plan.to_requester.gateway == primary


def test_without_gateway_tries_the_next_one_only_when_the_dc_chose() -> None:
    c = with_gateways()
    reg_gw(c, G1, "h1")
    reg_gw(c, G2, "h2")
    plan = c.plan(frozenset({MN}), DirectionRequest(MN, WWW), "hm", 100.0)
    assert isinstance(plan, DirectionPlan)
    first = plan.to_requester.gateway
    retry = c.without_gateway(plan, frozenset({first}), 100.0)
    assert isinstance(retry, DirectionPlan) and retry.to_requester.gateway != first
    none_left = c.without_gateway(retry, frozenset({G1, G2}), 100.0)
    assert isinstance(none_left, ErrorMessage) and "tried" in none_left.reason
    asked = c.plan(frozenset({MN}), DirectionRequest(MN, WWW, G1), "hm", 100.0)
    assert isinstance(asked, DirectionPlan)
    assert c.without_gateway(asked, frozenset({G1}), 100.0) is None


def test_gateway_reports_only_from_the_registering_connection() -> None:
    from ntm_proto.messages import GatewayReport, GatewayReportAck

    c = with_gateways()
    reg_gw(c, G1, "h1")
    reg_gw(c, G2, "h2")
    report = GatewayReport(WWW, G1, 4, 20_000, 3_000, 10_000)
    ok = c.report(frozenset({WWW, G1}), report, "h1", 5.0)
    assert ok == GatewayReportAck(G1)
    health = c.registry.gateway(WWW, G1).health  # type: ignore[union-attr]
    assert health is not None and (health.tunnels, health.loss_ppm, health.at) == (4, 10_000, 5.0)
    # G2's connection cannot report for G1, nor an unknown gateway be reported
    for names, msg, handle in (
        (frozenset({WWW, G2}), report, "h2"),
        (frozenset({WWW, G1}), GatewayReport(WWW, "zz.ntm.example.com", 0, 0, 0, 0), "h1"),
        (frozenset({WWW, G1}), report, "h-other"),
    ):
        e = c.report(names, msg, handle, 6.0)
        assert isinstance(e, ErrorMessage) and e.code is ErrorCode.NOT_REGISTERED
    assert c.counters["report_refused"] == 3
    assert c.registry.gateway(WWW, G1).health is health  # type: ignore[union-attr]


def test_gateways_expire_one_by_one() -> None:
    c = with_gateways()
    reg_gw(c, G1, "h1", now=0.0)
    reg_gw(c, G2, "h2", now=500.0)
    gone = c.registry.expire(600.0 + 1)  # lifetime 300: mn1 and G1 lapsed at 600
    assert gone == [MN, f"{WWW} via {G1}"]
    assert [r.gateway for r in c.registry.gateways(WWW)] == [G2]
    assert c.registry.expire(1101.0) == [f"{WWW} via {G2}"]
    assert not c.registry.is_multi_gateway(WWW)


def test_another_dcs_node_gets_a_gateway_too() -> None:
    from ntm_proto.messages import NodeInformationRequest

    c = with_gateways()
    reg_gw(c, G1, "h1")
    reg_gw(c, G2, "h2")
    nir = NodeInformationRequest(
        requester_zone="ntm.example.net",
        target=WWW,
        source_fqdn="cn3.ntm.example.net",
        source_vip="100.65.0.3",
        source_key=bytes(32),
        source_endpoints=(("198.51.100.33", 7400),),
        source_families=1,
        source_behind_nat=False,
        source_seen=("198.51.100.33", 7400),
        gateway=G2,
    )
    plan = c.plan_remote(frozenset({"dc2.ntm.example.net"}), "dc", nir, 1.0)
    assert isinstance(plan, DirectionPlan)
    assert plan.to_requester.gateway == G2 and plan.to_requester.alternatives == (G1,)
    assert plan.to_responder.peer_fqdn == "cn3.ntm.example.net"
