"""Route claims: the codec, the rules (sans-IO), and the real QUIC + mutual TLS channel."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb_integration import claims
from lb_integration.claims import (
    ClaimBook,
    ClaimDecodeError,
    Code,
    Remove,
    Replace,
    RouteClaim,
    RouteClaimAck,
)
from lb_integration.routes import ClaimService
from ntm_io.control import connect_control, serve_control
from ntm_pki import ca

NTMA1 = frozenset({"ntma1.ntm.example.com"})
NTMA2 = frozenset({"ntma2.ntm.example.com"})
V = "100.64.0.7"


def book() -> ClaimBook:
    return ClaimBook(
        (ipaddress.ip_network("100.64.0.0/10"),),
        (ipaddress.ip_network("192.0.2.0/24"),),
        max_lifetime=60,
    )


def offer(
    b: ClaimBook,
    claim: RouteClaim,
    names: frozenset[str] = NTMA1,
    now: float = 0.0,
    role: str | None = "adaptor",
) -> claims.Decision:
    return b.offer(claim, names, role, now)


# ---------------------------------------------------------------- codec


def test_codec_round_trip() -> None:
    for msg in (
        RouteClaim(V, "192.0.2.5", 1_700_000_000_123, 30),
        RouteClaim("2001:db8::7", "2001:db8:1::5", 0, 0, withdraw=True),
        RouteClaimAck(V, Code.STALE, "held by someone newer"),
        RouteClaimAck(V, Code.OK, "", 30),
    ):
        assert claims.decode(claims.encode(msg)) == msg


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff",
        b"[]",
        b'{"type": "route_claim"}',
        b'{"v":1,"type":"route_claim","vip":"x","next_hop":"192.0.2.5","claim_time":1,'
        b'"lifetime":5,"withdraw":false}',
        b'{"v":2,"type":"route_claim","vip":"100.64.0.7","next_hop":"192.0.2.5","claim_time":1,'
        b'"lifetime":5,"withdraw":false}',
        b'{"v":1,"type":"route_claim","vip":"100.64.0.7","next_hop":"192.0.2.5","claim_time":1,'
        b'"lifetime":true,"withdraw":false}',
        b'{"v":1,"type":"route_claim","vip":"100.64.0.7","next_hop":"192.0.2.5","claim_time":-1,'
        b'"lifetime":5,"withdraw":false}',
        b'{"v":1,"type":"route_claim","vip":"100.64.0.7","next_hop":"192.0.2.5","claim_time":1,'
        b'"lifetime":5,"withdraw":false,"extra":1}',
        b" " * 2000,
    ],
)
def test_codec_refuses_malformed(raw: bytes) -> None:
    with pytest.raises(ClaimDecodeError):
        claims.decode(raw)


@given(st.binary(max_size=300))
def test_decode_never_raises_anything_else(raw: bytes) -> None:
    with contextlib.suppress(ClaimDecodeError):
        claims.decode(raw)


@given(
    st.ip_addresses(),
    st.ip_addresses(),
    st.integers(0, 2**63 - 1),
    st.integers(1, 86400),
    st.booleans(),
)
def test_codec_round_trip_property(
    vip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    hop: ipaddress.IPv4Address | ipaddress.IPv6Address,
    t: int,
    lifetime: int,
    withdraw: bool,
) -> None:
    msg = RouteClaim(str(vip), str(hop), t, lifetime, withdraw)
    assert claims.decode(claims.encode(msg)) == msg


# ---------------------------------------------------------------- rules


def test_only_an_adaptor_may_claim() -> None:
    b = book()
    for role in ("node", "dc", "relay", None):
        d = offer(b, RouteClaim(V, "192.0.2.5", 1), role=role)
        assert d.ack.code is Code.NOT_ADAPTOR and d.changes == ()
    assert b.counters["refused_not_adaptor"] == 4
    assert b.held == {}


def test_vip_and_next_hop_must_be_acceptable() -> None:
    b = book()
    assert offer(b, RouteClaim("10.0.0.7", "192.0.2.5", 1)).ack.code is Code.VIP_OUTSIDE
    for hop in ("198.51.100.5", "2001:db8::5", "224.0.0.5", V):
        assert offer(b, RouteClaim(V, hop, 1)).ack.code is Code.BAD_NEXT_HOP, hop
    assert b.held == {}


def test_claim_installs_and_refresh_changes_nothing() -> None:
    b = book()
    d = offer(b, RouteClaim(V, "192.0.2.5", 100, 30))
    assert d.ack == RouteClaimAck(V, Code.OK, "", 30) and d.changes == (Replace(V, "192.0.2.5"),)
    d = offer(b, RouteClaim(V, "192.0.2.5", 100, 30), now=10.0)  # a refresh
    assert d.ack.accepted and d.changes == ()
    assert b.held[V].expires == 40.0


def test_lifetime_capped_by_config() -> None:
    d = offer(book(), RouteClaim(V, "192.0.2.5", 1, 3600))
    assert d.ack.lifetime == 60


def test_newest_claim_wins_races_and_ties_go_to_the_holder() -> None:
    b = book()
    offer(b, RouteClaim(V, "192.0.2.5", 100), NTMA1)
    # an older claim from ntma2 (it lost the tunnel before ntma1 took it) is refused
    d = offer(b, RouteClaim(V, "192.0.2.6", 99), NTMA2)
    assert d.ack.code is Code.STALE and "newest claim wins" in d.ack.reason
    # the same time from another NTMA is a tie: the current holder keeps it
    assert offer(b, RouteClaim(V, "192.0.2.6", 100), NTMA2).ack.code is Code.STALE
    assert b.held[V].next_hop == "192.0.2.5"
    # a newer claim (ntma2 took the tunnel over) moves the route
    d = offer(b, RouteClaim(V, "192.0.2.6", 101), NTMA2)
    assert d.ack.accepted and d.changes == (Replace(V, "192.0.2.6"),)
    # ...and ntma1's late refresh of its old claim cannot take it back
    assert offer(b, RouteClaim(V, "192.0.2.5", 100), NTMA1).ack.code is Code.STALE
    assert b.counters["refused_stale"] == 3


def test_withdraw_only_by_the_holder() -> None:
    b = book()
    offer(b, RouteClaim(V, "192.0.2.5", 100), NTMA1)
    d = offer(b, RouteClaim(V, "192.0.2.5", 100, 0, withdraw=True), NTMA2)
    assert d.ack.code is Code.NOT_HOLDER and V in b.held
    d = offer(b, RouteClaim(V, "192.0.2.5", 100, 0, withdraw=True), NTMA1)
    assert d.ack.accepted and d.changes == (Remove(V),) and V not in b.held
    # withdrawing what nobody holds is fine (idempotent)
    assert offer(b, RouteClaim(V, "192.0.2.5", 100, 0, withdraw=True)).ack.accepted


def test_claims_expire_and_remove_their_route() -> None:
    b = book()
    offer(b, RouteClaim(V, "192.0.2.5", 100, 10))
    assert b.next_expiry() == 10.0
    assert b.expire(9.9) == []
    assert b.expire(10.0) == [Remove(V)]
    assert b.held == {} and b.counters["expired"] == 1
    # after expiry anyone (even with an older time) may claim again
    assert offer(b, RouteClaim(V, "192.0.2.6", 5), NTMA2, now=11.0).ack.accepted


def test_adopted_route_yields_to_any_claim() -> None:
    b = book()
    b.adopt(V, "192.0.2.9", now=0.0)
    d = offer(b, RouteClaim(V, "192.0.2.9", 0), NTMA1)
    assert d.ack.accepted and d.changes == (Replace(V, "192.0.2.9"),)


# ---------------------------------------------------------------- service + QUIC


class FakeRoutes:
    def __init__(self) -> None:
        self.table: dict[str, str] = {}
        self.log: list[tuple[str, str]] = []

    def replace(self, vip: str, next_hop: str) -> None:
        self.table[vip] = next_hop
        self.log.append(("replace", vip))

    def remove(self, vip: str) -> None:
        self.table.pop(vip, None)
        self.log.append(("remove", vip))

    def ours(self) -> list[tuple[str, str]]:
        return []

    def close(self) -> None:
        pass


def test_service_counts_bad_messages() -> None:
    svc = ClaimService(book(), FakeRoutes())
    ack = asyncio.run(svc.handle_claim(b"garbage", NTMA1, "adaptor", "test"))
    assert ack.code is Code.BAD_MESSAGE and svc.book.counters["refused_bad_message"] == 1


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca.init_ca(d)
    ca.issue(d, "lb1", "lb", ["lb1.ntm.example.com"], ["127.0.0.1"])
    ca.issue(d, "ntma1", "adaptor", ["ntma1.ntm.example.com"])
    ca.issue(d, "mn1", "node", ["mn1.ntm.example.com"])
    return d


def test_over_quic_node_refused_adaptor_accepted(pki: Path) -> None:
    routes = FakeRoutes()

    async def scenario() -> tuple[RouteClaimAck, RouteClaimAck]:
        service = ClaimService(book(), routes)
        server = await serve_control(
            "127.0.0.1",
            0,
            ca=pki / "ca.pem",
            cert=pki / "lb1.pem",
            key=pki / "lb1.key",
            handler=service.handle,
        )
        answers = []
        try:
            port = server.address[1]
            for who in ("mn1", "ntma1"):
                conn = await connect_control(
                    "127.0.0.1",
                    port,
                    server_name="lb1.ntm.example.com",
                    ca=pki / "ca.pem",
                    cert=pki / f"{who}.pem",
                    key=pki / f"{who}.key",
                    handler=_no_requests,
                )
                raw = await conn.request(claims.encode(RouteClaim(V, "192.0.2.5", 1, 30)), 5.0)
                answers.append(claims.decode(raw))
                await conn.close()
        finally:
            server.close()
            await server.wait_closed()
        a, b = answers
        assert isinstance(a, RouteClaimAck) and isinstance(b, RouteClaimAck)
        return a, b

    node_ack, adaptor_ack = asyncio.run(scenario())
    assert node_ack.code is Code.NOT_ADAPTOR and "role adaptor" in node_ack.reason
    assert adaptor_ack.accepted and adaptor_ack.lifetime == 30
    assert routes.table == {V: "192.0.2.5"}
    assert routes.log == [("replace", V)]


async def _no_requests(conn: object, payload: bytes) -> bytes:
    return b""
