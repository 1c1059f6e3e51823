"""Gateway tunnel quality (adaptor/quality.py): EWMA RTT, RFC 3550 jitter, windowed loss."""

from __future__ import annotations

import pytest

from adaptor.quality import ProbeQuality

P1, P2 = b"\x01" * 8, b"\x02" * 8


def test_no_probes_reports_zeros() -> None:
    q = ProbeQuality().snapshot(10.0)
    assert (q.rtt_us, q.jitter_us, q.loss_ppm, q.resolved) == (0, 0, 0, 0)


def test_rtt_is_an_ewma_with_gain_one_eighth() -> None:
    pq = ProbeQuality()
    for seq, rtt in enumerate((0.010, 0.018)):
        pq.sent(P1, seq, float(seq))
        pq.answered(P1, seq, rtt, seq + rtt)
    assert pq.snapshot(5.0).rtt_us == 11_000  # 10 ms + (18 - 10) / 8


def test_jitter_follows_rfc3550_per_tunnel() -> None:
    pq = ProbeQuality()
    # Two tunnels with steady but different RTTs: no jitter (the difference is not jitter).
    for seq in range(10):
        for path, rtt in ((P1, 0.010), (P2, 0.050)):
            pq.sent(path, seq, float(seq))
            pq.answered(path, seq, rtt, seq + rtt)
    assert pq.snapshot(20.0).jitter_us == 0
    # Alternating 10/20 ms on one tunnel: J converges toward |D| = 10 ms, 1/16 per sample.
    pq = ProbeQuality()
    expected = 0.0
    for seq in range(40):
        rtt = 0.010 if seq % 2 == 0 else 0.020
        pq.sent(P1, seq, float(seq))
        pq.answered(P1, seq, rtt, seq + rtt)
        if seq:
            expected += (0.010 - expected) / 16
    assert pq.snapshot(50.0).jitter_us == round(expected * 1_000_000)
    assert 8_000 < pq.snapshot(50.0).jitter_us < 10_000


def test_loss_counts_unanswered_and_late_probes_over_the_window() -> None:
    pq = ProbeQuality(timeout=2.0, window=30.0)
    for seq in range(10):
        pq.sent(P1, seq, 0.0)
    for seq in range(7):
        pq.answered(P1, seq, 0.01, 0.01)
    q = pq.snapshot(1.0)  # 7, 8 and 9 still in flight
    assert (q.loss_ppm, q.resolved) == (0, 7)
    pq.answered(P1, 7, 2.5, 2.5)  # answered, but after the timeout: lost
    q = pq.snapshot(2.5)  # 8 and 9 timed out
    assert (q.loss_ppm, q.resolved) == (300_000, 10)
    pq.answered(P1, 8, 2.6, 2.6)  # already counted lost: ignored
    assert pq.snapshot(2.6).resolved == 10
    q = pq.snapshot(31.0)  # the answers (at 0.01) left the window, the losses (2.5) not yet
    assert (q.loss_ppm, q.resolved) == (1_000_000, 3)
    assert pq.snapshot(32.6).resolved == 0


def test_answers_to_unknown_probes_and_closed_tunnels_are_ignored() -> None:
    pq = ProbeQuality(timeout=2.0)
    pq.answered(P1, 99, 0.5, 1.0)  # never sent by us (e.g. the engine's own probes)
    pq.sent(P1, 1, 0.0)
    pq.sent(P2, 1, 0.0)
    pq.forget({P2})  # P1 closed: its probe is not a loss
    pq.answered(P2, 1, 0.02, 0.02)
    q = pq.snapshot(10.0)
    assert (q.loss_ppm, q.resolved, q.rtt_us) == (0, 1, 20_000)


@pytest.mark.parametrize("answered", [0, 1000])
def test_loss_is_bounded_ppm(answered: int) -> None:
    pq = ProbeQuality(timeout=1.0)
    for seq in range(1000):
        pq.sent(P1, seq, 0.0)
        if seq < answered:
            pq.answered(P1, seq, 0.001, 0.001)
    assert pq.snapshot(5.0).loss_ppm == (0 if answered else 1_000_000)
