"""ntm_io.tun_offload: which TCP segments (and UDP datagrams) merge into one TUN write, and
that the merged packet's headers (virtio-net, IPv4, TCP/UDP partial checksum) are what the
kernel expects."""

from __future__ import annotations

import os
import random
import struct

from ntm_io.tun_offload import (
    GSO_TCPV4,
    GSO_UDP_L4,
    MAX_COALESCED,
    MAX_SEGMENTS,
    NEEDS_CSUM,
    VNET_HDR,
    VNET_HDR_NONE,
    coalesce,
    ip_checksum,
)

SRC, DST = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])
ACK, PSH, FIN, SYN = 0x10, 0x08, 0x01, 0x02
TS_OPTS = b"\x01\x01\x08\x0a" + struct.pack("!II", 1000, 2000)  # NOP NOP timestamps


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp(
    seq: int,
    payload: bytes,
    flags: int = ACK,
    sport: int = 40000,
    opts: bytes = TS_OPTS,
    ttl: int = 64,
    frag: int = 0x4000,
    ip_id: int = 1,
    src: bytes = SRC,
) -> bytes:
    """A valid IPv4/TCP segment (both checksums right)."""
    doff = (20 + len(opts)) // 4
    th = struct.pack("!HHIIBBHHH", sport, 5201, seq, 777, doff << 4, flags, 502, 0, 0) + opts
    seg = th + payload
    pseudo = src + DST + struct.pack("!BBH", 0, 6, len(seg))
    check = ~csum(pseudo + seg) & 0xFFFF
    seg = seg[:16] + check.to_bytes(2, "big") + seg[18:]
    total = 20 + len(seg)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ip_id, frag, ttl, 6, 0, src, DST)
    ip = ip[:10] + ip_checksum(ip).to_bytes(2, "big") + ip[12:]
    return ip + seg


def flow(n: int, mss: int = 1348, seq: int = 5000, **kw: object) -> list[bytes]:
    out = []
    for i in range(n):
        out.append(tcp(seq, os.urandom(mss), ip_id=i + 1, **kw))  # type: ignore[arg-type]
        seq = (seq + mss) & 0xFFFFFFFF
    return out


def merged(write: list[bytes | memoryview]) -> tuple[tuple[int, ...], bytes]:
    """(virtio-net header fields, the packet) of one write."""
    hdr = bytes(write[0])
    return VNET_HDR.unpack(hdr), b"".join(bytes(b) for b in write[1:])


def test_contiguous_segments_become_one_gso_write() -> None:
    pkts = flow(10)
    [(write, originals)] = coalesce(pkts)
    assert originals == pkts
    (flags, gso, hdr_len, gso_size, start, offset), big = merged(write)
    hlen = 20 + 20 + len(TS_OPTS)
    assert (flags, gso, hdr_len, gso_size, start, offset) == (
        NEEDS_CSUM,
        GSO_TCPV4,
        hlen,
        1348,
        20,
        16,
    )
    # One packet: the first's headers, every payload in order, lengths and IP checksum right.
    assert big[20:hlen][:16] == pkts[0][20:36] and big[hlen:] == b"".join(p[hlen:] for p in pkts)
    assert int.from_bytes(big[2:4], "big") == len(big) == hlen + 10 * 1348
    assert csum(big[:20]) == 0xFFFF  # a valid IPv4 header checksum
    # Partial checksum: finishing it the way the kernel does (sum from csum_start, starting
    # with the field) gives the true TCP checksum of the merged segment.
    seg = big[20:]
    finished = ~csum(seg) & 0xFFFF
    zeroed = seg[:16] + b"\0\0" + seg[18:]
    pseudo = SRC + DST + struct.pack("!BBH", 0, 6, len(seg))
    assert finished == ~csum(pseudo + zeroed) & 0xFFFF


def test_psh_ends_a_run_and_is_kept() -> None:
    pkts = [*flow(3), tcp(5000 + 3 * 1348, os.urandom(1348), ACK | PSH)]
    pkts += [tcp(5000 + 4 * 1348, os.urandom(1348))]
    writes = coalesce(pkts)
    assert [o for _, o in writes] == [pkts[:4], pkts[4:]]
    (_, big) = merged(writes[0][0])
    assert big[33] == ACK | PSH  # the merged packet carries the PSH
    assert writes[1][0][0] == VNET_HDR_NONE  # a lone segment is written as it was


