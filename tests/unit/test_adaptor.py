"""The NTMA (`ntm adaptor`) without root: config, forwarding rules, claim tracking, and the
engine's inner-address check that keeps MNs from spoofing through it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import socket
import struct
import time
from pathlib import Path

import pytest

from adaptor import config as adaptor_config
from adaptor.claims import ClaimSender, ClaimTracker
from adaptor.config import AdaptorConfig, ClaimsConfig, Forward, parse_forward
from adaptor.daemon import send_probes
from adaptor.forwarding import ruleset
from adaptor.quality import ProbeQuality, Quality
from lb_integration.claims import ClaimBook, Code, RouteClaim, RouteClaimAck
from lb_integration.routes import ClaimService
from ntm_io.config import ConfigError
from ntm_io.control import serve_control
from ntm_node.engine import TunnelEngine
from ntm_pki import ca
from ntm_proto.crypto import StaticKey
from ntm_proto.messages import Endpoint, PathRole, RouteDirection, RouteKind

REPO = Path(__file__).resolve().parents[2]

# --- config --------------------------------------------------------------------------------


def write_config(tmp: Path, extra: str = "", adaptor: str | None = None) -> Path:
    for name in ("ca.pem", "a.pem", "a.key"):
        (tmp / name).write_text("x")
    adaptor_table = (
        adaptor
        if adaptor is not None
        else """
[adaptor]
service_interface = "dmz"
next_hop = "10.30.0.2"
lb_address = "10.30.0.100"
forward = ["tcp/80", "udp/9000"]
public_addresses = ["198.51.100.60"]
public_forward = ["tcp/80"]
"""
    )
    path = tmp / "a.toml"
    path.write_text(
        f"""
