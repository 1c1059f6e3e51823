"""loadtests.verdict: every check passes on a good run and fails on the matching fault."""

from __future__ import annotations

import random

import pytest

from loadtests.expect import ServiceExpectation
from loadtests.model import EventRecord, Gap, SessionRecord, UserRecord
from loadtests.verdict import (
    Check,
    Thresholds,
    Verdict,
    balance,
    client_violations,
    event_interruptions,
    judge,
    persistence_violations,
    quantile,
    session_violations,
    units,
)

WEB = {"web1": 1, "web2": 1, "web3": 1}
HTTP_STICKY = ServiceExpectation("http", 8080, "rr", True, WEB)
HTTP_RR = ServiceExpectation("http", 80, "rr", False, WEB)
UDP_SH = ServiceExpectation("udp", 9000, "sh", False, WEB)


def sess(
    vip: str,
    backends: list[tuple[float, str]],
    *,
    kind: str = "http",
    port: int = 8080,
    user: str | None = None,
    start: float = 0.0,
    end: float = 100.0,
    answers: int = 10,
    failures: int = 0,
    gaps: list[Gap] | None = None,
    wrong: int = 0,
    reason: str = "stopped",
) -> SessionRecord:
    return SessionRecord(
        user=user or f"u-{vip}-{kind}",
        client=f"{vip}.fqdn",
        vip=vip,
        kind=kind,
        port=port,
        target="100.64.200.1",
        sid=1,
        start=start,
        end=end,
        end_reason=reason,
        answers=answers if backends else 0,
        failures=failures,
        first_ok=backends[0][0] if backends else None,
        last_ok=backends[-1][0] if backends else None,
        backends=backends,
        gaps=gaps or [],
        wrong_address=wrong,
        seen_addresses=["198.51.100.60"] if wrong else [],
    )


def rr_clients(n: int, kind: str = "http", port: int = 8080) -> list[SessionRecord]:
    return [
        sess(f"100.64.0.{i}", [(1.0 + i, f"web{i % 3 + 1}")], kind=kind, port=port)
        for i in range(n)
    ]


def event(offset: float, at: float, action: str = "move", rc: int | None = 0) -> EventRecord:
    return EventRecord(offset, action, ["mn2", "access-b"], ["ntm"], at, at + 1, rc)


def check(v: Verdict, name: str) -> Check:
    found = [c for c in v.checks if c.name.startswith(name)]
    assert found, name
    return found[0]


# -- persistence ---------------------------------------------------------------------------


def test_session_violation_per_backend_change() -> None:
    s = sess("100.64.0.1", [(1.0, "web1"), (5.0, "web2"), (6.0, "web1")])
    found = session_violations([s])
    assert [(v.before, v.after, v.at) for v in found] == [
        ("web1", "web2", 5.0),
        ("web2", "web1", 6.0),
    ]
    assert all(v.level == "session" for v in found)


def test_client_violation_across_sessions_in_time_order() -> None:
    a = sess("100.64.0.1", [(1.0, "web1")], user="u1")
    b = sess("100.64.0.1", [(9.0, "web2")], user="u1", start=8.0)
    c = sess("100.64.0.1", [(3.0, "web1")], user="u2")  # another user, same identity
    found = client_violations([b, a, c])
    assert [(v.before, v.after, v.at) for v in found] == [("web1", "web2", 9.0)]
    # another protocol or port is another client stream
    assert client_violations([a, sess("100.64.0.1", [(2.0, "web3")], kind="udp", port=9000)]) == []


def test_client_level_only_where_the_service_keeps_clients() -> None:
    a = sess("100.64.0.1", [(1.0, "web1")], port=80)
    b = sess("100.64.0.1", [(9.0, "web2")], port=80, start=8.0)
    assert persistence_violations([a, b], [HTTP_RR]) == []  # rr without persistence: allowed
    sticky = ServiceExpectation("http", 80, "rr", True, WEB)
    assert len(persistence_violations([a, b], [sticky])) == 1
    hashed = ServiceExpectation("http", 80, "sh", False, WEB)
    assert len(persistence_violations([a, b], [hashed])) == 1  # a source hash sticks by itself


# -- balance -------------------------------------------------------------------------------


