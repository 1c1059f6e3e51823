"""ntm_io.control over real loopback UDP: mutual TLS, both-way requests, limits, lifecycle."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aioquic import tls
from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

from ntm_io import control
from ntm_io.control import (
    ControlClosed,
    ControlConnection,
    ControlError,
    ControlRefused,
    ControlReset,
    ControlServer,
    ControlTimeout,
    connect_control,
    serve_control,
)
from ntm_pki import ca

T = TypeVar("T")
WAIT = 10.0  # generous bound for "eventually"; never a readiness sleep


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a test coroutine; insist no task is left and the loop reported no error."""
    problems: list[dict[str, Any]] = []

    async def wrapper() -> T:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: problems.append(ctx))
        result = await coro
        current = asyncio.current_task()
        leftover = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        assert not leftover, f"tasks left running: {leftover}"
        gc.collect()  # surfaces "Future exception was never retrieved" now, not later
        await asyncio.sleep(0)
        return result

    result = asyncio.run(wrapper())
    assert not problems, f"event loop reported: {problems}"
    return result


@dataclass(frozen=True)
class Pki:
    dir: Path
    other: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    def cert(self, name: str) -> dict[str, Any]:
        return {"cert": self.dir / f"{name}.pem", "key": self.dir / f"{name}.key"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    lab = tmp_path_factory.mktemp("lab")
    ca.init_ca(lab)
    ca.issue(lab, "dc1", "dc", ["dc1.ntm.example.com"], ["127.0.0.1", "::1"])
    ca.issue(lab, "mn1", "node", ["mn1.ntm.example.com", "mn1.alt.example.com"])
    ca.issue(lab, "cn2", "node", ["cn2.ntm.example.com"])
    # A certificate from the right CA but with no NTM role (subject OU "admin").
    ca_cert, ca_key = ca.load_ca(lab)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    spec = ca.IdentitySpec("norole", "admin", ("norole.example.com",))
    leaf = ca._build_leaf(spec, key.public_key(), ca_cert, ca_key)
    (lab / "norole.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (lab / "norole.key").write_bytes(ca._key_pem(key))
    # Another CA issuing the same names: must be refused by both sides.
    other = tmp_path_factory.mktemp("other")
    ca.init_ca(other, "Evil CA")
    ca.issue(other, "mn1", "node", ["mn1.ntm.example.com"])
    ca.issue(other, "dc1", "dc", ["dc1.ntm.example.com"], ["127.0.0.1"])
    return Pki(lab, other)


async def echo(conn: ControlConnection, data: bytes) -> bytes:
    return f"{conn.peer_role}:".encode() + data


@asynccontextmanager
async def server(
    pki: Pki, handler: control.Handler = echo, host: str = "127.0.0.1", **kw: Any
) -> AsyncIterator[ControlServer]:
    srv = await serve_control(host, 0, ca=pki.ca, handler=handler, **pki.cert("dc1"), **kw)
    try:
        yield srv
    finally:
        srv.close()
        await srv.wait_closed()


@asynccontextmanager
async def client(
    pki: Pki,
    srv: ControlServer,
    name: str = "mn1",
    handler: control.Handler = echo,
    **kw: Any,
) -> AsyncIterator[ControlConnection]:
    host, port = srv.address
    kw.setdefault("server_name", "dc1.ntm.example.com")
    conn = await connect_control(host, port, ca=pki.ca, handler=handler, **pki.cert(name), **kw)
    try:
        yield conn
    finally:
        await conn.close()


async def server_side(srv: ControlServer, name: str) -> ControlConnection:
    """The server's connection for a client name (on_connect runs before the client returns)."""
    (conn,) = srv.connections_for(name)
    return conn


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


# ---------------------------------------------------------------- happy paths


def test_request_both_directions_with_verified_identities(pki: Pki) -> None:
    async def main() -> None:
        connected: list[ControlConnection] = []
        async with server(pki, on_connect=connected.append) as srv, client(pki, srv) as cli:
            assert cli.peer_role == "dc"
            assert cli.peer_names == frozenset({"dc1.ntm.example.com"})
            assert cli.peer_address == srv.address
            assert await cli.request(b"hello", timeout=5) == b"node:hello"

            srv_conn = await server_side(srv, "mn1.alt.example.com")
            assert connected == [srv_conn] and srv.connections == (srv_conn,)
            assert srv_conn.peer_role == "node"
            assert srv_conn.peer_names == {"mn1.ntm.example.com", "mn1.alt.example.com"}
            local = cli._protocol._link.get_extra_info("sockname")  # type: ignore[union-attr]
            assert srv_conn.peer_address == ("127.0.0.1", local[1])  # client bound 0.0.0.0
            # The server pushes over the client's own connection.
            assert await srv_conn.request(b"route", timeout=5) == b"dc:route"
            assert cli.counters["streams_in"] == 1 and cli.counters["replies_out"] == 1
            assert srv.counters["connections"] == 1 and srv.counters["refused"] == 0

    run(main())


def test_ipv6_loopback_and_ip_server_name(pki: Pki) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1")

    async def main() -> None:
        async with server(pki, host="::1") as srv, client(pki, srv, server_name="::1") as cli:
            assert srv.address[0] == "::1"
            assert await cli.request(b"v6", timeout=5) == b"node:v6"
            srv_conn = await server_side(srv, "mn1.ntm.example.com")
            assert srv_conn.peer_address[0] == "::1"
            assert await srv_conn.request(b"v6", timeout=5) == b"dc:v6"

    run(main())


def test_fifty_concurrent_requests_each_way(pki: Pki) -> None:
    async def slow_echo(conn: ControlConnection, data: bytes) -> bytes:
        await asyncio.sleep(0)  # interleave handlers
        return data[::-1]

    async def main() -> None:
        async with (
            server(pki, handler=slow_echo) as srv,
            client(pki, srv, handler=slow_echo) as cli,
        ):
            srv_conn = await server_side(srv, "mn1.ntm.example.com")
            ups = [cli.request(f"up-{i}".encode() * 50, timeout=10) for i in range(50)]
            downs = [srv_conn.request(f"down-{i}".encode(), timeout=10) for i in range(50)]
            results = await asyncio.gather(*ups, *downs)
            assert results[:50] == [(f"up-{i}".encode() * 50)[::-1] for i in range(50)]
            assert results[50:] == [f"down-{i}".encode()[::-1] for i in range(50)]
            assert srv.counters["streams_in"] == 50 and srv.counters["streams_out"] == 50

    run(main())


def test_two_clients_each_get_their_own_push(pki: Pki) -> None:
    async def main() -> None:
        async with (
            server(pki) as srv,
            client(pki, srv, "mn1") as mn1,
            client(pki, srv, "cn2") as cn2,
        ):
            assert len(srv.connections) == 2
            for name, conn in (("mn1.ntm.example.com", mn1), ("cn2.ntm.example.com", cn2)):
                seen: list[frozenset[str]] = []

                async def handler(c: ControlConnection, d: bytes, seen: list[Any] = seen) -> bytes:
                    seen.append(c.peer_names)
                    return d

                conn._handler = handler
                srv_conn = await server_side(srv, name)
                assert await srv_conn.request(b"x", timeout=5) == b"x"
                assert seen == [frozenset({"dc1.ntm.example.com"})]

    run(main())


# ---------------------------------------------------------------- mutual TLS


def test_client_from_another_ca_is_refused_and_server_keeps_serving(pki: Pki) -> None:
    async def main() -> None:
        connected: list[ControlConnection] = []
        async with server(pki, on_connect=connected.append) as srv:
            host, port = srv.address
            with pytest.raises(ControlRefused, match="certificate rejected"):
                await connect_control(
                    host,
                    port,
                    server_name="dc1.ntm.example.com",
                    ca=pki.ca,  # the client trusts the right CA; its own cert is foreign
                    cert=pki.other / "mn1.pem",
                    key=pki.other / "mn1.key",
                    handler=echo,
                )
            assert srv.counters["refused"] == 1 and connected == []
            async with client(pki, srv) as cli:
                assert await cli.request(b"ok", timeout=5) == b"node:ok"
            assert len(connected) == 1

    run(main())


class _Recorder(QuicConnectionProtocol):
    terminated: events.ConnectionTerminated | None = None

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            self.terminated = event
        super().quic_event_received(event)


def test_client_without_certificate_is_refused(pki: Pki) -> None:
    async def main() -> None:
        async with server(pki) as srv:
            config = QuicConfiguration(
                is_client=True, alpn_protocols=[control.ALPN], server_name="dc1.ntm.example.com"
            )
            config.load_verify_locations(cafile=str(pki.ca))
            config.verify_mode = ssl.CERT_REQUIRED
            # aioquic's client finishes its handshake before the server sees (no) cert;
            # the PING proves the server then closed the connection instead of answering.
            async with quic_connect(
                "127.0.0.1", srv.address[1], configuration=config, create_protocol=_Recorder
            ) as proto:
                with pytest.raises(ConnectionError):
                    await asyncio.wait_for(proto.ping(), WAIT)
                assert isinstance(proto, _Recorder) and proto.terminated is not None
                assert proto.terminated.error_code == control.CLOSE_CERT_REQUIRED
                assert "no client certificate" in proto.terminated.reason_phrase
            assert srv.counters["refused"] == 1 and srv.connections == ()
            async with client(pki, srv) as cli:
                assert await cli.request(b"still", timeout=5) == b"node:still"

    run(main())


def test_certificate_without_role_is_refused(pki: Pki) -> None:
    async def main() -> None:
        async with server(pki) as srv:
            with pytest.raises(ControlRefused, match="no NTM role"):
                async with client(pki, srv, "norole"):
                    pass
            assert srv.counters["refused"] == 1

    run(main())


def test_client_refuses_server_from_another_ca_or_wrong_name(pki: Pki) -> None:
    async def main() -> None:
        evil = await serve_control(
            "127.0.0.1",
            0,
            ca=pki.ca,
            cert=pki.other / "dc1.pem",
            key=pki.other / "dc1.key",
            handler=echo,
        )
        try:
            with pytest.raises(ControlRefused):
                async with client(pki, evil):
                    pass
        finally:
            evil.close()
            await evil.wait_closed()
        async with server(pki) as srv:
            with pytest.raises(ControlRefused):
                async with client(pki, srv, server_name="other.ntm.example.com"):
                    pass

    run(main())


def test_connect_timeout_when_nobody_answers(pki: Pki) -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))
            with pytest.raises(ControlTimeout, match="no control handshake"):
                await connect_control(
                    "127.0.0.1",
                    silent.getsockname()[1],
                    server_name="dc1.ntm.example.com",
                    ca=pki.ca,
                    handler=echo,
                    connect_timeout=0.3,
                    **pki.cert("mn1"),
                )

    run(main())


