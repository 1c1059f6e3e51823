"""The verdict of a load run: pure functions over the recorded sessions and events.

Checks (each passes, fails, or says plainly that it was not checked):

- persistence: no session was answered by two backends; when the service keeps clients on one
  server (persistence, or a source hash), no client was answered by two backends. Must be 0.
- client address: every server saw the identity's vIP as the client address (never a
  gateway's address): the property that makes persistence survive a gateway switch.
- every client answered: each identity a user had (even one whose name lookup always
  failed, so it never opened a session) got at least one answer.
- failed requests: failures outside the events' windows / (answers + failures)
  <= --max-failed-ratio (and, if given, those failures <= --max-failed), counting HTTP
  requests, UDP exchanges and DNS lookups. A failure in a gap attributed to an event
  (`gap_owner`) is the event's doing: a move or a dead gateway loses what is sent while it
  lasts (one request per stream and second of outage), so those are reported, and the
  events are judged by the interruption check instead.
- balance, against the scheduler:
    rr:   units per backend differ by at most 1 (+1 per unit that never got an answer, since
          it may have taken a turn we could not see). The unit is a client when the service
          has persistence (only a client's first connection takes a turn), else a session.
    wrr:  |units_i - n * w_i / W| <= w_i / gcd(w) (+ unanswered units): a window of the wrr
          sequence is off by at most one period's share.
    sh/mh: clients per backend against shares w_i / W, exact multinomial test (chi-square
          for large N), failing when p < alpha (default 0.001). See loadtests/stats.py.
    lc/wlc: depend on live connection counts; not checked (reported only).
- events: every driver action exited 0.
- interruption: every stream interrupted around an event recovered before the run ended;
  with --max-interruption, also no gap around an event was longer than that. The
  distribution per event is always reported.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .expect import HASHED, ServiceExpectation
from .model import EventRecord, Gap, SessionRecord, UserRecord
from .stats import goodness_of_fit

DEFAULT_ALPHA = 0.001
DEFAULT_MAX_FAILED_RATIO = 0.01
DEFAULT_EVENT_WINDOW = 30.0


@dataclass(frozen=True)
class Thresholds:
    max_failed_ratio: float = DEFAULT_MAX_FAILED_RATIO
    max_failed: int | None = None
    alpha: float = DEFAULT_ALPHA
    max_interruption: float | None = None
    event_window: float = DEFAULT_EVENT_WINDOW  # s after an event whose gaps count for it
    # s between a stream's requests: its last answer before an outage comes at most about
    # this long before the event that caused it (see `gap_owner`)
    request_interval: float = 1.0


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not checked (the summary says why)
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.ok]


@dataclass(frozen=True)
class Violation:
    level: str  # "session" | "client"
    kind: str
    port: int
    client: str
    vip: str
    at: float
    before: str
    after: str
    user: str = ""


@dataclass
class Balance:
    kind: str
    port: int
    scheduler: str
    unit: str  # "client" | "session"
    counts: dict[str, int]
    expected: dict[str, float]
    unanswered: int
    method: str = ""
    p_value: float | None = None
    ok: bool | None = None
    summary: str = ""


@dataclass
class EventInterruption:
    label: str
    at: float
    streams: int  # streams of sessions alive at the event
    interrupted: int
    unrecovered: int
    values: list[float]  # one per alive stream: its longest gap in the window (0 if none)
    kinds: list[str] = field(default_factory=list)  # the protocol of each value's stream

    def quantile(self, q: float) -> float:
        return quantile(self.values, q)

    def by_kind(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for v, k in zip(self.values, self.kinds, strict=True):
            out.setdefault(k, []).append(v)
        return out


@dataclass
class Verdict:
    checks: list[Check]
    violations: list[Violation]
    balances: list[Balance]
    interruptions: list[EventInterruption]
    totals: dict[str, Any]

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# -- persistence -------------------------------------------------------------------------


def session_violations(sessions: Iterable[SessionRecord]) -> list[Violation]:
    out = []
    for s in sessions:
        for (_, before), (t, after) in zip(s.backends, s.backends[1:], strict=False):
            out.append(
                Violation("session", s.kind, s.port, s.client, s.vip, t, before, after, s.user)
            )
    return out


def client_violations(sessions: Iterable[SessionRecord]) -> list[Violation]:
    """Across all sessions of a client (vIP, protocol, port), in time order."""
    answers: dict[tuple[str, str, int], list[tuple[float, str, SessionRecord]]] = defaultdict(list)
    for s in sessions:
        for t, b in s.backends:
            answers[(s.vip, s.kind, s.port)].append((t, b, s))
    out = []
    for (vip, kind, port), seen in answers.items():
        seen.sort(key=lambda x: x[0])
        current = seen[0][1]
        for t, b, s in seen[1:]:
            if b != current:
                out.append(Violation("client", kind, port, s.client, vip, t, current, b, s.user))
                current = b
    return out


def persistence_violations(
    sessions: Sequence[SessionRecord], expectations: Sequence[ServiceExpectation]
) -> list[Violation]:
    sticky = {(e.kind, e.port) for e in expectations if e.client_sticky}
    found = session_violations(sessions)
    found += client_violations([s for s in sessions if (s.kind, s.port) in sticky])
    return sorted(found, key=lambda v: v.at)


# -- balance -----------------------------------------------------------------------------


def units(sessions: Sequence[SessionRecord], unit: str) -> tuple[dict[str, int], int]:
    """Backend of each unit (its first answer) counted per backend, and units never answered."""
    counts: dict[str, int] = defaultdict(int)
    if unit == "session":
        unanswered = 0
        for s in sessions:
            if s.backends:
                counts[s.backends[0][1]] += 1
            else:
                unanswered += 1
        return dict(counts), unanswered
    first: dict[str, tuple[float, str]] = {}
    clients = set()
    for s in sessions:
        clients.add(s.vip)
        if s.backends:
            t, b = s.backends[0]
            if s.vip not in first or t < first[s.vip][0]:
                first[s.vip] = (t, b)
    for _, b in first.values():
        counts[b] += 1
    return dict(counts), len(clients) - len(first)


def balance(
    sessions: Sequence[SessionRecord], exp: ServiceExpectation, alpha: float = DEFAULT_ALPHA
) -> Balance:
    mine = [s for s in sessions if s.kind == exp.kind and s.port == exp.port]
    sticky = exp.client_sticky
    unit = "client" if sticky else "session"
    counts, unanswered = units(mine, unit)
    live = {b: w for b, w in exp.weights.items() if w > 0}
    for b in live:
        counts.setdefault(b, 0)
    n = sum(counts.values())
    total_w = sum(live.values())
    expected = {b: n * w / total_w for b, w in live.items()} if total_w else {}
    bal = Balance(exp.kind, exp.port, exp.scheduler, unit, counts, expected, unanswered)
    strangers = sorted(b for b in counts if b not in live and counts[b])
    if not live:
        bal.summary = "the LB config names no server with weight > 0"
        bal.ok = None
        return bal
    if strangers:
        bal.ok = False
        bal.summary = f"answers from backends the LB should not use: {', '.join(strangers)}"
        return bal
    if n == 0:
        bal.ok = False
        bal.summary = f"no {unit} was answered at all"
        return bal
    if exp.scheduler == "rr" or (exp.scheduler == "wrr" and len(set(live.values())) == 1):
        spread = max(counts[b] for b in live) - min(counts[b] for b in live)
        bal.method = "rr: max - min <= 1 (+ unanswered)"
        bal.ok = spread <= 1 + unanswered
        bal.summary = f"{unit}s per backend differ by {spread} (allowed {1 + unanswered})"
    elif exp.scheduler == "wrr":
        g = math.gcd(*live.values())
        worst = max(abs(counts[b] - expected[b]) - (live[b] / g + unanswered) for b in live)
        bal.method = "wrr: |n_i - n w_i/W| <= w_i/gcd (+ unanswered)"
        bal.ok = worst <= 1e-9
        bal.summary = f"{unit}s proportional to the weights within the wrr period bound"
        if not bal.ok:
            bal.summary = f"{unit}s off the weights by {worst:.2f} more than the wrr bound allows"
    elif exp.scheduler in HASHED:
        names = sorted(live)
        p, method = goodness_of_fit([counts[b] for b in names], [live[b] / total_w for b in names])
        bal.method, bal.p_value = f"{method} test, alpha {alpha:g}", p
        bal.ok = p >= alpha
        bal.summary = f"{n} {unit}s, p = {p:.3g} ({method}; fails below {alpha:g})"
    else:
        bal.method = "not checked"
        bal.ok = None
        bal.summary = f"{exp.scheduler} follows live connection counts: not checked"
    return bal


# -- interruptions -----------------------------------------------------------------------


def streams(sessions: Iterable[SessionRecord]) -> dict[tuple[str, str], list[SessionRecord]]:
    out: dict[tuple[str, str], list[SessionRecord]] = defaultdict(list)
    for s in sessions:
        out[(s.user, s.kind)].append(s)
    for lst in out.values():
        lst.sort(key=lambda s: s.start)
    return dict(out)


def event_windows(
    events: Sequence[EventRecord], window: float
) -> list[tuple[EventRecord, float, float]]:
    """(event, start, end) of every event that ran: from its start until `window` seconds
    later or the next event, whichever comes first, so one outage is not counted twice."""
    ordered = sorted((e for e in events if e.started_at), key=lambda e: e.started_at)
    out = []
    for i, ev in enumerate(ordered):
        hi = ev.started_at + window
        if i + 1 < len(ordered):
            hi = min(hi, ordered[i + 1].started_at)
        out.append((ev, ev.started_at, hi))
    return out


def gap_owner(
    g: Gap, windows: Sequence[tuple[EventRecord, float, float]], lead: float
) -> int | None:
    """The index of the event a gap is attributed to, if any.

    A gap starts at the stream's last answer, so an outage that an event caused starts up to
    one request interval (`lead`) BEFORE the event: such a gap is that event's, not the
    previous one's (whose window it also overlaps). Otherwise a gap that starts inside an
    event's window is that event's; one that starts outside every window is nobody's."""
    for i, (_, lo, _hi) in enumerate(windows):
        if g.start < lo <= min(g.start + lead, g.end):
            return i
    owner = None
    for i, (_, lo, hi) in enumerate(windows):
        if lo <= g.start < hi:
            owner = i
    return owner


