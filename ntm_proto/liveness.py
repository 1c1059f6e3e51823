"""Is the gateway still there? Path liveness, failover timers and fail-back policy (sans-IO).

Everything here is pure: the owner passes `now` (monotonic seconds) and the path's
`last_received`, sends the probes it is told to and reports their answers. The asyncio
glue is `ntm_node.failover`; docs/failover.md tells the story for users.

Timers come from one knob, the outage the user allows, A (`[node] allowed_outage`)::

    C  switch time: DC direction round trip + handshake with the new gateway (measured by
       the node on every path it builds; `switch_time_estimate` until the first one)
    F  detection time       F = A - C        (F = A - C - R toward a gateway with several
                                              uplinks: R, a few round trips, is kept for
                                              trying its other addresses first)
    K  losses that kill     `dead_after_losses` consecutive unanswered probes
    P  probe interval       P = F / (K + 1)

Inbound authenticated traffic on the path is life. When the path has been quiet for P, a
probe goes out, then one every P while the quiet lasts: probe n leaves at n*P of silence,
so the K-th leaves at K*P and still has a whole interval to be answered before F =
(K+1)*P. The gateway is dead when the silence has lasted F AND K probes went out into it
unanswered (any answer is inbound traffic, so it ends the silence) AND the last of them
has had P/2 to come back. Probes stay at least P/2 apart, so a stalled event loop never
kills a path by sending its probes in a burst; and the schedule counts from the last life
heard, not from the previous probe, so a loop that wakes a few ms late each time delays
the verdict by one such delay, not by K + 1 of them.

False failovers. With loss p on each way a probe round trip fails with q = 1 - (1 - p)^2
(p = 5 %: q = 0.0975). On an otherwise idle path (the worst case: data traffic is more
life) the probes are Bernoulli trials and a false failover is a run of K failures;
`false_failover_probability` computes it exactly over a Markov chain of the run length.
For the defaults A = 1.0 s and C = 0.3 s (F = 0.7 s), 10 minutes at 5 % loss each way:

    K = 5  (P = 117 ms, 5143 probes)   4.0e-2   one false failover every ~4 hours
    K = 8  (P =  78 ms, 7714 probes)   5.7e-5   one every ~4 months of continuous loss
    K = 10 (P =  64 ms, 9429 probes)   6.6e-7

so the default is K = 8: essentially zero, for 13 probes a second on a quiet path (about
2 kB/s with both directions; fewer once C is measured and F grows) and P still above usual
round trips (an answer slower than P still counts, it only comes too late to save the K-th
probe).

Paths in use only (`watch_idle=False`, `[node] probe_idle_paths = false`, what a swarm of
hundreds of identities uses). A path that carries nothing in either direction cannot lose
anything a user would notice, so it is not probed at all. The owner reports outbound data
(`data_sent`); the silence that counts then starts at the first outbound data packet after
the last life heard, instead of at that life, and everything above runs from there: probe n
at n*P after that packet, dead at F after it, so traffic is interrupted for at most A from
its first lost packet. Any inbound packet answers it (back to not watched). A path that
only sends keeps probing at the same pace as an idle one in the default mode, so the table
above is an upper bound; a path that only receives is not watched (its first packet of
ours starts the watch).

Fail-back. After a failover the gateway we left is held down for `failback_hold_down`
seconds; only then does the node ask the DC for a path through it again, and only when the
DC offers it does the node build that path (make-before-break: the current one carries
traffic until the new one is established). A held-down gateway is still used when it is
the only one left.
"""

from __future__ import annotations

import dataclasses
import enum
import statistics
from collections import deque

from .messages import Endpoint

MIN_DETECTION = 0.15  # s: F below this is noise, not detection (three 50 ms intervals)
MIN_PROBE_INTERVAL = 0.01  # s: probes closer than this measure the event loop
LOSS_WINDOW = 100  # probes the loss figure is computed over
SWITCH_SAMPLES = 9  # measured switch times the estimate of C comes from
SPREADS = 3  # C = median + SPREADS median absolute deviations: ~97th percentile if normal
# Added to a measured C, for what the builds it is measured on do not show: the event loop
# notices a verdict a little late (1.5-3 ms), and a failover builds its path amid the burst
# of work the failure causes (up to 14 ms slower than those builds). Both measured on the
# lab host at load 8-10; this is about twice their sum, and costs F 2.5 % of A = 1 s.
LOOP_ALLOWANCE = 0.025


