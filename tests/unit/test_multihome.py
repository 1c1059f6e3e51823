"""ntm_proto.multihome: which uplink each path uses and when the others are probed (pure)."""

from __future__ import annotations

import pytest

from ntm_proto.messages import Endpoint
from ntm_proto.multihome import MultihomePolicy, PathView, ProbeDue, Switch

V4, V6 = "10.10.1.103", "2001:db8:b::103"
GW4: Endpoint = ("198.51.100.60", 7400)
GW6: Endpoint = ("2001:db8:100::60", 7400)
GW4B: Endpoint = ("192.0.2.10", 7400)
PID = b"\x01" * 8
IFACES = {V4: "access-a", V6: "access-b"}


def policy(interval: float = 1.0) -> MultihomePolicy:
    p = MultihomePolicy([V4, V6], interval)
    p.set_available(IFACES)
    return p


def view(local: str | None, peer: Endpoint | None, heard: float = 0.0) -> PathView:
    return PathView(PID, local, peer, (GW4, GW6), heard)


def test_the_preferred_leg_in_use_stays_and_the_other_is_probed_every_interval() -> None:
    p = policy()
    plan = p.plan([view(V4, GW4)], now=0.0)
    assert plan.switches == []
    assert plan.probes == [ProbeDue(PID, V6, GW6)]  # the standby leg, to the peer's v6
    assert p.plan([view(V4, GW4)], now=0.5).probes == []
    assert p.plan([view(V4, GW4)], now=1.0).probes == [ProbeDue(PID, V6, GW6)]
    assert p.legs[(PID, V6)].sent == 2


def test_a_better_leg_is_used_only_once_it_has_answered() -> None:
    p = policy()
    on_v6 = view(V6, GW6, heard=0.0)  # the handshake happened to finish on the v6 leg
    plan = p.plan([on_v6], now=0.0)
    assert plan.switches == [] and plan.probes == [ProbeDue(PID, V4, GW4)]
    p.answered(PID, V4, now=0.02, rtt=0.02)
    plan = p.plan([on_v6], now=0.03)
    assert plan.switches == [Switch(PID, V4, GW4, "preferred")]
    # The leg we left worked as long as the path heard the peer: ready to come back to.
    assert p.legs[(PID, V6)].last_answer == 0.0


def test_preferring_the_other_leg_moves_there_make_before_break() -> None:
    p = policy()
    p.plan([view(V4, GW4)], now=0.0)
    assert p.prefer("access-b") == V6
    assert p.preference == [V6, V4]
    # Not ready yet (never answered): stay, and probe it.
    assert p.plan([view(V4, GW4, heard=0.9)], now=1.0).switches == []
    p.answered(PID, V6, now=1.01, rtt=0.01)
    plan = p.plan([view(V4, GW4, heard=1.0)], now=1.02)
    assert plan.switches == [Switch(PID, V6, GW6, "preferred")]
    # Back again at once: the leg we left is still ready (it carried traffic at 1.0).
    assert p.prefer(V4) == V4
    plan = p.plan([view(V6, GW6, heard=1.5)], now=1.6)
    assert plan.switches == [Switch(PID, V4, GW4, "preferred")]


def test_a_stale_answer_is_not_ready() -> None:
    p = policy()
    p.prefer("access-b")
    p.plan([view(V4, GW4)], now=0.0)
    p.answered(PID, V6, now=0.01, rtt=0.01)
    late = 0.01 + p.ready_for + 0.01
    assert p.plan([view(V4, GW4, heard=late)], now=late).switches == []


def test_losing_the_leg_in_use_moves_at_once_to_the_ready_one_else_the_best_left() -> None:
    p = policy()
    p.plan([view(V4, GW4)], now=0.0)
    p.answered(PID, V6, now=0.01, rtt=0.01)
    p.set_available({V6: "access-b"})  # access-a's cable pulled
    plan = p.plan([view(V4, GW4)], now=0.02)
    assert plan.switches == [Switch(PID, V6, GW6, "lost")]
    assert plan.probes == []  # nothing else to probe
    # Nothing ever answered: still move, to the best leg there is.
    q = policy()
    q.set_available({V6: "access-b"})
    assert q.plan([view(V4, GW4)], now=0.0).switches == [Switch(PID, V6, GW6, "lost")]


def test_the_leg_in_use_coming_back_is_probed_before_it_is_used_again() -> None:
    p = policy()
    p.set_available({V6: "access-b"})
    p.plan([view(V4, GW4)], now=0.0)  # lost -> V6
    p.set_available(IFACES)
    plan = p.plan([view(V6, GW6, heard=5.0)], now=5.0)
    assert plan.switches == [] and plan.probes == [ProbeDue(PID, V4, GW4)]
    p.answered(PID, V4, now=5.02, rtt=0.02)
    assert p.plan([view(V6, GW6, heard=5.0)], now=5.03).switches == [
        Switch(PID, V4, GW4, "preferred")
    ]


def test_a_leg_follows_the_peer_address_in_use_of_its_family() -> None:
    p = policy()
    moved = PathView(PID, V6, GW6, (GW4, GW6), 0.0)
    assert p.peer_for(moved, V4) == GW4
    on_b = PathView(PID, V4, GW4B, (GW4, GW6), 0.0)  # the gateway moved to another uplink
    assert p.peer_for(on_b, V4) == GW4B
    only_v4 = PathView(PID, V4, GW4, (GW4,), 0.0)
    assert p.peer_for(only_v4, V6) is None
    assert p.plan([only_v4], now=0.0).probes == []  # no leg toward an IPv4-only peer


def test_a_path_with_no_usable_leg_is_left_alone() -> None:
    p = policy()
    p.set_available({})
    assert p.plan([view(V4, GW4)], now=0.0).switches == []


def test_prefer_names_what_exists_when_it_does_not_know_a_name() -> None:
    p = policy()
    with pytest.raises(ValueError, match=r"'wlan0' is not .*10\.10\.1\.103 \(access-a\)"):
        p.prefer("wlan0")


def test_forget_drops_legs_of_paths_that_are_gone_and_late_answers_are_ignored() -> None:
    p = policy()
    p.plan([view(V4, GW4)], now=0.0)
    p.forget([])
    assert p.legs == {}
    p.answered(PID, V6, now=0.1, rtt=0.1)  # nothing to credit: no crash, no leg
    assert p.legs == {}


def test_status_shows_preference_and_legs() -> None:
    p = policy()
    p.plan([view(V4, GW4)], now=0.0)
    p.answered(PID, V6, now=0.05, rtt=0.05)
    assert p.status()["preference"] == [
        {"address": V4, "interface": "access-a", "up": True},
        {"address": V6, "interface": "access-b", "up": True},
    ]
    (leg,) = p.leg_status(PID, now=0.1)
    assert leg == {
        "local": V6,
        "sent": 1,
        "answered": 1,
        "rtt_ms": 50.0,
        "answered_ago_s": 0.05,
    }


def test_bad_construction_is_refused() -> None:
    with pytest.raises(ValueError, match="two local addresses"):
        MultihomePolicy([V4])
    with pytest.raises(ValueError, match="positive"):
        MultihomePolicy([V4, V6], interval=0)