def failures_in_windows(
    sessions: Iterable[SessionRecord],
    windows: Sequence[tuple[EventRecord, float, float]],
    lead: float = 1.0,
) -> dict[str, int]:
    """Failed requests per protocol in gaps attributed to an event (`gap_owner`)."""
    out: dict[str, int] = {}
    for s in sessions:
        for g in s.gaps:
            if gap_owner(g, windows, lead) is not None:
                out[s.kind] = out.get(s.kind, 0) + g.failures
    return out


def event_interruptions(
    sessions: Sequence[SessionRecord],
    events: Sequence[EventRecord],
    window: float,
    lead: float = 1.0,
) -> list[EventInterruption]:
    """Per event: for every stream alive at it, the longest of its gaps attributed to the
    event (`event_windows`, `gap_owner`; 0 if none)."""
    by_stream = streams(sessions)
    windows = event_windows(events, window)
    out = []
    for i, (ev, lo, _hi) in enumerate(windows):
        values: list[float] = []
        kinds: list[str] = []
        unrecovered = 0
        for (_, kind), lst in by_stream.items():
            if not (lst[0].start <= lo <= max(s.end for s in lst)):
                continue
            gaps: list[Gap] = [g for s in lst for g in s.gaps if gap_owner(g, windows, lead) == i]
            values.append(max((g.length for g in gaps), default=0.0))
            kinds.append(kind)
            unrecovered += any(not g.recovered for g in gaps)
        interrupted = sum(v > 0 for v in values)
        out.append(
            EventInterruption(ev.label, lo, len(values), interrupted, unrecovered, values, kinds)
        )
    return out


