"""TunnelEngine with one socket per uplink address ([node] tunnel_addresses), over loopback.

A gateway bound to 127.0.0.1 and 127.0.0.2 (two "uplinks") answers from the address the
packet came in on, and an MN moves its path to the other address only when that address
answers (TunnelPath.try_peer_address). Also: probe listeners see every ProbeResult.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import Callable

import pytest

from ntm_node.engine import TunnelEngine
from ntm_proto.crypto import StaticKey
from ntm_proto.messages import Endpoint, PathRole, RouteDirection, RouteKind
from ntm_proto.path import ProbeResult, TunnelPath

MN_VIP, GW_VIP = "100.64.0.10", "100.64.0.20"


class FakeTun:
    def __init__(self) -> None:
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.written: list[bytes] = []

    def fileno(self) -> int:
        return self.r.fileno()

    def read_batch(self, max_packets: int = 64) -> list[bytes]:
        with contextlib.suppress(BlockingIOError):
            self.r.recv(4096)
        return []

    def write(self, packet: bytes) -> bool:
        self.written.append(packet)
        return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def direction(
    pid: bytes, role: PathRole, vip: str, key: StaticKey, eps: tuple[Endpoint, ...]
) -> RouteDirection:
    return RouteDirection(
        pid, RouteKind.DIRECT, role, "x.ntm.example.com", vip, key.public_bytes(), eps, None, 300,
        bytes(32),
    )  # fmt: skip


async def until(cond: Callable[[], bool], what: str, bound: float = 5.0) -> None:
    for _ in range(int(bound / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def _two_uplinks() -> None:
    mn_key, gw_key = StaticKey.generate(), StaticKey.generate()
    port = free_port()
    mn = TunnelEngine(mn_key, 0)
    gw = TunnelEngine(gw_key, port, addresses=("127.0.0.1", "127.0.0.2"))
    results: list[tuple[bytes, ProbeResult]] = []
    mn.probe_listeners.append(lambda pid, r: results.append((pid, r)))
    try:
        for engine, vip in ((mn, MN_VIP), (gw, GW_VIP)):
            engine.open()
            engine.attach_tun(FakeTun(), vip)
        assert len(gw._bound) == 2
        pid = os.urandom(8)
        up1: Endpoint = ("127.0.0.1", port)
        up2: Endpoint = ("127.0.0.2", port)
        gw.add_path(direction(pid, PathRole.RESPONDER, MN_VIP, mn_key, ()))
        # Only the second uplink is offered: the answer must come from it.
        path = mn.add_path(direction(pid, PathRole.INITIATOR, GW_VIP, gw_key, (up2,)))
        await mn.wait_established(pid, 5.0)
        assert path.peer_address == up2
        gw_path = gw.endpoint.path(pid)
        assert gw_path is not None
        await until(lambda: gw.status()[0]["local_address"] == "127.0.0.2", "gw pins uplink 2")

        # A probe the engine relays to its listeners.
        assert path.send_probe(_now()) is not None
        mn.flush()
        await until(lambda: bool(results), "a ProbeResult")
        assert results[0][0] == pid

        # Move to uplink 1: only its authenticated answer moves the path, and from then on
        # the gateway answers from uplink 1 too.
        seq = path.try_peer_address(up1, _now())
        assert seq is not None and path.peer_address == up2
        mn.flush()
        await until(lambda: _peer(path) == up1, "the path to move to uplink 1")
        await until(lambda: gw.status()[0]["local_address"] == "127.0.0.1", "gw pins uplink 1")

        # An address that answers nothing takes nothing away.
        path.try_peer_address(("127.0.0.3", port), _now())
        mn.flush()
        await asyncio.sleep(0.2)
        assert _peer(path) == up1
    finally:
        mn.close()
        gw.close()


def _now() -> float:
    return time.monotonic()


def _peer(path: TunnelPath) -> Endpoint | None:
    return path.peer_address


def test_replies_leave_by_the_uplink_and_try_peer_address_moves_on_answer() -> None:
    asyncio.run(_two_uplinks())


def test_bind_failure_names_the_address() -> None:
    async def scenario() -> None:
        engine = TunnelEngine(StaticKey.generate(), free_port(), addresses=("192.0.2.1",))
        # IP_FREEBIND lets a not-yet-configured address bind; a busy port must still fail.
        engine.open()
        other = TunnelEngine(StaticKey.generate(), engine.port, addresses=("192.0.2.1",))
        try:
            with pytest.raises(OSError, match=re.escape("192.0.2.1")):
                other.open()
        finally:
            engine.close()
            other.close()

    asyncio.run(scenario())