def test_rr_per_client_exact_within_one() -> None:
    b = balance(rr_clients(200), HTTP_STICKY)
    assert b.unit == "client" and b.counts == {"web1": 67, "web2": 67, "web3": 66}
    assert b.ok is True
    assert b.expected["web1"] == pytest.approx(200 / 3)


def test_rr_off_by_two_fails_and_unanswered_units_widen_the_bound() -> None:
    extra = [sess("100.64.1.1", [(1.0, "web1")]), sess("100.64.1.2", [(1.0, "web1")])]
    clients = [*rr_clients(198), *extra]
    b = balance(clients, HTTP_STICKY)
    assert b.counts == {"web1": 68, "web2": 66, "web3": 66}
    assert b.ok is False and "differ by 2" in b.summary
    silent = sess("100.64.1.3", [])
    assert balance([*clients, silent], HTTP_STICKY).ok is True  # 1 + 1 unanswered


def test_rr_without_persistence_counts_sessions() -> None:
    sessions = [
        sess("100.64.0.1", [(float(i), f"web{i % 3 + 1}")], port=80, start=float(i))
        for i in range(9)
    ]
    b = balance(sessions, HTTP_RR)
    assert b.unit == "session" and b.counts == {"web1": 3, "web2": 3, "web3": 3} and b.ok


def test_client_unit_uses_each_clients_first_answer() -> None:
    s1 = sess("100.64.0.1", [(5.0, "web2")], user="a")
    s2 = sess("100.64.0.1", [(1.0, "web1")], user="b")
    counts, unanswered = units([s1, s2, sess("100.64.0.2", [])], "client")
    assert counts == {"web1": 1} and unanswered == 1


def test_wrr_proportional_within_one_period_share() -> None:
    exp = ServiceExpectation("http", 80, "wrr", False, {"web1": 2, "web2": 1, "web3": 1})
    order = ["web1", "web2", "web1", "web3"] * 25  # 100 sessions, weights 2:1:1
    sessions = [sess("100.64.0.1", [(float(i), b)], port=80) for i, b in enumerate(order)]
    assert balance(sessions, exp).ok is True
    skewed = [
        sess("100.64.0.1", [(float(i), "web1" if i < 70 else "web2")], port=80) for i in range(100)
    ]
    assert balance(skewed, exp).ok is False


def test_sh_statistical_tolerance() -> None:
    rng = random.Random(7)
    fair = [
        sess(f"100.64.{i // 250}.{i % 250}", [(1.0, rng.choice(list(WEB)))], kind="udp", port=9000)
        for i in range(200)
    ]
    b = balance(fair, UDP_SH)
    assert b.unit == "client" and b.ok is True and b.p_value is not None and b.p_value >= 0.001
    assert "exact multinomial" in b.method
    dead = [
        sess(f"100.64.0.{i}", [(1.0, f"web{i % 2 + 1}")], kind="udp", port=9000) for i in range(200)
    ]
    b = balance(dead, UDP_SH)
    assert b.ok is False and b.counts["web3"] == 0


def test_balance_flags_a_backend_the_lb_should_not_use_and_no_answers() -> None:
    exp = ServiceExpectation("http", 8080, "rr", True, {"web1": 1, "web2": 1, "web3": 0})
    b = balance([sess("100.64.0.1", [(1.0, "web3")])], exp)
    assert b.ok is False and "web3" in b.summary
    assert balance([sess("100.64.0.1", [])], HTTP_STICKY).ok is False


def test_lc_is_reported_not_checked() -> None:
    exp = ServiceExpectation("http", 80, "wlc", False, WEB)
    assert balance(rr_clients(3, port=80), exp).ok is None


# -- interruptions -------------------------------------------------------------------------


def test_interruption_per_event_takes_gaps_in_its_window_only() -> None:
    s1 = sess("100.64.0.1", [(1.0, "web1")], gaps=[Gap(29.5, 31.0, 2), Gap(61.0, 64.0, 3)])
    s2 = sess("100.64.0.2", [(1.0, "web2")], gaps=[Gap(59.8, 60.3, 1)])
    s3 = sess("100.64.0.3", [(1.0, "web3")])
    late = sess("100.64.0.4", [(80.0, "web3")], start=70.0)  # not alive at either event
    ints = event_interruptions([s1, s2, s3, late], [event(30, 30.0), event(60, 60.0)], 20.0)
    first, second = ints
    assert (first.streams, first.interrupted) == (3, 1)
    assert sorted(first.values) == [0.0, 0.0, 1.5]
    assert sorted(second.values) == [0.0, pytest.approx(0.5), 3.0]
    assert second.by_kind() == {"http": second.values}