# --- timers --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class LivenessTimers:
    """The timers derived from the allowed outage A and the switch time C (seconds)."""

    allowed_outage: float  # A
    switch_time: float  # C, estimated or measured
    dead_after_losses: int = 8  # K
    failback_hold_down: float = 60.0
    switch_time_measured: bool = False
    # R: kept for trying the peer's other addresses before switching gateways (a gateway
    # with several uplinks), so that F + R + C still fits in A.
    reserve: float = 0.0

    @property
    def minimum_detection(self) -> float:
        return max(MIN_DETECTION, (self.dead_after_losses + 1) * MIN_PROBE_INTERVAL)

    @property
    def wanted_detection(self) -> float:
        """F = A - C (- R), even when too small."""
        return self.allowed_outage - self.switch_time - self.reserve

    @property
    def detection(self) -> float:
        """F in use: A - C, but never below the minimum (see `problem`)."""
        return max(self.wanted_detection, self.minimum_detection)

    @property
    def probe_interval(self) -> float:
        """P = F / (K + 1)."""
        return self.detection / (self.dead_after_losses + 1)

    @property
    def problem(self) -> str | None:
        """Why A cannot be kept with this C (None when it can)."""
        f, lo = self.wanted_detection, self.minimum_detection
        if f >= lo:
            return None
        kind = "measured" if self.switch_time_measured else "estimated"
        r = f" - R = {f:.3f} s, R = {self.reserve:.3f} s for other uplinks," if self.reserve else ""
        return (
            f"allowed_outage A = {self.allowed_outage:g} s leaves detection F = A - C"
            f"{r or f' = {f:.3f} s'} with the {kind} switch time C = {self.switch_time:.3f} s; "
            f"F must be at least {lo:g} s, so A must be at least "
            f"{self.switch_time + self.reserve + lo:.3f} s"
        )

    def with_switch_time(self, switch_time: float) -> LivenessTimers:
        return dataclasses.replace(self, switch_time=switch_time, switch_time_measured=True)

    def with_reserve(self, reserve: float) -> LivenessTimers:
        return dataclasses.replace(self, reserve=reserve)

    def to_dict(self) -> dict[str, object]:
        return {
            "allowed_outage_s": self.allowed_outage,
            "switch_time_s": round(self.switch_time, 4),
            "switch_time_measured": self.switch_time_measured,
            "uplink_reserve_s": round(self.reserve, 4),
            "detection_s": round(self.detection, 4),
            "dead_after_losses": self.dead_after_losses,
            "probe_interval_s": round(self.probe_interval, 4),
            "failback_hold_down_s": self.failback_hold_down,
            "problem": self.problem,
        }


def false_failover_probability(loss_each_way: float, dead_after_losses: int, probes: int) -> float:
    """Chance that `probes` probes on an idle path contain a run of K unanswered ones.

    Each round trip fails with q = 1 - (1 - loss)^2, independently; exact over the Markov
    chain of the current run length.
    """
    q = 1.0 - (1.0 - loss_each_way) ** 2
    k = dead_after_losses
    run = [1.0] + [0.0] * (k - 1)  # P(current run of failures has length i), not yet dead
    dead = 0.0
    for _ in range(probes):
        nxt = [0.0] * k
        nxt[0] = sum(run) * (1.0 - q)
        for i in range(k - 1):
            nxt[i + 1] = run[i] * q
        dead += run[k - 1] * q
        run = nxt
    return dead


class SwitchTimeEstimate:
    """C from the node's own measurements of the last few path builds (direction round
    trip + handshake): their (low) median plus 3 (high) median absolute deviations, or the
    median alone while there are fewer than 3, plus LOOP_ALLOWANCE. F = A - C must hold
    for most switches, not for the typical one (with the bare median, every other switch
    overran A in the lab); both figures are robust, so one slow build (a lost handshake
    packet, a build during an outage) does not move C."""

    def __init__(self, estimate: float) -> None:
        self.estimate = estimate
        self._samples: deque[float] = deque(maxlen=SWITCH_SAMPLES)

    def add(self, seconds: float) -> None:
        if seconds >= 0:
            self._samples.append(seconds)

    @property
    def measured(self) -> bool:
        return bool(self._samples)

    @property
    def value(self) -> float:
        if not self._samples:
            return self.estimate
        median = statistics.median_low(self._samples)
        spread = 0.0  # with fewer than 3, a spread cannot be told from one slow build
        if len(self._samples) >= 3:
            spread = statistics.median_high(abs(s - median) for s in self._samples)
        return median + SPREADS * spread + LOOP_ALLOWANCE

    @property
    def samples(self) -> tuple[float, ...]:
        return tuple(self._samples)


# --- one path's liveness -------------------------------------------------------------------


