"""loadtests.model: streams, sessions, gaps, client memory, timeline (sans-IO)."""

from __future__ import annotations

from loadtests.model import (
    ClientMemory,
    EventRecord,
    Gap,
    SessionRecord,
    Stream,
    Timeline,
    UserRecord,
)


def stream() -> Stream:
    return Stream("mn1-1", "s0.swarm.ntm.example.com", "100.64.0.7", "http", 8080)


def test_answers_on_one_backend_make_one_transition_and_no_gap() -> None:
    s = stream()
    s.open_session(10.0, "100.64.9.9")
    for t in (10.1, 10.2, 10.3):
        out = s.answer(t, "web1", "100.64.0.7")
        assert out.session_violation is None and out.gap is None and not out.wrong_address
    rec = s.close_session(11.0, "done")
    assert rec.backends == [(10.1, "web1")]
    assert rec.answers == 3 and rec.failures == 0 and rec.gaps == []
    assert (rec.first_ok, rec.last_ok, rec.end, rec.end_reason) == (10.1, 10.3, 11.0, "done")
    assert rec.target == "100.64.9.9" and rec.sid == 1


def test_backend_change_within_a_session_is_a_violation() -> None:
    s = stream()
    s.open_session(0.0, "t")
    s.answer(1.0, "web1")
    out = s.answer(2.0, "web2")
    assert out.session_violation == "web1"
    assert s.answer(3.0, "web2").session_violation is None
    rec = s.close_session(4.0, "done")
    assert rec.backends == [(1.0, "web1"), (2.0, "web2")]


def test_gap_is_last_answer_to_next_answer_with_failures_between() -> None:
    s = stream()
    s.open_session(0.0, "t")
    s.answer(1.0, "web1")
    s.failure(3.0)
    s.failure(5.0)
    out = s.answer(6.5, "web1")
    assert out.gap == Gap(1.0, 6.5, 2)
    assert out.gap.length == 5.5
    # a slow answer without a failure in between is not a gap
    assert s.answer(9.0, "web1").gap is None
    rec = s.close_session(10.0, "done")
    assert rec.max_gap == 5.5 and rec.failures == 2


def test_gap_spans_a_broken_session_and_the_next_one() -> None:
    s = stream()
    s.open_session(0.0, "t")
    s.answer(1.0, "web1")
    s.failure(3.0)
    first = s.close_session(3.0, "broken: reset")
    assert first.broken and first.gaps == []
    s.open_session(3.5, "t")
    out = s.answer(4.0, "web2")
    assert out.session_violation is None  # a new session may land elsewhere
    assert out.gap == Gap(1.0, 4.0, 1)
    second = s.close_session(5.0, "done")
    assert second.sid == 2 and second.gaps == [Gap(1.0, 4.0, 1)]
    assert s.records == [first, second]


def test_failures_before_any_answer_are_not_a_gap() -> None:
    s = stream()
    s.open_session(0.0, "t")
    s.failure(1.0)
    assert s.answer(2.0, "web1").gap is None


def test_run_ending_in_an_outage_keeps_an_unrecovered_gap() -> None:
    s = stream()
    s.open_session(0.0, "t")
    s.answer(1.0, "web1")
    s.failure(2.0)
    rec = s.close_session(9.0, "stopped")
    assert rec.gaps == [Gap(1.0, 9.0, 1, recovered=False)]


def test_wrong_client_address_is_counted_and_remembered() -> None:
    s = stream()
    s.open_session(0.0, "t")
    assert s.answer(1.0, "web1", "198.51.100.60").wrong_address
    s.answer(2.0, "web1", "198.51.100.60")
    s.answer(3.0, "web1", None)  # UDP echo: address unknown, not wrong
    rec = s.close_session(4.0, "done")
    assert rec.wrong_address == 2 and rec.seen_addresses == ["198.51.100.60"]


def test_opening_a_session_closes_the_previous_one_as_done() -> None:
    s = stream()
    s.open_session(0.0, "t")
    s.open_session(1.0, "t")
    assert [r.end_reason for r in s.records] == ["done"]


def test_session_record_json_round_trip() -> None:
    s = stream()
    s.open_session(0.0, "t")
    s.answer(1.0, "web1", "1.2.3.4")
    s.failure(2.0)
    s.answer(3.0, "web2")
    rec = s.close_session(4.0, "stopped")
    doc = rec.to_json()
    assert doc["type"] == "session"
    assert SessionRecord.from_json(doc) == rec


def test_client_memory_reports_the_earlier_backend_once_per_change() -> None:
    m = ClientMemory()
    assert m.check("100.64.0.1", "http", 80, "web1") is None
    assert m.check("100.64.0.1", "http", 80, "web1") is None
    assert m.check("100.64.0.1", "udp", 9000, "web2") is None  # another service
    assert m.check("100.64.0.1", "http", 80, "web3") == "web1"
    assert m.check("100.64.0.1", "http", 80, "web3") is None


def test_timeline_counts_per_second_and_merges() -> None:
    a, b = Timeline(), Timeline()
    a.answer("http", 100.2, "web1")
    a.answer("http", 100.9, "web1")
    a.failure("udp", 101.5)
    b.answer("http", 100.5, "web2")
    b.answer("http", 100.5, "web1")
    b.failure("udp", 101.0)
    a.merge(b)
    assert a.answers == {"http": {100: {"web1": 3, "web2": 1}}}
    assert a.failures == {"udp": {101: 2}}
    assert Timeline.from_json(a.to_json()) == a


def test_event_record_label_and_round_trip() -> None:
    e = EventRecord(30.0, "move", ["mn2", "access-b"], ["ntm", "lab"], 1.0, 2.0, 0, "ok")
    assert e.label == "30s move mn2 access-b"
    assert EventRecord.from_json(e.to_json()) == e


def test_user_record_round_trip() -> None:
    u = UserRecord("mn2-3", "s2.swarm.ntm.example.com", "100.64.0.3", 1, 2, 3)
    assert u.to_json()["type"] == "user"
    assert UserRecord.from_json(u.to_json()) == u
