"""Static keys, the handshake and transport AEAD."""

from __future__ import annotations

import pytest

from ntm_proto.crypto import (
    REJECT_AFTER_MESSAGES,
    Ephemeral,
    EphemeralSource,
    HandshakeContext,
    KeyExhausted,
    RecvKey,
    SendKey,
    StaticKey,
    decode_public_key,
    encode_public_key,
    load_private_key,
    save_private_key,
)
from ntm_proto.errors import (
    AuthenticationError,
    DecodeError,
    LocalProtocolError,
    ReplayError,
)
from ntm_proto.messages import TunnelRequest, TunnelResponse
from ntm_proto.packet import HANDSHAKE_SIZE, HEADER_SIZE, TUNNEL_OVERHEAD, PacketType, parse

PID = bytes.fromhex("a1a2a3a4a5a6a7a8")
REQ = TunnelRequest(timestamp=1_700_000_000_000_000_000, initiator_vip="100.64.0.2")
RESP = TunnelResponse(timestamp=REQ.timestamp, responder_vip="100.64.0.3")


def contexts(
    si: StaticKey,
    sr: StaticKey,
    *,
    i_thinks_r: bytes | None = None,
    r_thinks_i: bytes | None = None,
) -> tuple[HandshakeContext, HandshakeContext]:
    init = HandshakeContext(si, i_thinks_r or sr.public_bytes(), PID, initiator=True)
    resp = HandshakeContext(sr, r_thinks_i or si.public_bytes(), PID, initiator=False)
    return init, resp


def test_static_key_roundtrip() -> None:
    key = StaticKey.generate()
    assert len(key.public_bytes()) == 32
    again = StaticKey.from_private_bytes(key.private_bytes())
    assert again.public_bytes() == key.public_bytes()
    dumped = save_private_key(key)
    assert dumped.endswith(b"\n") and len(dumped) == 45
    assert load_private_key(dumped).public_bytes() == key.public_bytes()
    assert load_private_key(b"  " + dumped + b"\n").public_bytes() == key.public_bytes()
    assert StaticKey.load(key.private_bytes()).public_bytes() == key.public_bytes()
    text = encode_public_key(key.public_bytes())
    assert decode_public_key(text) == key.public_bytes()
    assert key.private_bytes().hex() not in repr(key)


@pytest.mark.parametrize("bad", [b"", b"not base64!!", b"AAAA\n", bytes(31)])
def test_load_rejects(bad: bytes) -> None:
    with pytest.raises(ValueError):
        load_private_key(bad)


def test_decode_public_key_rejects() -> None:
    with pytest.raises(ValueError):
        decode_public_key("AAAA")
    with pytest.raises(ValueError):
        decode_public_key("%%%")


def test_handshake_agrees_on_keys() -> None:
    si, sr = StaticKey.generate(), StaticKey.generate()
    ci, cr = contexts(si, sr)
    init = ci.initiate(0, REQ)
    assert len(init.packet) == HANDSHAKE_SIZE
    assert parse(init.packet).type is PacketType.HANDSHAKE_INIT
    incoming = cr.receive_initiation(init.packet)
    assert incoming.request == REQ
    resp_packet, r_keys = incoming.accept(RESP, 0)
    assert len(resp_packet) == len(init.packet)  # no amplification
    response, i_keys = init.complete(resp_packet)
    assert response == RESP
    # initiator -> responder and back
    sealed = i_keys.send.seal(b"hello")
    assert len(sealed) == 5 + TUNNEL_OVERHEAD
    assert r_keys.recv.open(sealed, 0) == b"hello"
    back = r_keys.send.seal(b"world", control=True)
    assert back[0] == PacketType.CONTROL
    assert i_keys.recv.open(back, 0) == b"world"
    # the directions use different keys
    with pytest.raises(AuthenticationError):
        RecvKey(b"\x00" * 32).open(i_keys.send.seal(b"x"), 1)


def test_ephemerals_made_ahead_are_each_used_once() -> None:
    lows: list[int] = []
    source = EphemeralSource(keep=2, on_low=lambda: lows.append(1))
    source.refill()
    assert not source.low
    taken = [source.take() for _ in range(4)]  # two ready, then two made on the spot
    assert len({e.public for e in taken}) == 4 and len(lows) == 4
    assert source.low
    source.refill()
    assert not source.low
    # a handshake with given ephemerals: each side's key is the one handed in
    si, sr = StaticKey.generate(), StaticKey.generate()
    ci, cr = contexts(si, sr)
    e_i, e_r = Ephemeral(), Ephemeral()
    init = ci.initiate(0, REQ, e_i)
    assert parse(init.packet).ephemeral == e_i.public
    resp_packet, r_keys = cr.receive_initiation(init.packet).accept(RESP, 0, e_r)
    assert parse(resp_packet).ephemeral == e_r.public
    _, i_keys = init.complete(resp_packet)
    assert r_keys.recv.open(i_keys.send.seal(b"x"), 0) == b"x"


def test_static_exchange_is_remembered_per_peer() -> None:
    a, b, c = StaticKey.generate(), StaticKey.generate(), StaticKey.generate()
    first = a.exchange(b.public_bytes())
    assert a.exchange(b.public_bytes()) == first == b.exchange(a.public_bytes())
    assert a.exchange(c.public_bytes()) != first
    with pytest.raises(ValueError):
        a.exchange(bytes(32))  # low order: refused, and not remembered
    with pytest.raises(ValueError):
        a.exchange(bytes(32))


