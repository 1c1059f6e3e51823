"""reconcile.diff: only what differs, in a safe order, idempotent (examples + properties)."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from lb_integration.model import (
    LbState,
    Protocol,
    RealServer,
    Scheduler,
    ServiceKey,
    VirtualService,
)
from lb_integration.reconcile import (
    AddReal,
    AddService,
    DeleteReal,
    DeleteService,
    EditReal,
    EditService,
    apply_ops,
    canonical,
    diff,
    touched,
)

K1 = ServiceKey("10.99.0.10", 80, Protocol.TCP)
K2 = ServiceKey("10.99.0.10", 53, Protocol.UDP)
W1, W2, W3 = (RealServer(f"10.0.1.1{i}", 80) for i in (1, 2, 3))
WWW = VirtualService(K1, Scheduler.RR, reals=(W1, W2, W3))
DNS = VirtualService(K2, Scheduler.SH, 60, "255.255.255.255", (RealServer("10.0.1.11", 53),))


def test_same_state_is_no_ops() -> None:
    state = LbState((WWW, DNS))
    assert diff(state, state) == []
    # order of services and reals does not matter
    shuffled = LbState((DNS, dataclasses.replace(WWW, reals=(W3, W1, W2))))
    assert diff(state, shuffled) == []


def test_from_empty_adds_services_then_reals() -> None:
    ops = diff(LbState(), LbState((WWW,)))
    assert ops[0] == AddService(dataclasses.replace(WWW, reals=()))
    assert ops[1:] == [AddReal(K1, W1), AddReal(K1, W2), AddReal(K1, W3)]


def test_one_real_edit_touches_only_that_real() -> None:
    w2_off = dataclasses.replace(W2, weight=0)
    new = LbState((dataclasses.replace(WWW, reals=(W1, w2_off, W3)), DNS))
    assert diff(LbState((WWW, DNS)), new) == [EditReal(K1, W2, w2_off)]


def test_scheduler_change_is_an_edit_not_a_rebuild() -> None:
    new = dataclasses.replace(WWW, scheduler=Scheduler.WRR)
    ops = diff(LbState((WWW,)), LbState((new,)))
    assert ops == [
        EditService(dataclasses.replace(WWW, reals=()), dataclasses.replace(new, reals=()))
    ]


def test_additions_before_deletions_and_deleted_service_takes_its_reals() -> None:
    w4 = RealServer("10.0.1.14", 80)
    new = LbState((dataclasses.replace(WWW, reals=(W1, w4)),))
    ops = diff(LbState((WWW, DNS)), new)
    assert ops == [AddReal(K1, w4), DeleteReal(K1, W2), DeleteReal(K1, W3), DeleteService(DNS)]
    assert touched(ops) == {K1, K2}


# ---------------------------------------------------------------- properties

addresses = st.sampled_from(["10.0.1.11", "10.0.1.12", "10.0.1.13", "10.0.1.14"])
reals = st.builds(
    RealServer, address=addresses, port=st.sampled_from([80, 8080]), weight=st.integers(0, 3)
)
keys = st.builds(
    ServiceKey,
    address=st.sampled_from(["10.99.0.10", "10.99.0.11"]),
    port=st.sampled_from([80, 443]),
    protocol=st.sampled_from(list(Protocol)),
)


@st.composite
def services(draw: st.DrawFn) -> VirtualService:
    rs = draw(st.lists(reals, max_size=4, unique_by=lambda r: (r.address, r.port)))
    persistence = draw(st.sampled_from([None, 60, 300]))
    return VirtualService(
        key=draw(keys),
        scheduler=draw(st.sampled_from(list(Scheduler))),
        persistence=persistence,
        persistence_netmask="255.255.255.255" if persistence else None,
        reals=tuple(rs),
    )


states = st.lists(services(), max_size=4, unique_by=lambda s: s.key).map(
    lambda ss: LbState(tuple(ss))
)


@given(states)
def test_idempotent(state: LbState) -> None:
    assert diff(state, state) == []


@given(states, states)
def test_ops_reach_the_desired_state(current: LbState, desired: LbState) -> None:
    ops = diff(current, desired)
    assert apply_ops(current, ops) == canonical(desired)
    assert diff(apply_ops(current, ops), desired) == []


@given(states, states)
def test_only_differing_things_are_touched(current: LbState, desired: LbState) -> None:
    cur, want = current.by_key(), desired.by_key()
    for op in diff(current, desired):
        if isinstance(op, AddReal | EditReal | DeleteReal):
            real = op.real if isinstance(op, AddReal | DeleteReal) else op.new
            old = {(r.address, r.port): r for r in cur[op.key].reals} if op.key in cur else {}
            new = {(r.address, r.port): r for r in want[op.key].reals}
            assert old.get((real.address, real.port)) != new.get((real.address, real.port))
        elif isinstance(op, EditService):
            assert cur[op.new.key] != want[op.new.key]
    # every DeleteReal concerns a service that stays; deleted services carry their reals
    kept = set(want)
    assert all(op.key in kept for op in diff(current, desired) if isinstance(op, DeleteReal))


@given(states, states)
def test_order_adds_before_deletes(current: LbState, desired: LbState) -> None:
    kinds = [type(op) for op in diff(current, desired)]
    rank = {AddService: 0, EditService: 1, AddReal: 2, EditReal: 3, DeleteReal: 4, DeleteService: 5}
    assert [rank[k] for k in kinds] == sorted(rank[k] for k in kinds)
