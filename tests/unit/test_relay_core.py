"""The Relay Server core (sans-IO): binding, forwarding, the reflector attempt, expiry, load."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntm_proto import relay_binding as rb
from ntm_proto.crypto import StaticKey
from ntm_proto.messages import (
    Endpoint,
    ErrorCode,
    ErrorMessage,
    PathRole,
    RelayDirection,
    RelayDirectionAck,
)
from ntm_proto.packet import HANDSHAKE_SIZE, PacketType, build_prefix
from ntm_proto.path import PathConfig, PathEstablished, TunnelPath
from relay.core import PROBE_PATH_ID, Binding, RelayCore, RelaySettings

PID = bytes.fromhex("a1a2a3a4a5a6a7a8")
KEY = bytes(range(100, 132))
I_KEY = rb.side_key(KEY, PathRole.INITIATOR)
R_KEY = rb.side_key(KEY, PathRole.RESPONDER)
I_ADDR: Endpoint = ("198.51.100.2", 40001)  # the initiator behind nat-a, as the RS sees it
R_ADDR: Endpoint = ("198.51.100.3", 7400)
R6_ADDR: Endpoint = ("2001:db8:b::100", 7400)  # an IPv6-only responder
ATTACKER: Endpoint = ("203.0.113.66", 5555)
VICTIM: Endpoint = ("192.0.2.99", 53)
DC = "dc1.ntm.example.com"

_stamps = itertools.count(1_700_000_000_000_000_000)


def ts() -> int:
    return next(_stamps)


def data_packet(pid: bytes = PID, payload: bytes = b"x" * 40) -> bytes:
    """A well-framed DATA packet (the RS never looks inside)."""
    return build_prefix(PacketType.DATA, 0, pid) + bytes(8) + payload


def make(settings_: RelaySettings | None = None, lifetime: int = 600) -> RelayCore:
    core = RelayCore(settings_, now=0.0)
    ack = core.handle_direction(RelayDirection(PID, KEY, lifetime), DC, 0.0)
    assert isinstance(ack, RelayDirectionAck) and ack.active_paths == 1
    return core


def bind(
    core: RelayCore,
    side: PathRole,
    addr: Endpoint,
    now: float = 0.0,
    via: int = 0,
    key: bytes | None = None,
    stamp: int | None = None,
) -> list[tuple[bytes, Endpoint, int]]:
    key = key or (I_KEY if side is PathRole.INITIATOR else R_KEY)
    data = rb.build_bind(side, PID, ts() if stamp is None else stamp, key)
    assert core.receive_datagram(data, addr, now, via) is None
    return core.datagrams_to_send()


def bound_core(r_addr: Endpoint = R_ADDR, r_via: int = 0) -> RelayCore:
    core = make()
    assert len(bind(core, PathRole.INITIATOR, I_ADDR)) == 1
    assert len(bind(core, PathRole.RESPONDER, r_addr, via=r_via)) == 1
    return core


def forward(core: RelayCore, data: bytes, src: Endpoint, now: float = 1.0) -> Binding | None:
    return core.receive_datagram(data, src, now, 0)


def drops(core: RelayCore) -> dict[str, int]:
    return {k: v for k, v in core.counters.items() if k.startswith("drop_")}


# --- binding and forwarding -----------------------------------------------------------------


def test_bind_answers_an_ack_of_the_same_size_to_the_source() -> None:
    core = make()
    stamp = ts()
    [(ack, to, via)] = bind(core, PathRole.INITIATOR, I_ADDR, via=3, stamp=stamp)
    assert to == I_ADDR and via == 3 and len(ack) == rb.BIND_SIZE
    pkt = rb.parse(ack)
    assert pkt.type is rb.BindingType.BIND_ACK and pkt.timestamp == stamp and pkt.verify(I_KEY)
    path = core.path(PID)
    assert path is not None and path.sides[0].address == I_ADDR and path.sides[1].address is None


def test_forwards_both_ways_unchanged() -> None:
    core = bound_core()
    out = data_packet(payload=b"from the initiator" * 3)
    back = data_packet(payload=b"from the responder" * 5)
    dst = forward(core, out, I_ADDR)
    assert dst is not None and dst.address == R_ADDR and dst.role is PathRole.RESPONDER
    dst = forward(core, back, R_ADDR)
    assert dst is not None and dst.address == I_ADDR
    path = core.path(PID)
    assert path is not None
    i, r = path.sides
    assert (i.rx_packets, i.rx_bytes, i.tx_packets, i.tx_bytes) == (1, len(out), 1, len(back))
    assert (r.rx_packets, r.rx_bytes, r.tx_packets, r.tx_bytes) == (1, len(back), 1, len(out))
    assert core.counters["forwarded_packets"] == 2
    assert core.datagrams_to_send() == [] and drops(core) == {}


def test_cross_family_forwarding_uses_each_sides_socket() -> None:
    core = bound_core(r_addr=R6_ADDR, r_via=1)
    dst = forward(core, data_packet(), I_ADDR)
    assert dst is not None and dst.address == R6_ADDR and dst.via == 1
    dst = forward(core, data_packet(), R6_ADDR)
    assert dst is not None and dst.address == I_ADDR and dst.via == 0


def test_rebind_from_a_new_address_with_a_fresh_mac() -> None:
    core = bound_core()
    moved: Endpoint = ("198.51.100.2", 40999)  # nat-a gave the initiator a new mapping
    [(_ack, to, _via)] = bind(core, PathRole.INITIATOR, moved, now=2.0)
    assert to == moved
    assert forward(core, data_packet(), I_ADDR) is None  # the old mapping is dead now
    dst = forward(core, data_packet(), moved)
    assert dst is not None and dst.address == R_ADDR
    dst = forward(core, data_packet(), R_ADDR)
    assert dst is not None and dst.address == moved
    assert core.counters["rebinds"] == 1 and drops(core) == {"drop_unbound_source": 1}


def test_replayed_bind_is_dropped_even_from_a_new_address() -> None:
    core = make()
    bind_pkt = rb.build_bind(PathRole.INITIATOR, PID, ts(), I_KEY)
    assert core.receive_datagram(bind_pkt, I_ADDR, 0.0) is None
    assert len(core.datagrams_to_send()) == 1
    for src in (I_ADDR, ATTACKER, VICTIM):  # duplicate, and replays from elsewhere
        assert core.receive_datagram(bind_pkt, src, 1.0) is None
    # An older (but never seen) timestamp is no better.
    older = rb.build_bind(PathRole.INITIATOR, PID, 5, I_KEY)
    assert core.receive_datagram(older, VICTIM, 1.0) is None
    assert core.datagrams_to_send() == []
    path = core.path(PID)
    assert path is not None and path.sides[0].address == I_ADDR
    assert drops(core) == {"drop_bind_replayed": 4}


def test_forged_binds_are_dropped() -> None:
    core = bound_core()
    forged = [
        rb.build_bind(PathRole.INITIATOR, PID, ts(), bytes(32)),  # guessed key
        rb.build_bind(PathRole.INITIATOR, PID, ts(), KEY),  # the master key is not a side key
        # The responder knows only its own side's key: it cannot move the initiator's side.
        rb.build_bind(PathRole.INITIATOR, PID, ts(), R_KEY),
    ]
    good = rb.build_bind(PathRole.INITIATOR, PID, ts(), I_KEY)
    tampered = good[:12] + (int.from_bytes(good[12:20], "big") + 1).to_bytes(8, "big") + good[20:]
    for data in [*forged, tampered]:
        assert core.receive_datagram(data, VICTIM, 1.0) is None
    assert core.datagrams_to_send() == []
    path = core.path(PID)
    assert path is not None and path.sides[0].address == I_ADDR
    assert drops(core) == {"drop_bind_bad_mac": 4}


def test_reflector_attempt_forwards_nothing() -> None:
    """A valid path id from an address that never bound: nothing goes anywhere."""
    core = bound_core()
    for src in (ATTACKER, VICTIM, ("198.51.100.2", 40002), ("2001:db8:b::100", 7401)):
        assert forward(core, data_packet(), src) is None
        handshake = build_prefix(PacketType.HANDSHAKE_INIT, 0, PID) + bytes(HANDSHAKE_SIZE - 12)
        assert forward(core, handshake, src) is None
    assert core.datagrams_to_send() == []
    assert drops(core) == {"drop_unbound_source": 8}
    path = core.path(PID)
    assert path is not None and path.sides[0].tx_packets == path.sides[1].tx_packets == 0


def test_unknown_path_and_garbage_are_dropped_by_reason() -> None:
    core = bound_core()
    cases = {
        "drop_unknown_path": data_packet(pid=b"\xee" * 8),
        "drop_too_short": b"\x03\x00\x00",
        "drop_bad_type": b"\x09" + data_packet()[1:],
        "drop_bad_length": build_prefix(PacketType.HANDSHAKE_INIT, 0, PID) + b"short",
        "drop_bad_field": data_packet()[:2] + b"\x00\x01" + data_packet()[4:],
        "drop_bind_unexpected": rb.build_bind_ack(PathRole.INITIATOR, PID, ts(), I_KEY),
        "drop_bind_bad_length": rb.build_bind(PathRole.INITIATOR, PID, ts(), I_KEY) + b"!",
        "drop_bind_unknown_path": rb.build_bind(PathRole.INITIATOR, b"\xee" * 8, ts(), I_KEY),
    }
    for data in cases.values():
        assert forward(core, data, I_ADDR) is None
    assert core.datagrams_to_send() == []
    assert drops(core) == dict.fromkeys(cases, 1)


def test_bind_cannot_take_the_other_sides_address() -> None:
    core = bound_core()
    bind(core, PathRole.RESPONDER, I_ADDR)
    path = core.path(PID)
    assert path is not None and path.sides[1].address == R_ADDR
    assert drops(core) == {"drop_bind_conflict": 1}


# --- the queue before the other side binds -------------------------------------------------


def test_packets_wait_for_the_other_side_then_flow_in_order() -> None:
    core = make()
    bind(core, PathRole.INITIATOR, I_ADDR)
    early = [data_packet(payload=bytes([i]) * 50) for i in range(3)]
    for p in early:
        assert forward(core, p, I_ADDR, now=0.5) is None
    assert core.datagrams_to_send() == []
    out = bind(core, PathRole.RESPONDER, R_ADDR, now=1.0)
    assert [d for d, _a, _v in out[1:]] == early and all(a == R_ADDR for _d, a, _v in out[1:])
    assert rb.parse(out[0][0]).type is rb.BindingType.BIND_ACK
    assert core.counters["queue_flushed"] == 3


def test_queue_is_bounded_in_count_and_age() -> None:
    core = make(RelaySettings(queue_packets=2, queue_max_age=1.0))
    bind(core, PathRole.INITIATOR, I_ADDR)
    for _ in range(3):
        forward(core, data_packet(), I_ADDR, now=0.0)
    assert drops(core) == {"drop_queue_full": 1}
    out = bind(core, PathRole.RESPONDER, R_ADDR, now=5.0)  # too late for what waited
    assert len(out) == 1 and drops(core)["drop_queue_expired"] == 2


# --- directions, expiry, load ---------------------------------------------------------------


def test_lifetime_expiry_and_renewal() -> None:
    core = make(lifetime=100)
    assert core.get_timer() == 90.0  # idle timeout first
    bind(core, PathRole.INITIATOR, I_ADDR, now=80.0)  # activity pushes idle back
    core.handle_timer(90.0)
    assert core.path(PID) is not None
    # The DC renews with the same key: bindings survive.
    ack = core.handle_direction(RelayDirection(PID, KEY, 200), DC, 95.0)
    assert isinstance(ack, RelayDirectionAck)
    path = core.path(PID)
    assert path is not None and path.expires_at == 295.0 and path.sides[0].address == I_ADDR
    bind(core, PathRole.RESPONDER, R_ADDR, now=150.0)
    for t in range(160, 300, 30):
        assert forward(core, data_packet(), I_ADDR, now=float(t)) is not None
        core.handle_timer(float(t))
    timer = core.get_timer()
    assert timer is not None and timer <= 295.0
    core.handle_timer(295.0)
    assert core.path(PID) is None and core.counters["paths_expired_lifetime"] == 1
    assert forward(core, data_packet(), I_ADDR, now=296.0) is None
    assert bind(core, PathRole.INITIATOR, I_ADDR, now=296.0) == []
    assert drops(core) == {"drop_expired_path": 1, "drop_bind_expired_path": 1}


def test_idle_expiry_even_without_a_timer_run() -> None:
    core = bound_core()
    assert forward(core, data_packet(), I_ADDR, now=89.0) is not None
    assert forward(core, data_packet(), I_ADDR, now=179.5) is None  # 90.5 s of silence
    assert core.path(PID) is None and core.counters["paths_expired_idle"] == 1
    assert drops(core) == {"drop_expired_path": 1}


def test_drops_do_not_keep_a_path_alive() -> None:
    core = bound_core()
    for t in range(10, 200, 10):
        forward(core, data_packet(), ATTACKER, now=float(t))
        bind(core, PathRole.INITIATOR, ATTACKER, now=float(t), key=bytes(32))
        core.handle_timer(float(t))
    assert core.path(PID) is None


def test_directions_owner_capacity_removal_and_probe() -> None:
    core = RelayCore(RelaySettings(max_paths=2), now=0.0)
    assert isinstance(
        core.handle_direction(RelayDirection(PID, KEY, 60), DC, 0.0), RelayDirectionAck
    )
    # Another DC may neither change nor remove this path.
    for lifetime in (60, 0):
        answer = core.handle_direction(RelayDirection(PID, bytes(32), lifetime), "dc2", 0.0)
        assert isinstance(answer, ErrorMessage) and answer.code is ErrorCode.NOT_AUTHORIZED
    other = b"\x02" * 8
    assert isinstance(
        core.handle_direction(RelayDirection(other, KEY, 60), DC, 0), RelayDirectionAck
    )
    full = core.handle_direction(RelayDirection(b"\x03" * 8, KEY, 60), DC, 0.0)
    assert isinstance(full, ErrorMessage) and full.code is ErrorCode.POOL_EXHAUSTED
    # Load probe: reserved path id, lifetime 0; installing it is refused.
    probe = core.handle_direction(RelayDirection(PROBE_PATH_ID, bytes(32), 0), "dc2", 0.0)
    assert probe == RelayDirectionAck(PROBE_PATH_ID, active_paths=2, load=1000)
    refused = core.handle_direction(RelayDirection(PROBE_PATH_ID, KEY, 60), DC, 0.0)
    assert isinstance(refused, ErrorMessage)
    # Removal by the owner; then a new key for a path id starts it over (bindings gone).
    ack = core.handle_direction(RelayDirection(other, KEY, 0), DC, 1.0)
    assert ack == RelayDirectionAck(other, active_paths=1, load=500)
    bind(core, PathRole.INITIATOR, I_ADDR)
    core.handle_direction(RelayDirection(PID, bytes(range(32)), 60), DC, 1.0)
    path = core.path(PID)
    assert path is not None and path.sides[0].address is None
    assert core.counters["paths_replaced"] == 1 and core.counters["directions_refused"] == 4


def test_lifetime_is_capped() -> None:
    core = RelayCore(RelaySettings(max_lifetime=50), now=0.0)
    core.handle_direction(RelayDirection(PID, KEY, 2**32 - 1), DC, 0.0)
    path = core.path(PID)
    assert path is not None and path.expires_at == 50.0


def test_load_counts_paths_and_packet_rate() -> None:
    core = make(RelaySettings(max_paths=4, capacity_pps=100.0))
    assert core.load(0.0) == 0.25
    bind(core, PathRole.INITIATOR, I_ADDR)
    bind(core, PathRole.RESPONDER, R_ADDR)
    for i in range(198):
        forward(core, data_packet(), I_ADDR, now=i / 200)
    assert core.packet_rate(1.0) == 200.0  # 200 datagrams (2 BINDs) in 1 s
    assert core.load(1.0) == 2.0 and core.load_permille(1.0) == 2000
    status = core.status(1.0)
    assert status["active_paths"] == status["bound_paths"] == 1
    [row] = status["paths"]
    assert row["path_id"] == PID.hex() and row["initiator"]["address"] == list(I_ADDR)
    assert row["responder"]["tx_packets"] == 198


# --- properties -----------------------------------------------------------------------------

ADDRS = st.sampled_from([ATTACKER, VICTIM, ("2001:db8::1", 1), ("10.0.0.1", 7400)])


@settings(max_examples=300)
@given(st.lists(st.tuples(st.binary(max_size=200), ADDRS), max_size=20))
def test_random_datagrams_never_raise_and_never_produce_output(
    datagrams: list[tuple[bytes, Endpoint]],
) -> None:
    core = bound_core()
    for data, addr in datagrams:
        assert core.receive_datagram(data, addr, 1.0) is None
    assert core.datagrams_to_send() == []


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["bind_i", "bind_r", "data", "junk"]),
            st.sampled_from([I_ADDR, R_ADDR, R6_ADDR, ATTACKER]),
            st.binary(max_size=64),
        ),
        max_size=30,
    )
)
def test_never_amplifies_and_only_sends_to_proven_addresses(
    ops: list[tuple[str, Endpoint, bytes]],
) -> None:
    """Per datagram in, at most one datagram out per queued-or-received packet, never larger,
    and only to an address that bound with a valid MAC."""
    core = make()
    proven: set[Endpoint] = set()
    received = sent = 0
    for i, (op, addr, junk) in enumerate(ops):
        now = float(i)
        if op == "bind_i":
            data = rb.build_bind(PathRole.INITIATOR, PID, ts(), I_KEY)
        elif op == "bind_r":
            data = rb.build_bind(PathRole.RESPONDER, PID, ts(), R_KEY)
        elif op == "data":
            data = data_packet(payload=junk + b"p" * 20)
        else:
            data = junk
        if op.startswith("bind") and addr != ATTACKER:
            proven.add(addr)  # an end holding its side's key
        elif op.startswith("bind"):
            data = data[:-1] + bytes([data[-1] ^ 1])  # the attacker has no key
        received += len(data)
        dst = core.receive_datagram(data, addr, now)
        outs = core.datagrams_to_send()
        if dst is not None:
            assert dst.address in proven
            outs.append((data, dst.address, dst.via))
        for out, to, _via in outs:
            assert to in proven
            sent += len(out)
        assert sent <= received


# --- a real tunnel through the relay --------------------------------------------------------


def test_real_tunnel_handshake_and_data_through_the_relay() -> None:
    """Two TunnelPaths whose only peer endpoint is the RS: the handshake and data pass,
    byte for byte, across families; the INIT that beats the responder's BIND waits."""
    rs4: Endpoint = ("198.51.100.50", 7500)
    rs6: Endpoint = ("2001:db8:100::50", 7500)
    si, sr = StaticKey.generate(), StaticKey.generate()
    core = make()
    ini = TunnelPath(
        PathConfig(
            PID, PathRole.INITIATOR, si, sr.public_bytes(), "100.64.0.1", "100.64.0.2", (rs4,)
        ),
        0.0,
    )
    res = TunnelPath(
        PathConfig(PID, PathRole.RESPONDER, sr, si.public_bytes(), "100.64.0.2", "100.64.0.1"),
        0.0,
    )
    ends = {I_ADDR: (ini, rs4), R6_ADDR: (res, rs6)}
    wall = 1_700_000_000_000_000_000
    bind(core, PathRole.INITIATOR, I_ADDR, via=0)
    ini.connect(0.0, wall)

    def deliver(outs: list[tuple[bytes, Endpoint, int]], now: float) -> None:
        for out, addr, _via in outs:
            if rb.is_binding_packet(out):
                continue  # a BIND_ACK: the binder's business (test_relay_binding)
            target, rs_addr = ends[addr]
            target.receive_datagram(out, rs_addr, now, wall)  # from the RS, as the end sees it

    def pump(now: float) -> None:
        moved = True
        while moved:
            moved = False
            for src, (path, rs_addr) in ends.items():
                for data, to in path.datagrams_to_send(now):
                    assert to == rs_addr
                    moved = True
                    dst = core.receive_datagram(data, src, now, 0 if src == I_ADDR else 1)
                    outs = core.datagrams_to_send()
                    if dst is not None:
                        assert dst.address is not None
                        outs.append((data, dst.address, dst.via))
                    deliver(outs, now)

    pump(0.0)  # the INIT waits in the RS's queue
    assert core.counters["queued"] == 1
    r_bind = rb.build_bind(PathRole.RESPONDER, PID, ts(), R_KEY)
    assert core.receive_datagram(r_bind, R6_ADDR, 0.1, 1) is None
    deliver(core.datagrams_to_send(), 0.1)  # BIND_ACK, then the INIT that waited
    pump(0.1)  # RESP, the initiator's confirming Keepalive, the responder's answer
    assert core.counters["queue_flushed"] == 1
    assert ini.peer_address == rs4 and res.peer_address == rs6
    events = [ini.next_event(), res.next_event()]
    assert any(isinstance(e, PathEstablished) for e in events)
    ip_packet = bytes([0x45]) + bytes(19) + b"payload"
    sealed = ini.seal(ip_packet, 1.1)
    assert sealed is not None
    dst = core.receive_datagram(sealed, I_ADDR, 1.1, 0)
    assert dst is not None and dst.address == R6_ADDR and dst.via == 1
    assert res.receive_datagram(sealed, rs6, 1.1, wall) == ip_packet
    sealed_back = res.seal(b"E" + ip_packet, 1.2)
    assert sealed_back is not None
    dst = core.receive_datagram(sealed_back, R6_ADDR, 1.2, 1)
    assert dst is not None and dst.address == I_ADDR
    assert ini.receive_datagram(sealed_back, rs4, 1.2, wall) == b"E" + ip_packet
    assert drops(core) == {}


@pytest.mark.parametrize("n", [1, 100])
def test_many_paths_expire_with_one_heap_entry_each(n: int) -> None:
    core = RelayCore(RelaySettings(idle_timeout=10.0), now=0.0)
    for i in range(n):
        core.handle_direction(RelayDirection((i + 1).to_bytes(8, "big"), KEY, 60), DC, 0)
    for t in range(1, 10):
        core.handle_timer(float(t))
    assert len(core._heap) <= n
    core.handle_timer(10.0)
    assert core.active_paths == 0 and core.get_timer() is None
