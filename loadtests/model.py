"""What a load run records, and the sans-IO trackers that produce it.

A *stream* is what one Locust user does with one protocol: a sequence of *sessions* (one HTTP
keep-alive connection, or one UDP socket) against the service. Each answer names the backend
that gave it. A *gap* is the time between two successful answers of a stream with at least
one failure in between (a timed-out request, a broken connection); it may span two sessions
when a connection broke and the next one answered. Times are wall-clock seconds (time.time()),
so records from several processes and the handover driver line up.

No sockets and no clock here: `now` is passed in, so every rule is unit-tested.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("http", "udp")


@dataclass
class Gap:
    start: float  # the last successful answer before the failure(s)
    end: float  # the first successful answer after them (or the stream's end if open)
    failures: int
    recovered: bool = True

    @property
    def length(self) -> float:
        return self.end - self.start


@dataclass
class SessionRecord:
    user: str  # the stream's owner: one Locust user, unique across processes
    client: str  # the identity's FQDN
    vip: str
    kind: str  # "http" | "udp"
    port: int
    target: str  # the address DNS gave for the service
    sid: int  # sequence number within the stream
    start: float
    end: float = 0.0
    end_reason: str = ""  # "done" | "stopped" | "broken: <why>"
    answers: int = 0
    failures: int = 0
    first_ok: float | None = None
    last_ok: float | None = None
    backends: list[tuple[float, str]] = field(default_factory=list)  # first, then each change
    gaps: list[Gap] = field(default_factory=list)  # gaps that ended in this session
    wrong_address: int = 0  # answers whose server saw a client address other than the vIP
    seen_addresses: list[str] = field(default_factory=list)  # the wrong ones, distinct

    @property
    def broken(self) -> bool:
        return self.end_reason.startswith("broken")

    @property
    def max_gap(self) -> float:
        return max((g.length for g in self.gaps), default=0.0)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["type"] = "session"
        doc["backends"] = [[t, b] for t, b in self.backends]
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SessionRecord:
        fields = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        fields["backends"] = [(float(t), str(b)) for t, b in doc.get("backends", [])]
        fields["gaps"] = [Gap(**g) for g in doc.get("gaps", [])]
        return cls(**fields)


@dataclass
class UserRecord:
    """One Locust user at its end: a user whose name never resolved has no session at all."""

    user: str
    client: str
    vip: str
    dns_ok: int = 0
    dns_failed: int = 0
    sessions: int = 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "type": "user"}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> UserRecord:
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


@dataclass
class AnswerOutcome:
    """What one answer meant, for live counters."""

    session_violation: str | None = None  # the backend this session had before, if it changed
    gap: Gap | None = None  # the gap this answer closed
    wrong_address: bool = False


class Stream:
    """One user's sessions with one protocol; finished sessions go to `records`."""

    def __init__(self, user: str, client: str, vip: str, kind: str, port: int) -> None:
        self.user, self.client, self.vip, self.kind, self.port = user, client, vip, kind, port
        self.session: SessionRecord | None = None
        self.records: list[SessionRecord] = []
        self._sid = 0
        self._last_ok: float | None = None
        self._pending = 0  # failures since the last successful answer

    def open_session(self, now: float, target: str) -> SessionRecord:
        if self.session is not None:
            self.close_session(now, "done")
        self._sid += 1
        self.session = SessionRecord(
            self.user, self.client, self.vip, self.kind, self.port, target, self._sid, now
        )
        return self.session

    def _current(self) -> SessionRecord:
        if self.session is None:
            raise RuntimeError("no open session: call open_session first")
        return self.session

    def answer(self, now: float, backend: str, client_address: str | None = None) -> AnswerOutcome:
        s = self._current()
        out = AnswerOutcome()
        s.answers += 1
        if s.first_ok is None:
            s.first_ok = now
        s.last_ok = now
        if not s.backends:
            s.backends.append((now, backend))
        elif s.backends[-1][1] != backend:
            out.session_violation = s.backends[-1][1]
            s.backends.append((now, backend))
        if self._pending and self._last_ok is not None:
            out.gap = Gap(self._last_ok, now, self._pending)
            s.gaps.append(out.gap)
        self._pending = 0
        self._last_ok = now
        if client_address is not None and client_address != self.vip:
            out.wrong_address = True
            s.wrong_address += 1
            if client_address not in s.seen_addresses and len(s.seen_addresses) < 8:
                s.seen_addresses.append(client_address)
        return out

    def failure(self, now: float) -> None:
        self._current().failures += 1
        self._pending += 1

    def close_session(self, now: float, reason: str) -> SessionRecord:
        s = self._current()
        s.end, s.end_reason = now, reason
        if reason == "stopped" and self._pending and self._last_ok is not None:
            # The run ended inside an outage: keep it, marked as never recovered.
            s.gaps.append(Gap(self._last_ok, now, self._pending, recovered=False))
        self.records.append(s)
        self.session = None
        return s


class ClientMemory:
    """The backend each client (vIP, protocol, port) was first answered by, for live counts.

    Shared by the users of one process; the verdict recomputes the same over all processes.
    """

    def __init__(self) -> None:
        self._backend: dict[tuple[str, str, int], str] = {}

    def check(self, vip: str, kind: str, port: int, backend: str) -> str | None:
        """The client's earlier backend if this answer came from another one, else None."""
        key = (vip, kind, port)
        before = self._backend.setdefault(key, backend)
        if before == backend:
            return None
        self._backend[key] = backend
        return before


@dataclass
class Timeline:
    """Answers per backend and failures per whole second, per protocol (for the plots)."""

    answers: dict[str, dict[int, dict[str, int]]] = field(default_factory=dict)
    failures: dict[str, dict[int, int]] = field(default_factory=dict)

    def answer(self, kind: str, now: float, backend: str) -> None:
        per_backend = self.answers.setdefault(kind, {}).setdefault(int(now), {})
        per_backend[backend] = per_backend.get(backend, 0) + 1

    def failure(self, kind: str, now: float) -> None:
        per_second = self.failures.setdefault(kind, {})
        per_second[int(now)] = per_second.get(int(now), 0) + 1

    def merge(self, other: Timeline) -> None:
        for kind, seconds in other.answers.items():
            for sec, counts in seconds.items():
                for backend, n in counts.items():
                    mine = self.answers.setdefault(kind, {}).setdefault(sec, {})
                    mine[backend] = mine.get(backend, 0) + n
        for kind, fails in other.failures.items():
            for sec, n in fails.items():
                mine_f = self.failures.setdefault(kind, {})
                mine_f[sec] = mine_f.get(sec, 0) + n

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "timeline",
            "answers": {
                k: {str(s): c for s, c in sorted(v.items())} for k, v in self.answers.items()
            },
            "failures": {
                k: {str(s): n for s, n in sorted(v.items())} for k, v in self.failures.items()
            },
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Timeline:
        return cls(
            answers={
                k: {int(s): {str(b): int(n) for b, n in c.items()} for s, c in v.items()}
                for k, v in doc.get("answers", {}).items()
            },
            failures={
                k: {int(s): int(n) for s, n in v.items()}
                for k, v in doc.get("failures", {}).items()
            },
        )


@dataclass
class EventRecord:
    """One handover-driver action, as it was executed."""

    offset: float  # seconds after the start of the run, as scheduled
    action: str
    args: list[str]
    argv: list[str]
    started_at: float = 0.0
    ended_at: float = 0.0
    rc: int | None = None
    output: str = ""

    @property
    def label(self) -> str:
        return f"{self.offset:g}s {self.action} {' '.join(self.args)}".strip()

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["label"] = self.label
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> EventRecord:
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})