# -- the verdict -------------------------------------------------------------------------


def totals(sessions: Sequence[SessionRecord], users: Sequence[UserRecord] = ()) -> dict[str, Any]:
    per_kind: dict[str, dict[str, int]] = {}
    for s in sessions:
        k = per_kind.setdefault(s.kind, {"sessions": 0, "answers": 0, "failures": 0})
        k["sessions"] += 1
        k["answers"] += s.answers
        k["failures"] += s.failures
    if users:
        per_kind["dns"] = {
            "sessions": 0,
            "answers": sum(u.dns_ok for u in users),
            "failures": sum(u.dns_failed for u in users),
        }
    answers = sum(k["answers"] for k in per_kind.values())
    failures = sum(k["failures"] for k in per_kind.values())
    gaps = [g.length for s in sessions for g in s.gaps]
    starts = [s.start for s in sessions]
    ends = [s.end for s in sessions]
    return {
        "sessions": len(sessions),
        "clients": len({s.vip for s in sessions} | {u.vip for u in users}),
        "users": len({s.user for s in sessions} | {u.user for u in users}),
        "answers": answers,
        "failures": failures,
        "per_kind": per_kind,
        "gaps": len(gaps),
        "max_gap": max(gaps, default=0.0),
        "first_start": min(starts, default=0.0),
        "last_end": max(ends, default=0.0),
    }


def _failed_check(t: dict[str, Any], th: Thresholds, during: dict[str, int]) -> Check:
    requests = t["answers"] + t["failures"]
    in_events = sum(during.values())
    outside = t["failures"] - in_events
    ratio = outside / requests if requests else 0.0
    ok = requests > 0 and ratio <= th.max_failed_ratio
    limit = f"<= {th.max_failed_ratio:.2%}"
    if th.max_failed is not None:
        ok = ok and outside <= th.max_failed
        limit += f" and <= {th.max_failed}"
    kinds = ", ".join(
        f"{k} {v['failures'] - during.get(k, 0)}" for k, v in sorted(t["per_kind"].items())
    )
    summary = f"{outside} of {requests} requests failed ({ratio:.2%}; allowed {limit}; {kinds})"
    if in_events:
        summary = f"outside the events: {summary}; in the events' windows {in_events} more"
        summary += f" (all: {t['failures'] / requests:.2%}; judged per event below)"
    if not requests:
        summary = "no request was made at all"
    details = {
        "ratio": ratio,
        "requests": requests,
        "failures_outside_events": outside,
        "failures_in_events": in_events,
        "ratio_all": t["failures"] / requests if requests else 0.0,
    }
    return Check("failed requests", ok, summary, details)


