"""The DC over real QUIC on loopback: registration rules, directions, and bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dc import federation
from dc.config import DcConfig, FederationConfig, RelaySpec, TlsConfig
from dc.relays import RelayedPath, RelayedPaths
from dc.server import IDLE_GAP, DcServer
from ntm_io.control import ControlConnection, connect_control
from ntm_pki import ca
from ntm_proto import messages as m
from relay import config as relay_config
from relay.core import RelaySettings
from relay.server import RelayServer

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca.init_ca(d)
    ca.issue(d, "dc1", "dc", dns=["dc1.ntm.example.com"], ips=["127.0.0.1"])
    ca.issue(d, "mn1", "node", dns=["mn1.ntm.example.com"])
    ca.issue(d, "cn2", "node", dns=["cn2.ntm.example.com"])
    for gw in ("ntma1", "ntma2"):
        ca.issue(d, gw, "adaptor", dns=["www.ntm.example.com", f"{gw}.ntm.example.com"])
    ca.issue(d, "dc2", "dc", dns=["dc2.ntm.example.net"], ips=["127.0.0.1"])
    ca.issue(d, "cn3", "node", dns=["cn3.ntm.example.net"])
    for rs in ("rs1", "rs2"):
        ca.issue(d, rs, "relay", dns=[f"{rs}.relay.example.com"], ips=["127.0.0.1"])
    return d


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


async def with_dc(
    pki: Path, tmp: Path, body: Callable[[DcServer, Callable[..., Any]], Awaitable[None]]
) -> None:
    cfg = DcConfig(
        name="dc1",
        zone="ntm.example.com",
        listen=("127.0.0.1",),
        quic_port=free_udp_port(),
        dns_port=0,
        vip_pool=ipaddress.IPv4Network("100.64.0.0/16"),
        vip_route=ipaddress.IPv4Network("100.64.0.0/10"),
        ns_name="dc1.ntm.example.com",
        ns_addresses=("127.0.0.1",),
        registration_lifetime=300,
        status_socket=str(tmp / "dc1.sock"),
        state_file=None,
        tls=TlsConfig(str(pki / "ca.pem"), str(pki / "dc1.pem"), str(pki / "dc1.key")),
        federation=None,
    )
    server = DcServer(cfg)
    await server.start()
    conns: list[ControlConnection] = []

    async def connect(name: str, handler: Any = None) -> ControlConnection:
        async def refuse(_c: ControlConnection, _p: bytes) -> bytes:
            return m.encode(m.ErrorMessage(m.ErrorCode.UNEXPECTED, "no pushes here"))

        conn = await connect_control(
            "127.0.0.1",
            cfg.quic_port,
            server_name="dc1.ntm.example.com",
            ca=str(pki / "ca.pem"),
            cert=str(pki / f"{name}.pem"),
            key=str(pki / f"{name}.key"),
            handler=handler or refuse,
        )
        conns.append(conn)
        return conn

    try:
        await body(server, connect)
    finally:
        for c in conns:
            await c.close()
        await server.close()


async def ask(conn: ControlConnection, msg: m.Message | bytes) -> m.Message:
    raw = msg if isinstance(msg, bytes) else m.encode(msg)
    return m.decode(await conn.request(raw, 5.0))


def registration(fqdn: str, eps: tuple[m.Endpoint, ...] = (("127.0.0.1", 7400),)) -> m.Message:
    return m.RegistrationRequest(fqdn, KEY, 7400, eps)


def test_register_only_names_in_the_certificate(pki: Path, tmp_path: Path) -> None:
    async def body(server: DcServer, connect: Callable[..., Any]) -> None:
        mn1 = await connect("mn1")
        refused = await ask(mn1, registration("cn2.ntm.example.com"))
        assert isinstance(refused, m.ErrorMessage)
        assert refused.code is m.ErrorCode.NOT_AUTHORIZED
        assert "cn2.ntm.example.com is not among the names in your certificate" in refused.reason
        ok = await ask(mn1, registration("mn1.ntm.example.com"))
        assert isinstance(ok, m.RegistrationResponse)
        assert ipaddress.ip_address(ok.vip) in ipaddress.ip_network("100.64.0.0/16")
        assert ok.seen[0] == "127.0.0.1" and not ok.behind_nat

    run(with_dc(pki, tmp_path, body))


def test_malformed_signaling_gets_an_error_and_the_dc_goes_on(pki: Path, tmp_path: Path) -> None:
    async def body(server: DcServer, connect: Callable[..., Any]) -> None:
        mn1 = await connect("mn1")
        good = m.encode(registration("mn1.ntm.example.com"))
        cases = {
            "bad_version": bytes([7]) + good[1:],
            "bad_type": bytes([1, 200]) + good[2:],
            "bad_length": good[:-3],
            "bad_field": good.replace(b"mn1.ntm", b"MN1.ntm"),
        }
        for reason, raw in cases.items():
            answer = await ask(mn1, raw)
            assert isinstance(answer, m.ErrorMessage), reason
            expected = (
                m.ErrorCode.UNSUPPORTED_VERSION
                if reason == "bad_version"
                else m.ErrorCode.BAD_MESSAGE
            )
            assert answer.code is expected, reason
            assert server.counters[f"bad_{reason}"] >= 1
        # oversized body: the header promises more than the codec allows
        huge = struct.pack("!BBH", 1, m.MsgType.ERROR, 60000) + b"x" * 60000
        answer = await ask(mn1, huge)
        assert isinstance(answer, m.ErrorMessage) and answer.code is m.ErrorCode.BAD_MESSAGE
        # a valid message in the wrong place
        answer = await ask(mn1, m.Keepalive())
        assert isinstance(answer, m.ErrorMessage) and answer.code is m.ErrorCode.UNEXPECTED
        # and the same connection still works
        assert isinstance(
            await ask(mn1, registration("mn1.ntm.example.com")), m.RegistrationResponse
        )

    run(with_dc(pki, tmp_path, body))


def test_direction_pushes_to_the_responder_first(pki: Path, tmp_path: Path) -> None:
    async def body(server: DcServer, connect: Callable[..., Any]) -> None:
        pushed: list[m.RouteDirection] = []

        async def cn2_handler(_c: ControlConnection, payload: bytes) -> bytes:
            rd = m.decode_as(payload, m.RouteDirection)
            pushed.append(rd)
            return m.encode(m.RouteDirectionAck(rd.path_id))

        cn2 = await connect("cn2", cn2_handler)
        mn1 = await connect("mn1")
        assert isinstance(
            await ask(cn2, registration("cn2.ntm.example.com")), m.RegistrationResponse
        )
        assert isinstance(
            await ask(mn1, registration("mn1.ntm.example.com")), m.RegistrationResponse
        )
        rd = await ask(mn1, m.DirectionRequest("mn1.ntm.example.com", "cn2.ntm.example.com"))
        assert isinstance(rd, m.RouteDirection)
        assert rd.kind is m.RouteKind.DIRECT and rd.role is m.PathRole.INITIATOR
        assert len(pushed) == 1 and pushed[0].path_id == rd.path_id
        assert pushed[0].role is m.PathRole.RESPONDER
        assert pushed[0].peer_fqdn == "mn1.ntm.example.com"
        # speaking for a name registered on another connection is refused
        spoof = await ask(mn1, m.DirectionRequest("cn2.ntm.example.com", "mn1.ntm.example.com"))
        assert isinstance(spoof, m.ErrorMessage) and spoof.code is m.ErrorCode.NOT_REGISTERED
        unknown = await ask(mn1, m.DirectionRequest("mn1.ntm.example.com", "zz.ntm.example.com"))
        assert isinstance(unknown, m.ErrorMessage) and unknown.code is m.ErrorCode.UNKNOWN_TARGET

    run(with_dc(pki, tmp_path, body))


def test_responder_that_refuses_gives_a_clear_error(pki: Path, tmp_path: Path) -> None:
    async def body(server: DcServer, connect: Callable[..., Any]) -> None:
        cn2 = await connect("cn2")  # answers pushes with an ErrorMessage
        mn1 = await connect("mn1")
        await ask(cn2, registration("cn2.ntm.example.com"))
        await ask(mn1, registration("mn1.ntm.example.com"))
        answer = await ask(mn1, m.DirectionRequest("mn1.ntm.example.com", "cn2.ntm.example.com"))
        assert isinstance(answer, m.ErrorMessage)
        assert answer.code is m.ErrorCode.PEER_UNREACHABLE and "refused" in answer.reason

    run(with_dc(pki, tmp_path, body))


def test_answer_before_the_ack_only_to_a_responder_that_took_its_last_push(
    pki: Path, tmp_path: Path
) -> None:
    async def body(server: DcServer, connect: Callable[..., Any]) -> None:
        release = asyncio.Event()
        pushed: list[m.RouteDirection] = []
        refuse = False

        async def cn2_handler(_c: ControlConnection, payload: bytes) -> bytes:
            rd = m.decode_as(payload, m.RouteDirection)
            pushed.append(rd)
            if len(pushed) == 2:
                await release.wait()  # the second push is acked only after mn1 got its answer
            if refuse:
                return m.encode(m.ErrorMessage(m.ErrorCode.INTERNAL, "cannot"))
            return m.encode(m.RouteDirectionAck(rd.path_id))

        cn2 = await connect("cn2", cn2_handler)
        mn1 = await connect("mn1")
        await ask(cn2, registration("cn2.ntm.example.com"))
        await ask(mn1, registration("mn1.ntm.example.com"))
        request = m.DirectionRequest("mn1.ntm.example.com", "cn2.ntm.example.com")
        # first: cn2 never took a push yet, so the DC waits for its ack
        rd1 = await ask(mn1, request)
        assert isinstance(rd1, m.RouteDirection) and [p.path_id for p in pushed] == [rd1.path_id]
        assert server.counters.get("answered_before_ack", 0) == 0
        # second, on an idle DC: cn2 took the last one, so mn1 is answered while cn2
        # still holds the push
        await asyncio.sleep(IDLE_GAP)
        rd2 = await ask(mn1, request)
        assert isinstance(rd2, m.RouteDirection) and rd2.path_id != rd1.path_id
        assert server.counters["answered_before_ack"] == 1
        await wait_until(lambda: len(pushed) == 2)
        assert pushed[1].path_id == rd2.path_id and not release.is_set()
        refuse = True  # ...and then refuses it: counted, and the next answer waits again
        release.set()
        await wait_until(lambda: server.counters.get("push_failed_after_answer", 0) == 1)
        await asyncio.sleep(IDLE_GAP)
        rd3 = await ask(mn1, request)
        assert isinstance(rd3, m.ErrorMessage) and "refused" in rd3.reason
        assert server.counters["answered_before_ack"] == 1

    run(with_dc(pki, tmp_path, body))


async def wait_until(predicate: Callable[[], bool], bound: float = 5.0) -> None:
    async with asyncio.timeout(bound):
        while not predicate():
            await asyncio.sleep(0.01)


# --- several gateways ---------------------------------------------------------------------

WWW = "www.ntm.example.com"
G1, G2 = "ntma1.ntm.example.com", "ntma2.ntm.example.com"


def gateway_registration(gateway: str) -> m.Message:
    return m.RegistrationRequest(WWW, KEY, 7400, (("127.0.0.1", 7400),), gateway, 100)


def test_direction_to_a_service_goes_through_one_gateway_and_names_the_others(
    pki: Path, tmp_path: Path
) -> None:
    async def body(server: DcServer, connect: Callable[..., Any]) -> None:
        pushed: dict[str, list[m.RouteDirection]] = {G1: [], G2: []}
        refuse: set[str] = set()

        def gateway_handler(name: str) -> Any:
            async def handler(_c: ControlConnection, payload: bytes) -> bytes:
                rd = m.decode_as(payload, m.RouteDirection)
                pushed[name].append(rd)
                if name in refuse:
                    return m.encode(m.ErrorMessage(m.ErrorCode.INTERNAL, "busy"))
                return m.encode(m.RouteDirectionAck(rd.path_id))

            return handler

        g1 = await connect("ntma1", gateway_handler(G1))
        g2 = await connect("ntma2", gateway_handler(G2))
        mn1 = await connect("mn1")
        for conn, gw in ((g1, G1), (g2, G2)):
            assert isinstance(await ask(conn, gateway_registration(gw)), m.RegistrationResponse)
        await ask(mn1, registration("mn1.ntm.example.com"))
        # a gateway name may only be registered from its own certificate
        stolen = await ask(g1, gateway_registration(G2))
        assert isinstance(stolen, m.ErrorMessage) and stolen.code is m.ErrorCode.NOT_AUTHORIZED

        rd = await ask(mn1, m.DirectionRequest("mn1.ntm.example.com", WWW))
        assert isinstance(rd, m.RouteDirection) and rd.gateway in (G1, G2)
        chosen, other = rd.gateway, G2 if rd.gateway == G1 else G1
        assert rd.alternatives == (other,)
        assert [p.path_id for p in pushed[chosen]] == [rd.path_id] and not pushed[other]
        assert pushed[chosen][0].gateway == chosen and pushed[chosen][0].alternatives == ()

        # the chosen gateway refuses the next path: the DC goes through the other one
        refuse.add(chosen)
        rd2 = await ask(mn1, m.DirectionRequest("mn1.ntm.example.com", WWW))
        assert isinstance(rd2, m.RouteDirection) and rd2.gateway == other
        assert server.counters["gateway_retries"] == 1
        # a gateway's ack decides whether another is tried: never answered before it
        assert server.counters.get("answered_before_ack", 0) == 0
        # ...but not when the MN named the gateway
        named = await ask(mn1, m.DirectionRequest("mn1.ntm.example.com", WWW, chosen))
        assert isinstance(named, m.ErrorMessage) and "refused" in named.reason

        status = server.status()
        rows = {r["gateway"]: r for r in status["services"][WWW]["gateways"]}
        assert rows[chosen]["connected"] and rows[chosen]["assignments"] == 0
        assert rows[other]["assignments"] == 1  # the latest direction for mn1 went there

    run(with_dc(pki, tmp_path, body))


def test_gateway_reports_are_kept_and_shown_only_from_their_gateway(
    pki: Path, tmp_path: Path
) -> None:
    async def body(server: DcServer, connect: Callable[..., Any]) -> None:
        g1 = await connect("ntma1")
        g2 = await connect("ntma2")
        mn1 = await connect("mn1")
        await ask(g1, gateway_registration(G1))
        await ask(g2, gateway_registration(G2))
        await ask(mn1, registration("mn1.ntm.example.com"))
        report = m.GatewayReport(WWW, G1, 3, 12_000, 1_500, 20_000)
        assert await ask(g1, report) == m.GatewayReportAck(G1)
        for conn in (g2, mn1):
            refused = await ask(conn, report)
            assert isinstance(refused, m.ErrorMessage)
            assert refused.code is m.ErrorCode.NOT_REGISTERED
        assert server.coordinator.counters["report_refused"] == 2
        rows = {r["gateway"]: r for r in server.status()["services"][WWW]["gateways"]}
        assert (rows[G1]["tunnels"], rows[G1]["rtt_us"], rows[G1]["loss_ppm"]) == (
            3,
            12_000,
            20_000,
        )
        assert rows[G1]["effective_weight"] < 100 and rows[G2]["tunnels"] is None
        assert rows[G1]["hold_down_left"] > 0  # just connected; default hold-down 30 s

        # disconnect: no longer connected, DNS answers from the other gateway only
        await g1.close()
        for _ in range(100):
            if not server.registry.gateway(WWW, G1).handle:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.05)
        rows = {r["gateway"]: r for r in server.status()["services"][WWW]["gateways"]}
        assert not rows[G1]["connected"] and rows[G2]["connected"]
        assert server._zone_lookup(WWW) == ["127.0.0.1"]

    run(with_dc(pki, tmp_path, body))


def test_dc_client_registers_as_a_gateway_reports_and_asks_for_one(
    pki: Path, tmp_path: Path
) -> None:
    """The node-side API (ntm_node.dc_client) against the real DC."""
    from types import SimpleNamespace

    from ntm_io.netwatch import AddressSet
    from ntm_node.dc_client import DcClient, DirectionError

    async def body(server: DcServer, connect: Callable[..., Any]) -> None:
        def client(name: str, fqdn: str, on_push: Any) -> DcClient:
            cfg = SimpleNamespace(
                fqdn=fqdn,
                tunnel_port=7400,
                dc_addresses=("127.0.0.1",),
                dc_port=server.config.quic_port,
                dc_server_name="dc1.ntm.example.com",
                ca=str(pki / "ca.pem"),
                cert=str(pki / f"{name}.pem"),
                key=str(pki / f"{name}.key"),
            )
            return DcClient(
                cfg,  # type: ignore[arg-type]
                KEY,
                addresses=lambda: AddressSet(ipv4=("127.0.0.1",)),
                on_push=on_push,
                on_registered=lambda _r: None,
            )

        async def ack(rd: m.RouteDirection) -> m.Message:
            return m.RouteDirectionAck(rd.path_id)

        gw1, gw2 = client("ntma1", WWW, ack), client("ntma2", WWW, ack)
        gw1.gateway, gw2.gateway, gw2.weight = G1, G2, 0
        mn = client("mn1", "mn1.ntm.example.com", ack)
        tasks = [asyncio.create_task(c.run()) for c in (gw1, gw2, mn)]
        try:
            for c in (gw1, gw2, mn):
                await asyncio.wait_for(c.registered.wait(), 10)
            assert server.registry.gateway(WWW, G2).weight == 0  # type: ignore[union-attr]
            await gw1.report(m.GatewayReport(WWW, G1, 1, 1000, 100, 0))
            assert gw1.counters["reports"] == 1
            with pytest.raises(DirectionError) as refused:
                await gw2.report(m.GatewayReport(WWW, G1, 1, 1000, 100, 0))
            assert refused.value.code is m.ErrorCode.NOT_REGISTERED
            rd = await mn.request_direction(WWW)
            assert rd.gateway == G1 and rd.alternatives == ()  # ntma2 drains (weight 0)
            with pytest.raises(DirectionError) as drained:
                await mn.request_direction(WWW, gateway=G2)
            assert drained.value.code is m.ErrorCode.PEER_UNREACHABLE
            assert "draining" in str(drained.value)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in (gw1, gw2, mn):
                await c._drop_connection()

    run(with_dc(pki, tmp_path, body))


# --- relayed paths and relay failover ------------------------------------------------------


def relayed_path(pid: int, relay: str, requester: str, expires_at: float = 100.0) -> RelayedPath:
    return RelayedPath(bytes([pid]) * 8, relay, requester, "cn1.ntm.example.com", "", expires_at)


def test_a_dead_relay_moves_only_the_newest_live_path_of_each_pair() -> None:
    table = RelayedPaths()
    table.add(relayed_path(1, "rs1", "mn1"))  # replaced by 2 (renewed): not moved
    table.add(relayed_path(2, "rs1", "mn1"))
    table.add(relayed_path(3, "rs1", "mn2"))  # replaced by 4 on another relay: not moved
    table.add(relayed_path(4, "rs2", "mn2"))
    table.add(relayed_path(5, "rs1", "mn3", expires_at=10.0))  # its lifetime is over
    moved = table.take_on("rs1", now=50.0)
    assert [p.path_id[0] for p in moved] == [2]
    assert len(table) == 1 and table.get(bytes([4]) * 8) is not None  # rs1's are forgotten
    assert table.take_on("rs1", now=50.0) == []
    assert table.expire(100.0) == 1 and len(table) == 0


def relay_server(pki: Path, name: str, port: int = 0, control_port: int = 0) -> RelayServer:
    return RelayServer(
        relay_config.RelayConfig(
            name=name,
            listen=("127.0.0.1",),
            port=port,
            control_listen=("127.0.0.1",),
            control_port=control_port,
            status_socket="",
            settings=RelaySettings(),
            tls=relay_config.TlsConfig(
                str(pki / "ca.pem"), str(pki / f"{name}.pem"), str(pki / f"{name}.key")
            ),
        )
    )


def dc_config(
    pki: Path, tmp: Path, name: str, zone: str, pool: str, peer_port: int, port: int
) -> DcConfig:
    return DcConfig(
        name=name,
        zone=zone,
        listen=("127.0.0.1",),
        quic_port=port,
        dns_port=0,
        vip_pool=ipaddress.IPv4Network(pool),
        vip_route=ipaddress.IPv4Network("100.64.0.0/10"),
        ns_name=f"{name}.{zone}",
        ns_addresses=("127.0.0.1",),
        registration_lifetime=300,
        status_socket=str(tmp / f"{name}.sock"),
        state_file=None,
        tls=TlsConfig(str(pki / "ca.pem"), str(pki / f"{name}.pem"), str(pki / f"{name}.key")),
        federation=FederationConfig(("127.0.0.1",), 2.0, peer_port),
    )


async def fake_dns(name: str, qtype: str, _servers: list[str], _timeout: float) -> list[str]:
    """The delegations of the two zones, as a resolver would give them."""
    ns = {"ntm.example.com": "dc1.ntm.example.com", "ntm.example.net": "dc2.ntm.example.net"}
    if qtype == "NS":
        return [ns[name]] if name in ns else []
    return ["127.0.0.1"] if qtype == "A" and name in ns.values() else []


def test_a_federated_relayed_path_moves_when_the_relay_dies(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mn1 (dc1) and cn3 (dc2), both behind NAT: dc2 decides the route, so it picks the
    relay; when that relay dies dc2 asks dc1 to rebuild, and both ends get the new path."""
    monkeypatch.setattr(federation, "query", fake_dns)

    async def go() -> None:
        relays = {n: relay_server(pki, n) for n in ("rs1", "rs2")}
        for r in relays.values():
            await r.start()
        port1, port2 = free_udp_port(), free_udp_port()
        dc1 = DcServer(
            dc_config(pki, tmp_path, "dc1", "ntm.example.com", "100.64.0.0/16", port2, port1)
        )
        specs = tuple(
            RelaySpec(
                n,
                "127.0.0.1",
                r.control_addresses[0][1],
                f"{n}.relay.example.com",
                (r.addresses[0],),
            )
            for n, r in relays.items()
        )
        cfg2 = dc_config(pki, tmp_path, "dc2", "ntm.example.net", "100.65.0.0/16", port1, port2)
        dc2 = DcServer(dataclasses.replace(cfg2, relays=specs))
        dc2.relays.poll_interval = 0.2  # find the dead relay quickly
        pushed: dict[str, list[m.RouteDirection]] = {"mn1": [], "cn3": []}
        conns: list[ControlConnection] = []

        def take(name: str) -> Any:
            async def handler(_c: ControlConnection, payload: bytes) -> bytes:
                rd = m.decode_as(payload, m.RouteDirection)
                pushed[name].append(rd)
                return m.encode(m.RouteDirectionAck(rd.path_id))

            return handler

        async def node(name: str, fqdn: str, port: int, server: str, private: str) -> Any:
            conn = await connect_control(
                "127.0.0.1",
                port,
                server_name=server,
                ca=str(pki / "ca.pem"),
                cert=str(pki / f"{name}.pem"),
                key=str(pki / f"{name}.key"),
                handler=take(name),
            )
            conns.append(conn)
            reg = await ask(conn, registration(fqdn, ((private, 7400),)))
            assert isinstance(reg, m.RegistrationResponse) and reg.behind_nat
            return conn

        try:
            await dc1.start()
            await dc2.start()
            await until(lambda: all(r.healthy for r in dc2.relays.relays.values()), "relays up")
            mn1 = await node("mn1", MN1, port1, "dc1.ntm.example.com", "10.10.1.100")
            await node("cn3", CN3, port2, "dc2.ntm.example.net", "10.20.2.10")
            rd = await ask(mn1, m.DirectionRequest(MN1, CN3))
            assert isinstance(rd, m.RouteDirection) and rd.kind is m.RouteKind.RELAY
            first = dc2.relays.relays["rs1"]
            assert rd.relay == first.spec.endpoints[0]  # dc2's relay (the least loaded)
            assert [p.relay for p in pushed["cn3"]] == [rd.relay]
            assert dc1.status()["live_federated_paths"] == 1
            assert dc2.status()["live_relayed_paths"] == 1

            await relays["rs1"].close()
            await until(lambda: bool(pushed["mn1"]), "mn1 pushed a new path", bound=15.0)
            [new] = pushed["mn1"]
            rs2 = relays["rs2"].addresses[0]
            assert new.kind is m.RouteKind.RELAY and new.relay == rs2
            assert new.role is m.PathRole.INITIATOR and new.peer_fqdn == CN3
            assert new.path_id != rd.path_id
            assert [p.path_id for p in pushed["cn3"]][-1] == new.path_id
            assert pushed["cn3"][-1].relay == rs2
            await until(lambda: dc2.counters.get("relay_failovers") == 1, "dc2 counted it")
            assert dc2.counters["relay_failovers_federated"] == 1
            assert dc1.counters["federated_rebuilds"] == 1

            # dc2 may not have dc1 rebuild a path dc1 never federated, nor a node ask it
            as_dc2 = await connect_control(
                "127.0.0.1",
                port1,
                server_name="dc1.ntm.example.com",
                ca=str(pki / "ca.pem"),
                cert=str(pki / "dc2.pem"),
                key=str(pki / "dc2.key"),
                handler=take("x"),
            )
            conns.append(as_dc2)
            other = await ask(as_dc2, m.DirectionRequest(MN1, "cn9.ntm.example.net"))
            assert isinstance(other, m.ErrorMessage) and other.code is m.ErrorCode.NOT_AUTHORIZED
            assert dc1.counters["rebuild_refused"] == 1
        finally:
            for c in conns:
                await c.close()
            await dc1.close()
            await dc2.close()
            for r in relays.values():
                await r.close()

    run(go())


