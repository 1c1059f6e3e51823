"""The DC over real QUIC on loopback: registration rules, directions, and bad input."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dc.config import DcConfig, TlsConfig
from dc.server import DcServer
from ntm_io.control import ControlConnection, connect_control
from ntm_pki import ca
from ntm_proto import messages as m

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca.init_ca(d)
    ca.issue(d, "dc1", "dc", dns=["dc1.ntm.example.com"], ips=["127.0.0.1"])
    ca.issue(d, "mn1", "node", dns=["mn1.ntm.example.com"])
    ca.issue(d, "cn2", "node", dns=["cn2.ntm.example.com"])
    return d


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


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
