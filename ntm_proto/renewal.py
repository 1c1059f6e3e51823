"""Path renewal decisions (sans-IO): when the node that asked for a path asks again.

A Route Direction is good for `lifetime` seconds (`[dc] path_lifetime`, default 3600). At
its end the Relay Server drops a relayed path (`relay.core`: `paths_expired_lifetime`, then
its packets count as `drop_expired_path`) and the DC forgets the path (its relay, kept for
failover, and gateway assignments). Direct and reverse paths carry on at the ends, but the
DC no longer vouches for them. So the *requester*, the end that sent the Direction Request
(the initiator of a direct or relayed path, the responder of a reverse one), renews every
path it still uses, by asking the DC for a new one and building it while the old one
carries the traffic; both ends' engines move the peer's vIP to the new path once it is
established and drop the old one (make-before-break). Decisions:

- **When.** The first attempt falls at a point drawn uniformly between `renew_at - spread`
  and `renew_at` of the lifetime (70 % .. 80 %), so nodes whose paths were built together
  (a swarm, a DC restart) do not ask together, and a failed first attempt leaves at least a
  fifth of the lifetime for retries.
- **In use.** More packets crossed the path, both ways, over the last `active_window` of the
  lifetime (a quarter) than keepalives and rekeys alone account for: two keepalives per
  `keepalive_interval` (one per end) plus three packets per rekey (`rekey_interval`), each
  with one to spare. The ends count data and control packets together, so this is the
  nearest sign of data they give; failover probes on a watched gateway path count as use.
  A path not in use is not renewed; it is looked at again every sample period and renewed
  as soon as it is used again (after its lifetime a relayed one has lost its relay binding
  by then, so its first packets are lost until the new path is up).
- **Retries.** After a failed attempt: `retry_min` (2 s), doubling up to `retry_max` (60 s),
  each with +-25 % jitter; while the old path lives, never later than half its remaining
  time, so more attempts fit before it ends. A used path past its lifetime keeps being
  retried at that pace: a new path is the only way it works again.

`now` is monotonic seconds, passed in; the random source is injected (tests fix it).
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

REKEY_PACKETS = 3  # INIT, RESP and the initiator's key-confirming keepalive


@dataclasses.dataclass(frozen=True, slots=True)
class RenewalSettings:
    """Fractions of the path lifetime, and seconds."""

    renew_at: float = 0.8  # the latest first attempt
    spread: float = 0.1  # first attempts fall in [renew_at - spread, renew_at]
    active_window: float = 0.25  # "in use" looks back this share of the lifetime
    retry_min: float = 2.0
    retry_max: float = 60.0
    retry_jitter: float = 0.25  # each retry delay is scaled by 1 +- this
    sample_min: float = 0.5  # traffic is sampled every lifetime / 40, within these bounds
    sample_max: float = 15.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.spread <= self.renew_at < 1.0:
            raise ValueError("need 0 <= spread <= renew_at < 1")
        if not 0.0 < self.active_window <= 1.0:
            raise ValueError("active_window must be in (0, 1]")
        if not 0.0 < self.retry_min <= self.retry_max:
            raise ValueError("need 0 < retry_min <= retry_max")
        if not 0.0 <= self.retry_jitter < 1.0:
            raise ValueError("retry_jitter must be in [0, 1)")
        if not 0.0 < self.sample_min <= self.sample_max:
            raise ValueError("need 0 < sample_min <= sample_max")

    def sample_period(self, lifetime: float) -> float:
        return min(max(lifetime / 40.0, self.sample_min), self.sample_max)


class RenewalState(enum.Enum):
    WAITING = "waiting"  # before its renewal time, or between retries
    IDLE = "idle"  # due, but not in use: looked at again each sample period
    RENEWING = "renewing"  # an attempt is under way (the owner is building the new path)
    RENEWED = "renewed"  # a new path took over; this one is about to go


@dataclasses.dataclass(slots=True)
class _Tracked:
    peer: str
    started: float
    lifetime: float
    next_try: float
    period: float
    keepalive_interval: float
    rekey_interval: float
    samples: deque[tuple[float, int]]  # (time, packets so far), at least `period` apart
    last: tuple[float, int] | None = None  # the newest observation
    state: RenewalState = RenewalState.WAITING
    attempts: int = 0  # failed attempts in a row

    @property
    def expires_at(self) -> float:
        return self.started + self.lifetime


class RenewalSchedule:
    """Which tracked paths to renew now (see the module docstring).

    The owner tracks the paths it requested and that carry their peer's traffic now, feeds
    each one's packet count (`observe`), asks `due(now)` and starts one attempt per path it
    returns, then reports `succeeded` or `failed`.
    """

    def __init__(
        self, settings: RenewalSettings | None = None, rng: Callable[[], float] = random.random
    ) -> None:
        self.settings = settings or RenewalSettings()
        self._rng = rng
        self._paths: dict[bytes, _Tracked] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            ("renewals", "renewal_failures", "idle_not_renewed"), 0
        )

    def __contains__(self, path_id: bytes) -> bool:
        return path_id in self._paths

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self._paths))

    def track(
        self,
        path_id: bytes,
        peer: str,
        started: float,
        lifetime: float,
        keepalive_interval: float,
        rekey_interval: float,
    ) -> None:
        """Start watching a path (no-op if it is watched already)."""
        if path_id in self._paths:
            return
        s = self.settings
        share = s.renew_at - s.spread * self._rng()
        period = s.sample_period(lifetime)
        self._paths[path_id] = _Tracked(
            peer=peer,
            started=started,
            lifetime=lifetime,
            next_try=started + lifetime * share,
            period=period,
            keepalive_interval=keepalive_interval,
            rekey_interval=rekey_interval,
            samples=deque(),
        )

    def untrack(self, path_id: bytes) -> None:
        self._paths.pop(path_id, None)

    def observe(self, path_id: bytes, packets: int, now: float) -> None:
        """The path's packet count (both directions, since it was created) at `now`."""
        p = self._paths.get(path_id)
        if p is None:
            return
        p.last = (now, packets)
        if not p.samples or now - p.samples[-1][0] >= p.period:
            p.samples.append((now, packets))
        boundary = now - self.settings.active_window * p.lifetime
        while len(p.samples) >= 2 and p.samples[1][0] <= boundary:
            p.samples.popleft()  # keep one sample at or before the window's start

    def in_use(self, path_id: bytes, now: float) -> bool:
        p = self._paths.get(path_id)
        if p is None or p.last is None or not p.samples:
            return False
        boundary = now - self.settings.active_window * p.lifetime
        base = p.samples[0]
        for sample in p.samples:
            if sample[0] > boundary:
                break
            base = sample
        span = max(p.last[0] - base[0], 0.0)
        allowance = 2 * (span / p.keepalive_interval + 1) + REKEY_PACKETS * (
            span / p.rekey_interval + 1
        )
        return p.last[1] - base[1] > allowance

    def due(self, now: float) -> list[bytes]:
        """Paths to renew now; each is RENEWING until `succeeded` or `failed`."""
        out: list[bytes] = []
        for path_id, p in self._paths.items():
            if p.state in (RenewalState.RENEWING, RenewalState.RENEWED) or now < p.next_try:
                continue
            if not self.in_use(path_id, now):
                if p.state is not RenewalState.IDLE:
                    self.counters["idle_not_renewed"] += 1
                p.state = RenewalState.IDLE
                p.next_try = now + p.period
                continue
            p.state = RenewalState.RENEWING
            out.append(path_id)
        return out

    def succeeded(self, path_id: bytes) -> None:
        p = self._paths.get(path_id)
        if p is not None:
            p.state = RenewalState.RENEWED
            p.attempts = 0
            self.counters["renewals"] += 1

    def failed(self, path_id: bytes, now: float) -> float:
        """Schedule the next attempt; returns its delay (seconds)."""
        p = self._paths.get(path_id)
        if p is None:
            return 0.0
        s = self.settings
        p.attempts += 1
        delay = min(s.retry_max, s.retry_min * 2.0 ** (p.attempts - 1))
        delay *= 1.0 - s.retry_jitter + 2.0 * s.retry_jitter * self._rng()
        left = p.expires_at - now
        if left > 0:
            delay = min(delay, max(left / 2.0, s.sample_min))
        p.state = RenewalState.WAITING
        p.next_try = now + delay
        self.counters["renewal_failures"] += 1
        return delay

    def next_wakeup(self, now: float) -> float | None:
        """When `due` or `observe` next has work: a renewal time or a sample, None if idle."""
        times: list[float] = []
        for p in self._paths.values():
            if p.state is RenewalState.RENEWED:
                continue
            times.append(p.samples[-1][0] + p.period if p.samples else now)
            if p.state is not RenewalState.RENEWING:
                times.append(p.next_try)
        return min(times) if times else None

    def status(self, now: float) -> list[dict[str, Any]]:
        return [
            {
                "path_id": path_id.hex(),
                "peer_fqdn": p.peer,
                "state": p.state.value,
                "renew_in_s": round(max(p.next_try - now, 0.0), 1),
                "expires_in_s": round(p.expires_at - now, 1),
                "in_use": self.in_use(path_id, now),
                "failed_attempts": p.attempts,
            }
            for path_id, p in self._paths.items()
        ]
