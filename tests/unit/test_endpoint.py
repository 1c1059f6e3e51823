"""TunnelEndpoint: many paths on one socket, demultiplexed by path id."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntm_proto.crypto import StaticKey
from ntm_proto.endpoint import TunnelEndpoint
from ntm_proto.errors import LocalProtocolError
from ntm_proto.messages import PathRole
from ntm_proto.packet import PacketType
from ntm_proto.path import PathConfig, PathEstablished, PathState, TunnelPath

from .test_path import ATTACKER, I_ADDR, R_ADDR, WALL0, Link, Node, Sim

PIDS = [bytes([i]) * 8 for i in range(1, 4)]


def three_paths(link: Link | None = None) -> tuple[Sim, Node, Node]:
    """Node a opens three paths to node b (peer vIPs 100.64.1.1 .. 100.64.1.3)."""
    a, b = Node("a", I_ADDR), Node("b", R_ADDR)
    sim = Sim(a, b, link)
    sa, sb = StaticKey.generate(), StaticKey.generate()
    for i, pid in enumerate(PIDS, start=1):
        a_vip, b_vip = f"100.64.0.{i}", f"100.64.1.{i}"
        ca = PathConfig(pid, PathRole.INITIATOR, sa, sb.public_bytes(), a_vip, b_vip, (R_ADDR,))
        cb = PathConfig(pid, PathRole.RESPONDER, sb, sa.public_bytes(), b_vip, a_vip)
        a.ep.add_path(ca, sim.now).connect(sim.now, sim.wall)
        b.ep.add_path(cb, sim.now)
    sim.run(0.1)
    return sim, a, b


def test_many_paths_one_socket() -> None:
    sim, a, b = three_paths()
    assert sorted(pid for pid, e in a.events if isinstance(e, PathEstablished)) == PIDS
    assert sorted(pid for pid, e in b.events if isinstance(e, PathEstablished)) == PIDS
    for pid in PIDS:
        assert sim.send_ip(a, b"E-" + pid, pid)
    sim.run(0.1)
    assert sorted(b.inbox) == sorted(b"E-" + pid for pid in PIDS)


def test_receive_returns_the_path() -> None:
    sim, a, b = three_paths()
    path = a.ep.path(PIDS[1])
    assert path is not None
    datagram = path.seal(b"E-hello", sim.now)
    assert datagram is not None
    result = b.ep.receive_datagram(datagram, I_ADDR, sim.now, sim.wall)
    assert result is not None
    assert result[0] is b.ep.path(PIDS[1]) and result[1] == b"E-hello"


def test_path_lookup_and_vip() -> None:
    _sim, a, _b = three_paths()
    ep = a.ep
    assert ep.path(PIDS[0]) is not None
    assert ep.path(b"\x00" * 8) is None
    p2 = ep.path_for_vip("100.64.1.2")
    assert p2 is not None and p2.path_id == PIDS[1]
    assert ep.path_for_vip("100.64.9.9") is None
    assert ep.path_for_vip("garbage") is None
    assert len(ep.paths) == 3


def test_vip_handover_between_paths() -> None:
    ep = TunnelEndpoint()
    s = StaticKey.generate()
    peer = StaticKey.generate().public_bytes()
    cfg = [
        PathConfig(pid, PathRole.RESPONDER, s, peer, "100.64.0.1", "100.64.1.1") for pid in PIDS[:2]
    ]
    old, new = ep.add_path(cfg[0], 0.0), ep.add_path(cfg[1], 0.0)
    assert ep.path_for_vip("100.64.1.1") is new  # the newest direction wins
    assert ep.remove_path(new.path_id) is new
    assert new.state is PathState.CLOSED
    assert ep.path_for_vip("100.64.1.1") is old
    assert ep.remove_path(new.path_id) is None
    with pytest.raises(LocalProtocolError):
        ep.add_path(cfg[0], 0.0)


def test_unknown_path_and_short_datagrams_counted() -> None:
    sim, _a, b = three_paths()
    before = dict(b.ep.counters)
    assert b.ep.receive_datagram(bytes(5), ATTACKER, sim.now, sim.wall) is None
    unknown = bytes([3, 0, 0, 0]) + b"\xee" * 8 + bytes(40)
    assert b.ep.receive_datagram(unknown, ATTACKER, sim.now, sim.wall) is None
    counters = b.ep.counters
    assert counters["drop_too_short"] == 1
    assert counters["drop_unknown_path"] == 1
    assert counters["rx_datagrams"] == before["rx_datagrams"] + 2


def test_bad_datagrams_leave_other_paths_alone() -> None:
    sim, a, b = three_paths()
    rng = random.Random(5)
    target = b.ep.path(PIDS[0])
    assert target is not None
    for _ in range(200):
        ptype = rng.choice([1, 2, 3, 4, 9])
        junk = bytes([ptype, rng.randrange(3), 0, 0]) + PIDS[0] + rng.randbytes(rng.randrange(120))
        assert b.ep.receive_datagram(junk, ATTACKER, sim.now, sim.wall) is None
    replays_before = b.ep.counters.get("drop_replayed", 0)  # random counters >= 2^60
    # a replay too
    p = a.ep.path(PIDS[1])
    assert p is not None
    datagram = p.seal(b"E-x", sim.now)
    assert datagram is not None
    assert b.ep.receive_datagram(datagram, I_ADDR, sim.now, sim.wall) is not None
    assert b.ep.receive_datagram(datagram, I_ADDR, sim.now, sim.wall) is None
    assert b.ep.counters["drop_replayed"] == replays_before + 1
    drops = sum(v for k, v in b.ep.counters.items() if k.startswith("drop_"))
    assert drops == 201
    # every path still works, addresses unchanged
    for pid in PIDS:
        path = b.ep.path(pid)
        assert path is not None and path.peer_address == I_ADDR
        assert sim.send_ip(a, b"E-after-" + pid, pid)
        assert sim.send_ip(b, b"E-back-" + pid, pid)
    sim.run(0.1)
    assert len([x for x in b.inbox if x.startswith(b"E-after-")]) == 3
    assert len([x for x in a.inbox if x.startswith(b"E-back-")]) == 3


def test_timers_and_events_over_all_paths() -> None:
    sim, a, _b = three_paths()
    assert a.ep.get_timer() == pytest.approx(sim.now - 0.1 + 15.0, abs=0.1)  # keepalives
    sent = len(sim.sent)
    sim.run(15.0)
    keepalives = [d for _, d, src, _ in sim.sent[sent:] if src == I_ADDR]
    assert len(keepalives) == 3 and all(d[0] == PacketType.CONTROL for d in keepalives)
    assert a.ep.events() == []  # drained by the sim


def test_empty_endpoint() -> None:
    ep = TunnelEndpoint()
    assert ep.get_timer() is None
    assert ep.datagrams_to_send(0.0) == []
    assert ep.events() == []
    ep.handle_timer(0.0, WALL0)


def _hostile_endpoint() -> TunnelEndpoint:
    _sim, _a, b = three_paths()
    ci = b.ep.path(PIDS[0])
    assert ci is not None
    # plus a fresh responder path and an initiator mid-handshake
    s, peer = StaticKey.generate(), StaticKey.generate().public_bytes()
    b.ep.add_path(
        PathConfig(b"\x07" * 8, PathRole.RESPONDER, s, peer, "100.64.0.9", "100.64.1.9"), 0.0
    )
    init = b.ep.add_path(
        PathConfig(b"\x08" * 8, PathRole.INITIATOR, s, peer, "100.64.0.8", "100.64.1.8", (R_ADDR,)),
        0.0,
    )
    init.connect(0.0, WALL0)
    return b.ep


_HOSTILE = _hostile_endpoint()
_KNOWN = [*PIDS, b"\x07" * 8, b"\x08" * 8]


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.tuples(
            st.integers(0, 6),
            st.integers(0, 255),
            st.sampled_from(_KNOWN),
            st.binary(max_size=160),
        ).map(lambda t: bytes([t[0], t[1], 0, 0]) + t[2] + t[3]),
    ),
    st.floats(0, 1000),
)
def test_endpoint_never_raises(data: bytes, now: float) -> None:
    assert _HOSTILE.receive_datagram(data, ATTACKER, now, WALL0) is None
    _HOSTILE.handle_timer(now, WALL0)
    _HOSTILE.datagrams_to_send(now)


def test_endpoint_tolerates_all_paths_states() -> None:
    ep = TunnelEndpoint()
    s, peer = StaticKey.generate(), StaticKey.generate().public_bytes()
    path = ep.add_path(
        PathConfig(PIDS[0], PathRole.RESPONDER, s, peer, "100.64.0.1", "100.64.1.1"), 0
    )
    assert isinstance(path, TunnelPath)
    path.close()
    junk = bytes([3, 0, 0, 0]) + PIDS[0] + bytes(40)
    assert ep.receive_datagram(junk, ATTACKER, 0.0, WALL0) is None
    assert ep.counters["drop_closed"] == 1
