"""TunnelPath with two uplinks: standby probes move nothing, `move_to` is make-before-break.

Built on test_path.py's in-memory harness. The initiator (the MN) owns I_ADDR and
I_ADDR2 (two uplinks); the responder answers at R_ADDR and R_ADDR6.
"""

from __future__ import annotations

from ntm_proto.messages import Endpoint, Probe, StandbyProbe, decode, encode
from ntm_proto.packet import PacketType
from ntm_proto.path import PeerAddressChanged, ProbeResult, StandbyProbeResult
from tests.unit.test_path import I_ADDR, I_ADDR2, R_ADDR, established

R_ADDR6: Endpoint = ("2001:db8:100::30", 7400)


def test_standby_probe_is_answered_to_its_source_and_moves_neither_end() -> None:
    sim, a, b, pi, pr = established()
    heard_r, heard_i = pr.last_received, pi.last_received
    probe = pi.standby_probe(sim.now, R_ADDR6)
    assert probe is not None
    seq, datagram = probe
    assert datagram[0] == PacketType.CONTROL
    sim.now += 0.01
    sim.inject(datagram, I_ADDR2, b)  # from the MN's other uplink
    assert pr.peer_address == I_ADDR  # the responder did not follow
    assert pr.last_received == heard_r  # and does not count it as the path's life
    assert b.of_type(PeerAddressChanged) == []
    _t, ack, src, dst = sim.sent[-1]
    assert (src, dst) == (R_ADDR, I_ADDR2)  # answered back the way it came
    sim.now += 0.01
    sim.inject(ack, R_ADDR6, a)  # arriving from the responder's other address
    assert pi.peer_address == R_ADDR
    assert pi.last_received == heard_i
    (result,) = a.of_type(StandbyProbeResult)
    assert isinstance(result, StandbyProbeResult)
    assert (result.seq, result.peer) == (seq, R_ADDR6)
    assert abs(result.rtt - 0.02) < 1e-9
    assert a.of_type(ProbeResult) == []


def test_a_plain_probe_from_another_address_still_moves_the_peer() -> None:
    # probe_other_families (failover.py) relies on it after a move across families.
    sim, a, _b, pi, pr = established()
    a.addr = I_ADDR2
    pi.send_probe(sim.now)
    sim.run(0.1)
    assert pr.peer_address == I_ADDR2


def test_standby_probe_needs_an_established_path() -> None:
    from tests.unit.test_path import pair

    sim, _a, _b, pi, _pr = pair(connect=False)
    assert pi.standby_probe(sim.now, R_ADDR) is None
    assert not pi.move_to(R_ADDR, sim.now, hold=2.0)


def test_move_to_sends_a_keepalive_there_and_the_peer_follows_on_it() -> None:
    sim, a, b, pi, pr = established()
    # Same peer address, new local uplink: the Keepalive tells the responder.
    a.addr = I_ADDR2
    assert pi.move_to(R_ADDR, sim.now, hold=2.0)
    sim.run(0.05)
    assert pr.peer_address == I_ADDR2
    assert sim.send_ip(b, b"to-the-new-uplink")
    sim.run(0.05)
    assert a.inbox == [b"to-the-new-uplink"]


def test_move_to_another_peer_address_holds_off_the_way_back() -> None:
    sim, a, _b, pi, pr = established()
    # The responder sends one packet toward us before it learns of our move...
    in_flight = pr.seal(b"sent-before-the-move", sim.now)
    assert in_flight is not None
    assert pi.move_to(R_ADDR6, sim.now, hold=2.0)
    assert pi.peer_address == R_ADDR6
    assert a.of_type(PeerAddressChanged) == []  # events reach the node on flush
    sim.flush()
    assert a.of_type(PeerAddressChanged) == [PeerAddressChanged(R_ADDR, R_ADDR6)]
    _t, keepalive, _src, dst = sim.sent[-1]
    assert dst == R_ADDR6 and keepalive[0] == PacketType.CONTROL
    # ...it arrives from the address we left, newest of all: delivered, but no move back.
    assert sim.inject(in_flight, R_ADDR, a) == b"sent-before-the-move"
    assert pi.peer_address == R_ADDR6
    # After the hold, that address may move the path again (ordinary roaming).
    sim.now += 2.5
    later = pr.seal(b"after-the-hold", sim.now)
    assert later is not None
    assert sim.inject(later, R_ADDR, a) == b"after-the-hold"
    assert pi.peer_address == R_ADDR


def test_standby_messages_round_trip() -> None:
    msg = StandbyProbe(seq=7, sent_us=123)
    assert decode(encode(msg)) == msg
    assert encode(msg)[1] != encode(Probe(seq=7, sent_us=123))[1]