def test_a_shorter_segment_ends_a_run() -> None:
    pkts = flow(4)
    short = tcp(5000 + 4 * 1348, b"z" * 100)
    after = tcp(5000 + 4 * 1348 + 100, os.urandom(1348))
    writes = coalesce([*pkts, short, after])
    assert [o for _, o in writes] == [[*pkts, short], [after]]
    (fields, big) = merged(writes[0][0])
    assert fields[3] == 1348 and len(big) == 52 + 4 * 1348 + 100


def test_a_gap_or_a_retransmission_starts_a_new_run() -> None:
    pkts = flow(3)
    gap = tcp(5000 + 5 * 1348, os.urandom(1348))
    again = pkts[1]
    writes = coalesce([*pkts, gap, again])
    assert [o for _, o in writes] == [pkts, [gap], [again]]


def test_flows_are_merged_separately_and_keep_their_order() -> None:
    a = flow(4, sport=1111)
    b = flow(4, sport=2222, seq=90000)
    mixed = [a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3]]
    writes = coalesce(mixed)
    assert [o for _, o in writes] == [a, b]


def test_what_must_match_for_a_merge() -> None:
    base = flow(2)
    nxt = 5000 + 2 * 1348
    for other in (
        tcp(nxt, os.urandom(1348), ttl=63),  # TTL
        tcp(nxt, os.urandom(1348), frag=0),  # DF
        tcp(nxt, os.urandom(1348), opts=b"\x01\x01\x08\x0a" + struct.pack("!II", 1001, 2000)),
        tcp(nxt, os.urandom(1348), src=bytes([100, 64, 0, 9])),  # another flow
    ):
        writes = coalesce([*base, other])
        assert [o for _, o in writes] == [base, [other]]


def test_packets_that_never_merge_pass_unchanged_and_end_their_flow_run() -> None:
    pkts = flow(2)
    nxt = 5000 + 2 * 1348
    fin = tcp(nxt, b"", ACK | FIN)
    later = tcp(nxt + 1, os.urandom(1348))
    writes = coalesce([*pkts, fin, later])
    # The FIN is written alone, after the run; the segment after it is not pulled before it.
    assert [o for _, o in writes] == [pkts, [fin], [later]]
    assert writes[1][0] == [VNET_HDR_NONE, fin]
    syn = tcp(1, b"", SYN)
    udp = b"\x45" + bytes(8) + b"\x11" + bytes(30)
    frag = tcp(nxt, os.urandom(100), frag=0x2000)  # MF set
    ipopt = b"\x46" + pkts[0][1:]  # IHL 6
    odd = [syn, udp, frag, ipopt, b"\x60" + bytes(50), b"\x45"]
    assert [o for _, o in coalesce(odd)] == [[p] for p in odd]


def test_pure_acks_and_single_segments_are_not_marked_gso() -> None:
    ack = tcp(5000, b"")
    one = flow(1)
    writes = coalesce([ack, *one])
    assert [w for w, _ in writes] == [[VNET_HDR_NONE, ack], [VNET_HDR_NONE, one[0]]]


def test_a_run_stops_at_64_kib() -> None:
    pkts = flow(60)
    writes = coalesce(pkts)
    assert [p for _, o in writes for p in o] == pkts
    for write, originals in writes:
        _, big = merged(write)
        assert len(big) <= MAX_COALESCED
        if len(originals) > 1:
            assert int.from_bytes(big[2:4], "big") == len(big)
    assert len(writes) == 2


def test_sequence_numbers_wrap() -> None:
    pkts = flow(3, seq=2**32 - 1348 - 10)
    assert [o for _, o in coalesce(pkts)] == [pkts]