def _answered_check(sessions: Sequence[SessionRecord], users: Sequence[UserRecord]) -> Check:
    answered = {s.vip for s in sessions if s.answers}
    everyone = {s.vip for s in sessions} | {u.vip for u in users}
    silent = sorted(everyone - answered)
    ok = bool(everyone) and not silent
    summary = f"{len(answered)} of {len(everyone)} client(s) answered"
    if silent:
        unresolved = {u.vip for u in users if not u.dns_ok}
        summary += f"; never answered: {len(silent)}"
        if unresolved:
            summary += f" ({len(unresolved & set(silent))} never resolved the name)"
        summary += f", e.g. {', '.join(silent[:3])}"
    if not everyone:
        summary = "no session was recorded (did the users start?)"
    return Check("every client answered", ok, summary, {"silent": silent})


def _address_check(sessions: Sequence[SessionRecord]) -> Check:
    wrong = [s for s in sessions if s.wrong_address]
    n = sum(s.wrong_address for s in wrong)
    seen = sorted({a for s in wrong for a in s.seen_addresses})
    http = [s for s in sessions if s.kind == "http"]
    if not http:
        return Check("client address is the vIP", None, "no HTTP session: servers not asked")
    summary = (
        "every server saw the vIP"
        if not n
        else (f"{n} answer(s) from servers that saw another client address: {', '.join(seen[:5])}")
    )
    return Check("client address is the vIP", n == 0, summary, {"wrong": n, "seen": seen})


def _events_check(events: Sequence[EventRecord]) -> Check:
    bad = [e for e in events if e.rc != 0]
    if not events:
        return Check("driver events", None, "no event was scheduled")
    summary = f"{len(events) - len(bad)} of {len(events)} event(s) ran"
    if bad:
        summary += "; failed: " + "; ".join(
            f"{e.label} ({'did not run' if e.rc is None else f'exit {e.rc}'})" for e in bad
        )
    return Check("driver events", not bad, summary)


def _interruption_check(ints: Sequence[EventInterruption], th: Thresholds) -> Check:
    worst = max((max(i.values, default=0.0) for i in ints), default=0.0)
    unrecovered = sum(i.unrecovered for i in ints)
    summary = f"longest interruption around an event {worst:.2f} s"
    if unrecovered:
        summary += "; never recovered before the run ended: " + ", ".join(
            f"{i.unrecovered} stream(s) after {i.label}" for i in ints if i.unrecovered
        )
    if th.max_interruption is None:
        if not ints:
            return Check("interruption", None, "no event ran")
        if unrecovered:
            return Check("interruption", False, summary)
        return Check(
            "interruption",
            True,
            summary + "; every stream recovered (no --max-interruption: length not checked)",
        )
    ok = worst <= th.max_interruption and not unrecovered
    return Check("interruption", ok, summary + f" (allowed {th.max_interruption:g} s)")


def judge(
    sessions: Sequence[SessionRecord],
    events: Sequence[EventRecord],
    expectations: Sequence[ServiceExpectation],
    th: Thresholds = Thresholds(),
    users: Sequence[UserRecord] = (),
) -> Verdict:
    t = totals(sessions, users)
    windows = event_windows(events, th.event_window)
    violations = persistence_violations(sessions, expectations)
    by_level = {lvl: sum(v.level == lvl for v in violations) for lvl in ("session", "client")}
    sticky = [f"{e.kind}/{e.port}" for e in expectations if e.client_sticky]
    per_client = f"client-level on {', '.join(sticky)}" if sticky else "no client-level check"
    checks = [
        Check(
            "persistence violations",
            not violations,
            f"{len(violations)} ({by_level['session']} within a session, {by_level['client']} "
            f"across a client's sessions; {per_client})",
            by_level,
        ),
        _address_check(sessions),
        _answered_check(sessions, users),
        _failed_check(t, th, failures_in_windows(sessions, windows, th.request_interval)),
    ]
    balances = [balance(sessions, e, th.alpha) for e in expectations]
    for b in balances:
        checks.append(
            Check(f"balance {b.kind}/{b.port} ({b.scheduler}, per {b.unit})", b.ok, b.summary)
        )
    ints = event_interruptions(sessions, events, th.event_window, th.request_interval)
    checks.append(_events_check(events))
    checks.append(_interruption_check(ints, th))
    return Verdict(checks, violations, balances, ints, t)