class Liveness(enum.Enum):
    ALIVE = "alive"
    PROBING = "probing"  # quiet: probes out, none answered yet
    DEAD = "dead"


class Verdict(enum.Enum):
    WAIT = "wait"  # nothing to do before get_timer()
    PROBE = "probe"  # send one probe now and report it with probe_sent()
    DEAD = "dead"  # just declared dead (once; reset() to watch again)


class PathMonitor:
    """Liveness of one path: probe when quiet, declare it dead (see the module docstring).

    With `watch_idle` False only a path in use is watched: from the first outbound data
    packet (`data_sent`) that no inbound packet has followed yet."""

    def __init__(self, now: float, watch_idle: bool = True) -> None:
        self.watch_idle = watch_idle
        self.state = Liveness.ALIVE
        self.started = now
        self.heard = now  # the latest life we know of
        self.declared_dead_at: float | None = None
        self.srtt: float | None = None
        self.jitter = 0.0
        self.last_rtt: float | None = None
        self.probes_sent = 0
        self.probes_answered = 0
        self._quiet_probes = 0  # probes sent into the current silence
        self._last_probe = float("-inf")
        self._sent_since: float | None = None  # first outbound data after `heard`
        self._outcomes: deque[list[float]] = deque(maxlen=LOSS_WINDOW)  # [sent_at, answered]
        self._outstanding: dict[int, list[float]] = {}

    def reset(self, now: float) -> None:
        """Watch afresh from `now` (after the path moved to another peer address)."""
        self.state = Liveness.ALIVE
        self.heard = max(self.heard, now)
        self.declared_dead_at = None
        self._quiet_probes = 0
        self._last_probe = float("-inf")

    def _note_life(self, last_received: float) -> None:
        if last_received > self.heard:
            self.heard = last_received
            self._quiet_probes = 0
            if self.state is not Liveness.DEAD:
                self.state = Liveness.ALIVE

    def data_sent(self, now: float, last_received: float) -> bool:
        """The path carried outbound data at `now`. True when that starts a silence to
        watch (the owner reads get_timer() again); never with watch_idle."""
        self._note_life(last_received)
        if self._sent_since is not None and self._sent_since >= self.heard:
            return False  # an earlier packet is still unanswered: the silence runs from it
        self._sent_since = now
        return not self.watch_idle

    def quiet_since(self) -> float | None:
        """Where the silence that counts started: the last life heard, or without
        watch_idle the first outbound data after it (None: not in use, nothing to watch)."""
        if self.watch_idle:
            return self.heard
        sent = self._sent_since
        return sent if sent is not None and sent >= self.heard else None

    def _next_probe_at(self, start: float, timers: LivenessTimers) -> float:
        p = timers.probe_interval
        return max(start + (self._quiet_probes + 1) * p, self._last_probe + p / 2)

    def _dead_at(self, start: float, timers: LivenessTimers) -> float:
        return max(start + timers.detection, self._last_probe + timers.probe_interval / 2)

    def poll(self, now: float, last_received: float, timers: LivenessTimers) -> Verdict:
        """What to do now; call at `get_timer()` (or any time) with the path's last_received."""
        if self.state is Liveness.DEAD:
            return Verdict.WAIT
        self._note_life(last_received)
        start = self.quiet_since()
        if start is None:
            return Verdict.WAIT
        k = timers.dead_after_losses
        if self._quiet_probes >= k and now >= self._dead_at(start, timers):
            self.state = Liveness.DEAD
            self.declared_dead_at = now
            return Verdict.DEAD
        if self._quiet_probes < k and now >= self._next_probe_at(start, timers):
            return Verdict.PROBE
        return Verdict.WAIT

    def get_timer(self, timers: LivenessTimers) -> float | None:
        if self.state is Liveness.DEAD or (start := self.quiet_since()) is None:
            return None
        if self._quiet_probes >= timers.dead_after_losses:
            return self._dead_at(start, timers)
        return self._next_probe_at(start, timers)

    def probe_sent(self, seq: int | None, now: float) -> None:
        """The owner sent the probe poll() asked for (seq None: the path could not send)."""
        self._quiet_probes += 1
        self._last_probe = now
        self.state = Liveness.PROBING
        if seq is None:
            return
        self.probes_sent += 1
        outcome = [now, 0.0]
        self._outcomes.append(outcome)
        self._outstanding[seq] = outcome
        if len(self._outstanding) > LOSS_WINDOW:
            del self._outstanding[next(iter(self._outstanding))]

    def probe_answered(self, seq: int, rtt: float, now: float) -> None:
        """A ProbeResult: round-trip statistics (the answer itself is life already)."""
        outcome = self._outstanding.pop(seq, None)
        if outcome is None:
            return
        outcome[1] = 1.0
        self.probes_answered += 1
        if self.last_rtt is not None:  # RFC 3550 style smoothed jitter
            self.jitter += (abs(rtt - self.last_rtt) - self.jitter) / 16
        self.last_rtt = rtt
        self.srtt = rtt if self.srtt is None else self.srtt + (rtt - self.srtt) / 8

    def loss(self, now: float, timers: LivenessTimers) -> float | None:
        """Share of recent probes left unanswered for longer than F (None before any)."""
        settled = [o for o in self._outcomes if now - o[0] >= timers.detection or o[1]]
        if not settled:
            return None
        return 1.0 - sum(o[1] for o in settled) / len(settled)

    def status(self, now: float, timers: LivenessTimers) -> dict[str, object]:
        loss = self.loss(now, timers)
        return {
            "state": self.state.value,
            "in_use": self.quiet_since() is not None if not self.watch_idle else None,
            "rtt_ms": None if self.srtt is None else round(self.srtt * 1000, 2),
            "jitter_ms": round(self.jitter * 1000, 2),
            "loss": None if loss is None else round(loss, 4),
            "last_heard_s": round(now - self.heard, 3),
            "probes_sent": self.probes_sent,
            "probes_answered": self.probes_answered,
        }


