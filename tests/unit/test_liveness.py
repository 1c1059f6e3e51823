"""ntm_proto.liveness: timers from one knob, the path monitor, the gateway plan (pure)."""

from __future__ import annotations

import random

import pytest

from ntm_proto.liveness import (
    LOOP_ALLOWANCE,
    GatewayPlan,
    Liveness,
    LivenessTimers,
    PathMonitor,
    SwitchTimeEstimate,
    Verdict,
    false_failover_probability,
    other_endpoints,
)

T = LivenessTimers(allowed_outage=1.5, switch_time=0.3, dead_after_losses=8)


# --- timers --------------------------------------------------------------------------------


def test_timers_derive_from_the_allowed_outage() -> None:
    assert T.detection == pytest.approx(1.2)
    assert T.probe_interval == pytest.approx(1.2 / 9)
    assert T.problem is None
    measured = T.with_switch_time(0.05)
    assert measured.detection == pytest.approx(1.45) and measured.switch_time_measured
    d = measured.to_dict()
    assert d["detection_s"] == 1.45 and d["dead_after_losses"] == 8 and d["problem"] is None


@pytest.mark.parametrize(
    "a,c,k,ok",
    [
        (1.5, 0.3, 8, True),
        (0.45, 0.3, 8, True),  # F = 0.15, exactly the floor
        (0.44, 0.3, 8, False),
        (0.3, 0.3, 5, False),  # F = 0
        (2.0, 0.0, 64, True),  # floor (K+1) * 10 ms = 0.65 s
        (0.6, 0.0, 64, False),
    ],
)
def test_too_small_outage_is_explained_with_numbers(a: float, c: float, k: int, ok: bool) -> None:
    t = LivenessTimers(a, c, k)
    assert (t.problem is None) is ok
    if not ok:
        assert t.problem is not None
        assert f"A = {a:g} s" in t.problem and f"C = {c:.3f} s" in t.problem
        assert "at least" in t.problem
        assert t.detection == t.minimum_detection  # never below the floor at run time


def test_false_failover_probability() -> None:
    # K = 1: any failed probe kills: 1 - (1 - q)^n.
    q = 1 - 0.95**2
    assert false_failover_probability(0.05, 1, 10) == pytest.approx(1 - (1 - q) ** 10)
    assert false_failover_probability(0.0, 3, 1000) == 0.0
    assert false_failover_probability(1.0, 3, 3) == pytest.approx(1.0)
    # The figures in the module docstring and docs/failover.md (C 0.3 s, 10 minutes).
    figures = {(1.0, 5): 4.0e-2, (1.0, 8): 5.7e-5, (1.0, 10): 6.6e-7}
    figures |= {(1.5, 5): 2.4e-2, (1.5, 8): 3.3e-5, (1.5, 10): 3.8e-7}
    for (a, k), expect in figures.items():
        t = LivenessTimers(a, 0.3, k)
        p = false_failover_probability(0.05, k, round(600 / t.probe_interval))
        assert p == pytest.approx(expect, rel=0.05)
    # The default K keeps 10 minutes at 5 % loss each way essentially free of false failovers.
    assert false_failover_probability(0.05, T.dead_after_losses, 4500) < 1e-4


def test_switch_time_estimate_is_a_robust_high_estimate() -> None:
    est = SwitchTimeEstimate(0.3)
    assert est.value == 0.3 and not est.measured
    for s in (0.02, 0.03, 1.2, 0.025):  # one lost INIT costs a 1 s retry: ignored
        est.add(s)
    # median 0.025 plus 3 median absolute deviations (0.005) plus the loop allowance
    assert est.measured and est.value == pytest.approx(0.04 + LOOP_ALLOWANCE)
    # the spread of a busy host (lab figures): C covers the slow switches too
    lab = SwitchTimeEstimate(0.3)
    for s in (0.0097, 0.016, 0.0391, 0.0178, 0.0293, 0.0527, 0.0318, 0.0529):
        lab.add(s)
    assert lab.value == pytest.approx(0.0293 + 3 * 0.0133 + LOOP_ALLOWANCE)
    few = SwitchTimeEstimate(0.3)  # four lab builds, then a failover that took 30.2 ms
    for s in (0.0127, 0.0274, 0.0153, 0.0297):
        few.add(s)
    assert few.value == pytest.approx(0.0153 + 3 * 0.0121 + LOOP_ALLOWANCE)
    est2 = SwitchTimeEstimate(0.3)
    est2.add(0.01)
    est2.add(1.76)  # a build that waited through an outage
    assert est2.value == pytest.approx(0.01 + LOOP_ALLOWANCE)
    for _ in range(20):
        est.add(0.5)
    assert est.value == pytest.approx(0.5 + LOOP_ALLOWANCE) and len(est.samples) == 9


# --- the monitor, with a fake clock ----------------------------------------------------------