def test_a_renewed_local_relayed_path_is_moved_once_when_its_relay_dies(
    pki: Path, tmp_path: Path
) -> None:
    """mn1 and cn2 of dc1, both behind NAT; mn1 renewed its path (two paths on rs1 for the
    pair): when rs1 dies only the newest is moved, to rs2, and both ends are told."""

    async def go() -> None:
        # rs2 starts only after both paths are on rs1
        ports = {n: (free_udp_port(), free_udp_port()) for n in ("rs1", "rs2")}
        relays = {n: relay_server(pki, n, *ports[n]) for n in ("rs1", "rs2")}
        await relays["rs1"].start()
        port = free_udp_port()
        specs = tuple(
            RelaySpec(n, "127.0.0.1", control, f"{n}.relay.example.com", (("127.0.0.1", udp),))
            for n, (udp, control) in ports.items()
        )
        cfg = dc_config(pki, tmp_path, "dc1", "ntm.example.com", "100.64.0.0/16", 1, port)
        dc = DcServer(dataclasses.replace(cfg, relays=specs, federation=None))
        dc.relays.poll_interval = 0.2
        pushed: dict[str, list[m.RouteDirection]] = {"mn1": [], "cn2": []}
        conns: list[ControlConnection] = []

        async def node(name: str, private: str) -> ControlConnection:
            async def handler(_c: ControlConnection, payload: bytes) -> bytes:
                rd = m.decode_as(payload, m.RouteDirection)
                pushed[name].append(rd)
                return m.encode(m.RouteDirectionAck(rd.path_id))

            conn = await connect_control(
                "127.0.0.1",
                port,
                server_name="dc1.ntm.example.com",
                ca=str(pki / "ca.pem"),
                cert=str(pki / f"{name}.pem"),
                key=str(pki / f"{name}.key"),
                handler=handler,
            )
            conns.append(conn)
            fqdn = f"{name}.ntm.example.com"
            assert isinstance(
                await ask(conn, registration(fqdn, ((private, 7400),))), m.RegistrationResponse
            )
            return conn

        try:
            await dc.start()
            await until(lambda: dc.relays.relays["rs1"].healthy, "rs1 up")
            mn1 = await node("mn1", "10.10.1.100")
            await node("cn2", "10.20.2.20")
            old = await ask(mn1, m.DirectionRequest(MN1, CN2))
            renewed = await ask(mn1, m.DirectionRequest(MN1, CN2))
            assert isinstance(old, m.RouteDirection) and isinstance(renewed, m.RouteDirection)
            assert old.relay == renewed.relay == relays["rs1"].addresses[0]
            await relays["rs2"].start()
            await until(lambda: dc.relays.relays["rs2"].healthy, "rs2 up")
            await relays["rs1"].close()
            await until(lambda: dc.counters.get("relay_failovers") == 1, "the path moved")
            [moved] = pushed["mn1"]
            assert moved.relay == relays["rs2"].addresses[0]
            assert moved.path_id not in (old.path_id, renewed.path_id)
            assert [p.path_id for p in pushed["cn2"]][-1] == moved.path_id
            assert "relay_failover_failed" not in dc.counters
        finally:
            for c in conns:
                await c.close()
            await dc.close()
            for r in relays.values():
                await r.close()

    run(go())


MN1, CN2, CN3 = "mn1.ntm.example.com", "cn2.ntm.example.com", "cn3.ntm.example.net"


async def until(cond: Callable[[], bool], what: str, bound: float = 10.0) -> None:
    deadline = time.monotonic() + bound
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound} s: {what}")
        await asyncio.sleep(0.05)
