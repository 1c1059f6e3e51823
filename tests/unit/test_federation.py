"""DC federation rules: who may speak for which zone, and bounded failure."""

from __future__ import annotations

import asyncio
import ipaddress
import time

from dc.config import TlsConfig
from dc.coordinator import Coordinator, DirectionPlan, Federate
from dc.federation import FederatedPaths, Federation
from dc.registry import Registry
from ntm_proto.messages import (
    DirectionRequest,
    ErrorCode,
    ErrorMessage,
    NodeInformationRequest,
    RegistrationRequest,
    RouteKind,
)
from ntm_proto.pool import VipPool


def dc(zone: str, pool: str, federation: bool = True) -> Coordinator:
    return Coordinator(
        zone,
        Registry(VipPool(ipaddress.IPv4Network(pool))),
        ipaddress.IPv4Network("100.64.0.0/10"),
        federation=federation,
    )


def request(
    zone: str = "ntm.example.com", source: str = "mn1.ntm.example.com"
) -> NodeInformationRequest:
    return NodeInformationRequest(
        requester_zone=zone,
        target="cn3.ntm.example.net",
        source_fqdn=source,
        source_vip="100.64.0.7",
        source_key=bytes(32),
        source_endpoints=(("198.51.100.2", 7400),),
        source_families=1,
        source_behind_nat=True,
        source_seen=("198.51.100.2", 7400),
    )


def dc2_with_cn3() -> Coordinator:
    c = dc("ntm.example.net", "100.65.0.0/16")
    c.register(
        frozenset({"cn3.ntm.example.net"}),
        "node",
        RegistrationRequest("cn3.ntm.example.net", bytes(32), 7400, (("198.51.100.33", 7400),)),
        ("198.51.100.33", 5000),
        "h-cn3",
        0.0,
    )
    return c


def test_other_zone_is_federated_not_refused() -> None:
    c = dc("ntm.example.com", "100.64.0.0/16")
    c.register(
        frozenset({"mn1.ntm.example.com"}),
        "node",
        RegistrationRequest("mn1.ntm.example.com", bytes(32), 7400, ()),
        ("198.51.100.2", 1),
        "h",
        0.0,
    )
    plan = c.plan(
        frozenset({"mn1.ntm.example.com"}),
        DirectionRequest("mn1.ntm.example.com", "cn3.ntm.example.net"),
        "h",
    )
    assert isinstance(plan, Federate) and plan.zone == "ntm.example.net"
    c.federation = False
    plan = c.plan(
        frozenset({"mn1.ntm.example.com"}),
        DirectionRequest("mn1.ntm.example.com", "cn3.ntm.example.net"),
        "h",
    )
    assert isinstance(plan, ErrorMessage) and plan.code is ErrorCode.UNKNOWN_TARGET


def test_a_dc_may_speak_only_for_its_own_zone() -> None:
    c = dc2_with_cn3()
    ok = c.plan_remote(frozenset({"dc1.ntm.example.com"}), "dc", request(), time.monotonic())
    assert isinstance(ok, DirectionPlan)
    assert ok.kind is RouteKind.DIRECT  # mn1 behind NAT, cn3 global
    assert ok.to_requester.peer_fqdn == "cn3.ntm.example.net"
    assert ok.to_responder.peer_fqdn == "mn1.ntm.example.com"
    # a certificate of another zone claiming ntm.example.com
    bad = c.plan_remote(frozenset({"dc9.ntm.example.org"}), "dc", request(), 0.0)
    assert isinstance(bad, ErrorMessage) and bad.code is ErrorCode.NOT_AUTHORIZED
    # a node certificate naming a host in the zone is still not a DC
    bad = c.plan_remote(frozenset({"mn1.ntm.example.com"}), "node", request(), 0.0)
    assert isinstance(bad, ErrorMessage) and bad.code is ErrorCode.NOT_AUTHORIZED
    # the right DC, but for a node outside the zone it claims
    bad = c.plan_remote(
        frozenset({"dc1.ntm.example.com"}), "dc", request(source="x.ntm.example.org"), 0.0
    )
    assert isinstance(bad, ErrorMessage) and bad.code is ErrorCode.NOT_AUTHORIZED
    assert c.counters["federation_refused"] == 3


def test_delegation_that_points_nowhere_fails_within_the_timeout() -> None:
    # nothing answers DNS on 127.0.0.1 here: the look-up has nowhere to go.
    fed = Federation(("127.0.0.1",), 0.5, 4433, TlsConfig("ca", "cert", "key"))

    async def go() -> tuple[object, float]:
        started = time.monotonic()
        answer = await fed.ask("ntm.example.net", request())
        return answer, time.monotonic() - started

    answer, elapsed = asyncio.run(go())
    assert isinstance(answer, ErrorMessage) and answer.code is ErrorCode.PEER_UNREACHABLE
    assert "ntm.example.net" in answer.reason
    assert elapsed < 1.5
    assert fed.counters["failed"] == 1


def test_only_the_target_zones_dc_may_ask_to_rebuild_a_recent_federated_path() -> None:
    ledger = FederatedPaths(lifetime=3600)
    ledger.remember("mn1.ntm.example.com", "cn3.ntm.example.net", "ntm.example.net", 100.0)
    dc2 = frozenset({"dc2.ntm.example.net"})
    ask = DirectionRequest("mn1.ntm.example.com", "cn3.ntm.example.net")
    assert ledger.may_rebuild(dc2, "dc", ask, 200.0) == "ntm.example.net"
    refusals = {
        "another zone's DC": ledger.may_rebuild(
            frozenset({"dc9.ntm.example.org"}), "dc", ask, 200.0
        ),
        "a node naming a host of the zone": ledger.may_rebuild(dc2, "node", ask, 200.0),
        "a path never federated": ledger.may_rebuild(
            dc2, "dc", DirectionRequest("mn1.ntm.example.com", "cn4.ntm.example.net"), 200.0
        ),
        "another of our nodes": ledger.may_rebuild(
            dc2, "dc", DirectionRequest("mn2.ntm.example.com", "cn3.ntm.example.net"), 200.0
        ),
        "a path older than its lifetime": ledger.may_rebuild(dc2, "dc", ask, 3700.0),
    }
    for what, answer in refusals.items():
        assert isinstance(answer, ErrorMessage), what
        assert answer.code is ErrorCode.NOT_AUTHORIZED, what
    ledger.expire(3700.0)
    assert len(ledger) == 0