def test_window_stops_at_the_next_event_and_skips_events_that_did_not_run() -> None:
    s = sess("100.64.0.1", [(1.0, "web1")], gaps=[Gap(40.0, 41.0, 1)])
    ints = event_interruptions(
        [s], [event(30, 30.0), event(35, 35.0), event(90, 0.0, rc=None)], 30.0
    )
    assert [max(i.values) for i in ints] == [0.0, 1.0]


def test_a_gap_that_starts_just_before_an_event_is_that_events_only() -> None:
    """The last answer before an outage comes up to one interval before the event that
    caused it: that gap overlaps the previous event's window too, but is not its doing."""
    s = sess("100.64.0.1", [(1.0, "web1")], gaps=[Gap(59.5, 62.5, 2), Gap(45.0, 46.0, 1)])
    first, second = event_interruptions([s], [event(30, 30.0), event(60, 60.0)], 40.0, 1.0)
    assert max(first.values) == pytest.approx(1.0)  # only its own gap at 45 s
    assert max(second.values) == pytest.approx(3.0)
    # a gap that began well before any event (2 s > one interval) is nobody's
    early = sess("100.64.0.2", [(1.0, "web1")], gaps=[Gap(27.0, 31.0, 3)])
    (only,) = event_interruptions([early], [event(30, 30.0)], 40.0, 1.0)
    assert only.values == [0.0]


def test_quantile_nearest_rank() -> None:
    assert quantile([], 0.5) == 0.0
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0
    assert quantile([5.0], 0.01) == 5.0


# -- the whole verdict ---------------------------------------------------------------------


def good_run() -> list[SessionRecord]:
    return rr_clients(30) + [
        sess(f"100.64.0.{i}", [(1.0, "web2")], kind="udp", port=9000) for i in range(30)
    ]


def test_good_run_passes_and_exits_zero() -> None:
    v = judge(good_run(), [event(30, 30.0)], [HTTP_STICKY, UDP_SH])
    statuses = {c.name: c.ok for c in v.checks}
    assert statuses["persistence violations"] is True
    assert statuses["client address is the vIP"] is True
    assert statuses["failed requests"] is True
    assert statuses["driver events"] is True
    assert statuses["interruption"] is True  # every stream recovered; no length bound
    # udp: all 30 clients on web2 under sh is a real skew
    assert check(v, "balance udp/9000").ok is False
    fixed = rr_clients(30) + [
        sess(f"100.64.0.{i}", [(1.0, f"web{i % 3 + 1}")], kind="udp", port=9000) for i in range(30)
    ]
    v = judge(fixed, [event(30, 30.0)], [HTTP_STICKY, UDP_SH])
    assert v.ok and v.exit_code == 0, [c for c in v.checks if c.ok is False]


def test_a_persistence_violation_fails_the_verdict() -> None:
    sessions = rr_clients(30)
    sessions[4] = sess("100.64.0.4", [(5.0, "web2"), (31.0, "web3")])  # switched at a handover
    v = judge(sessions, [event(30, 30.0)], [HTTP_STICKY])
    assert not v.ok and v.exit_code == 1
    c = check(v, "persistence violations")
    assert c.ok is False and c.details == {"session": 1, "client": 1}
    assert len(v.violations) == 2


def test_snat_at_the_gateway_fails_twice_over() -> None:
    """What a gateway that SNATs the vIP looks like: new backend and a foreign address."""
    sessions = rr_clients(30)
    sessions[7] = sess("100.64.0.7", [(8.0, "web2"), (61.0, "web1")], wrong=12)
    v = judge(sessions, [event(60, 60.0, "kill")], [HTTP_STICKY])
    assert check(v, "client address").ok is False
    assert check(v, "persistence").ok is False
    assert v.exit_code == 1


