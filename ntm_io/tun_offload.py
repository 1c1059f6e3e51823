"""Receive coalescing for a TUN with IFF_VNET_HDR (GRO done in userspace).

Each `write` into a TUN makes the kernel run its whole receive path (IP, TCP or UDP, a
socket wake-up) for one packet; on this machine that is the largest kernel cost of a
tunnel's receiving side. The kernel's own GRO never sees TUN writes in batches, so we do
what it would do: consecutive in-order TCP segments of one flow become one large packet,
written once with a virtio-net header that marks it GSO (TCPv4, segment size = their
MSS) and its checksum partial. The local TCP stack takes it as one GRO'd skb; a packet
forwarded on (a gateway) is cut back into segments, checksums computed, by the kernel's
GSO. Runs of equal-size UDP datagrams of one flow go the same way as GSO_UDP_L4 (the
kernel hands a socket without UDP_GRO the datagrams one by one, as they were).

The TCP rules are Linux GRO's (`tcp_gro_receive`, `inet_gro_receive`): IPv4 without
options or fragments; TCP with only ACK (and PSH, which ends a run); payload present; same
TOS, TTL, DF, ack number, window and options; sequence numbers contiguous; every segment
the size of the first except a shorter last one, which ends the run; at most 64 KiB and
64 segments. UDP: the same IP rules, same ports, payload sizes as for TCP. Anything else
is written unchanged and ends its flow's run, so nothing is reordered within a flow.

Checksums: a merged packet's TCP or UDP checksum is not checked here; the kernel trusts a
partial checksum. The data was authenticated by the tunnel (AES-GCM), so only a broken
peer stack could send a bad checksum, and the same peer could send any valid one.
Nothing here needs the offloads of the read side (TUNSETOFFLOAD stays 0): the kernel hands
us finished packets, each behind an all-zero header.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_off
VNET_HDR_SIZE = VNET_HDR.size  # 10
VNET_HDR_NONE = bytes(VNET_HDR_SIZE)
NEEDS_CSUM = 1  # VIRTIO_NET_HDR_F_NEEDS_CSUM
GSO_TCPV4 = 1  # VIRTIO_NET_HDR_GSO_TCPV4
GSO_UDP_L4 = 5  # VIRTIO_NET_HDR_GSO_UDP_L4 (TUN takes it since Linux 6.2)
GSO_NONE = 0

MAX_COALESCED = 65535  # the IPv4 total length field
MAX_SEGMENTS = 64  # per merged packet (UDP GSO's old UDP_MAX_SEGMENTS; TCP stops at 64 KiB)
_ACK, _PSH = 0x10, 0x08
_TCP_CSUM_OFFSET = 16
_UDP_CSUM_OFFSET = 6
_IP_HDR = 20


class _Run:
    """Segments of one flow merged so far (the first one's headers, then payloads)."""

    __slots__ = (
        "closed", "expect", "hlen", "length", "mss", "packets", "psh", "size", "tcp", "unpack",
    )  # fmt: skip

    def __init__(self, pkt: bytes, hlen: int, seq: int, plen: int, psh: bool, tcp: bool) -> None:
        self.packets = [pkt]
        self.tcp = tcp
        self.hlen = hlen  # IP + TCP (or UDP) header bytes
        self.length = len(pkt)  # of every segment but a shorter last one
        self.mss = plen
        self.size = len(pkt)  # of the merged packet
        self.psh = psh
        self.closed = psh
        self.unpack = _fields(hlen) if tcp else _UDP_FIELDS
        # The header fields the next full-size segment must have: the same as this one's,
        # with (TCP) the sequence number that follows it.
        got = self.unpack(pkt)
        if tcp:
            got = (got[0], got[1], got[2], (seq + plen) & 0xFFFFFFFF, got[4], got[5])
        self.expect = got


_FIELDS: dict[int, Callable[[bytes], tuple[Any, ...]]] = {}


def _fields(hlen: int) -> Callable[[bytes], tuple[Any, ...]]:
    """An unpacker of what two mergeable segments share, plus the sequence number: bytes
    0-3 (version, TOS, length), 6-9 (flags, fragment, TTL, protocol), 12-23 (addresses,
    ports), seq, 28-35 (ack, data offset, TCP flags, window), 38-hlen (urgent, options).
    Skipped: the IP ID and both checksums."""
    unpack = _FIELDS.get(hlen)
    if unpack is None:
        unpack = _FIELDS[hlen] = struct.Struct(f"!4s2x4s2x12sI8s2x{hlen - 38}s").unpack_from
    return unpack


# UDP: bytes 0-3 (version, TOS, length), 6-9 (flags, fragment, TTL, protocol), 12-23
# (addresses, ports), 24-25 (UDP length); not the IP ID or the checksums.
_UDP_FIELDS = struct.Struct("!4s2x4s2x12s2s").unpack_from

Buffers = list[bytes | memoryview]


def coalesce(packets: Sequence[bytes], udp: bool = True) -> list[tuple[Buffers, list[bytes]]]:
    """Group IPv4 packets (in arrival order) into TUN writes for an IFF_VNET_HDR device.

    Returns, per write, the buffers for `os.writev` (a virtio-net header, then the packet)
    and the original packets it carries (to write one by one if the kernel refuses it).
    Order within every flow is kept; a write holds one packet or one merged run. With
    `udp`, runs of equal-size UDP datagrams of one flow merge too (GSO_UDP_L4).
    """
    out: list[tuple[Buffers, list[bytes]] | _Run] = []
    runs: dict[bytes, _Run] = {}
    udp_runs: dict[bytes, _Run] | None = {} if udp else None
    last: _Run | None = None  # the open run the previous packet went to
    for pkt in packets:
        # Fast path, a bulk transfer: the next full-size segment of the same run.
        if last is not None and len(pkt) == last.length and last.unpack(pkt) == last.expect:
            last.packets.append(pkt)
            mss = last.mss
            if last.tcp:
                e = last.expect
                last.expect = (e[0], e[1], e[2], (e[3] + mss) & 0xFFFFFFFF, e[4], e[5])
            last.size += mss
            if last.size + mss > MAX_COALESCED or len(last.packets) >= MAX_SEGMENTS:
                last.closed = True
                last = None
            continue
        if pkt[9:10] == b"\x11" and udp_runs is not None:
            last = _add_udp(pkt, out, udp_runs)
        else:
            last = _add(pkt, out, runs)
    return [item if isinstance(item, tuple) else (_emit(item), item.packets) for item in out]


def _add_udp(
    pkt: bytes, out: list[tuple[Buffers, list[bytes]] | _Run], runs: dict[bytes, _Run]
) -> _Run | None:
    """`_add` for UDP: a datagram of the same flow and size as the run's continues it, a
    shorter one ends it; anything unusual is written alone and ends its flow's run."""
    n = len(pkt)
    key = pkt[12:24]
    if (
        n <= 28
        or pkt[0] != 0x45
        or pkt[6] & 0x3F
        or pkt[7]
        or int.from_bytes(pkt[2:4], "big") != n
        or int.from_bytes(pkt[24:26], "big") != n - 20
    ):
        runs.pop(key, None)
        out.append(([VNET_HDR_NONE, pkt], [pkt]))
        return None
    plen = n - 28
    run = runs.get(key)
    if (
        run is not None
        and not run.closed
        and plen <= run.mss
        and run.size + plen <= MAX_COALESCED
        and len(run.packets) < MAX_SEGMENTS
    ):
        got, e = run.unpack(pkt), run.expect
        if plen == run.mss:
            joins = got == e  # another flow came between
        else:  # a shorter datagram, the last of the run: its lengths differ
            joins = got[0][:2] == e[0][:2] and got[1] == e[1] and got[2] == e[2]
        if joins:
            run.packets.append(pkt)
            run.size += plen
            if plen < run.mss:
                run.closed = True
                return None
            return _open(run)
    run = _Run(pkt, 28, 0, plen, False, tcp=False)
    runs[key] = run
    out.append(run)
    return run


def _add(
    pkt: bytes, out: list[tuple[Buffers, list[bytes]] | _Run], runs: dict[bytes, _Run]
) -> _Run | None:
    """The general case: append `pkt` to its flow's run, start one, or write it alone.
    Returns the run it went to if that run is still open."""
    n = len(pkt)
    if n < 40 or pkt[9] != 6 or pkt[0] != 0x45:
        if n >= 24 and pkt[9] == 6 and pkt[0] >> 4 == 4:
            runs.pop(_flow_key(pkt), None)  # TCP we cannot merge: its flow's run ends
        out.append(([VNET_HDR_NONE, pkt], [pkt]))
        return None
    thl = (pkt[32] >> 4) * 4
    hlen = _IP_HDR + thl
    flags = pkt[33]
    key = pkt[12:24]
    if (
        thl < 20
        or n <= hlen
        or (flags != _ACK and flags != _ACK | _PSH)
        or pkt[6] & 0x3F  # MF or a fragment offset (DF, 0x40, is fine)
        or pkt[7]
        or int.from_bytes(pkt[2:4], "big") != n
    ):
        runs.pop(key, None)
        out.append(([VNET_HDR_NONE, pkt], [pkt]))
        return None
    plen = n - hlen
    seq = int.from_bytes(pkt[24:28], "big")
    psh = flags == _ACK | _PSH
    run = runs.get(key)
    if (
        run is not None
        and not run.closed
        and plen <= run.mss
        and run.hlen == hlen
        and run.size + plen <= MAX_COALESCED
        and len(run.packets) < MAX_SEGMENTS
        and _joins(run, pkt)
    ):
        # A segment the fast path did not take: another flow came between, or it is a
        # shorter or PSH one, which ends the run.
        run.packets.append(pkt)
        run.size += plen
        e = run.expect
        run.expect = (e[0], e[1], e[2], (seq + plen) & 0xFFFFFFFF, e[4], e[5])
        if psh or plen < run.mss:
            run.psh = psh
            run.closed = True
            return None
        return _open(run)
    run = _Run(pkt, hlen, seq, plen, psh, tcp=True)
    runs[key] = run
    out.append(run)
    return None if run.closed else run


def _joins(run: _Run, pkt: bytes) -> bool:
    """May `pkt` (a full or shorter segment, PSH or not) follow `run`? Same TOS, DF, TTL,
    ack, window and options; the next sequence number; flags ACK or ACK|PSH (checked)."""
    got, e = run.unpack(pkt), run.expect
    return bool(
        got[0][:2] == e[0][:2]  # version, IHL, TOS (the length may be shorter)
        and got[1] == e[1]
        and got[2] == e[2]
        and got[3] == e[3]
        and got[4][:5] == e[4][:5]  # ack, data offset
        and got[4][6:] == e[4][6:]  # window (the flags byte between may add PSH)
        and got[5] == e[5]
    )


def _open(run: _Run) -> _Run | None:
    """`run` if another full-size segment still fits in it, else None (and it is closed)."""
    if run.size + run.mss > MAX_COALESCED or len(run.packets) >= MAX_SEGMENTS:
        run.closed = True
        return None
    return run


def _flow_key(pkt: bytes) -> bytes:
    ihl = (pkt[0] & 0x0F) * 4
    return pkt[12:20] + pkt[ihl : ihl + 4]


def _emit(run: _Run) -> Buffers:
    packets = run.packets
    first = packets[0]
    if len(packets) == 1:
        return [VNET_HDR_NONE, first]
    hlen = run.hlen
    ip = bytearray(first[:_IP_HDR])
    ip[2:4] = run.size.to_bytes(2, "big")
    ip[10:12] = b"\0\0"
    ip[10:12] = ip_checksum(ip).to_bytes(2, "big")
    l4 = bytearray(first[_IP_HDR:hlen])
    l4_len = run.size - _IP_HDR
    # Partial checksum: the pseudo-header sum (not complemented) over the whole merged
    # packet; the kernel adds the data (local delivery trusts it, GSO computes each
    # segment's from it).
    if run.tcp:
        if run.psh:
            l4[13] |= _PSH
        l4[16:18] = _fold(_sum16(first[12:20]) + 6 + l4_len).to_bytes(2, "big")
        hdr = VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, hlen, run.mss, _IP_HDR, _TCP_CSUM_OFFSET)
    else:
        l4[4:6] = l4_len.to_bytes(2, "big")
        l4[6:8] = _fold(_sum16(first[12:20]) + 17 + l4_len).to_bytes(2, "big")
        hdr = VNET_HDR.pack(NEEDS_CSUM, GSO_UDP_L4, hlen, run.mss, _IP_HDR, _UDP_CSUM_OFFSET)
    return [hdr, bytes(ip), bytes(l4), *[p[hlen:] for p in packets]]


def _sum16(data: bytes | bytearray) -> int:
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def _fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ip_checksum(header: bytes | bytearray) -> int:
    """The Internet checksum of an IPv4 header whose checksum field is zero."""
    return ~_fold(_sum16(header)) & 0xFFFF


__all__ = [
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_UDP_L4",
    "MAX_SEGMENTS",
    "NEEDS_CSUM",
    "VNET_HDR",
    "VNET_HDR_NONE",
    "VNET_HDR_SIZE",
    "Buffers",
    "coalesce",
    "ip_checksum",
]
