"""A handshake that overtakes its Route Direction is held and replayed, not lost."""

from __future__ import annotations

import os

from ntm_proto.endpoint import EARLY_HOLD, EARLY_MAX, TunnelEndpoint
from ntm_proto.path import PathEstablished, PathState

from .test_path import I_ADDR, R_ADDR, WALL0, make_configs


def init_datagram(path_id: bytes | None = None) -> tuple[bytes, object, object]:
    ci, cr = make_configs(path_id=path_id or os.urandom(8))
    initiator = TunnelEndpoint()
    path = initiator.add_path(ci, 0.0)
    path.connect(0.0, WALL0)
    (data, addr), *_ = initiator.datagrams_to_send(0.0)
    assert addr == R_ADDR
    return data, cr, initiator


def test_early_init_is_replayed_when_the_path_arrives() -> None:
    data, cr, initiator = init_datagram()
    responder = TunnelEndpoint()
    assert responder.receive_datagram(data, I_ADDR, 0.1, WALL0) is None  # no path yet
    path = responder.add_path(cr, 0.2, WALL0)  # type: ignore[arg-type]
    assert path.state is not PathState.NEW  # the held INIT was answered at once
    assert responder.counters["early_replayed"] == 1
    (resp, addr), *_ = responder.datagrams_to_send(0.2)
    assert addr == I_ADDR
    initiator.receive_datagram(resp, R_ADDR, 0.3, WALL0)  # type: ignore[attr-defined]
    events = [e for _, e in initiator.events()]  # type: ignore[attr-defined]
    assert any(isinstance(e, PathEstablished) for e in events)


def test_stale_or_unasked_early_inits_are_not_replayed() -> None:
    data, cr, _ = init_datagram()
    responder = TunnelEndpoint()
    responder.receive_datagram(data, I_ADDR, 0.0, WALL0)
    responder.add_path(cr, EARLY_HOLD + 1.0, WALL0)  # type: ignore[arg-type]
    assert responder.counters["early_replayed"] == 0
    # without wall_ns (old callers) nothing is replayed either
    data2, cr2, _ = init_datagram()
    other = TunnelEndpoint()
    other.receive_datagram(data2, I_ADDR, 0.0, WALL0)
    other.add_path(cr2, 0.1)  # type: ignore[arg-type]
    assert other.counters["early_replayed"] == 0


def test_holding_area_is_bounded() -> None:
    responder = TunnelEndpoint()
    for _ in range(EARLY_MAX + 10):
        data, _, _ = init_datagram()
        responder.receive_datagram(data, I_ADDR, 0.0, WALL0)
    assert len(responder._early) == EARLY_MAX