def test_initiation_is_single_use() -> None:
    si, sr = StaticKey.generate(), StaticKey.generate()
    ci, cr = contexts(si, sr)
    init = ci.initiate(0, REQ)
    resp_packet, _ = cr.receive_initiation(init.packet).accept(RESP, 0)
    init.complete(resp_packet)
    with pytest.raises(LocalProtocolError):
        init.complete(resp_packet)


def test_each_handshake_gives_new_keys() -> None:
    si, sr = StaticKey.generate(), StaticKey.generate()
    ci, cr = contexts(si, sr)
    outs = []
    for _ in range(2):
        init = ci.initiate(0, REQ)
        resp_packet, _ = cr.receive_initiation(init.packet).accept(RESP, 0)
        _, keys = init.complete(resp_packet)
        outs.append(keys.send.seal(b"same"))
    assert outs[0] != outs[1]


def test_wrong_responder_static_key_fails() -> None:
    si, sr, mallory = StaticKey.generate(), StaticKey.generate(), StaticKey.generate()
    # The initiator believes the responder is `mallory`: the real responder cannot open it.
    ci, cr = contexts(si, sr, i_thinks_r=mallory.public_bytes())
    with pytest.raises(AuthenticationError):
        cr.receive_initiation(ci.initiate(0, REQ).packet)


def test_wrong_initiator_static_key_fails() -> None:
    si, sr, mallory = StaticKey.generate(), StaticKey.generate(), StaticKey.generate()
    # Mallory knows the responder's public key but not the initiator's private key.
    cm = HandshakeContext(mallory, sr.public_bytes(), PID, initiator=True)
    _, cr = contexts(si, sr)
    with pytest.raises(AuthenticationError):
        cr.receive_initiation(cm.initiate(0, REQ).packet)


def test_impostor_responder_fails() -> None:
    si, sr, mallory = StaticKey.generate(), StaticKey.generate(), StaticKey.generate()
    ci, _ = contexts(si, sr)
    init = ci.initiate(0, REQ)
    # Mallory cannot open the init (needs S_r), and a response made with its own key and
    # the initiator's public key does not authenticate either.
    cm = HandshakeContext(mallory, si.public_bytes(), PID, initiator=False)
    with pytest.raises(AuthenticationError):
        cm.receive_initiation(init.packet)


def test_other_path_id_fails() -> None:
    si, sr = StaticKey.generate(), StaticKey.generate()
    ci, _ = contexts(si, sr)
    other = HandshakeContext(sr, si.public_bytes(), b"\x00" * 8, initiator=False)
    with pytest.raises(DecodeError):
        other.receive_initiation(ci.initiate(0, REQ).packet)


def test_tampered_handshake_fails() -> None:
    si, sr = StaticKey.generate(), StaticKey.generate()
    ci, cr = contexts(si, sr)
    init = ci.initiate(3, REQ)
    for pos in (1, 12, 50, 107):  # epoch, ephemeral, ciphertext, tag
        bad = bytearray(init.packet)
        bad[pos] ^= 0x01
        with pytest.raises(AuthenticationError):
            cr.receive_initiation(bytes(bad))
    resp_packet, _ = cr.receive_initiation(init.packet).accept(RESP, 3)
    bad = bytearray(resp_packet)
    bad[60] ^= 0x80
    with pytest.raises(AuthenticationError):
        init.complete(bytes(bad))


def test_low_order_ephemeral_rejected() -> None:
    si, sr = StaticKey.generate(), StaticKey.generate()
    ci, cr = contexts(si, sr)
    bad = bytearray(ci.initiate(0, REQ).packet)
    bad[12:44] = bytes(32)  # the all-zero point
    with pytest.raises(AuthenticationError):
        cr.receive_initiation(bytes(bad))


def test_role_misuse() -> None:
    si, sr = StaticKey.generate(), StaticKey.generate()
    ci, cr = contexts(si, sr)
    with pytest.raises(LocalProtocolError):
        cr.initiate(0, REQ)
    with pytest.raises(LocalProtocolError):
        ci.receive_initiation(b"")
    with pytest.raises(LocalProtocolError):
        HandshakeContext(si, b"short", PID, initiator=True)
    with pytest.raises(LocalProtocolError):
        HandshakeContext(si, sr.public_bytes(), b"short", initiator=True)


def test_transport_replay_and_tamper() -> None:
    key = bytes(range(32))
    send, recv = SendKey(key, 0, PID), RecvKey(key)
    packets = [send.seal(bytes([i]) * 10) for i in range(3)]
    assert [int.from_bytes(p[12:20], "big") for p in packets] == [0, 1, 2]
    assert recv.open(packets[2], 2) == bytes([2]) * 10
    assert recv.open(packets[0], 0) == bytes(10)
    with pytest.raises(ReplayError):
        recv.open(packets[0], 0)
    bad = bytearray(packets[1])
    bad[HEADER_SIZE] ^= 1
    with pytest.raises(AuthenticationError):
        recv.open(bytes(bad), 1)
    assert recv.window.highest == 2  # the forgery did not move the window
    assert recv.open(packets[1], 1) == bytes([1]) * 10
    # a header field is authenticated too (AAD)
    forged = bytearray(send.seal(b"abc"))
    forged[1] ^= 1
    with pytest.raises(AuthenticationError):
        recv.open(bytes(forged), 3)


def test_send_limit() -> None:
    send = SendKey(bytes(32), 0, PID)
    send.counter = REJECT_AFTER_MESSAGES - 1
    send.seal(b"last")
    with pytest.raises(KeyExhausted):
        send.seal(b"one too many")
    recv = RecvKey(bytes(32))
    with pytest.raises(ReplayError):
        recv.open(bytes(40), REJECT_AFTER_MESSAGES)
