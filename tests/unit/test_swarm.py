"""`ntm swarm` without a lab: the shared resolver picks the identity by the query's source
address, identities start a bounded number at a time, the identities file and the status
aggregate them. Members here are fakes (a real one needs root for its TUN); the lab test
tests/integration/test_swarm.py runs real ones."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import logging
import socket
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from dnslib import CNAME, QTYPE, RR, A
from pyroute2.netlink.exceptions import NetlinkError

from ntm_io import netwatch
from ntm_io.netwatch import AddressSet
from ntm_node import daemon as daemon_module
from ntm_node import swarm_client
from ntm_node import swarm_config as swarm_config_module
from ntm_node.swarm import Swarm, SwarmMember, freeze_heap
from ntm_node.swarm_client import SwarmClientError, load_identities, resolve
from ntm_node.swarm_config import SwarmConfig, SwarmDns
from ntm_node.swarm_dns import SwarmResolver
from ntm_node.swarm_netwatch import SwarmAddressWatcher, links_to_look_up
from ntm_node.swarm_routing import PolicyRouting
from ntm_proto.marker import MarkerRule
from tests.unit.test_dns_server import FakeServer, reply_to
from tests.unit.test_swarm_config import write_config, write_pki

T = TypeVar("T")
HANG_GUARD = 10.0  # only protects the suite from a hang; never a performance claim
SERVICE = "www.example.com"
GATEWAY = "www.ntm.example.com"
DNS = ["s{0..7}.swarm.ntm.example.com"]


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, HANG_GUARD)

    return asyncio.run(bounded())


@pytest.fixture(autouse=True)
def _no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Any:
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        yield
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def upstream_answer(data: bytes, transport: str) -> list[bytes]:
    """www.example.com CNAME www.ntm.example.com (marked), A 198.51.100.60."""
    return [
        reply_to(
            data,
            RR(SERVICE, QTYPE.CNAME, rdata=CNAME(GATEWAY), ttl=60),
            RR(GATEWAY, rdata=A("198.51.100.60"), ttl=60),
        )
    ]


class Identities:
    """Fake identities behind 127.0.0.x: directions give a vIP naming who was asked."""

    def __init__(self, clients: dict[str, str]) -> None:
        self.clients = clients  # source address -> identity name
        self.calls: list[tuple[str, str]] = []
        self.gate = asyncio.Event()

    def identity_for(self, client: str) -> Any:
        name = self.clients.get(client)
        if name is None:
            return None

        async def directions(fqdn: str) -> str:
            self.calls.append((name, fqdn))
            await self.gate.wait()  # all askers are in before anyone is answered
            return f"100.64.0.{name[1:]}"

        return directions


def ask(name: str, source: str, server: tuple[str, int]) -> Coroutine[Any, Any, list[str]]:
    return asyncio.to_thread(resolve, name, source, server, 5.0)


def test_the_query_source_picks_the_identity() -> None:
    async def main() -> None:
        up = await FakeServer(upstream_answer).start()
        ids = Identities({"127.0.0.2": "s2", "127.0.0.3": "s3"})
        res = SwarmResolver(("127.0.0.1", 0), [up.address], MarkerRule(), ids.identity_for)
        await res.start()
        assert res.address is not None
        try:
            asks = [ask(SERVICE, src, res.address) for src in ("127.0.0.2", "127.0.0.3")]
            pending = asyncio.gather(*asks)
            while len(ids.calls) < 2:  # both identities asked for the same peer at once
                await asyncio.sleep(0.01)
            ids.gate.set()
            assert await pending == [["100.64.0.2"], ["100.64.0.3"]]
            # Same peer, two identities: two direction calls, none shared.
            assert sorted(ids.calls) == [("s2", GATEWAY), ("s3", GATEWAY)]
            assert res.counters["direction_calls"] == 2
            assert res.counters["direction_shared"] == 0
            # Not an identity: the ordinary answer, counted.
            assert await ask(SERVICE, "127.0.0.1", res.address) == ["198.51.100.60"]
            assert res.counters["not_from_identity"] == 1
            assert res.counters["fallbacks"] == 1
            assert res.counters["intercepted"] == 2
        finally:
            await res.close()
            await up.close()

    run(main())


def test_tcp_queries_are_attributed_too() -> None:
    async def main() -> None:
        up = await FakeServer(upstream_answer).start()
        ids = Identities({"127.0.0.4": "s4"})
        ids.gate.set()
        res = SwarmResolver(("127.0.0.1", 0), [up.address], MarkerRule(), ids.identity_for)
        await res.start()
        assert res.address is not None
        try:
            from dnslib import DNSRecord

            q = DNSRecord.question(SERVICE, "A")
            reader, writer = await asyncio.open_connection(
                *res.address, local_addr=("127.0.0.4", 0)
            )
            wire = q.pack()
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            reply = DNSRecord.parse(await reader.readexactly(size))
            writer.close()
            await writer.wait_closed()
            assert [str(rr.rdata) for rr in reply.rr if rr.rtype == 1] == ["100.64.0.4"]
            assert ids.calls == [("s4", GATEWAY)]
        finally:
            await res.close()
            await up.close()

    run(main())


# --- the swarm with fake members ---------------------------------------------------------


def swarm_config(tmp: Path, count: int, concurrency: int) -> SwarmConfig:
    node = SimpleNamespace(mark="ntm")
    return SwarmConfig(
        name="mn2",
        fqdn_template="s{i}.swarm.ntm.example.com",
        first=5,
        count=count,
        tunnel_port=7400,
        tun_prefix="ntms",
        route_table=1000,
        rule_priority=1000,
        start_concurrency=concurrency,
        start_timeout=5.0,
        key_dir=str(tmp / "keys"),
        status_socket=str(tmp / "mn2.sock"),
        identities_file=str(tmp / "mn2" / "ids.json"),
        dns=SwarmDns(("127.0.0.53", 53), ("198.51.100.11",), 3.0, 2.0),
        node=node,  # type: ignore[arg-type]
    )


class FakeMember:
    """What the swarm uses of a SwarmMember; registration takes a few loop turns."""

    running = 0
    most = 0

    def __init__(
        self,
        config: Any,
        *,
        index: int,
        table: int,
        priority: int,
        swarm_ifaces: tuple[str, ...],
        addresses: Any,
        routing: Any,
        on_ready: Any,
    ) -> None:
        self.config = config
        self.index = index
        self.table = table
        self.on_ready = on_ready
        self.swarm_ifaces = swarm_ifaces
        self.ready = asyncio.Event()
        self.ready_after: float | None = None
        self.policy = None
        self.addresses = None
        self.moves: list[Any] = []
        self.engine = SimpleNamespace(
            local_vip=None,
            counters={"tun_dropped_no_path": 1},
            endpoint=SimpleNamespace(counters={"rx": index}),
        )
        self.dc = SimpleNamespace(
            registered=asyncio.Event(), counters={"registrations": 1}, last_error=None
        )
        self.closed = False

    async def start(self) -> None:
        FakeMember.running += 1
        FakeMember.most = max(FakeMember.most, FakeMember.running)
        self._task = asyncio.get_running_loop().create_task(self._register())

    async def _register(self) -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        FakeMember.running -= 1
        self.engine.local_vip = f"100.64.1.{self.index}"
        self.dc.registered.set()
        self.ready_after = 0.01
        self.ready.set()
        self.on_ready(self)

    def directions(self, fqdn: str) -> Any:
        raise AssertionError("not used here")

    def host_addresses_changed(self, addresses: Any) -> None:
        self.moves.append(addresses)

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "fqdn": self.config.fqdn,
            "vip": self.engine.local_vip,
            "registered": self.dc.registered.is_set(),
            "paths": 2,
            "established": 1,
        }

    async def close(self) -> None:
        self.closed = True


def test_identities_start_a_bounded_number_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = swarm_config(tmp_path, count=12, concurrency=4)
    identity = SimpleNamespace  # the fake member only reads fqdn and tun_name
    monkeypatch.setattr(
        SwarmConfig,
        "identity",
        lambda self, k: identity(fqdn=self.fqdn(self.first + k), tun_name=f"ntms{self.first + k}"),
    )
    FakeMember.running = FakeMember.most = 0

    async def main() -> Swarm:
        swarm = Swarm(cfg)
        swarm.member_class = FakeMember  # type: ignore[assignment]
        await swarm._start_members()
        return swarm

    swarm = run(main())
    assert FakeMember.most == 4  # never more than start_concurrency registering at once
    assert len(swarm.members) == 12
    m0 = swarm.members[0]
    assert isinstance(m0, FakeMember)
    assert (m0.index, m0.table, m0.swarm_ifaces[0], m0.swarm_ifaces[-1]) == (
        5,
        1000,
        "ntms5",
        "ntms16",
    )
    # Every vIP maps to its identity (the resolver asks this).
    assert swarm.identity_for("100.64.1.7") is not None
    assert swarm.identity_for("100.64.1.99") is None

    doc = json.loads(Path(cfg.identities_file).read_text())
    assert doc["complete"] is True and doc["dns"] == "127.0.0.53:53"
    assert [i["fqdn"] for i in doc["identities"]] == [
        f"s{n}.swarm.ntm.example.com" for n in range(5, 17)
    ]
    assert len({i["vip"] for i in doc["identities"]}) == 12
    assert {i["status"] for i in doc["identities"]} == {"registered"}

    st = swarm.status()
    assert st["role"] == "swarm" and st["registered"] == 12 and st["ready"] is True
    assert st["totals"]["paths"] == 24 and st["totals"]["established"] == 12
    assert st["totals"]["counters"]["dc"] == {"registrations": 12}
    assert st["totals"]["counters"]["tunnel"] == {"rx": sum(range(5, 17))}
    assert st["memory"]["rss_kb"] > 0 and st["startup"]["all_done_s"] is not None
    # One set of DC connection slots for all: a move reconnects them a few at a time.
    assert all(m.dc.connect_slots is swarm.connect_slots for m in swarm.members.values())
    json.dumps(st)  # the status socket sends it as JSON

    # A move reaches every identity.
    swarm._addresses_changed("moved")  # type: ignore[arg-type]
    assert all(m.moves == ["moved"] for m in swarm.members.values())  # type: ignore[attr-defined]

    # A changed vIP (the DC lost the assignment) rewrites the file and the map.
    m0.engine.local_vip = "100.64.2.5"
    swarm._member_ready(m0)  # type: ignore[arg-type]
    assert swarm.identity_for("100.64.1.5") is None and swarm.identity_for("100.64.2.5")
    assert load_identities(cfg.identities_file).identities[0].vip == "100.64.2.5"


def test_identities_file_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "ids.json"
    path.write_text(
        json.dumps(
            {
                "swarm": "mn2",
                "dns": "127.0.0.53:53",
                "count": 2,
                "complete": False,
                "identities": [
                    {"index": 0, "fqdn": "s0.x", "vip": "100.64.0.9", "tun": "ntms0"},
                    {"index": 1, "fqdn": "s1.x", "vip": None, "tun": "ntms1"},
                ],
            }
        )
    )
    ids = load_identities(path)
    assert ids.dns == ("127.0.0.53", 53) and not ids.complete
    assert ids.identities == (swarm_client.Identity(0, "s0.x", "100.64.0.9", "ntms0"),)
    with pytest.raises(SwarmClientError, match="no identities file yet"):
        load_identities(tmp_path / "missing.json")
    path.write_text("{}")
    with pytest.raises(SwarmClientError, match="not an identities file"):
        load_identities(path)


def test_a_member_is_a_node_daemon_with_the_swarms_addresses(tmp_path: Path) -> None:
    cfg = swarm_config_module.load(write_config(tmp_path, write_pki(tmp_path / "pki", DNS)))
    known = AddressSet(ipv4=("192.0.2.9",))

    async def main() -> SwarmMember:
        return SwarmMember(
            cfg.identity(3),
            index=3,
            table=1003,
            priority=1000,
            swarm_ifaces=("ntms0", "ntms3"),
            addresses=known,
            routing=PolicyRouting(),
            on_ready=lambda m: None,
        )

    member = run(main())
    assert member.addresses == known  # given, not dumped again per identity
    assert daemon_module.current_addresses is netwatch.current_addresses  # restored
    assert member.config.fqdn == "s3.swarm.ntm.example.com"
    assert member.engine.port == 7403
    assert Path(member.config.key_file).is_file()  # its own static key
    # No identity offers another identity's vIP (on its TUN) to the DC as an endpoint.
    assert member.ignored_interfaces() == ("ntms0", "ntms3")
    # Quiet paths are not probed ([swarm] probe_idle_paths = false): the engine reports
    # the data it seals to failover instead.
    assert member.failover.probe_idle is False
    assert member.engine.send_listeners == [member.failover._on_data_sent]
    # Its line in the swarm's status is read from the parts, not from a full node status.
    member.status = None  # type: ignore[assignment]
    assert member.summary() == {
        "index": 3,
        "fqdn": "s3.swarm.ntm.example.com",
        "vip": None,
        "tun": "ntms3",
        "tunnel_port": 7403,
        "registered": False,
        "paths": 0,
        "established": 0,
        "dc_error": None,
        "failover": {"gateways": {}, "probes_sent": 0},
    }


# --- the swarm's address watcher ----------------------------------------------------------


class FakeIpr:
    """AsyncIPRoute's dumps and gets over fixed messages; records the links asked for."""

    def __init__(self, addrs: list[dict[str, Any]], links: dict[int, dict[str, Any]]) -> None:
        self.addrs = addrs
        self.links = links
        self.routes = [
            {"dst_len": 0, "type": 1, "family": socket.AF_INET, "table": 254, "flags": 0,
             "RTA_OIF": 2},
        ]  # fmt: skip
        self.asked: list[int] = []

    async def addr(self, what: str) -> AsyncIterator[dict[str, Any]]:
        assert what == "dump"
        return _aiter(self.addrs)

    async def link(self, what: str, *, index: int) -> list[dict[str, Any]]:
        assert what == "get"
        self.asked.append(index)
        if index not in self.links:
            raise NetlinkError(errno.ENODEV)
        return [self.links[index]]

    async def route(self, what: str) -> AsyncIterator[dict[str, Any]]:
        return _aiter(self.routes)


