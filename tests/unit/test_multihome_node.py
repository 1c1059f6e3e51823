"""The node side of make-before-break: config, `ntm node --prefer`, and the engine plus
`MultihomeManager` over loopback (two MN uplinks 127.0.0.3 / 127.0.0.4, one gateway)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from ntm_cli.main import main
from ntm_io.config import ConfigError
from ntm_io.netwatch import AddressSet
from ntm_io.status import AdminError
from ntm_node import config as node_config
from ntm_node.engine import TunnelEngine
from ntm_node.multihome import MultihomeManager
from ntm_node.multihome_client import last_switch_to, paths_on
from ntm_proto.crypto import StaticKey
from ntm_proto.messages import Endpoint, PathRole
from ntm_proto.multihome import MultihomePolicy
from ntm_proto.path import StandbyProbeResult
from tests.unit.test_engine_uplinks import GW_VIP, MN_VIP, FakeTun, direction, free_port, until

LAB = Path(__file__).resolve().parents[2] / "lab" / "config"
UP1, UP2 = "127.0.0.3", "127.0.0.4"


@pytest.fixture()
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pki = tmp_path / "pki"
    pki.mkdir()
    for name in ("ca.pem", "mn3.pem", "mn3.key"):
        (pki / name).write_text("placeholder")
    monkeypatch.setenv("NTM_LAB_STATE", str(tmp_path))
    return tmp_path


def mn3_edited(state: Path, old: str, new: str) -> Path:
    text = (LAB / "mn3.toml").read_text()
    assert old in text, old
    out = state / "mn3.toml"
    out.write_text(text.replace(old, new))
    return out


def test_lab_mn3_config_loads(state: Path) -> None:
    cfg = node_config.load(LAB / "mn3.toml")
    assert cfg.make_before_break and cfg.standby_interval == 0.5
    assert cfg.tunnel_addresses == ("10.10.1.103", "2001:db8:b::103")


@pytest.mark.parametrize(
    "old,new,expect",
    [
        (
            'tunnel_addresses = ["10.10.1.103", "2001:db8:b::103"]',
            'tunnel_addresses = ["10.10.1.103"]',
            "needs two or more tunnel_addresses",
        ),
        ("standby_interval = 0.5", "standby_interval = 20", "would lose its NAT binding"),
        ("standby_interval = 0.5", "standby_interval = 0", "must be at least 0.05"),
    ],
)
def test_mn3_config_errors(state: Path, old: str, new: str, expect: str) -> None:
    with pytest.raises(ConfigError) as exc:
        node_config.load(mn3_edited(state, old, new))
    assert expect in str(exc.value)


def test_prefer_needs_a_socket_and_says_when_nobody_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["node", "--prefer", "access-b"]) == 2
    assert "--prefer needs --socket" in capsys.readouterr().err
    sock = str(tmp_path / "mn3.sock")
    assert main(["node", "--prefer", "access-b", "--socket", sock]) == 1
    assert "no daemon takes admin requests" in capsys.readouterr().err
    assert main(["node"]) == 2
    assert "needs --config" in capsys.readouterr().err


def test_status_readers() -> None:
    doc = {
        "multihome": {
            "paths": [{"local": UP2}, {"local": UP2}],
            "events": [{"to": UP2, "at": 1.5}, {"to": UP1, "at": 2.0}, {"to": UP2, "at": 3.0}],
        }
    }
    assert paths_on(doc, UP2) == 2 and paths_on(doc, UP1) is None
    assert paths_on({"multihome": None}, UP1) is None
    assert last_switch_to(doc, UP2) == 3.0 and last_switch_to({}, UP2) is None


async def _two_uplinks_make_before_break() -> None:
    mn_key, gw_key = StaticKey.generate(), StaticKey.generate()
    port = free_port()
    mn = TunnelEngine(mn_key, 0, addresses=(UP1, UP2))
    gw = TunnelEngine(gw_key, port)
    policy = MultihomePolicy([UP1, UP2], interval=0.05)
    policy.set_available({UP1: "wlan0", UP2: "lte0"})
    manager = MultihomeManager(mn, policy)
    try:
        for engine, vip in ((mn, MN_VIP), (gw, GW_VIP)):
            engine.open()
            engine.attach_tun(FakeTun(), vip)
        pid = os.urandom(8)
        to_gw: Endpoint = ("127.0.0.1", port)
        gw.add_path(direction(pid, PathRole.RESPONDER, MN_VIP, mn_key, ()))
        path = mn.add_path(direction(pid, PathRole.INITIATOR, GW_VIP, gw_key, (to_gw,)))
        await mn.wait_established(pid, 5.0)
        gw_path = gw.endpoint.path(pid)
        assert gw_path is not None and path.peer_address == to_gw
        mn_ports = {a: s.getsockname()[1] for a, s in mn._by_address.items()}

        def gw_sees() -> str | None:
            peer = gw_path.peer_address
            return None if peer is None else peer[0]

        def standby_answers() -> int:
            return manager.counters.get("standby_answered", 0)

        # The first leg carries the path; the second is probed and answers, and the
        # gateway does not follow the probes.
        manager.tick()
        assert mn.local_address_of(pid) == UP1 and gw_sees() == UP1
        await until(lambda: standby_answers() > 0, "a standby answer on lte0")
        assert gw_sees() == UP1 and mn.counters["standby_probes"] >= 1

        # Prefer lte0: it is ready, so the path moves at once and the gateway follows.
        reply = manager.prefer({"uplink": "lte0"})
        assert reply["address"] == UP2
        assert mn.local_address_of(pid) == UP2
        await until(lambda: gw_sees() == UP2, "the gateway to follow to lte0")
        assert gw_path.peer_address == (UP2, mn_ports[UP2])
        assert manager.status()["paths"][0]["local"] == UP2

        # lte0 goes away (netlink): back to wlan0 at once, no new path needed.
        covered = manager.addresses_changed(AddressSet(ipv4=(UP1,), interfaces=((UP1, "wlan0"),)))
        assert covered and mn.local_address_of(pid) == UP1
        await until(lambda: gw_sees() == UP1, "the gateway to follow back to wlan0")
        reasons = [e["reason"] for e in manager.events]
        assert reasons == ["preferred", "lost"]
        assert mn.endpoint.path(pid) is path  # the same path throughout

        with pytest.raises(AdminError, match="not one of this node's tunnel addresses"):
            manager.prefer({"uplink": "eth9"})
        with pytest.raises(AdminError, match='needs "uplink"'):
            manager.prefer({})
    finally:
        mn.close()
        gw.close()


def test_engine_and_manager_move_a_path_between_two_uplinks() -> None:
    asyncio.run(_two_uplinks_make_before_break())


def test_the_netlink_view_names_the_interface_of_each_usable_address() -> None:
    from ntm_io.netwatch import build_address_set

    up = 0x1 | 0x40
    links = [
        {"index": 2, "flags": up, "IFLA_IFNAME": "access-a"},
        {"index": 3, "flags": up, "IFLA_IFNAME": "access-b"},
        {"index": 4, "flags": 0x1, "IFLA_IFNAME": "wlan0"},  # no carrier: not usable
    ]
    addrs = [
        {"family": 2, "index": 2, "scope": 0, "flags": 0x80, "IFA_ADDRESS": "10.10.1.103"},
        {"family": 10, "index": 3, "scope": 0, "flags": 0x80, "IFA_ADDRESS": "2001:db8:b::103"},
        {"family": 2, "index": 4, "scope": 0, "flags": 0x80, "IFA_ADDRESS": "192.168.1.5"},
    ]
    got = build_address_set(links, addrs, [], ())
    assert got.interface_of() == {"10.10.1.103": "access-a", "2001:db8:b::103": "access-b"}
    # Interface names are not part of the comparison: only addresses are changes.
    assert got == AddressSet(ipv4=("10.10.1.103",), ipv6=("2001:db8:b::103",))


async def _split_access_gateway_answers_a_standby_probe_by_its_uplink() -> None:
    mn_key, gw_key = StaticKey.generate(), StaticKey.generate()
    port = free_port()
    mn = TunnelEngine(mn_key, 0)
    gw = TunnelEngine(gw_key, port, addresses=("127.0.0.1", "127.0.0.2"))
    answers: list[StandbyProbeResult] = []
    mn.standby_listeners.append(lambda _pid, r: answers.append(r))
    try:
        for engine, vip in ((mn, MN_VIP), (gw, GW_VIP)):
            engine.open()
            engine.attach_tun(FakeTun(), vip)
        pid = os.urandom(8)
        up1: Endpoint = ("127.0.0.1", port)
        up2: Endpoint = ("127.0.0.2", port)
        gw.add_path(direction(pid, PathRole.RESPONDER, MN_VIP, mn_key, ()))
        path = mn.add_path(direction(pid, PathRole.INITIATOR, GW_VIP, gw_key, (up1,)))
        await mn.wait_established(pid, 5.0)
        await until(lambda: gw.status()[0]["local_address"] == "127.0.0.1", "gw pins uplink 1")
        probe = path.standby_probe(time.monotonic(), up2)
        assert probe is not None
        mn._socks[socket.AF_INET].sendto(probe[1], up2)
        await until(lambda: bool(answers), "the standby answer")
        assert answers[0].peer == up2  # from the uplink it reached, not the pinned one
        assert gw.status()[0]["local_address"] == "127.0.0.1"  # and the pin did not move
        assert path.peer_address == up1
    finally:
        mn.close()
        gw.close()


def test_a_split_access_gateway_answers_a_standby_probe_by_the_uplink_it_came_to() -> None:
    asyncio.run(_split_access_gateway_answers_a_standby_probe_by_its_uplink())
