"""ntm_io.udp_batch: grouping datagrams into GSO runs, splitting GRO buffers, the sender's
fall-backs (with a fake socket), and a real GSO send / GRO receive over loopback."""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from ntm_io import udp_batch
from ntm_io.udp_batch import (
    MAX_GSO_BYTES,
    SOL_UDP,
    UDP_SEGMENT,
    BatchSender,
    enable_gro,
    gso_runs,
    recv_segments,
    split_segments,
)

# --- gso_runs ------------------------------------------------------------------------------


def test_equal_sizes_make_one_run() -> None:
    assert gso_runs([1436] * 10) == [(0, 10)]


def test_a_shorter_datagram_ends_its_run() -> None:
    assert gso_runs([1436, 1436, 100, 1436, 1436]) == [(0, 3), (3, 5)]


def test_a_larger_datagram_starts_a_new_run() -> None:
    # A run's segment size is its first datagram's: nothing larger may follow in it.
    assert gso_runs([100, 100, 1436, 1436, 52]) == [(0, 2), (2, 5)]


def test_singletons_and_empty() -> None:
    assert gso_runs([]) == []
    assert gso_runs([60]) == [(0, 1)]
    assert gso_runs([60, 70, 80]) == [(0, 1), (1, 2), (2, 3)]


def test_runs_respect_the_segment_and_byte_limits() -> None:
    assert gso_runs([10] * 130, max_segments=64) == [(0, 64), (64, 128), (128, 130)]
    big = 1436
    per_run = MAX_GSO_BYTES // big  # 45 datagrams of 1436 bytes fit in 65507
    runs = gso_runs([big] * 100)
    assert runs[0] == (0, per_run)
    assert all(sum([big] * (e - s)) <= MAX_GSO_BYTES for s, e in runs)
    assert [i for s, e in runs for i in range(s, e)] == list(range(100))  # order, nothing lost


def test_runs_cover_every_datagram_in_order() -> None:
    sizes = [1436, 1436, 1436, 90, 90, 1436, 40, 1436, 1436, 1436, 1436, 1000, 1436]
    runs = gso_runs(sizes)
    assert [i for s, e in runs for i in range(s, e)] == list(range(len(sizes)))
    for s, e in runs:
        seg = sizes[s]
        assert all(x == seg for x in sizes[s : e - 1]) and sizes[e - 1] <= seg


# --- split_segments ------------------------------------------------------------------------


def test_split_segments() -> None:
    data = bytes(range(250))
    assert split_segments(data, 100) == [data[:100], data[100:200], data[200:]]
    assert split_segments(data[:200], 100) == [data[:100], data[100:200]]
    assert split_segments(data, 0) == [data]
    assert split_segments(data, 250) == [data]
    assert split_segments(data, 1000) == [data]


# --- BatchSender with a fake socket --------------------------------------------------------


class FakeSock:
    def __init__(self, gso_error: int | None = None, sendto_error: int | None = None) -> None:
        self.gso_error = gso_error
        self.sendto_error = sendto_error
        self.sendmsg_calls: list[tuple[list[bytes], list[tuple[int, int, bytes]], Any]] = []
        self.sendto_calls: list[tuple[bytes, Any]] = []

    def fileno(self) -> int:
        return 99

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 1)

    def sendmsg(
        self, buffers: list[bytes], cmsg: list[tuple[int, int, bytes]], _f: int, addr: Any
    ) -> int:
        if self.gso_error is not None:
            raise OSError(self.gso_error, "refused")
        self.sendmsg_calls.append((list(buffers), cmsg, addr))
        return sum(map(len, buffers))

    def sendto(self, data: bytes, addr: Any) -> int:
        if self.sendto_error is not None:
            raise OSError(self.sendto_error, "failed")
        self.sendto_calls.append((data, addr))
        return len(data)


ADDR = ("192.0.2.1", 4000)


def sent(sock: FakeSock) -> list[bytes]:
    """Everything that went out, as datagrams, in the order of the calls (all runs here are
    sent before singles only when the test says so)."""
    out: list[bytes] = []
    for buffers, cmsg, _ in sock.sendmsg_calls:
        [(level, kind, value)] = cmsg
        assert (level, kind) == (SOL_UDP, UDP_SEGMENT)
        seg = int.from_bytes(value, sys.byteorder)
        out.extend(split_segments(b"".join(buffers), seg))
    out.extend(d for d, _ in sock.sendto_calls)
    return out


def test_a_run_goes_out_in_one_sendmsg_with_its_segment_size() -> None:
    counters: dict[str, int] = {}
    sock = FakeSock()
    grams = [bytes([i]) * 1436 for i in range(5)] + [b"x" * 300]
    BatchSender(counters).send(sock, grams, ADDR)  # type: ignore[arg-type]
    [(buffers, cmsg, addr)] = sock.sendmsg_calls
    assert buffers == grams and addr == ADDR
    assert cmsg == [(SOL_UDP, UDP_SEGMENT, (1436).to_bytes(2, sys.byteorder))]
    assert not sock.sendto_calls
    assert counters == {"tx_gso_sends": 1, "tx_gso_datagrams": 6}