def test_cancelled_connect_leaves_no_socket(pki: Pki) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))
            before = open_fds()
            attempt = connect_control(
                "127.0.0.1",
                silent.getsockname()[1],
                server_name="dc1.ntm.example.com",
                ca=pki.ca,
                handler=echo,
                **pki.cert("mn1"),
            )
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(attempt, 0.2)  # the caller's own timeout cancels it
            await asyncio.sleep(0)  # let the transport finish closing
            assert open_fds() == before

    run(main())


def test_missing_files_are_config_errors(pki: Pki) -> None:
    from ntm_io.config import ConfigError

    async def main() -> None:
        with pytest.raises(ConfigError, match="ntm pki init"):
            await serve_control(
                "127.0.0.1", 0, ca=pki.dir / "nope.pem", handler=echo, **pki.cert("dc1")
            )
        with pytest.raises(ConfigError, match="ntm pki issue"):
            await serve_control(
                "127.0.0.1", 0, ca=pki.ca, cert=pki.dir / "x.pem", key="x.key", handler=echo
            )

    run(main())


# ---------------------------------------------------------------- limits and failures


def test_oversized_request_resets_stream_and_connection_survives(pki: Pki) -> None:
    async def size(conn: ControlConnection, data: bytes) -> bytes:
        return str(len(data)).encode()

    async def main() -> None:
        async with server(pki, handler=size) as srv, client(pki, srv, max_message=1 << 20) as cli:
            with pytest.raises(ControlReset) as info:
                await cli.request(b"x" * (control.MAX_MESSAGE + 1), timeout=5)
            assert info.value.code == control.E_TOO_BIG
            assert srv.counters["oversize"] == 1 and srv.counters["resets_out"] == 1
            assert cli.counters["resets_in"] == 1
            exact = b"y" * control.MAX_MESSAGE
            assert await cli.request(exact, timeout=5) == str(control.MAX_MESSAGE).encode()

    run(main())


