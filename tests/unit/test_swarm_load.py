"""What keeps a swarm's move cheap outside the swarm's own modules: DC connections wait for
a shared slot, a move abandons the old connection instead of closing it politely, the DC
rewrites its state file only when a vIP assignment changed; and `[node] probe_idle_paths`."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dc.config import DcConfig, TlsConfig
from dc.server import DcServer
from ntm_io.netwatch import AddressSet
from ntm_node import dc_client
from ntm_node import swarm_config as swarm_config_module
from ntm_node.config import NodeConfig
from ntm_node.dc_client import DcClient
from tests.unit.test_failover import mn1_with, state  # noqa: F401  (state is a fixture)
from tests.unit.test_swarm_config import write_config, write_pki

DNS = ["s{0..7}.swarm.ntm.example.com"]
HANG_GUARD = 10.0  # only protects the suite from a hang; never a performance claim
HERE = AddressSet(ipv4=("10.10.1.101",))


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, HANG_GUARD))


@pytest.fixture
def identities(tmp_path: Path) -> list[NodeConfig]:
    cfg = swarm_config_module.load(write_config(tmp_path, write_pki(tmp_path / "pki", DNS)))
    return [cfg.identity(k) for k in range(cfg.count)]


def client(config: NodeConfig) -> DcClient:
    async def no_push(_rd: Any) -> Any:
        raise AssertionError("no pushes here")

    return DcClient(config, bytes(32), lambda: HERE, no_push, lambda _resp: None)


def test_dc_connections_wait_for_a_shared_slot(
    identities: list[NodeConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    running = most = 0

    async def connect(*_args: Any, **_kwargs: Any) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        for _ in range(5):  # a handshake takes a few loop turns
            await asyncio.sleep(0)
        running -= 1
        return SimpleNamespace(closed=asyncio.Event())

    monkeypatch.setattr(dc_client, "connect_control", connect)

    async def main() -> None:
        slots = asyncio.Semaphore(3)
        clients = [client(c) for c in identities]
        for c in clients:
            c.connect_slots = slots
        await asyncio.gather(*(c._connect(HERE) for c in clients))
        alone = client(identities[0])  # no slots: a single node connects at once
        await alone._connect(HERE)

    run(main())
    assert most == 3


def test_a_move_abandons_the_old_connection_without_a_polite_close(
    identities: list[NodeConfig],
) -> None:
    class Conn:
        def __init__(self) -> None:
            self.closed = asyncio.Event()
            self.aborted = self.close_awaited = False

        def abort(self) -> None:
            self.aborted = True
            self.closed.set()

        async def close(self) -> None:
            self.close_awaited = True

    class Reconnecting(Exception):
        pass

    async def main() -> tuple[DcClient, Conn]:
        c = client(identities[0])
        old = Conn()
        c.conn = old  # type: ignore[assignment]
        c.registration = SimpleNamespace(lifetime=300)  # type: ignore[assignment]
        c.registered.set()

        async def connect_and_register() -> None:
            raise Reconnecting

        c._connect_and_register = connect_and_register  # type: ignore[method-assign]
        task = asyncio.get_running_loop().create_task(c._stay_registered())
        await asyncio.sleep(0)
        c.addresses_changed()  # the host moved
        with pytest.raises(Reconnecting):
            await task
        return c, old

    c, old = run(main())
    assert old.aborted and not old.close_awaited
    assert c.conn is None and not c.registered.is_set()


def test_the_dc_rewrites_its_state_file_only_when_a_vip_changes(tmp_path: Path) -> None:
    state_file = tmp_path / "dc1.json"
    cfg = DcConfig(
        name="dc1",
        zone="ntm.example.com",
        listen=("127.0.0.1",),
        quic_port=4433,
        dns_port=0,
        vip_pool=ipaddress.IPv4Network("100.64.0.0/16"),
        vip_route=ipaddress.IPv4Network("100.64.0.0/10"),
        ns_name="dc1.ntm.example.com",
        ns_addresses=("127.0.0.1",),
        registration_lifetime=300,
        status_socket=str(tmp_path / "dc1.sock"),
        state_file=str(state_file),
        tls=TlsConfig(str(tmp_path / "ca.pem"), str(tmp_path / "d.pem"), str(tmp_path / "d.key")),
        federation=None,
    )

    async def main() -> None:
        server = DcServer(cfg)
        vip = server.registry.pool.allocate("s0.swarm.ntm.example.com")
        server._save_state()
        assert vip in state_file.read_text()
        state_file.write_text("untouched")
        for _ in range(3):  # re-registrations (a swarm's move): same assignments
            server._save_state()
        assert state_file.read_text() == "untouched"
        server.registry.pool.allocate("s1.swarm.ntm.example.com")
        server._save_state()
        assert "s1.swarm.ntm.example.com" in state_file.read_text()

    run(main())


def test_node_probes_idle_paths_unless_told_not_to(state: Path) -> None:  # noqa: F811
    from ntm_node import config as node_config

    assert node_config.load(mn1_with(state, "")).probe_idle_paths is True
    cfg = node_config.load(mn1_with(state, "probe_idle_paths = false"))
    assert cfg.probe_idle_paths is False