def test_random_mixes_keep_every_packet_and_each_flow_in_order() -> None:
    rng = random.Random(7)
    for _ in range(200):
        seqs = {1111: 1000, 2222: 2**32 - 3000, 3333: 50}
        pkts: list[bytes] = []
        for _ in range(rng.randrange(1, 40)):
            sport = rng.choice(list(seqs))
            size = rng.choice([1348, 1348, 1348, 700, 0])
            flags = rng.choice([ACK, ACK, ACK, ACK | PSH, ACK | FIN])
            if rng.random() < 0.1:
                seqs[sport] = (seqs[sport] + 1348) & 0xFFFFFFFF  # a gap
            pkts.append(tcp(seqs[sport], bytes([sport % 251]) * size, flags, sport=sport))
            seqs[sport] = (seqs[sport] + size) & 0xFFFFFFFF
        writes = coalesce(pkts)
        flat = [p for _, o in writes for p in o]
        assert sorted(flat) == sorted(pkts)
        for sport in seqs:  # each flow's packets in arrival order
            key = sport.to_bytes(2, "big")
            assert [p for p in flat if p[20:22] == key] == [p for p in pkts if p[20:22] == key]
        for write, originals in writes:
            if len(originals) == 1:
                assert write == [VNET_HDR_NONE, originals[0]]
                continue
            fields, big = merged(write)
            hlen = fields[2]
            assert big[hlen:] == b"".join(p[hlen:] for p in originals)
            sizes = [len(p) - hlen for p in originals]
            assert fields[3] == sizes[0] and all(s == sizes[0] for s in sizes[:-1])
            assert 0 < sizes[-1] <= sizes[0]
            assert all(p[33] == ACK for p in originals[:-1])
            seq = int.from_bytes(originals[0][24:28], "big")
            for p, s in zip(originals, sizes, strict=True):
                assert int.from_bytes(p[24:28], "big") == seq
                seq = (seq + s) & 0xFFFFFFFF


# --- UDP -------------------------------------------------------------------------------------


def udp(payload: bytes, sport: int = 40000, ttl: int = 64, ip_id: int = 1) -> bytes:
    """A valid IPv4/UDP datagram (both checksums right)."""
    length = 8 + len(payload)
    pseudo = SRC + DST + struct.pack("!BBH", 0, 17, length)
    check = ~csum(pseudo + struct.pack("!HHHH", sport, 5201, length, 0) + payload) & 0xFFFF
    dgram = struct.pack("!HHHH", sport, 5201, length, check or 0xFFFF) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, ip_id, 0x4000, ttl, 17, 0, SRC, DST)
    ip = ip[:10] + ip_checksum(ip).to_bytes(2, "big") + ip[12:]
    return ip + dgram


def test_equal_size_udp_datagrams_become_one_gso_write() -> None:
    pkts = [udp(bytes([i]) * 1372, ip_id=i) for i in range(8)] + [udp(b"end" * 10)]
    [(write, originals)] = coalesce(pkts)
    assert originals == pkts
    fields, big = merged(write)
    assert fields == (NEEDS_CSUM, GSO_UDP_L4, 28, 1372, 20, 6)
    assert big[28:] == b"".join(p[28:] for p in pkts)
    assert int.from_bytes(big[2:4], "big") == len(big) and csum(big[:20]) == 0xFFFF
    assert int.from_bytes(big[24:26], "big") == len(big) - 20  # the UDP length
    seg = big[20:]
    pseudo = SRC + DST + struct.pack("!BBH", 0, 17, len(seg))
    zeroed = seg[:6] + b"\0\0" + seg[8:]
    assert ~csum(seg) & 0xFFFF == ~csum(pseudo + zeroed) & 0xFFFF  # partial checksum


def test_udp_runs_end_where_they_must() -> None:
    a = [udp(b"a" * 500, sport=1111) for _ in range(3)]
    b = [udp(b"b" * 500, sport=2222) for _ in range(3)]
    mixed = [a[0], b[0], a[1], b[1], a[2], b[2]]
    assert [o for _, o in coalesce(mixed)] == [a, b]  # two flows, each merged, in order
    bigger = udp(b"c" * 600, sport=1111)
    assert [o for _, o in coalesce([*a, bigger])] == [a, [bigger]]  # larger: a new run
    other_ttl = udp(b"a" * 500, sport=1111, ttl=9)
    assert [o for _, o in coalesce([*a, other_ttl])] == [a, [other_ttl]]
    small = [udp(b"s" * 10) for _ in range(100)]
    assert [len(o) for _, o in coalesce(small)] == [MAX_SEGMENTS, 100 - MAX_SEGMENTS]
    assert [len(o) for _, o in coalesce(small, udp=False)] == [1] * 100


def test_tcp_and_udp_with_the_same_ports_are_not_mixed() -> None:
    t = flow(3, sport=40000)
    u = [udp(b"u" * 1348) for _ in range(3)]
    writes = coalesce([t[0], u[0], t[1], u[1], t[2], u[2]])
    assert [o for _, o in writes] == [t, u]