def test_oversized_messages_caught_locally_and_on_answers(pki: Pki) -> None:
    async def big(conn: ControlConnection, data: bytes) -> bytes:
        return b"z" * int(data)

    async def main() -> None:
        async with server(pki, handler=big) as srv, client(pki, srv) as cli:
            with pytest.raises(ControlError, match="exceeds"):  # refused before sending
                await cli.request(b"x" * (control.MAX_MESSAGE + 1), timeout=5)
            with pytest.raises(ControlReset) as info:  # server won't send a huge answer
                await cli.request(str(control.MAX_MESSAGE + 1).encode(), timeout=5)
            assert info.value.code == control.E_TOO_BIG
            assert srv.counters["oversize"] == 1
            assert await cli.request(b"3", timeout=5) == b"zzz"
        async with server(pki, handler=big, max_message=1 << 20) as srv, client(pki, srv) as cli:
            with pytest.raises(ControlError, match="answer exceeds"):  # client's own limit
                await cli.request(b"100000", timeout=5)
            assert cli.counters["oversize"] == 1
            assert await cli.request(b"2", timeout=5) == b"zz"

    run(main())


def test_handler_exception_resets_stream_quickly_and_next_request_works(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async def fragile(conn: ControlConnection, data: bytes) -> bytes:
        if data == b"boom":
            raise RuntimeError("handler bug")
        return data

    async def main() -> None:
        async with server(pki, handler=fragile) as srv, client(pki, srv) as cli:
            with pytest.raises(ControlReset) as info:
                await cli.request(b"boom", timeout=WAIT)
            assert info.value.code == control.E_HANDLER
            assert srv.counters["handler_errors"] == 1
            assert await cli.request(b"fine", timeout=5) == b"fine"
            assert len(srv.connections) == 1

    with caplog.at_level(logging.ERROR, logger="ntm.control"):
        run(main())
    assert any("handler failed" in r.getMessage() for r in caplog.records)


def test_timeout_raises_and_cancels_the_remote_handler(pki: Pki) -> None:
    async def main() -> None:
        cancelled = asyncio.Event()
        never = asyncio.Event()

        async def stuck(conn: ControlConnection, data: bytes) -> bytes:
            if data == b"quick":
                return data
            try:
                await never.wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return b""

        async with server(pki, handler=stuck) as srv, client(pki, srv) as cli:
            with pytest.raises(ControlTimeout, match="no answer"):
                await cli.request(b"slow", timeout=0.2)
            assert cli.counters["timeouts"] == 1
            await asyncio.wait_for(cancelled.wait(), WAIT)  # STOP_SENDING reached it
            assert await cli.request(b"quick", timeout=5) == b"quick"

    run(main())


# ---------------------------------------------------------------- lifecycle


def test_client_close_is_clean_and_seen_by_server(pki: Pki) -> None:
    async def main() -> None:
        gone: list[ControlConnection] = []
        closed_seen = asyncio.Event()

        def on_close(conn: ControlConnection) -> None:
            gone.append(conn)
            closed_seen.set()

        async with server(pki, on_close=on_close) as srv:
            async with client(pki, srv) as cli:
                srv_conn = await server_side(srv, "mn1.ntm.example.com")
            assert cli.closed.is_set()
            with pytest.raises(ControlClosed):
                await cli.request(b"late", timeout=1)
            await asyncio.wait_for(closed_seen.wait(), WAIT)
            assert gone == [srv_conn] and srv.connections == ()
            assert srv_conn.close_reason == "closed by application"
            await cli.close()  # idempotent

    run(main())


def test_server_close_fails_pending_requests_on_clients(pki: Pki) -> None:
    async def main() -> None:
        never = asyncio.Event()

        async def stuck(conn: ControlConnection, data: bytes) -> bytes:
            await never.wait()
            return data

        srv = await serve_control("127.0.0.1", 0, ca=pki.ca, handler=stuck, **pki.cert("dc1"))
        async with client(pki, srv) as cli:
            pending = asyncio.ensure_future(cli.request(b"wait", timeout=WAIT))
            await wait_for(lambda: srv.counters["streams_in"] == 1, "request arrived")
            srv.close()
            await srv.wait_closed()
            with pytest.raises(ControlClosed):
                await pending
            await asyncio.wait_for(cli.closed.wait(), WAIT)
            assert "server shutting down" in cli.close_reason

    run(main())


def test_idle_peer_is_detected(pki: Pki) -> None:
    async def main() -> None:
        gone = asyncio.Event()
        async with server(pki, idle_timeout=0.5, on_close=lambda c: gone.set()) as srv:
            cli = await connect_control(
                "127.0.0.1",
                srv.address[1],
                server_name="dc1.ntm.example.com",
                ca=pki.ca,
                handler=echo,
                keepalive=0,
                **pki.cert("mn1"),
            )
            cli._protocol._release(force=True)  # the client vanishes without a word
            await asyncio.wait_for(gone.wait(), WAIT)
            assert srv.connections == ()
            await cli.close()

    run(main())


def test_keepalive_holds_an_idle_connection_open(pki: Pki) -> None:
    async def main() -> None:
        async with (
            server(pki, idle_timeout=0.5, keepalive=0.1) as srv,
            client(pki, srv, idle_timeout=0.5, keepalive=0.1) as cli,
        ):
            await asyncio.sleep(1.5)  # three idle timeouts of silence from the application
            assert not cli.closed.is_set()
            assert await cli.request(b"alive", timeout=5) == b"node:alive"

    run(main())


def test_migration_updates_peer_address_and_pushes_follow(pki: Pki) -> None:
    async def main() -> None:
        moved: asyncio.Queue[tuple[Any, Any]] = asyncio.Queue()
        async with (
            server(pki, on_address_change=lambda c, old, new: moved.put_nowait((old, new))) as srv,
            client(pki, srv, local_addr=("127.0.0.1", 0)) as cli,
        ):
            srv_conn = await server_side(srv, "mn1.ntm.example.com")
            before = srv_conn.peer_address
            await control.rebind(cli, ("127.0.0.1", 0))
            old, new = await asyncio.wait_for(moved.get(), WAIT)
            assert old == before and new != before and srv_conn.peer_address == new
            local = cli._protocol._link.get_extra_info("sockname")  # type: ignore[union-attr]
            assert new == (local[0], local[1])
            assert srv_conn.counters["migrations"] == 1
            assert await srv_conn.request(b"after-move", timeout=5) == b"dc:after-move"
            assert await cli.request(b"up", timeout=5) == b"node:up"

    run(main())


def test_async_callbacks_are_awaited(pki: Pki) -> None:
    async def main() -> None:
        pushed = asyncio.Event()

        async def on_connect(conn: ControlConnection) -> None:
            # The DC's pattern: push to a node as soon as it is connected.
            assert await conn.request(b"welcome", timeout=5) == b"dc:welcome"
            pushed.set()

        async with server(pki, on_connect=on_connect) as srv, client(pki, srv):
            await asyncio.wait_for(pushed.wait(), WAIT)

    run(main())


# ---------------------------------------------------------------- fewer datagrams


def test_requests_of_one_loop_pass_share_a_datagram_and_answers_carry_the_ack(
    pki: Pki,
) -> None:
    """What makes a busy DC cheaper: sends are batched per loop pass, and an ACK due
    rides on the next packet with data instead of going as a datagram of its own."""

    async def main() -> None:
        async with server(pki) as srv, client(pki, srv) as cli:
            srv_conn = await server_side(srv, "mn1.ntm.example.com")
            assert cli._quic._ack_delay == srv_conn._quic._ack_delay == control.ACK_DELAY
            transport = cli._protocol._transport
            assert transport is not None
            sent: list[bytes] = []
            real_sendto = transport.sendto

            def sendto(data: bytes, addr: Any = None) -> None:
                sent.append(data)
                real_sendto(data, addr)

            transport.sendto = sendto  # type: ignore[method-assign,assignment]
            try:
                answers = await asyncio.gather(
                    *(cli.request(f"r{i}".encode(), timeout=5) for i in range(8))
                )
            finally:
                del transport.sendto  # back to the class's method
            assert answers == [f"node:r{i}".encode() for i in range(8)]
            # The eight requests in one datagram; at most one more, the client's ACK of the
            # answers if its delay ran out before the check.
            assert 1 <= len(sent) <= 2, f"{len(sent)} datagrams for 8 requests"
            # The server's answers carried its ACK of the requests: none is left pending.
            assert srv_conn._quic._spaces[tls.Epoch.ONE_RTT].ack_at is None
            assert srv.counters["replies_out"] == 8

    run(main())