def state(mon: PathMonitor) -> Liveness:
    """(A function, so mypy does not keep a narrowed state across calls.)"""
    return mon.state


class Clocked:
    """A monitor driven the way ntm_node.failover drives it, over a lossy fake link."""

    def __init__(
        self, timers: LivenessTimers = T, loss: float = 0.0, rtt: float = 0.02, seed: int = 1
    ) -> None:
        self.t = timers
        self.now = 0.0
        self.mon = PathMonitor(0.0)
        self.last_received = 0.0
        self.rng = random.Random(seed)
        self.loss = loss
        self.rtt = rtt
        self.dead = False  # the gateway
        self.answers: list[tuple[float, int, float]] = []  # (arrival, seq, sent)
        self.probe_times: list[float] = []
        self.verdicts: list[tuple[float, Verdict]] = []
        self.seq = 0

    def run_until(self, end: float) -> None:
        while self.now < end:
            timer = self.mon.get_timer(self.t)
            times = [end] + [a for a, _, _ in self.answers]
            if timer is not None:
                times.append(timer)
            self.now = max(self.now, min(times))
            for a in [x for x in self.answers if x[0] <= self.now]:
                self.answers.remove(a)
                self.last_received = a[0]
                self.mon.probe_answered(a[1], a[0] - a[2], self.now)
            verdict = self.mon.poll(self.now, self.last_received, self.t)
            if verdict is Verdict.PROBE:
                self.probe_times.append(self.now)
                self.mon.probe_sent(self.seq, self.now)
                lost = self.dead or self.rng.random() < self.loss or self.rng.random() < self.loss
                if not lost:
                    self.answers.append((self.now + self.rtt, self.seq, self.now))
                self.seq += 1
            elif verdict is Verdict.DEAD:
                self.verdicts.append((self.now, verdict))
                return
            if self.mon.state is Liveness.DEAD:
                return


def test_probes_only_when_quiet_then_every_interval() -> None:
    c = Clocked()
    c.dead = True
    c.run_until(10.0)
    p = T.probe_interval
    assert c.probe_times == pytest.approx([n * p for n in range(1, 9)])
    assert [v for _, v in c.verdicts] == [Verdict.DEAD]
    assert c.verdicts[0][0] == pytest.approx(T.detection)
    assert c.mon.state is Liveness.DEAD and c.mon.declared_dead_at == pytest.approx(1.2)
    assert c.mon.poll(20.0, 0.0, T) is Verdict.WAIT  # declared once
    assert c.mon.get_timer(T) is None


def test_traffic_is_life_and_no_probe_goes_out_under_it() -> None:
    mon = PathMonitor(0.0)
    for i in range(1, 1000):
        now = i * 0.05  # inbound traffic every 50 ms, below P
        assert mon.poll(now, now, T) is Verdict.WAIT
    assert mon.probes_sent == 0 and mon.state is Liveness.ALIVE


def test_an_answer_ends_the_silence() -> None:
    mon = PathMonitor(0.0)
    p = T.probe_interval
    assert mon.poll(p, 0.0, T) is Verdict.PROBE
    mon.probe_sent(0, p)
    assert mon.state is Liveness.PROBING
    assert mon.poll(p + 0.01, p + 0.01, T) is Verdict.WAIT  # the answer arrived
    assert state(mon) is Liveness.ALIVE
    assert mon.get_timer(T) == pytest.approx(2 * p + 0.01)


def test_a_stalled_loop_does_not_kill_by_burst() -> None:
    mon = PathMonitor(0.0)
    verdicts = [mon.poll(5.0, 0.0, T)]  # the loop wakes long after F
    mon.probe_sent(0, 5.0)
    for _ in range(20):  # and polls again at once, many times
        verdicts.append(mon.poll(5.0, 0.0, T))
    assert verdicts[0] is Verdict.PROBE and set(verdicts[1:]) == {Verdict.WAIT}
    # The answer to that one probe, 20 ms later, saves the path.
    assert mon.poll(5.02, 5.02, T) is Verdict.WAIT and mon.state is Liveness.ALIVE


@pytest.mark.parametrize("late", [0.002, 0.004, 0.008])
def test_a_loop_waking_late_each_time_delays_the_verdict_once_not_k_times(late: float) -> None:
    """Each probe timer fires `late` seconds late (a busy host): the verdict comes at
    F + late, not F + (K + 1) * late (what anchoring each probe on the previous one gave:
    36 ms past F at 4 ms per wake-up, enough to break A in the lab)."""
    mon = PathMonitor(0.0)
    sent: list[float] = []
    while True:
        timer = mon.get_timer(T)
        assert timer is not None
        now = timer + late
        verdict = mon.poll(now, 0.0, T)
        if verdict is Verdict.PROBE:
            mon.probe_sent(len(sent), now)
            sent.append(now)
        elif verdict is Verdict.DEAD:
            break
    assert len(sent) == T.dead_after_losses
    assert sent == pytest.approx([n * T.probe_interval + late for n in range(1, 9)])
    assert now == pytest.approx(T.detection + late)


