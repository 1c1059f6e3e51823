"""Tunnel quality as a gateway reports it to its DC, sans-IO: RTT, jitter and loss of the
probes it sends on its tunnels.

- RTT: an EWMA of the samples with gain 1/8 (RFC 6298's SRTT).
- Jitter: RFC 3550's interarrival jitter, J += (|D| - J) / 16, where D is the change of RTT
  between two consecutive answers on the same tunnel (tunnels to different MNs have
  different RTTs; their differences are not jitter).
- Loss: of the probes whose fate is known in the last `window` seconds, the share that got no
  answer within `timeout`. A late answer still counts as lost (as in RTP); probes of a tunnel
  that is gone are forgotten, not lost.
"""

from __future__ import annotations

import collections
import dataclasses

RTT_GAIN = 1 / 8
JITTER_GAIN = 1 / 16
MAX_OUTSTANDING = 4096  # probes awaiting an answer; beyond this the oldest are dropped


@dataclasses.dataclass(frozen=True)
class Quality:
    rtt_us: int
    jitter_us: int
    loss_ppm: int
    resolved: int  # probes answered or lost within the window (how much the loss rests on)


class ProbeQuality:
    def __init__(self, timeout: float = 2.0, window: float = 30.0) -> None:
        self.timeout = timeout
        self.window = window
        self.srtt: float | None = None  # seconds
        self.jitter = 0.0  # seconds
        self._last_rtt: dict[bytes, float] = {}  # per tunnel, for the jitter's D
        self._outstanding: dict[tuple[bytes, int], float] = {}  # (path, seq) -> sent at
        # (when known, lost?), oldest first; bounded so a flood of probes cannot grow it
        self._outcomes: collections.deque[tuple[float, bool]] = collections.deque(maxlen=65536)

    def sent(self, path_id: bytes, seq: int, now: float) -> None:
        self._outstanding[(path_id, seq)] = now
        if len(self._outstanding) > MAX_OUTSTANDING:
            del self._outstanding[next(iter(self._outstanding))]

    def answered(self, path_id: bytes, seq: int, rtt: float, now: float) -> None:
        """A ProbeResult. Answers to probes we did not send (or already counted) are ignored."""
        sent_at = self._outstanding.pop((path_id, seq), None)
        if sent_at is None:
            return
        if now - sent_at > self.timeout:
            self._outcomes.append((now, True))
            return
        self._outcomes.append((now, False))
        self.srtt = rtt if self.srtt is None else self.srtt + RTT_GAIN * (rtt - self.srtt)
        previous = self._last_rtt.get(path_id)
        if previous is not None:
            self.jitter += JITTER_GAIN * (abs(rtt - previous) - self.jitter)
        self._last_rtt[path_id] = rtt

    def forget(self, keep: set[bytes]) -> None:
        """Drop what we hold about tunnels not in `keep` (they closed)."""
        self._outstanding = {k: t for k, t in self._outstanding.items() if k[0] in keep}
        self._last_rtt = {p: r for p, r in self._last_rtt.items() if p in keep}

    def snapshot(self, now: float) -> Quality:
        for key, sent_at in list(self._outstanding.items()):
            if now - sent_at >= self.timeout:
                del self._outstanding[key]
                self._outcomes.append((now, True))  # stamped when known: the deque stays sorted
        while self._outcomes and self._outcomes[0][0] < now - self.window:
            self._outcomes.popleft()
        lost = sum(1 for _, was_lost in self._outcomes if was_lost)
        n = len(self._outcomes)
        return Quality(
            rtt_us=round((self.srtt or 0.0) * 1_000_000),
            jitter_us=round(self.jitter * 1_000_000),
            loss_ppm=lost * 1_000_000 // n if n else 0,
            resolved=n,
        )
