"""Anti-replay window: unit cases and a property test against a reference model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ntm_proto.replay import WINDOW_SIZE, ReplayWindow


def test_in_order_from_zero() -> None:
    w = ReplayWindow()
    assert w.highest == -1
    for n in range(5000):
        assert w.accept(n)
    assert w.highest == 4999


def test_counter_zero_once() -> None:
    w = ReplayWindow()
    assert w.check(0)
    assert w.accept(0)
    assert not w.accept(0)


def test_duplicates_rejected() -> None:
    w = ReplayWindow()
    for n in (5, 3, 9, 4):
        assert w.accept(n)
    for n in (5, 3, 9, 4):
        assert not w.check(n)
        assert not w.accept(n)
    assert w.accept(6)


def test_reorder_within_window() -> None:
    w = ReplayWindow()
    assert w.accept(3000)
    oldest_ok = 3000 - WINDOW_SIZE + 1
    assert w.accept(oldest_ok)
    assert w.accept(2999)
    assert not w.check(3000 - WINDOW_SIZE)  # just outside
    assert not w.accept(0)


def test_too_old_after_jump() -> None:
    w = ReplayWindow()
    assert w.accept(10)
    assert w.accept(10 + WINDOW_SIZE)  # shift by exactly the window: nothing remembered
    assert not w.check(10)
    assert w.check(11)
    assert w.accept(11)


def test_big_jumps() -> None:
    w = ReplayWindow()
    assert w.accept(0)
    assert w.accept(2**40)
    assert not w.check(0)
    assert w.accept(2**40 - 1)
    assert w.accept(2**63)
    assert not w.check(2**40)
    assert w.accept(2**64 - 1)
    assert w.highest == 2**64 - 1


def test_check_does_not_update() -> None:
    w = ReplayWindow()
    assert w.check(7)
    assert w.check(7)
    assert w.highest == -1
    w.update(7)
    assert not w.check(7)


def test_negative_counter_rejected() -> None:
    assert not ReplayWindow().check(-1)


def test_reset() -> None:
    w = ReplayWindow()
    w.accept(100)
    w.reset()
    assert w.accept(100)


class ReferenceWindow:
    """Obviously correct model: the set of everything accepted."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.highest = -1

    def accept(self, n: int) -> bool:
        if n in self.seen or n <= self.highest - WINDOW_SIZE:
            return False
        self.seen.add(n)
        self.highest = max(self.highest, n)
        return True


@settings(max_examples=300)
@given(
    st.lists(
        st.one_of(
            st.integers(0, 5000),
            st.integers(0, 2**64 - 1),
            st.integers(0, 64),
        ),
        max_size=300,
    )
)
def test_matches_reference_model(counters: list[int]) -> None:
    w, ref = ReplayWindow(), ReferenceWindow()
    for n in counters:
        assert w.accept(n) == ref.accept(n)
        assert w.highest == ref.highest


_STEPS = st.lists(
    st.one_of(
        st.integers(-WINDOW_SIZE - 10, 40),  # reorder and duplicates near the top
        st.integers(0, 3 * WINDOW_SIZE),  # jumps forward
    ),
    min_size=1,
    max_size=200,
)


@settings(max_examples=200)
@given(_STEPS)
def test_window_behaves_like_set_model(steps: list[int]) -> None:
    w, ref = ReplayWindow(), ReferenceWindow()
    base = 0
    for step in steps:
        n = max(0, base + step)
        expected = ref.accept(n)
        assert w.check(n) == expected
        if expected:
            w.update(n)
        assert w.highest == ref.highest
        base = max(base, n)