def test_dead_within_allowed_outage_at_full_loss() -> None:
    c = Clocked(loss=0.0)
    c.run_until(30.0)  # healthy first: only answered probes
    assert not c.verdicts
    cut = c.now
    c.dead = True
    c.run_until(cut + 10.0)
    assert c.verdicts, "never declared dead"
    detect = c.verdicts[0][0] - cut
    assert detect <= T.detection + 1e-9
    assert detect + T.switch_time <= T.allowed_outage + 1e-9


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("allowed_outage", [1.0, 1.5])
def test_no_false_failover_at_5_percent_loss_for_10_minutes(
    allowed_outage: float, seed: int
) -> None:
    t = LivenessTimers(allowed_outage, 0.3, 8)
    c = Clocked(timers=t, loss=0.05, seed=seed)
    c.run_until(600.0)
    assert not c.verdicts and c.mon.state is not Liveness.DEAD
    assert c.mon.probes_sent > 3000  # the path was probed all along
    loss = c.mon.loss(c.now, T)
    assert loss is not None and 0.05 < loss < 0.15  # round-trip loss is about 9.75 %


def test_5_percent_loss_with_a_small_k_does_fail() -> None:
    """The table is honest: K = 2 under the same loss gives false failovers."""
    t = LivenessTimers(1.5, 0.3, 2)
    c = Clocked(timers=t, loss=0.05, seed=1)
    c.run_until(600.0)
    assert c.verdicts


def test_rtt_jitter_loss_statistics() -> None:
    mon = PathMonitor(0.0)
    for i, rtt in enumerate([0.010, 0.030, 0.010, 0.030]):
        mon.probe_sent(i, float(i))
        mon.probe_answered(i, rtt, float(i) + rtt)
    mon.probe_sent(4, 4.0)  # never answered
    mon.probe_answered(99, 0.5, 5.0)  # unknown seq: ignored
    assert mon.srtt is not None and 0.010 < mon.srtt < 0.030
    assert mon.jitter > 0
    assert mon.loss(4.5, T) == 0.0  # the last one is not settled yet
    assert mon.loss(10.0, T) == pytest.approx(0.2)
    st = mon.status(10.0, T)
    assert st["probes_sent"] == 5 and st["probes_answered"] == 4 and st["loss"] == 0.2


def test_reset_watches_afresh() -> None:
    mon = PathMonitor(0.0)
    c = Clocked()
    c.mon = mon
    c.dead = True
    c.run_until(5.0)
    assert mon.state is Liveness.DEAD
    mon.reset(6.0)
    assert state(mon) is Liveness.ALIVE and mon.get_timer(T) == pytest.approx(
        6.0 + T.probe_interval
    )


# --- where to go next ----------------------------------------------------------------------


def test_other_endpoints() -> None:
    eps = (("198.51.100.61", 7400), ("203.0.113.61", 7400))
    assert other_endpoints(eps, eps[0]) == (eps[1],)
    assert other_endpoints(eps[:1], eps[0]) == ()


def test_gateway_plan_hold_down_and_failback() -> None:
    plan = GatewayPlan(hold_down=60.0, retry=10.0)
    plan.observe("ntma1", ("ntma1", "ntma2", "ntma3"))
    assert plan.preferred == "ntma1" and plan.alternatives == ("ntma2", "ntma3")
    assert plan.failback_due(0.0) is None and plan.next_check() is None
    plan.failed("ntma1", 100.0)
    plan.switched("ntma2", ("ntma1", "ntma3"))
    assert plan.current == "ntma2" and plan.preferred == "ntma1"
    # ntma2 dies during the hold-down: ntma3 first, the held-down ntma1 only after it.
    assert plan.candidates(110.0) == ["ntma3", "ntma1"]
    assert plan.candidates(170.0) == ["ntma1", "ntma3"]
    assert plan.failback_due(159.9) is None
    assert plan.next_check() == 160.0
    assert plan.failback_due(160.0) == "ntma1"
    plan.failback_refused(160.0)  # the DC does not offer it yet
    assert plan.failback_due(165.0) is None and plan.failback_due(170.0) == "ntma1"
    plan.switched("ntma1", ("ntma2",))
    assert plan.failback_due(1000.0) is None and plan.next_check() is None
    st = plan.status(120.0)
    assert st["current"] == "ntma1" and st["held_down"] == {"ntma1": 40.0}


def test_reserve_for_other_uplinks_comes_out_of_detection() -> None:
    t = T.with_reserve(0.1)
    assert t.detection == pytest.approx(1.1) and t.probe_interval == pytest.approx(1.1 / 9)
    tight = LivenessTimers(0.5, 0.3, 8).with_reserve(0.1)
    assert tight.problem is not None
    assert "R = 0.100 s for other uplinks" in tight.problem
    assert "A must be at least 0.550 s" in tight.problem
