"""The Relay Server over real loopback sockets: UDP forwarding (IPv4 <-> IPv6), the QUIC
control channel with real certificates, status, and the config file. No root needed."""

from __future__ import annotations

import asyncio
import gc
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ntm_io.config import ConfigError
from ntm_io.control import connect_control
from ntm_io.status import read_status
from ntm_pki import ca
from ntm_proto import messages as m
from ntm_proto import relay_binding as rb
from ntm_proto.messages import Endpoint, PathRole
from ntm_proto.packet import PacketType, build_prefix
from relay import cli as relay_cli
from relay import config as relay_config
from relay.core import RelaySettings
from relay.server import RelayServer

T = TypeVar("T")
WAIT = 10.0  # bound on "eventually"; never a readiness sleep
PID = bytes.fromhex("0badc0de0badc0de")
KEY = bytes(range(32))
RS_NAME = "rs1.relay.example.com"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a test coroutine; insist no task is left and the loop reported no error."""
    problems: list[dict[str, Any]] = []

    async def wrapper() -> T:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: problems.append(ctx))
        result = await coro
        current = asyncio.current_task()
        leftover = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        assert not leftover, f"tasks left running: {leftover}"
        gc.collect()
        await asyncio.sleep(0)
        return result

    result = asyncio.run(wrapper())
    assert not problems, f"event loop reported: {problems}"
    return result


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca.init_ca(d)
    ca.issue(d, "rs1", "relay", [RS_NAME], ["127.0.0.1", "::1"])
    ca.issue(d, "dc1", "dc", ["dc1.ntm.example.com"])
    ca.issue(d, "mn1", "node", ["mn1.ntm.example.com"])
    return d


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix="ntm-rs-", dir="/tmp")  # AF_UNIX paths must stay short
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def relay_cfg(pki: Path, run_dir: Path) -> relay_config.RelayConfig:
    return relay_config.RelayConfig(
        name="rs1",
        listen=("127.0.0.1", "::1"),
        port=0,  # one ephemeral port per socket; the test reads them back
        control_listen=("127.0.0.1",),
        control_port=0,
        status_socket=str(run_dir / "rs1.sock"),
        settings=RelaySettings(max_paths=100),
        tls=relay_config.TlsConfig(
            ca=str(pki / "ca.pem"), cert=str(pki / "rs1.pem"), key=str(pki / "rs1.key")
        ),
    )


async def with_relay(
    pki: Path, run_dir: Path, body: Callable[[RelayServer], Awaitable[None]]
) -> None:
    server = RelayServer(relay_cfg(pki, run_dir))
    await server.start()
    try:
        await body(server)
    finally:
        await server.close()


class End:
    """A fake tunnel endpoint: one non-blocking UDP socket."""

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind((host, 0))
        self.addr: Endpoint = self.sock.getsockname()[:2]

    def send(self, data: bytes, to: Endpoint) -> None:
        self.sock.sendto(data, to)

    async def recv(self) -> tuple[bytes, Endpoint]:
        loop = asyncio.get_running_loop()
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 65535), WAIT)
        return data, (addr[0], addr[1])

    def nothing_waiting(self) -> bool:
        try:
            self.sock.recv(65535)
        except BlockingIOError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


def data_packet(payload: bytes) -> bytes:
    return build_prefix(PacketType.DATA, 0, PID) + bytes(8) + payload + bytes(16)


async def bind(end: End, side: PathRole, rs: Endpoint, stamp: int) -> None:
    key = rb.side_key(KEY, side)
    end.send(rb.build_bind(side, PID, stamp, key), rs)
    data, src = await end.recv()
    ack = rb.parse(data)
    assert src == rs and ack.type is rb.BindingType.BIND_ACK and ack.timestamp == stamp
    assert ack.verify(key)


def test_two_ends_ipv4_and_ipv6_exchange_packets_through_the_relay(
    pki: Path, short_dir: Path
) -> None:
    async def body(server: RelayServer) -> None:
        rs4, rs6 = server.addresses
        assert rs4[0] == "127.0.0.1" and rs6[0] == "::1"
        answer = server.core.handle_direction(
            m.RelayDirection(PID, KEY, 60), "dc1", time.monotonic()
        )
        assert isinstance(answer, m.RelayDirectionAck)
        a, b, attacker = End("127.0.0.1"), End("::1"), End("127.0.0.1")
        try:
            await bind(a, PathRole.INITIATOR, rs4, 1)
            await bind(b, PathRole.RESPONDER, rs6, 1)
            for i in range(20):  # both ways, byte for byte, across families
                out = data_packet(b"a->b %d " % i * (i + 1))
                a.send(out, rs4)
                assert await b.recv() == (out, rs6)
                back = data_packet(b"b->a %d " % i * (i + 3))
                b.send(back, rs6)
                assert await a.recv() == (back, rs4)
            # The reflector attempt: a valid path id from an unbound address (and a
            # replayed BIND); then a marker from a: it arrives first, nothing else does.
            attacker.send(data_packet(b"reflect me"), rs4)
            attacker.send(
                rb.build_bind(PathRole.INITIATOR, PID, 1, rb.side_key(KEY, PathRole.INITIATOR)), rs4
            )
            marker = data_packet(b"marker")
            a.send(marker, rs4)
            assert await b.recv() == (marker, rs6)
            assert attacker.nothing_waiting() and a.nothing_waiting() and b.nothing_waiting()
            # A new NAT mapping for a: it re-binds from another socket and carries on.
            a2 = End("127.0.0.1")
            try:
                await bind(a2, PathRole.INITIATOR, rs4, 2)
                b.send(data_packet(b"to the new a"), rs6)
                assert await a2.recv() == (data_packet(b"to the new a"), rs4)
                assert a.nothing_waiting()
            finally:
                a2.close()
            doc = await asyncio.to_thread(read_status, server.config.status_socket)
            assert doc["role"] == "relay" and doc["active_paths"] == 1
            assert doc["counters"]["drop_unbound_source"] == 1
            assert doc["counters"]["drop_bind_replayed"] == 1
            assert doc["counters"]["rebinds"] == 1
            [path] = doc["paths"]
            assert path["initiator"]["rx_packets"] == 21 and path["responder"]["tx_packets"] == 21
            assert path["responder"]["address"] == list(b.addr)
            assert "load" in doc and doc["listen"] == [list(rs4), list(rs6)]
        finally:
            for end in (a, b, attacker):
                end.close()

    run(with_relay(pki, short_dir, body))


def test_only_a_dc_certificate_may_direct_the_relay(pki: Path, short_dir: Path) -> None:
    async def noop(_conn: Any, _data: bytes) -> bytes:
        return b""

    async def body(server: RelayServer) -> None:
        host, port = server.control_addresses[0]

        async def ask(identity: str, msg: m.Message) -> m.Message:
            conn = await connect_control(
                host,
                port,
                server_name=RS_NAME,
                ca=pki / "ca.pem",
                cert=pki / f"{identity}.pem",
                key=pki / f"{identity}.key",
                handler=noop,
            )
            try:
                assert conn.peer_role == "relay"  # what the DC must check
                return m.decode(await conn.request(m.encode(msg), WAIT))
            finally:
                await conn.close()

        direction = m.RelayDirection(PID, KEY, 60)
        refused = await ask("mn1", direction)
        assert isinstance(refused, m.ErrorMessage)
        assert refused.code is m.ErrorCode.NOT_AUTHORIZED
        assert server.core.active_paths == 0
        assert server.counters["control_refused_role"] == 1
        accepted = await ask("dc1", direction)
        assert accepted == m.RelayDirectionAck(PID, active_paths=1, load=10)
        path = server.core.path(PID)
        assert path is not None and path.owner == "dc1.ntm.example.com"
        # Load probe, and a message that is not for a relay.
        probe = await ask("dc1", m.RelayDirection(bytes(8), bytes(32), 0))
        assert probe == m.RelayDirectionAck(bytes(8), active_paths=1, load=10)
        wrong = await ask("dc1", m.RouteDirectionAck(PID))
        assert isinstance(wrong, m.ErrorMessage) and wrong.code is m.ErrorCode.UNEXPECTED

    run(with_relay(pki, short_dir, body))


def test_expiry_runs_on_the_event_loop_timer(pki: Path, short_dir: Path) -> None:
    async def body(server: RelayServer) -> None:
        rs4 = server.addresses[0]
        emptied = asyncio.Event()
        on_timer = server._on_timer

        def watched() -> None:  # the server's own timer, observed
            on_timer()
            if not server.core.active_paths:
                emptied.set()

        server._on_timer = watched  # type: ignore[method-assign]
        server.core.handle_direction(m.RelayDirection(PID, KEY, 1), "dc1", time.monotonic())
        server._arm_timer()
        a = End("127.0.0.1")
        try:
            await bind(a, PathRole.INITIATOR, rs4, 1)
            await asyncio.wait_for(emptied.wait(), WAIT)
            assert server.core.counters["paths_expired_lifetime"] == 1
            a.send(data_packet(b"late"), rs4)
            a.send(
                rb.build_bind(PathRole.INITIATOR, PID, 2, rb.side_key(KEY, PathRole.INITIATOR)), rs4
            )
            doc = await asyncio.to_thread(read_status, server.config.status_socket)
            assert doc["counters"]["drop_expired_path"] == 1
            assert doc["counters"]["drop_bind_expired_path"] == 1
            assert a.nothing_waiting()
        finally:
            a.close()

    run(with_relay(pki, short_dir, body))


# --- configuration -------------------------------------------------------------------------


def write(tmp: Path, text: str) -> Path:
    p = tmp / "rs1.toml"
    p.write_text(text)
    return p


def test_config_file(pki: Path, tmp_path: Path) -> None:
    tls = f'[tls]\nca = "{pki}/ca.pem"\ncert = "{pki}/rs1.pem"\nkey = "{pki}/rs1.key"\n'
    cfg = relay_config.load(
        write(
            tmp_path,
            '[relay]\nname = "rs1"\nlisten = ["198.51.100.50", "2001:db8:100::50"]\n'
            "max_paths = 5\nidle_timeout = 30\n" + tls,
        )
    )
    assert cfg.listen == ("198.51.100.50", "2001:db8:100::50") == cfg.control_listen
    assert (cfg.port, cfg.control_port) == (7500, 4434)
    assert cfg.settings.max_paths == 5 and cfg.settings.idle_timeout == 30.0
    assert cfg.status_socket == "/run/ntm/relay-rs1.sock"
    for bad, why in [
        ('[relay]\nname = "rs1"\nlisten = ["nope"]\n' + tls, "not an IP address"),
        ('[relay]\nname = "rs1"\nport = 70000\n' + tls, "out of range"),
        ('[relay]\nname = "rs1"\nmax_pathz = 1\n' + tls, "unknown key"),
        ('[relay]\nname = "rs1"\n[control]\nport = "x"\n' + tls, "integer"),
        ('[relay]\nname = "rs1"\n[tls]\nca = "/nonexistent"\ncert = "a"\nkey = "b"\n', "ntm pki"),
    ]:
        with pytest.raises(ConfigError, match=why):
            relay_config.load(write(tmp_path, bad))


def test_the_example_config_loads(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = Path(relay_config.__file__).with_name("example.toml")
    monkeypatch.setenv("NTM_LAB_STATE", str(tmp_path))
    (tmp_path / "pki").symlink_to(pki)
    cfg = relay_config.load(example)
    assert cfg.name == "rs1" and cfg.port == 7500 and cfg.control_port == 4434
    assert cfg.control_listen == cfg.listen == ("198.51.100.50", "2001:db8:100::50")
    assert cfg.settings == RelaySettings()  # the example spells out the defaults


def test_cli_reports_a_port_in_use(pki: Path, short_dir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        toml = (
            f'[relay]\nname = "rs1"\nlisten = ["127.0.0.1"]\nport = {port}\n'
            f'status_socket = "{short_dir}/rs1.sock"\n[control]\nport = 0\n'
            f'[tls]\nca = "{pki}/ca.pem"\ncert = "{pki}/rs1.pem"\nkey = "{pki}/rs1.key"\n'
        )
        import argparse

        parser = argparse.ArgumentParser()
        relay_cli.add_arguments(parser)
        args = parser.parse_args(["--config", str(write(short_dir, toml))])
        with pytest.raises(ConfigError, match="cannot listen"):
            relay_cli.run(args)
