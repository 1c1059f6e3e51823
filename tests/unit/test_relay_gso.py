"""The Relay Server's batched forwarding over real loopback sockets: a burst sent with UDP
GSO reaches the relay as one GRO read and leaves as GSO sends, every datagram intact and in
order, to an end that coalesces (UDP_GRO) and to one that does not. No root needed."""

from __future__ import annotations

import asyncio
import socket
import time

from ntm_io.udp_batch import BatchSender, enable_gro, recv_segments, split_segments
from ntm_proto import messages as m
from ntm_proto import relay_binding as rb
from ntm_proto.messages import Endpoint, PathRole
from ntm_proto.packet import PacketType, build_prefix
from relay import config as relay_config
from relay.core import RelaySettings
from relay.server import RelayServer

WAIT = 10.0
PID = bytes.fromhex("5ca1ab1e5ca1ab1e")
KEY = bytes(range(32, 64))


def data_packet(i: int, size: int) -> bytes:
    body = i.to_bytes(4, "big") + bytes([i % 251]) * (size - 4)
    return build_prefix(PacketType.DATA, 0, PID) + i.to_bytes(8, "big") + body + bytes(16)


async def recv_all(sock: socket.socket, count: int) -> list[bytes]:
    loop = asyncio.get_running_loop()
    got: list[bytes] = []
    deadline = time.monotonic() + WAIT
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} datagrams"
        ready = asyncio.Event()
        loop.add_reader(sock.fileno(), ready.set)
        try:
            await asyncio.wait_for(ready.wait(), WAIT)
        finally:
            loop.remove_reader(sock.fileno())
        while True:
            try:
                buf, segment, _ = recv_segments(sock)
            except BlockingIOError:
                break
            got.extend(split_segments(buf, segment))
    return got


def end(gro: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.bind(("127.0.0.1", 0))
    if gro:
        enable_gro(s)
    return s


async def bind(sock: socket.socket, side: PathRole, rs: Endpoint) -> None:
    key = rb.side_key(KEY, side)
    sock.sendto(rb.build_bind(side, PID, 1, key), rs)
    [ack] = await recv_all(sock, 1)
    assert rb.parse(ack).type is rb.BindingType.BIND_ACK


def test_a_gso_burst_is_forwarded_whole_and_in_order() -> None:
    async def scenario() -> None:
        cfg = relay_config.RelayConfig(
            name="rs1",
            listen=("127.0.0.1",),
            port=0,
            control_listen=(),
            control_port=0,
            status_socket="",
            settings=RelaySettings(max_paths=10),
            tls=relay_config.TlsConfig(ca="", cert="", key=""),
        )
        server = RelayServer(cfg)
        await server.start()
        a, b_gro = end(gro=False), end(gro=True)
        try:
            rs = server.addresses[0]
            server.core.handle_direction(m.RelayDirection(PID, KEY, 60), "dc1", time.monotonic())
            await bind(a, PathRole.INITIATOR, rs)
            await bind(b_gro, PathRole.RESPONDER, rs)
            burst = [data_packet(i, 1300) for i in range(40)] + [data_packet(40, 200)]
            counters: dict[str, int] = {}
            BatchSender(counters).send(a, burst, rs)
            assert await recv_all(b_gro, len(burst)) == burst
            # and back, to an end without GRO: the relay's GSO send arrives as datagrams
            back = [data_packet(100 + i, 900) for i in range(30)]
            BatchSender(counters).send(b_gro, back, rs)
            assert await recv_all(a, len(back)) == back
            assert server.core.counters["forwarded_packets"] == len(burst) + len(back)
            if "tx_gso_disabled" not in counters and "tx_gso_disabled" not in server.counters:
                assert server.counters.get("tx_gso_sends", 0) >= 2  # forwarded in runs
        finally:
            a.close()
            b_gro.close()
            await server.close()

    asyncio.run(scenario())