[node]
name = "ntma9"
fqdn = "www.ntm.example.com"
[dc]
addresses = ["198.51.100.20"]
server_name = "dc1.ntm.example.com"
[dns]
enabled = false
[tls]
ca = "{tmp}/ca.pem"
cert = "{tmp}/a.pem"
key = "{tmp}/a.key"
{adaptor_table}
{extra}
"""
    )
    return path


def test_config_loads_and_defaults(tmp_path: Path) -> None:
    cfg = adaptor_config.load(write_config(tmp_path))
    assert cfg.node.fqdn == "www.ntm.example.com"
    assert cfg.forward == (Forward("tcp", 80), Forward("udp", 9000))
    assert cfg.public_forward == (Forward("tcp", 80),)
    assert cfg.nft_table == "ntm_adaptor_ntma9"
    assert cfg.claims is None
    assert (cfg.gateway, cfg.weight, cfg.report_interval) == ("", 100, 5.0)


GATEWAY_BASE = (
    '[adaptor]\nservice_interface = "dmz"\nnext_hop = "10.30.0.2"\n'
    'lb_address = "10.30.0.100"\nforward = ["tcp/80"]\n'
)


def test_gateway_settings(tmp_path: Path) -> None:
    table = GATEWAY_BASE + 'gateway = "NTMA1.ntm.example.com."\nweight = 0\nreport_interval = 2\n'
    cfg = adaptor_config.load(write_config(tmp_path, adaptor=table))
    assert (cfg.gateway, cfg.weight, cfg.report_interval) == ("ntma1.ntm.example.com", 0, 2.0)


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ('gateway = "www.ntm.example.com"', "is the service name"),
        ('gateway = "ntma 1.example.com"', "not a valid name"),
        ("gateway = 5", "not a string"),
        ("weight = 65536", "out of range"),
        ("weight = -1", "out of range"),
        ("report_interval = 0.1", "at least 0.5"),
        ("report_interval = 7200", "stale"),
    ],
)
def test_gateway_setting_errors(tmp_path: Path, setting: str, match: str) -> None:
    path = write_config(tmp_path, adaptor=GATEWAY_BASE + setting + "\n")
    with pytest.raises(ConfigError, match=match):
        adaptor_config.load(path)


def test_claims_table(tmp_path: Path) -> None:
    extra = '[claims]\nagent = "10.30.0.10"\nserver_name = "lb.dmz.example.com"\nlifetime = 30\n'
    cfg = adaptor_config.load(write_config(tmp_path, extra))
    assert cfg.claims is not None
    assert (cfg.claims.port, cfg.claims.lifetime, cfg.claims.refresh) == (4434, 30, 10.0)


@pytest.mark.parametrize(
    ("extra", "adaptor", "match"),
    [
        ("", None, None),
        ("[extra]\n", None, "unknown table"),
        (
            '[claims]\nagent = "10.30.0.10"\nserver_name = "x"\nlifetime = 30\nrefresh = 30\n',
            None,
            "must be below lifetime",
        ),
        (
            "",
            '[adaptor]\nservice_interface = "dmz"\nnext_hop = "10.30.0.2"\n'
            'lb_address = "10.30.0.100"\nforward = ["http/80"]\n',
            "not a forward",
        ),
        (
            "",
            '[adaptor]\nservice_interface = "dmz"\nnext_hop = "10.30.0.2"\n'
            'lb_address = "10.30.0.100"\nforward = ["tcp/80"]\n'
            'public_addresses = ["2001:db8::1"]\npublic_forward = ["tcp/80"]\n',
            "IPv6",
        ),
        (
            "",
            '[adaptor]\nservice_interface = "ntm0"\nnext_hop = "10.30.0.2"\n'
            'lb_address = "10.30.0.100"\nforward = ["tcp/80"]\n',
            "not the TUN",
        ),
        (
            "",
            '[adaptor]\nservice_interface = "dmz"\nnext_hop = "10.30.0.2"\n'
            'lb_address = "10.30.0.100"\nforward = ["tcp/80"]\npublic_forward = ["tcp/80"]\n',
            "needs public_addresses",
        ),
    ],
)
def test_config_errors_say_what_to_do(
    tmp_path: Path, extra: str, adaptor: str | None, match: str | None
) -> None:
    path = write_config(tmp_path, extra, adaptor)
    if match is None:
        adaptor_config.load(path)
        return
    with pytest.raises(ConfigError, match=match):
        adaptor_config.load(path)


def test_dns_interception_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text(
        path.read_text().replace("enabled = false", 'enabled = true\nupstreams = ["192.0.2.1"]')
    )
    with pytest.raises(ConfigError, match="enabled = false"):
        adaptor_config.load(path)


def test_forward_parsing() -> None:
    assert parse_forward([" TCP/443 ", "udp/53"], "x") == (Forward("tcp", 443), Forward("udp", 53))
    for bad in (["tcp/0"], ["tcp/65536"], ["tcp"], ["tcp/80", "tcp/80"]):
        with pytest.raises(ConfigError):
            parse_forward(bad, "x")


def test_lab_config_is_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    for name in ("ca.pem", "ntma1.pem", "ntma1.key"):
        (pki / name).write_text("x")
    monkeypatch.setenv("NTM_LAB_STATE", str(tmp_path))
    cfg = adaptor_config.load(REPO / "lab" / "config" / "ntma1.toml")
    assert cfg.node.fqdn == "www.ntm.example.com"
    assert cfg.claims is not None and cfg.claims.server_name == "lb.dmz.example.com"


# --- forwarding rules ----------------------------------------------------------------------


def _cfg(tmp_path: Path) -> AdaptorConfig:
    return adaptor_config.load(write_config(tmp_path))


def test_ruleset_dnats_tunnel_and_public_traffic_and_never_snats(tmp_path: Path) -> None:
    rules = ruleset(_cfg(tmp_path), "100.64.1.2")
    assert rules.index("delete table ip ntm_adaptor_ntma9") < rules.index("chain prerouting")
    assert 'iifname "ntm0" ip daddr 100.64.1.2 tcp dport 80 counter dnat to 10.30.0.100:80' in rules
    assert "ip daddr 100.64.1.2 udp dport 9000 counter dnat to 10.30.0.100:9000" in rules
    assert 'iifname != "ntm0" ip daddr 198.51.100.60 tcp dport 80 counter dnat to' in rules
    # The only source rewrite is toward the tunnels (the inverse of our own DNAT, for flows
    # adopted from another gateway): what reaches the LB keeps the client's address.
    snats = [line.strip() for line in rules.splitlines() if "snat" in line]
    assert snats == [
        'oifname "ntm0" ip saddr 10.30.0.100 tcp sport 80 counter snat to 100.64.1.2:80 '
        'comment "adopted tcp/80"',
        'oifname "ntm0" ip saddr 10.30.0.100 udp sport 9000 counter snat to 100.64.1.2:9000 '
        'comment "adopted udp/9000"',
    ]
    assert "masquerade" not in rules
    # only DNATed flows (and their replies) are forwarded
    assert "type filter hook forward priority filter; policy drop;" in rules
    assert "ct state established,related accept" in rules
    # ... and what the service sends toward a tunnel first, after a failover
    assert (
        'iifname "dmz" oifname "ntm0" ip saddr 10.30.0.100 tcp sport 80 ct state new accept'
        in rules
    )


# --- claims --------------------------------------------------------------------------------

P1, P2 = b"\x01" * 8, b"\x02" * 8
VIP = "100.64.0.7"


def ok(vip: str = VIP) -> RouteClaimAck:
    return RouteClaimAck(vip, Code.OK, "", 60)


def test_claim_when_a_tunnel_appears_refresh_while_it_lives_withdraw_when_gone() -> None:
    t = ClaimTracker("10.30.0.2", lifetime=60, refresh=20, retry=2)
    [c] = t.update({VIP: P1}, now=100.0, wall_ms=5000)
    assert (c.vip, c.next_hop, c.claim_time, c.lifetime, c.withdraw) == (
        VIP,
        "10.30.0.2",
        5000,
        60,
        False,
    )
    t.result(c, ok(), 100.0)
    assert t.update({VIP: P1}, 110.0, 15000) == []  # nothing until the refresh is due
    [r] = t.update({VIP: P1}, 120.0, 25000)
    assert r.claim_time == 5000 and not r.withdraw  # a refresh keeps the takeover time
    t.result(r, ok(), 120.0)
    [w] = t.update({}, 121.0, 26000)
    assert w.withdraw and w.claim_time == 5000
    t.result(w, ok(), 121.0)
    assert t.held == {} and t.counters == {"acked": 2, "withdrawn": 1}


def test_no_answer_is_retried_sooner_than_a_refresh() -> None:
    t = ClaimTracker("10.30.0.2", 60, 20, 2)
    [c] = t.update({VIP: P1}, 0.0, 1000)
    t.result(c, None, 0.0)
    assert t.update({VIP: P1}, 1.0, 2000) == []
    [again] = t.update({VIP: P1}, 2.0, 3000)
    assert again.claim_time == c.claim_time
    t.result(again, ok(), 2.0)
    assert t.status(2.0)[0]["acked"] is True
    assert t.update({VIP: P1}, 5.0, 6000) == []


def test_a_new_tunnel_is_a_new_takeover_with_a_newer_time() -> None:
    t = ClaimTracker("10.30.0.2", 60, 20, 2)
    [c1] = t.update({VIP: P1}, 0.0, 1000)
    [c2] = t.update({VIP: P2}, 0.1, 1000)  # same wall ms: still strictly newer
    assert c2.claim_time > c1.claim_time and not c2.withdraw


def test_a_newer_claim_elsewhere_silences_us_until_our_next_tunnel() -> None:
    t = ClaimTracker("10.30.0.2", 60, 20, 2)
    [c] = t.update({VIP: P1}, 0.0, 1000)
    t.result(c, RouteClaimAck(VIP, Code.STALE, "held by ntma2"), 0.0)
    assert t.update({VIP: P1}, 100.0, 99000) == []  # no flapping back
    assert t.update({}, 101.0, 99100) == []  # and nothing to withdraw: we do not hold it
    [c2] = t.update({VIP: P2}, 102.0, 99200)
    assert c2.claim_time == 99200


# --- the engine drops inner packets with a spoofed source -------------------------------------


class FakeTun:
    """A PacketDevice: inject() queues a packet for the engine; write() collects output."""

    def __init__(self) -> None:
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.queue: list[bytes] = []
        self.written: list[bytes] = []

    def fileno(self) -> int:
        return self.r.fileno()

    def inject(self, pkt: bytes) -> None:
        self.queue.append(pkt)
        self.w.send(b"x")

    def read_batch(self, max_packets: int = 64) -> list[bytes]:
        with contextlib.suppress(BlockingIOError):
            self.r.recv(4096)
        out, self.queue = self.queue[:max_packets], self.queue[max_packets:]
        return out

    def write(self, packet: bytes) -> bool:
        self.written.append(packet)
        return True


def ipv4_udp(src: str, dst: str, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 40000, 9000, 8 + len(payload), 0) + payload
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(udp),
            1,
            0,
            64,
            socket.IPPROTO_UDP,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )
        + udp
    )


async def _spoof_scenario() -> tuple[list[bytes], dict[str, int]]:
    mn_key, ntma_key = StaticKey.generate(), StaticKey.generate()
    mn, ntma = TunnelEngine(mn_key, 0), TunnelEngine(ntma_key, 0)
    mn_tun, ntma_tun = FakeTun(), FakeTun()
    mn_vip, ntma_vip = "100.64.0.10", "100.64.0.20"
    try:
        for engine, tun, vip in ((mn, mn_tun, mn_vip), (ntma, ntma_tun, ntma_vip)):
            engine.open()
            engine.attach_tun(tun, vip)
        ntma_port = ntma._socks[socket.AF_INET].getsockname()[1]
        pid = os.urandom(8)

        def rd(
            role: PathRole, fqdn: str, vip: str, key: StaticKey, eps: tuple[Endpoint, ...]
        ) -> RouteDirection:
            return RouteDirection(
                pid,
                RouteKind.DIRECT,
                role,
                fqdn,
                vip,
                key.public_bytes(),
                eps,
                None,
                300,
                bytes(32),
            )

        ntma.add_path(rd(PathRole.RESPONDER, "mn1.ntm.example.com", mn_vip, mn_key, ()))
        mn.add_path(
            rd(
                PathRole.INITIATOR,
                "www.ntm.example.com",
                ntma_vip,
                ntma_key,
                (("127.0.0.1", ntma_port),),
            )
        )
        await mn.wait_established(pid, 5.0)
        await ntma.wait_established(pid, 5.0)
        mn_tun.inject(ipv4_udp(mn_vip, ntma_vip, b"genuine"))
        mn_tun.inject(ipv4_udp("100.64.9.9", ntma_vip, b"spoofed"))  # another MN's vIP
        mn_tun.inject(ipv4_udp("10.40.0.11", ntma_vip, b"spoofed"))  # a server's address
        for _ in range(100):
            if ntma.counters.get("rx_dropped_inner_address", 0) >= 2 and ntma_tun.written:
                break
            await asyncio.sleep(0.02)
        return ntma_tun.written, dict(ntma.counters)
    finally:
        mn.close()
        ntma.close()


def test_engine_drops_and_counts_inner_packets_with_a_spoofed_source() -> None:
    written, counters = asyncio.run(_spoof_scenario())
    assert [p[28:] for p in written] == [b"genuine"]
    assert counters["rx_dropped_inner_address"] == 2


# --- gateway reports: probes on the tunnels, measured through the engine ----------------------


async def _probe_scenario() -> tuple[Quality, int, Quality]:
    mn_key, ntma_key = StaticKey.generate(), StaticKey.generate()
    mn, ntma = TunnelEngine(mn_key, 0), TunnelEngine(ntma_key, 0)
    quality = ProbeQuality(timeout=0.5, window=30.0)
    ntma.probe_listeners.append(
        lambda pid, result: quality.answered(pid, result.seq, result.rtt, time.monotonic())
    )
    try:
        for engine, vip in ((mn, "100.64.0.10"), (ntma, "100.64.0.20")):
            engine.open()
            engine.attach_tun(FakeTun(), vip)
        port = ntma._socks[socket.AF_INET].getsockname()[1]
        pid = os.urandom(8)

        def rd(role: PathRole, vip: str, key: StaticKey, eps: tuple[Endpoint, ...]):
            return RouteDirection(
                pid, RouteKind.DIRECT, role, "x.ntm.example.com", vip, key.public_bytes(),
                eps, None, 300, bytes(32),
            )  # fmt: skip

        ntma.add_path(rd(PathRole.RESPONDER, "100.64.0.10", mn_key, ()))
        mn.add_path(rd(PathRole.INITIATOR, "100.64.0.20", ntma_key, (("127.0.0.1", port),)))
        await mn.wait_established(pid, 5.0)
        await ntma.wait_established(pid, 5.0)
        for _ in range(3):
            assert send_probes(ntma, quality, [pid, os.urandom(8)], time.monotonic()) == 1
            for _ in range(100):
                if quality.snapshot(time.monotonic()).resolved >= 3:
                    break
                await asyncio.sleep(0.01)
        answered = quality.snapshot(time.monotonic())
        # The MN goes away: its probes go unanswered and count as loss after the timeout.
        mn.close()
        sent = send_probes(ntma, quality, [pid], time.monotonic())
        for _ in range(200):
            if quality.snapshot(time.monotonic()).loss_ppm:
                break
            await asyncio.sleep(0.01)
        return answered, sent, quality.snapshot(time.monotonic())
    finally:
        mn.close()
        ntma.close()


def test_probes_on_tunnels_measure_rtt_and_loss() -> None:
    answered, sent, after = asyncio.run(_probe_scenario())
    assert answered.resolved == 3 and answered.loss_ppm == 0 and answered.rtt_us > 0
    assert sent == 1
    assert after.resolved == 4 and after.loss_ppm == 250_000


# --- the sender over QUIC, against the LB agent's own claim service -------------------------


class FakeRoutes:
    def __init__(self) -> None:
        self.table: dict[str, str] = {}

    def replace(self, vip: str, next_hop: str) -> None:
        self.table[vip] = next_hop

    def remove(self, vip: str) -> None:
        self.table.pop(vip, None)

    def ours(self) -> list[tuple[str, str]]:
        return []

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca.init_ca(d)
    ca.issue(d, "lb", "lb", ["lb.dmz.example.com"], ["127.0.0.1"])
    ca.issue(d, "ntma1", "adaptor", ["www.ntm.example.com"])
    return d


def test_sender_claims_in_batches_and_withdraws(pki: Path) -> None:
    routes = FakeRoutes()
    vips = [f"100.64.3.{i}" for i in range(1, 101)]

    async def scenario() -> tuple[dict[str, str], dict[str, str], RouteClaimAck | None]:
        service = ClaimService(ClaimBook((ipaddress.ip_network("100.64.0.0/10"),)), routes)
        server = await serve_control(
            "127.0.0.1",
            0,
            ca=pki / "ca.pem",
            cert=pki / "lb.pem",
            key=pki / "lb.key",
            handler=service.handle,
        )
        port = server.address[1]
        cfg = ClaimsConfig("127.0.0.1", port, "lb.dmz.example.com", 60, 20.0, 2.0)
        sender = ClaimSender(
            cfg, str(pki / "ca.pem"), str(pki / "ntma1.pem"), str(pki / "ntma1.key")
        )
        tracker = ClaimTracker("10.30.0.2", 60, 20.0, 2.0)
        try:
            tunnels = {v: bytes([i % 256]) * 8 for i, v in enumerate(vips)}
            sent = tracker.update(tunnels, 0.0, 1000)
            for c, a in zip(sent, await sender.send_many(sent), strict=True):
                tracker.result(c, a, 0.0)
            after_claims = dict(routes.table)
            gone = tracker.update({v: p for v, p in tunnels.items() if v != vips[0]}, 1.0, 2000)
            for c, a in zip(gone, await sender.send_many(gone), strict=True):
                tracker.result(c, a, 1.0)
            after_withdraw = dict(routes.table)
            await sender.close()
        finally:
            server.close()
            await server.wait_closed()
        # the agent is gone now: no answer, counted, nothing raised
        lost = await ClaimSender(
            dataclasses.replace(cfg, port=port),
            str(pki / "ca.pem"),
            str(pki / "ntma1.pem"),
            str(pki / "ntma1.key"),
        ).send(RouteClaim(vips[1], "10.30.0.2", 3000, 60))
        assert tracker.counters == {"acked": 100, "withdrawn": 1}
        assert sender.counters["connects"] == 1
        return after_claims, after_withdraw, lost

    after_claims, after_withdraw, lost = asyncio.run(scenario())
    assert after_claims == dict.fromkeys(vips, "10.30.0.2")
    assert vips[0] not in after_withdraw and len(after_withdraw) == 99
    assert lost is None