async def _aiter(items: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for item in items:
        yield item


def addr(index: int, local: str, label: str | None, scope: int = 0) -> dict[str, Any]:
    msg: dict[str, Any] = {"index": index, "scope": scope, "flags": 0, "IFA_ADDRESS": local}
    if label is not None:  # the kernel labels IPv4 addresses with their interface
        msg["IFA_LABEL"] = label
    return msg


def test_the_swarm_watcher_never_looks_up_a_swarm_tun() -> None:
    tuns = [f"ntms{k}" for k in range(50)]
    up = netwatch.IFF_UP | netwatch.IFF_RUNNING
    ipr = FakeIpr(
        [
            addr(1, "127.0.0.1", "lo", scope=254),
            addr(2, "10.10.1.101", "access-a"),
            addr(2, "2001:db8:b::101", None),
            *(addr(10 + k, f"100.64.0.{k + 1}", tun) for k, tun in enumerate(tuns)),
            addr(99, "192.0.2.99", "gone0"),  # its link vanished since the address dump
        ],
        {
            1: {"index": 1, "flags": up | netwatch.IFF_LOOPBACK, "IFLA_IFNAME": "lo"},
            2: {"index": 2, "flags": up, "IFLA_IFNAME": "access-a"},
        },
    )
    watcher = SwarmAddressWatcher(lambda a: None, ignore_ifaces=tuns)
    watcher._ipr = ipr
    found = run(watcher._dump())
    assert found == AddressSet(
        ipv4=("10.10.1.101",), ipv6=("2001:db8:b::101",), has_default_route_v4=True
    )
    assert ipr.asked == [1, 2, 99]  # no TUN among them
    assert links_to_look_up(ipr.addrs, frozenset(tuns)) == [1, 2, 99]


def test_freeze_heap_keeps_the_start_up_heap_out_of_collections() -> None:
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