def test_one_datagram_is_a_plain_sendto() -> None:
    counters: dict[str, int] = {}
    sock = FakeSock()
    BatchSender(counters).send(sock, [b"only"], ADDR)  # type: ignore[arg-type]
    assert sock.sendto_calls == [(b"only", ADDR)] and not sock.sendmsg_calls


@pytest.mark.parametrize("code", [errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP])
def test_refused_gso_falls_back_and_is_switched_off_for_the_socket(code: int) -> None:
    counters: dict[str, int] = {}
    sock = FakeSock(gso_error=code)
    sender = BatchSender(counters)
    grams = [b"a" * 100] * 3
    sender.send(sock, grams, ADDR)  # type: ignore[arg-type]
    assert [d for d, _ in sock.sendto_calls] == grams  # nothing lost
    assert counters["tx_gso_disabled"] == 1
    sock.gso_error = None
    sender.send(sock, grams, ADDR)  # type: ignore[arg-type]
    assert not sock.sendmsg_calls  # not tried again on this socket
    assert len(sock.sendto_calls) == 6 and counters["tx_gso_disabled"] == 1


def test_full_buffer_and_errors_are_counted_not_raised() -> None:
    counters: dict[str, int] = {}
    sender = BatchSender(counters)
    full = FakeSock(gso_error=errno.EAGAIN)
    sender.send(full, [b"a" * 100] * 4, ADDR)  # type: ignore[arg-type]
    assert counters["tx_dropped_full"] == 4  # a lost run counts its datagrams
    other = FakeSock(gso_error=errno.EHOSTUNREACH)
    sender.send(other, [b"a" * 100] * 4, ADDR)  # type: ignore[arg-type]
    assert counters["tx_errors"] == 1 and "tx_gso_disabled" not in counters
    bad = FakeSock(sendto_error=errno.ENETUNREACH)
    sender.send(bad, [b"x"], ADDR)  # type: ignore[arg-type]
    assert counters["tx_errors"] == 2


def test_mixed_sizes_keep_their_order() -> None:
    counters: dict[str, int] = {}
    sock = FakeSock()
    grams = [b"A" * 1436, b"B" * 1436, b"c" * 60, b"D" * 1436, b"e" * 70, b"F" * 1436]
    BatchSender(counters).send(sock, grams, ADDR)  # type: ignore[arg-type]
    # Runs (A,B,c) and (D,e) by sendmsg; F alone by sendto; within each call, order holds.
    assert [b"".join(b) for b, _, _ in sock.sendmsg_calls] == [
        b"".join(grams[:3]),
        b"".join(grams[3:5]),
    ]
    assert sock.sendto_calls == [(grams[5], ADDR)]
    assert sorted(sent(sock)) == sorted(grams)


def test_gso_can_be_switched_off() -> None:
    sock = FakeSock()
    BatchSender({}, gso=False).send(sock, [b"a" * 10] * 3, ADDR)  # type: ignore[arg-type]
    assert len(sock.sendto_calls) == 3 and not sock.sendmsg_calls


# --- the real kernel, over loopback ---------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gro = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (gro, plain):
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
    try:
        yield tx, gro, plain
    finally:
        for s in (tx, gro, plain):
            s.close()


def receive_all(sock: socket.socket, count: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < count:
        buf, segment, _ = recv_segments(sock)
        got.extend(split_segments(buf, segment))
    return got


def test_real_gso_send_arrives_as_the_same_datagrams(
    pair: tuple[socket.socket, socket.socket, socket.socket],
) -> None:
    tx, gro, plain = pair
    have_gro = enable_gro(gro)
    grams = [bytes([i % 251]) * 1436 for i in range(40)] + [b"tail" * 50]
    grams += [b"ack" * 20, b"ack" * 20, bytes(range(200))]
    counters: dict[str, int] = {}
    sender = BatchSender(counters)
    for dst in (gro, plain):
        sender.send(tx, grams, dst.getsockname())
    # Every datagram, byte for byte and in order, whether the receiver coalesces or not.
    assert receive_all(gro, len(grams)) == grams
    assert receive_all(plain, len(grams)) == grams
    if have_gro and "tx_gso_disabled" not in counters:
        assert counters["tx_gso_sends"] >= 2  # this kernel has UDP GSO: the runs used it


def test_recv_segments_reports_no_segment_for_a_single_datagram(
    pair: tuple[socket.socket, socket.socket, socket.socket],
) -> None:
    tx, gro, _ = pair
    enable_gro(gro)
    tx.sendto(b"one", gro.getsockname())
    buf, segment, addr = recv_segments(gro)
    assert buf == b"one" and segment in (0, 3) and addr[0] == "127.0.0.1"
    assert split_segments(buf, segment) == [b"one"]


def test_module_constants_match_linux() -> None:
    assert (udp_batch.SOL_UDP, udp_batch.UDP_SEGMENT, udp_batch.UDP_GRO) == (17, 103, 104)
