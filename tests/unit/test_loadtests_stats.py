"""loadtests.stats: chi-square tail, exact multinomial test, choice of method."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadtests.stats import (
    EXACT_LIMIT,
    chi2_sf,
    chi2_statistic,
    goodness_of_fit,
    multinomial_exact_p,
    outcomes,
)


@pytest.mark.parametrize(
    ("x", "dof", "p"),
    [
        (3.841459, 1, 0.05),  # the textbook 5 % critical values
        (5.991465, 2, 0.05),
        (7.814728, 3, 0.05),
        (9.487729, 4, 0.05),
        (11.070498, 5, 0.05),
        (13.815511, 2, 0.001),
        (16.266236, 3, 0.001),
        (0.0, 3, 1.0),
    ],
)
def test_chi2_sf_matches_tables(x: float, dof: int, p: float) -> None:
    assert chi2_sf(x, dof) == pytest.approx(p, rel=1e-5)


@given(st.floats(min_value=0.01, max_value=80), st.integers(min_value=1, max_value=12))
def test_chi2_sf_is_a_tail_probability(x: float, dof: int) -> None:
    p = chi2_sf(x, dof)
    assert 0.0 <= p <= 1.0
    assert chi2_sf(x + 1.0, dof) <= p  # decreasing in x
    assert chi2_sf(x, dof + 1) >= p  # more freedom, heavier tail


def test_exact_test_two_servers_is_the_binomial_two_sided_test() -> None:
    # 10 clients, 9 on one of two equal servers: P = 2 * (C(10,9)+C(10,10)) / 2^10
    assert multinomial_exact_p([9, 1], [0.5, 0.5]) == pytest.approx(22 / 1024)
    assert multinomial_exact_p([5, 5], [0.5, 0.5]) == pytest.approx(1.0)


def test_exact_p_sums_to_one_over_the_most_extreme_outcome() -> None:
    # the least likely outcome has p-value = its own probability
    assert multinomial_exact_p([6, 0, 0], [1 / 3] * 3) == pytest.approx(3 * (1 / 3) ** 6)


def test_goodness_of_fit_picks_exact_for_small_and_chi_square_for_large() -> None:
    p, method = goodness_of_fit([67, 67, 66], [1 / 3] * 3)
    assert method == "exact multinomial" and p > 0.9
    big = [3400, 3300, 3300]
    assert outcomes(sum(big), 3) > EXACT_LIMIT
    p, method = goodness_of_fit(big, [1 / 3] * 3)
    assert method == "chi-square"
    assert p == pytest.approx(chi2_sf(chi2_statistic(big, [1 / 3] * 3), 2))


def test_goodness_of_fit_rejects_a_skew_and_a_dead_server() -> None:
    p, _ = goodness_of_fit([100, 100, 0], [1 / 3] * 3)  # one server never used
    assert p < 1e-10
    p, _ = goodness_of_fit([120, 40, 40], [1 / 3] * 3)
    assert p < 0.001


def test_goodness_of_fit_honours_weights() -> None:
    # weights 2:1:1 -> shares 1/2, 1/4, 1/4
    assert goodness_of_fit([100, 50, 50], [0.5, 0.25, 0.25])[0] > 0.5
    assert goodness_of_fit([67, 67, 66], [0.5, 0.25, 0.25])[0] < 0.001


def test_trivial_cases_and_bad_shares() -> None:
    assert goodness_of_fit([5], [1.0]) == (1.0, "trivial")
    assert goodness_of_fit([0, 0], [0.5, 0.5]) == (1.0, "trivial")
    with pytest.raises(ValueError):
        goodness_of_fit([1, 2], [0.5, 0.6])
    with pytest.raises(ValueError):
        goodness_of_fit([1, 2], [1.0])
    with pytest.raises(ValueError):
        chi2_sf(1.0, 0)
    assert math.isclose(sum([0.5, 0.25, 0.25]), 1.0)
