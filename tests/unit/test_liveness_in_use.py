"""ntm_proto.liveness without idle probing (`watch_idle=False`, a swarm's identities): only
a path with unanswered outbound data is watched, from its first such packet (pure)."""

from __future__ import annotations

import random

import pytest

from ntm_proto.liveness import Liveness, LivenessTimers, PathMonitor, Verdict

T = LivenessTimers(allowed_outage=1.0, switch_time=0.3, dead_after_losses=8)  # the defaults
P, F = T.probe_interval, T.detection


class Link:
    """One monitor the way ntm_node.failover drives it, over a lossy fake link: outbound
    data every `data_every` s (answered after `answer_after` s, or never), probes
    answered after `rtt` s, each way losing `loss`; `dead` cuts both ways."""

    def __init__(
        self,
        watch_idle: bool = False,
        data_every: float | None = None,
        answer_after: float | None = None,
        loss: float = 0.0,
        rtt: float = 0.02,
        seed: int = 1,
    ) -> None:
        self.mon = PathMonitor(0.0, watch_idle=watch_idle)
        self.now = 0.0
        self.last_received = 0.0
        self.data_every = data_every
        self.next_data = data_every if data_every is not None else float("inf")
        self.answer_after = answer_after
        self.rng = random.Random(seed)
        self.loss = loss
        self.rtt = rtt
        self.dead = False
        self.arrivals: list[tuple[float, int | None, float]] = []  # (at, probe seq, sent)
        self.probe_times: list[float] = []
        self.dead_at: float | None = None
        self.seq = 0

    def _lost(self) -> bool:
        return self.dead or self.rng.random() < self.loss or self.rng.random() < self.loss

    def run_until(self, end: float) -> None:
        while self.now < end and self.dead_at is None:
            times = [end, self.next_data, *(a for a, _, _ in self.arrivals)]
            if (timer := self.mon.get_timer(T)) is not None:
                times.append(timer)
            self.now = max(self.now, min(times))
            for arrival in sorted(a for a in self.arrivals if a[0] <= self.now):
                self.arrivals.remove(arrival)
                self.last_received = arrival[0]
                if arrival[1] is not None:
                    self.mon.probe_answered(arrival[1], arrival[0] - arrival[2], self.now)
            if self.now >= self.next_data:
                self.mon.data_sent(self.now, self.last_received)
                if self.answer_after is not None and not self._lost():
                    self.arrivals.append((self.now + self.answer_after, None, self.now))
                assert self.data_every is not None
                self.next_data += self.data_every
            verdict = self.mon.poll(self.now, self.last_received, T)
            if verdict is Verdict.PROBE:
                self.probe_times.append(self.now)
                self.mon.probe_sent(self.seq, self.now)
                if not self._lost():
                    self.arrivals.append((self.now + self.rtt, self.seq, self.now))
                self.seq += 1
            elif verdict is Verdict.DEAD:
                self.dead_at = self.now


def test_a_quiet_path_is_not_probed_at_all() -> None:
    link = Link()
    link.dead = True  # not even a dead gateway is noticed: nobody uses the path
    link.run_until(600.0)
    assert link.probe_times == [] and link.dead_at is None
    assert link.mon.get_timer(T) is None and link.mon.state is Liveness.ALIVE
    assert link.mon.status(600.0, T)["in_use"] is False


def test_detection_runs_from_the_first_unanswered_outbound_packet() -> None:
    """The gateway died long ago while the path was quiet; the user sends at t0 = 100 s
    (and again every 50 ms): probes at t0 + n*P, dead at t0 + F, so the user's traffic is
    interrupted for at most F + C = A from its first lost packet."""
    mon = PathMonitor(0.0, watch_idle=False)
    assert mon.poll(100.0, 0.0, T) is Verdict.WAIT and mon.get_timer(T) is None
    assert mon.data_sent(100.0, 0.0) is True  # starts the watch: read get_timer() again
    assert mon.get_timer(T) == pytest.approx(100.0 + P)
    sent: list[float] = []
    data = 100.05
    while True:
        timer = mon.get_timer(T)
        assert timer is not None
        while data < timer:  # more of the user's packets: the silence still runs from t0
            assert mon.data_sent(data, 0.0) is False
            data += 0.05
        verdict = mon.poll(timer, 0.0, T)
        if verdict is Verdict.PROBE:
            mon.probe_sent(len(sent), timer)
            sent.append(timer)
        elif verdict is Verdict.DEAD:
            break
    assert sent == pytest.approx([100.0 + n * P for n in range(1, 9)])
    assert timer == pytest.approx(100.0 + F)
    assert (timer - 100.0) + T.switch_time <= T.allowed_outage + 1e-9
    assert mon.quiet_since() == 100.0  # what failover reports as the detection's start


def test_an_answer_ends_the_watch_and_the_next_packet_starts_a_new_one() -> None:
    mon = PathMonitor(0.0, watch_idle=False)
    mon.data_sent(1.0, 0.0)
    assert mon.poll(1.0 + P, 0.0, T) is Verdict.PROBE
    mon.probe_sent(0, 1.0 + P)
    assert mon.state is Liveness.PROBING
    assert mon.poll(1.2, 1.19, T) is Verdict.WAIT  # the probe's answer (any inbound packet)
    assert mon.state is Liveness.ALIVE and mon.get_timer(T) is None
    assert mon.data_sent(5.0, 1.19) is True
    assert mon.get_timer(T) == pytest.approx(5.0 + P)  # a fresh silence, no probe counted


def test_answered_requests_send_no_probes() -> None:
    """What a Locust user does: a request every second, answered within 20 ms (< P)."""
    link = Link(data_every=1.0, answer_after=0.02)
    link.run_until(600.0)
    assert link.probe_times == [] and link.dead_at is None


def test_the_default_mode_is_unchanged_by_data() -> None:
    mon = PathMonitor(0.0)
    assert mon.data_sent(0.05, 0.0) is False  # nothing to re-read: idle paths are watched
    assert mon.get_timer(T) == pytest.approx(P) and mon.quiet_since() == 0.0
    assert mon.status(0.1, T)["in_use"] is None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_path_that_only_sends_is_probed_no_faster_than_an_idle_one_and_survives_loss(
    seed: int,
) -> None:
    """The worst case for false failovers without idle probing: a one-way stream (data
    every 50 ms, nothing comes back but probe answers) at 5 % loss each way for 10 minutes.
    It is probed at the pace of an idle path in the default mode, so the table of
    docs/failover.md bounds it, and no failover is declared."""
    stream = Link(data_every=0.05, loss=0.05, seed=seed)
    stream.run_until(600.0)
    idle = Link(watch_idle=True, loss=0.05, seed=seed)
    idle.run_until(600.0)
    assert stream.dead_at is None and idle.dead_at is None
    assert len(stream.probe_times) > 3000  # watched all along
    assert len(stream.probe_times) <= len(idle.probe_times) * 1.02


def test_a_dead_gateway_under_a_one_way_stream_is_declared_within_f() -> None:
    link = Link(data_every=0.01)
    link.run_until(30.0)
    assert link.dead_at is None
    cut = link.now
    link.dead = True
    link.run_until(cut + 5.0)
    assert link.dead_at is not None
    # The silence starts with the first packet after the last answer (one in flight at the
    # cut still arrives, up to 20 ms later), at most 10 ms after that: dead F later.
    assert link.dead_at - cut <= F + link.rtt + 0.01 + 1e-9