def test_failed_requests_threshold() -> None:
    sessions = rr_clients(3)
    sessions[0] = sess("100.64.0.0", [(1.0, "web1")], answers=90, failures=2)
    th = Thresholds(max_failed_ratio=0.01)
    assert check(judge(sessions, [], [HTTP_STICKY], th), "failed").ok is False
    th = Thresholds(max_failed_ratio=0.05)
    assert check(judge(sessions, [], [HTTP_STICKY], th), "failed").ok is True
    th = Thresholds(max_failed_ratio=0.05, max_failed=1)
    assert check(judge(sessions, [], [HTTP_STICKY], th), "failed").ok is False


def test_failures_in_an_events_window_are_the_events_not_the_ratios() -> None:
    """A move loses what is sent while it lasts: judged per event, not as steady failures;
    the same failures away from any event fail the ratio."""
    sessions = rr_clients(3)
    sessions[0] = sess("100.64.0.0", [(1.0, "web1")], answers=90, failures=5)
    sessions[0].gaps = [Gap(30.5, 33.0, 2), Gap(70.0, 71.0, 1)]  # 2 at the event, 1 outside
    th = Thresholds(max_failed_ratio=0.02)
    c = check(judge(sessions, [event(30, 30.0)], [HTTP_STICKY], th), "failed")
    # 5 failed, 2 of them in the move's window: 3 of 110 = 2.7 % outside > 2 %
    assert c.ok is False and c.details["failures_in_events"] == 2
    assert c.details["failures_outside_events"] == 3 and "2 more" in c.summary
    sessions[0].failures = 3
    c = check(judge(sessions, [event(30, 30.0)], [HTTP_STICKY], th), "failed")
    assert c.ok is True  # 1 of 108 outside
    assert check(judge(sessions, [], [HTTP_STICKY], th), "failed").ok is False  # no event


def test_failed_event_silent_client_and_interruption_threshold_fail() -> None:
    s = rr_clients(3)
    s[1] = sess("100.64.0.1", [(1.0, "web2")], gaps=[Gap(30.0, 35.0, 3)])
    v = judge(s, [event(30, 30.0, rc=1)], [HTTP_STICKY], Thresholds(max_interruption=4.0))
    assert check(v, "driver events").ok is False
    assert check(v, "interruption").ok is False
    v = judge([*rr_clients(3), sess("100.64.9.9", [])], [], [HTTP_STICKY])
    assert check(v, "every client answered").ok is False


def test_no_sessions_at_all_fails() -> None:
    v = judge([], [], [HTTP_STICKY])
    assert not v.ok


def test_unrecovered_stream_fails_the_interruption_check() -> None:
    s = rr_clients(3)
    s[0] = sess("100.64.0.0", [(1.0, "web1")], gaps=[Gap(30.0, 40.0, 5, recovered=False)])
    v = judge(s, [event(30, 30.0)], [HTTP_STICKY], Thresholds(max_interruption=60.0))
    c = check(v, "interruption")
    assert c.ok is False and "never recovered" in c.summary
    c = check(judge(s, [event(30, 30.0)], [HTTP_STICKY]), "interruption")
    assert c.ok is False and "never recovered" in c.summary  # without a bound too
    assert check(judge(s, [], [HTTP_STICKY]), "interruption").ok is None  # no event


def test_a_user_whose_name_never_resolved_fails_the_verdict() -> None:
    """The 200-identity run that showed it: users stuck in DNS leave no session behind."""
    sessions = rr_clients(3)
    users = [UserRecord(f"u-100.64.0.{i}-http", "c", f"100.64.0.{i}", dns_ok=1) for i in range(3)]
    users.append(UserRecord("u9", "c9", "100.64.0.9", dns_ok=0, dns_failed=4))
    v = judge(sessions, [], [HTTP_STICKY], Thresholds(max_failed_ratio=0.5), users)
    c = check(v, "every client answered")
    assert c.ok is False and "1 never resolved the name" in c.summary
    assert v.totals["clients"] == 4 and v.totals["users"] == 4
    assert v.totals["per_kind"]["dns"] == {"sessions": 0, "answers": 3, "failures": 4}
    failed = check(v, "failed requests")
    assert failed.ok is True and "dns 4" in failed.summary  # 4 of 34 within 50 %
    strict = judge(sessions, [], [HTTP_STICKY], Thresholds(), users)
    assert check(strict, "failed requests").ok is False
