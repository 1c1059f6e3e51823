"""Path renewal: the sans-IO schedule on a fake clock, the asyncio glue on a fake engine,
and two real engines renewing a relayed path through a real Relay Server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from ntm_node.dc_client import DirectionError
from ntm_node.engine import TunnelEngine
from ntm_node.renewal import PathRenewer, requested_here
from ntm_proto.crypto import StaticKey
from ntm_proto.messages import (
    ErrorCode,
    PathRole,
    RelayDirection,
    RelayDirectionAck,
    RouteDirection,
    RouteKind,
)
from ntm_proto.path import PathState
from ntm_proto.relay_binding import new_binding_key, side_key
from ntm_proto.renewal import RenewalSchedule, RenewalSettings, RenewalState
from relay import config as relay_config
from relay.core import RelaySettings
from relay.server import RelayServer

LIFE = 100.0
KA, REKEY = 15.0, 120.0
PID = bytes.fromhex("0123456789abcdef")


def const(u: float) -> Callable[[], float]:
    return lambda: u


def schedule(rng: Callable[[], float] = lambda: 0.5, **kw: Any) -> RenewalSchedule:
    return RenewalSchedule(RenewalSettings(**kw), rng)


def feed(s: RenewalSchedule, pid: bytes, start: float, end: float, rate: float) -> None:
    """Observe `rate` packets per second from `start` to `end`, once per second."""
    t, packets = start, 0.0
    while t <= end:
        s.observe(pid, int(packets), t)
        t += 1.0
        packets += rate


# --- the schedule ----------------------------------------------------------------------


def test_first_attempt_falls_between_70_and_80_percent_of_the_lifetime() -> None:
    for u, share in ((0.0, 0.8), (0.5, 0.75), (0.999999, 0.7)):
        s = schedule(const(u))
        s.track(PID, "cn1", 0.0, LIFE, KA, REKEY)
        feed(s, PID, 0.0, 100.0, rate=20.0)
        assert s.due(LIFE * share - 0.01) == []
        assert s.due(LIFE * share + 0.01) == [PID]


def test_jitter_spreads_a_swarm_over_the_window() -> None:
    rng = random.Random(7)
    s = schedule(rng.random)
    ids = [i.to_bytes(8, "big") for i in range(200)]
    for pid in ids:
        s.track(pid, "cn", 0.0, 3600.0, KA, REKEY)
        s.observe(pid, 0, 0.0)
    times = sorted(row["renew_in_s"] for row in s.status(0.0))
    assert times[0] >= 2520.0 and times[-1] <= 2880.0
    # spread over the whole window: each minute of it gets some, none a crowd
    per_minute: dict[int, int] = {}
    for t in times:
        per_minute[int(t // 60)] = per_minute.get(int(t // 60), 0) + 1
    print("renewals per minute of the window:", dict(sorted(per_minute.items())))
    assert len(per_minute) == 6 and max(per_minute.values()) <= 2 * 200 / 6


def test_a_used_path_is_renewed_once_and_then_left_alone() -> None:
    s = schedule()
    s.track(PID, "cn1", 0.0, LIFE, KA, REKEY)
    feed(s, PID, 0.0, 80.0, rate=10.0)
    assert s.in_use(PID, 80.0)
    assert s.due(80.0) == [PID]
    assert s.due(81.0) == []  # under way: not handed out twice
    s.succeeded(PID)
    assert s.due(200.0) == []
    assert s.next_wakeup(200.0) is None
    assert s.status(80.0)[0]["state"] == RenewalState.RENEWED.value
    assert s.counters["renewals"] == 1


def test_keepalives_alone_are_not_use_and_such_a_path_is_renewed_when_used_again() -> None:
    s = schedule()
    s.track(PID, "cn1", 0.0, LIFE, KA, REKEY)
    # both ends' keepalives (2 per 15 s) and a rekey: exactly what an idle path carries
    feed(s, PID, 0.0, 90.0, rate=2 / KA)
    assert not s.in_use(PID, 90.0)
    assert s.due(90.0) == []
    assert s.status(90.0)[0]["state"] == "idle"
    assert s.counters["idle_not_renewed"] == 1
    # past its lifetime the application sends again: renewed at the next sample
    t = 130.0
    s.observe(PID, 20, t)
    s.observe(PID, 60, t + 2.5)
    assert s.due(t + 2.5) == [PID]
    assert s.counters["idle_not_renewed"] == 1  # counted once per idle spell


def test_use_looks_back_a_quarter_of_the_lifetime_only() -> None:
    s = schedule()
    s.track(PID, "cn1", 0.0, LIFE, KA, REKEY)
    feed(s, PID, 0.0, 40.0, rate=50.0)  # busy early on
    packets = int(40 * 50.0)
    for t in range(41, 81):  # then quiet for 40 s > 25 s
        s.observe(PID, packets, float(t))
    assert not s.in_use(PID, 80.0)


def test_failures_back_off_with_jitter_but_retry_before_the_path_ends() -> None:
    s = schedule(lambda: 0.5, retry_min=2.0, retry_max=60.0)
    s.track(PID, "cn1", 0.0, 1000.0, KA, REKEY)
    feed(s, PID, 0.0, 800.0, rate=10.0)
    now = 800.0
    assert s.due(now) == [PID]
    delays = []
    for _ in range(5):
        delays.append(s.failed(PID, now))
        now += delays[-1]
        s.observe(PID, 100_000 + int(now * 10), now)
        assert s.due(now - 0.01) == [] and s.due(now) == [PID]
    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0]  # rng 0.5: no jitter
    # 200 s left would allow 64 s, but only half of what is left is waited
    now = 980.0
    assert s.failed(PID, now) == 10.0
    # past the lifetime: the slowest pace, jittered
    late = schedule(lambda: 0.0, retry_min=2.0, retry_max=60.0)
    late.track(PID, "cn1", 0.0, 100.0, KA, REKEY)
    for _ in range(10):
        delay = late.failed(PID, 500.0)
    assert delay == 45.0  # 60 s scaled by 1 - 0.25
    assert late.counters["renewal_failures"] == 10


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        RenewalSettings(renew_at=1.0)
    with pytest.raises(ValueError):
        RenewalSettings(spread=0.9, renew_at=0.8)
    with pytest.raises(ValueError):
        RenewalSettings(retry_min=10.0, retry_max=5.0)
    assert RenewalSettings().sample_period(3600.0) == 15.0
    assert RenewalSettings().sample_period(20.0) == 0.5


def test_the_requester_is_the_initiator_except_on_a_reverse_path() -> None:
    def rd(kind: RouteKind, role: PathRole) -> RouteDirection:
        return direction(PID, kind, role, "cn1", "100.64.0.2", bytes(32), ())

    assert requested_here(rd(RouteKind.DIRECT, PathRole.INITIATOR))
    assert requested_here(rd(RouteKind.RELAY, PathRole.INITIATOR))
    assert requested_here(rd(RouteKind.REVERSE, PathRole.RESPONDER))
    assert not requested_here(rd(RouteKind.DIRECT, PathRole.RESPONDER))
    assert not requested_here(rd(RouteKind.RELAY, PathRole.RESPONDER))
    assert not requested_here(rd(RouteKind.REVERSE, PathRole.INITIATOR))


# --- the glue on a fake engine -----------------------------------------------------------


def direction(
    pid: bytes,
    kind: RouteKind,
    role: PathRole,
    peer: str,
    vip: str,
    key: bytes,
    eps: tuple[tuple[str, int], ...],
    relay: tuple[str, int] | None = None,
    lifetime: int = int(LIFE),
    relay_key: bytes = bytes(32),
    gateway: str = "",
) -> RouteDirection:
    return RouteDirection(pid, kind, role, peer, vip, key, eps, relay, lifetime, relay_key, gateway)


class FakeConfig:
    keepalive_interval = KA
    rekey_after_seconds = REKEY


class FakePath:
    def __init__(self, path_id: bytes, created: float) -> None:
        self.path_id = path_id
        self.created = created
        self.state = PathState.HANDSHAKING
        self.packets = 0
        self.config = FakeConfig()

    @property
    def counters(self) -> dict[str, int]:
        return {"rx_packets": self.packets, "tx_packets": self.packets}


class FakeEngine:
    """Routes a peer vIP through its newest established path and drops the old one."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.meta: dict[bytes, RouteDirection] = {}
        self.by_id: dict[bytes, FakePath] = {}
        self.route: dict[str, FakePath] = {}
        self.handshakes_succeed = True
        self.endpoint = self

    @property
    def paths(self) -> list[FakePath]:
        return list(self.by_id.values())

    def route_direction(self, path_id: bytes) -> RouteDirection | None:
        return self.meta.get(path_id)

    def path_to(self, peer_vip: str) -> FakePath | None:
        return self.route.get(peer_vip)

    def add_path(self, rd: RouteDirection, handshake_retry: float | None = None) -> FakePath:
        path = FakePath(rd.path_id, self.clock())
        self.by_id[rd.path_id] = path
        self.meta[rd.path_id] = rd
        return path

    def establish(self, path_id: bytes) -> None:
        path = self.by_id[path_id]
        path.state = PathState.ESTABLISHED
        vip = self.meta[path_id].peer_vip
        old = self.route.get(vip)
        self.route[vip] = path
        if old is not None and old is not path:
            self.remove_path(old.path_id)

    async def wait_established(self, path_id: bytes, timeout: float) -> None:
        await asyncio.sleep(0)
        if not self.handshakes_succeed:
            raise TimeoutError
        self.establish(path_id)

    def remove_path(self, path_id: bytes) -> None:
        self.by_id.pop(path_id, None)
        self.meta.pop(path_id, None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_glue_renews_only_used_paths_it_requested_that_carry_traffic() -> None:
    async def go() -> None:
        clock = Clock()
        engine = FakeEngine(clock)
        asked: list[tuple[str, str]] = []

        async def request(fqdn: str, gateway: str) -> RouteDirection:
            asked.append((fqdn, gateway))
            return direction(
                os.urandom(8),
                RouteKind.RELAY,
                PathRole.INITIATOR,
                fqdn,
                "100.64.0.2",
                bytes(32),
                (),
                ("198.51.100.50", 7500),
            )

        mine = direction(
            PID,
            RouteKind.RELAY,
            PathRole.INITIATOR,
            "cn1.ntm.example.com",
            "100.64.0.2",
            bytes(32),
            (),
            ("198.51.100.50", 7500),
        )
        theirs = direction(
            b"t" * 8,
            RouteKind.DIRECT,
            PathRole.RESPONDER,
            "mn2.ntm.example.com",
            "100.64.0.3",
            bytes(32),
            (),
        )
        for rd in (mine, theirs):
            engine.add_path(rd)
            engine.establish(rd.path_id)
        renewer = PathRenewer(
            cast(Any, engine), request, clock=clock, rng=lambda: 0.0
        )  # renew at 80 %
        busy = [engine.by_id[PID], engine.by_id[b"t" * 8]]
        while clock.now < 1000.0 + 0.8 * LIFE - 1:
            for p in busy:
                p.packets += 50
            renewer.step(clock.now)
            clock.now += 1.0
        assert asked == []
        clock.now = 1000.0 + 0.8 * LIFE + 0.5
        renewer.step(clock.now)
        await settle()
        assert asked == [("cn1.ntm.example.com", "")]  # never the path it only answered
        new = engine.path_to("100.64.0.2")
        assert new is not None and new.path_id != PID and PID not in engine.by_id
        assert b"t" * 8 in engine.by_id
        renewer.step(clock.now)
        status = renewer.status()
        assert status["counters"]["renewals"] == 1
        assert [row["path_id"] for row in status["paths"]] == [new.path_id.hex()]

    asyncio.run(go())


def test_glue_keeps_the_old_path_when_renewal_fails_and_retries() -> None:
    async def go() -> None:
        clock = Clock()
        engine = FakeEngine(clock)
        answers: list[Any] = [
            DirectionError("DC did not answer: timeout"),
            "handshake times out",
            DirectionError("gateway ntma1 is draining", ErrorCode.PEER_UNREACHABLE),
        ]
        asked: list[tuple[str, str]] = []

        async def request(fqdn: str, gateway: str) -> RouteDirection:
            asked.append((fqdn, gateway))
            answer = answers.pop(0) if answers else None
            if isinstance(answer, Exception):
                raise answer
            engine.handshakes_succeed = answer is None
            return direction(
                os.urandom(8),
                RouteKind.DIRECT,
                PathRole.INITIATOR,
                fqdn,
                "100.64.0.9",
                bytes(32),
                (("198.51.100.60", 7400),),
                gateway=gateway,
            )

        engine.add_path(
            direction(
                PID,
                RouteKind.DIRECT,
                PathRole.INITIATOR,
                "www.ntm.example.com",
                "100.64.0.9",
                bytes(32),
                (("198.51.100.60", 7400),),
                gateway="ntma1.ntm.example.com",
            )
        )
        engine.establish(PID)
        renewer = PathRenewer(cast(Any, engine), request, clock=clock, rng=lambda: 0.5)
        path = engine.by_id[PID]

        async def tick(until: float) -> None:
            while clock.now < until:
                path.packets += 50
                renewer.step(clock.now)
                await settle()
                clock.now += 0.5

        await tick(1000.0 + 0.75 * LIFE + 0.6)
        assert len(asked) == 1 and engine.path_to("100.64.0.9") is path  # DC failed
        await tick(clock.now + 2.1)
        assert len(asked) == 2 and engine.path_to("100.64.0.9") is path  # handshake failed
        assert list(engine.by_id) == [PID]  # the half-built path was removed
        await tick(clock.now + 4.1)
        # the gateway takes no new paths: asked through it, then with the DC's choice
        assert asked[2:] == [
            ("www.ntm.example.com", "ntma1.ntm.example.com"),
            ("www.ntm.example.com", ""),
        ]
        new = engine.path_to("100.64.0.9")
        assert new is not None and new is not path and PID not in engine.by_id
        counters = renewer.status()["counters"]
        assert counters["renewal_failures"] == 2 and counters["renewals"] == 1

    asyncio.run(go())


# --- two real engines and a real relay -------------------------------------------------

MN_VIP, CN_VIP = "100.64.0.10", "100.64.0.20"
MN, CN = "mn1.ntm.example.com", "cn1.ntm.example.com"


class Tun:
    """A fake TUN: packets injected here are read by the engine; written ones are kept."""

    def __init__(self) -> None:
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.queue: list[bytes] = []
        self.written: list[bytes] = []

    def fileno(self) -> int:
        return self.r.fileno()

    def inject(self, packet: bytes) -> None:
        self.queue.append(packet)
        self.w.send(b"x")

    def read_batch(self, max_packets: int = 64) -> list[bytes]:
        with contextlib.suppress(BlockingIOError):
            self.r.recv(4096)
        out, self.queue = self.queue, []
        return out

    def write(self, packet: bytes) -> bool:
        self.written.append(packet)
        return True

    def close(self) -> None:
        self.r.close()
        self.w.close()


def ip_packet(src: str, dst: str, seq: int) -> bytes:
    payload = struct.pack("!I", seq)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        0,
        0,
        64,
        17,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return header + payload


class LoopbackDc:
    """Does what the DC does for a relayed path: installs it at the relay, gives the
    responder (cn) its Route Direction, answers the requester (mn)."""

    def __init__(self, relay: RelayServer, cn: TunnelEngine, keys: dict[str, StaticKey]) -> None:
        self.relay, self.cn, self.keys = relay, cn, keys
        self.lifetime = 3
        self.issued: list[bytes] = []

    async def request(self, fqdn: str, gateway: str) -> RouteDirection:
        pid, key = os.urandom(8), new_binding_key()
        ack = self.relay.core.handle_direction(
            RelayDirection(pid, key, self.lifetime), "dc1", time.monotonic()
        )
        assert isinstance(ack, RelayDirectionAck)
        ep = self.relay.addresses[0]
        self.cn.add_path(
            direction(
                pid,
                RouteKind.RELAY,
                PathRole.RESPONDER,
                MN,
                MN_VIP,
                self.keys[MN].public_bytes(),
                (),
                ep,
                self.lifetime,
                side_key(key, PathRole.RESPONDER),
            )
        )
        self.issued.append(pid)
        return direction(
            pid,
            RouteKind.RELAY,
            PathRole.INITIATOR,
            fqdn,
            CN_VIP,
            self.keys[CN].public_bytes(),
            (ep,),
            ep,
            self.lifetime,
            side_key(key, PathRole.INITIATOR),
        )


def test_a_relayed_flow_outlives_two_path_lifetimes(tmp_path: Path) -> None:
    async def go() -> None:
        relay = RelayServer(
            relay_config.RelayConfig(
                name="rs1",
                listen=("127.0.0.1",),
                port=0,
                control_listen=(),
                control_port=0,
                status_socket="",
                settings=RelaySettings(),
                tls=relay_config.TlsConfig("", "", ""),
            )
        )
        await relay.start()
        keys = {MN: StaticKey.generate(), CN: StaticKey.generate()}
        mn, cn = TunnelEngine(keys[MN], 0), TunnelEngine(keys[CN], 0)
        mn_tun, cn_tun = Tun(), Tun()
        renewal: asyncio.Task[None] | None = None
        try:
            for engine, tun, vip in ((mn, mn_tun, MN_VIP), (cn, cn_tun, CN_VIP)):
                engine.open()
                engine.attach_tun(tun, vip)
            dc = LoopbackDc(relay, cn, keys)
            first = await dc.request(CN, "")
            mn.add_path(first)
            await mn.wait_established(first.path_id, 5.0)
            renewer = PathRenewer(
                mn, dc.request, settings=RenewalSettings(sample_min=0.1), rng=random.random
            )
            renewal = asyncio.get_running_loop().create_task(renewer.run())
            sent, started = 0, time.monotonic()
            while time.monotonic() - started < 2.3 * dc.lifetime:  # a 20 Hz flow mn -> cn
                mn_tun.inject(ip_packet(MN_VIP, CN_VIP, sent))
                sent += 1
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            got = sorted(struct.unpack("!I", p[20:24])[0] for p in cn_tun.written)
            gaps = [b - a for a, b in itertools.pairwise(got)]
            longest = max(gaps, default=0) * 0.05
            print(f"{len(got)} of {sent} packets arrived; longest gap ~{longest:.2f} s")
            assert len(got) >= sent - 4 and longest < 1.0
            # two renewals: the newest path carries the flow at both ends, alone
            assert len(dc.issued) >= 3
            newest = mn.path_to(CN_VIP)
            assert newest is not None and newest.path_id == dc.issued[-1]
            assert [p.path_id for p in mn.endpoint.paths] == [dc.issued[-1]]
            await until(
                lambda: [p.path_id for p in cn.endpoint.paths] == [dc.issued[-1]], "cn retired"
            )
            # the relay forgot the first path at its lifetime end
            assert relay.core.path(dc.issued[0]) is None
            assert relay.core.counters["paths_expired_lifetime"] >= 1
            assert renewer.status()["counters"]["renewals"] >= 2
        finally:
            if renewal is not None:
                renewal.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewal
            mn.close()
            cn.close()
            mn_tun.close()
            cn_tun.close()
            await relay.close()

    asyncio.run(go())


async def until(cond: Callable[[], bool], what: str, bound: float = 5.0) -> None:
    deadline = time.monotonic() + bound
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
