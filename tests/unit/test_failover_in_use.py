"""ntm_node.failover with probe_idle=False (a swarm's identities): a quiet path is not
probed, the first unanswered outbound packet starts detection, and the switch still comes
within A of it. Same in-memory world as test_failover.py (fake clock, real TunnelPaths)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ntm_io.netwatch import AddressSet
from ntm_node.failover import MAX_WAIT, FailoverManager, probe_other_families
from ntm_proto.messages import Endpoint
from ntm_proto.path import TunnelPath
from tests.unit.test_failover import (
    GW1,
    GW1_ADDRS,
    GW2,
    MN_ADDR,
    SERVICE,
    SERVICE_VIP,
    TIMERS,
    World,
    arun,
    outage,
)

PACKET = bytes([0x45]) + bytes(39)  # an inner IPv4 packet (the fake engine never reads it)


def in_use_manager(w: World) -> FailoverManager:
    w.engine.send_listeners = []  # type: ignore[attr-defined]  # TunnelEngine has them
    return FailoverManager(
        w.engine, w.request_direction, TIMERS, clock=lambda: w.now, probe_idle=False
    )


def current(w: World) -> TunnelPath:
    path = w.engine.path_to(SERVICE_VIP)
    assert path is not None and path.peer_address is not None
    return path


def send_data(w: World) -> TunnelPath:
    """One packet of the MN's application into the tunnel (what TunnelEngine._on_tun does,
    listeners included)."""
    path = current(w)
    sealed = path.seal(PACKET, w.now)
    assert sealed is not None and path.peer_address is not None
    w.send(w.mn, sealed, path.peer_address)
    for listener in getattr(w.engine, "send_listeners", []):
        listener([path], w.now)
    return path


def answer(w: World, path: TunnelPath, gateway: str = GW1) -> None:
    """The service answers through the same path (inbound data for the MN)."""
    gw_path = w.gws[gateway].ep.path(path.path_id)
    assert gw_path is not None
    sealed = gw_path.seal(PACKET, w.now)
    assert sealed is not None
    w.send(w.gws[gateway], sealed, MN_ADDR)


def liveness(m: FailoverManager) -> dict[str, Any]:
    result: dict[str, Any] = m.status()["services"][SERVICE]["liveness"]
    return result


def test_a_quiet_path_is_not_probed_and_the_loop_sleeps() -> None:
    async def scenario() -> None:
        w = World()
        m = in_use_manager(w)
        await w.connect(m)
        await w.run(m, 60.0)
        assert liveness(m)["probes_sent"] == 0 and liveness(m)["in_use"] is False
        assert m.status()["probe_idle_paths"] is False
        assert m.brief() == {"gateways": {SERVICE: GW1}, "probes_sent": 0}
        # Nothing to wait for but the periodic look (not a busy loop at the 1 ms floor).
        assert m.step(w.now) == pytest.approx(MAX_WAIT)

    arun(scenario())


def test_answered_requests_send_no_probes() -> None:
    async def scenario() -> None:
        w = World()
        m = in_use_manager(w)
        await w.connect(m)
        for second in range(1, 61):  # a request every second, answered at once
            await w.run(m, float(second))
            answer(w, send_data(w))
        await w.run(m, 62.0)
        assert liveness(m)["probes_sent"] == 0 and not m.events

    arun(scenario())


def test_a_gateway_lost_while_quiet_fails_over_within_a_of_the_first_packet() -> None:
    async def scenario() -> None:
        w = World()
        m = in_use_manager(w)
        first = await w.connect(m)
        await w.run(m, 10.0)
        w.down.update(GW1_ADDRS)  # ntma1 dies while nobody uses the path
        await w.run(m, 30.0)
        assert m.gateway_for(SERVICE) == GW1 and not m.events  # nothing noticed, nothing lost
        t0 = w.now
        send_data(w)  # the user's first packet after 20 s: lost
        await w.run(m, t0 + 3.0)
        assert m.gateway_for(SERVICE) == GW2 and first.path_id in w.engine.retired
        assert outage(w, t0) <= m.timers.allowed_outage  # from the first lost packet
        (ev,) = list(m.events)
        assert ev.kind == "gateway" and ev.ok
        assert ev.detection_s is not None
        assert ev.detection_s == pytest.approx(m.timers.detection, abs=0.01)  # from t0
        assert liveness(m)["probes_sent"] == 0  # the new path is quiet again

    arun(scenario())


def test_the_loop_wakes_earlier_for_a_path_that_starts_being_used() -> None:
    """run() sleeps on a timer that data on a quiet path moves closer, without a step."""

    async def scenario() -> None:
        w = World()
        m = in_use_manager(w)
        m.clock = asyncio.get_running_loop().time  # run() uses real timers here
        w.now = m.clock()
        await w.connect(m)
        m.step(w.now)  # watch the path
        steps = 0
        real_step = m.step

        def counting_step(now: float) -> float:
            nonlocal steps
            steps += 1
            return real_step(now)

        m.step = counting_step  # type: ignore[method-assign]
        task = asyncio.get_running_loop().create_task(m.run())
        await asyncio.sleep(0)
        assert steps == 1 and m._due > m.clock() + 0.5  # asleep until the periodic look
        while m.clock() <= w.now + 0.05:  # the fake world ran ahead during the handshake
            await asyncio.sleep(0.02)
        w.now = m.clock()
        before = steps
        send_data(w)
        assert steps == before  # no extra step: only the alarm moved
        assert m._due == pytest.approx(w.now + m.timers.probe_interval)
        assert m._alarm is not None and m._alarm.when() <= m._due + 0.001
        m.wake()
        await asyncio.sleep(0)
        assert steps == before + 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    arun(scenario())


# --- the node's own move to a network of another family -----------------------------------

GW1_DUAL: tuple[Endpoint, ...] = (("198.51.100.60", 7400), ("2001:db8:100::60", 7400))
MN_V6: Endpoint = ("2001:db8:b::100", 7400)


def test_a_move_to_another_family_reaches_the_peer_at_once_on_the_same_path() -> None:
    async def scenario() -> None:
        w = World()
        w.gws[GW1].addrs = GW1_DUAL  # the Route Direction lists both of ntma1's families
        m = w.manager(TIMERS)
        path = await w.connect(m)
        await w.run(m, 1.0)
        assert path.peer_address == GW1_DUAL[0]
        # Nothing to do while we still have an address of the family in use.
        assert probe_other_families(w.mn.ep, AddressSet(ipv4=("10.10.1.100",)), w.now) == 0
        w.down.add(MN_ADDR)  # the host moves to an IPv6-only network
        w.mn.addrs, w.mn.pinned = (MN_V6,), {}
        sent = probe_other_families(w.mn.ep, AddressSet(ipv6=(MN_V6[0],)), w.now)
        assert sent == 1
        w.flush()
        await w.run(m, w.now + 0.1)  # one round trip
        assert path.peer_address == GW1_DUAL[1]  # the same path, now over IPv6
        gw_path = w.gws[GW1].ep.path(path.path_id)
        assert gw_path is not None and gw_path.peer_address == MN_V6  # and it knows where we are
        answer(w, send_data(w))  # traffic flows both ways
        heard = path.last_received
        await w.run(m, w.now + 0.1)
        assert path.last_received > heard and w.engine.path_to(SERVICE_VIP) is path

    arun(scenario())


def test_without_an_address_of_a_family_we_have_nothing_is_probed() -> None:
    async def scenario() -> None:
        w = World()  # ntma1 has an IPv4 address only
        m = w.manager(TIMERS)
        await w.connect(m)
        assert probe_other_families(w.mn.ep, AddressSet(ipv6=(MN_V6[0],)), w.now) == 0

    arun(scenario())