# --- where to go next ----------------------------------------------------------------------


def other_endpoints(
    endpoints: tuple[Endpoint, ...], current: Endpoint | None
) -> tuple[Endpoint, ...]:
    """The peer's other addresses (a gateway's other uplinks), in the Route Direction's
    order: where to look before giving up on the gateway."""
    return tuple(ep for ep in endpoints if ep != current)


class GatewayPlan:
    """Which gateway a service goes through, and when to fail back (one per service).

    `preferred` is the DC's first choice (the gateway of the first path); a gateway that
    failed is held down for the hold-down time and the node fails back to the preferred
    one only after its hold-down, and only if the DC offers it (`failback_due`, then
    `failback_refused` or `switched`).
    """

    def __init__(self, hold_down: float, retry: float = 10.0) -> None:
        self.hold_down = hold_down
        self.retry = retry  # between fail-back attempts the DC refused
        self.preferred: str | None = None
        self.current = ""
        self.alternatives: tuple[str, ...] = ()
        self._held: dict[str, float] = {}  # gateway -> held down until
        self._next_failback = 0.0

    def observe(self, gateway: str, alternatives: tuple[str, ...]) -> None:
        """A path through `gateway` carries the service now."""
        if self.preferred is None:
            self.preferred = gateway
        self.current = gateway
        self.alternatives = tuple(a for a in alternatives if a != gateway)

    def failed(self, gateway: str, now: float) -> None:
        self._held[gateway] = now + self.hold_down
        self._next_failback = max(self._next_failback, now + self.hold_down)

    def held_until(self, gateway: str) -> float | None:
        return self._held.get(gateway)

    def candidates(self, now: float) -> list[str]:
        """Gateways to fail over to, best first: not held down, then held down (the only
        way left is better than none)."""
        others = [a for a in self.alternatives if a != self.current]
        free = [a for a in others if self._held.get(a, 0.0) <= now]
        return free + [a for a in others if a not in free]

    def switched(self, gateway: str, alternatives: tuple[str, ...]) -> None:
        self.observe(gateway, alternatives)

    def failback_due(self, now: float) -> str | None:
        """The preferred gateway, when it is time to ask the DC for it again."""
        pref = self.preferred
        if not pref or pref == self.current or now < self._next_failback:
            return None
        if self._held.get(pref, 0.0) > now:
            return None
        return pref

    def failback_refused(self, now: float) -> None:
        self._next_failback = now + self.retry

    def next_check(self) -> float | None:
        """When failback_due may first say yes (None when we are on the preferred one)."""
        pref = self.preferred
        if not pref or pref == self.current:
            return None
        return max(self._next_failback, self._held.get(pref, 0.0))

    def status(self, now: float) -> dict[str, object]:
        return {
            "current": self.current,
            "preferred": self.preferred,
            "alternatives": list(self.alternatives),
            "held_down": {g: round(t - now, 1) for g, t in self._held.items() if t > now},
        }


__all__ = [
    "LOOP_ALLOWANCE",
    "MIN_DETECTION",
    "MIN_PROBE_INTERVAL",
    "GatewayPlan",
    "Liveness",
    "LivenessTimers",
    "PathMonitor",
    "SwitchTimeEstimate",
    "Verdict",
    "false_failover_probability",
    "other_endpoints",
]
