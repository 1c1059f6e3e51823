"""Goodness of fit for hash schedulers: is a client spread plausible under the expected shares?

Source hashing (sh) and Maglev (mh) put each client on a server by hashing its address, so
with N clients the counts per server follow (to a very good approximation, for addresses the
hash treats as unrelated) a multinomial distribution with the servers' shares p_i (weight /
total weight). The test's p-value is the probability, under that distribution, of a spread at
least as unlikely as the one observed:

- exact multinomial test (sum of the probabilities of every outcome no more likely than the
  observed one) when the outcome space is small enough to enumerate (EXACT_LIMIT outcomes);
- otherwise Pearson's chi-square statistic with k-1 degrees of freedom, whose approximation
  is good exactly when N is large (which is when enumeration is too costly).

The check fails when p < alpha; the default alpha = 0.001 means a correct balancer fails the
check once in a thousand runs, while a real skew (a dead server, a wrong weight, every client
on one server) is caught as soon as there are a few dozen clients.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

EXACT_LIMIT = 250_000


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X chi-square with an integer number of degrees of freedom (closed form)."""
    if dof < 1:
        raise ValueError("degrees of freedom must be >= 1")
    if x <= 0:
        return 1.0
    half = x / 2.0
    if dof % 2 == 0:
        term, total = 1.0, 1.0
        for i in range(1, dof // 2):
            term *= half / i
            total += term
        return min(1.0, math.exp(-half) * total)
    # odd: erfc(sqrt(x/2)) + e^(-x/2) * sum_{i=0}^{m-1} (x/2)^(i+1/2) / Gamma(i+3/2)
    total = math.erfc(math.sqrt(half))
    term = math.sqrt(half) / math.gamma(1.5)
    acc = 0.0
    for i in range((dof - 1) // 2):
        if i:
            term *= half / (i + 0.5)
        acc += term
    return min(1.0, total + math.exp(-half) * acc)


def chi2_statistic(observed: Sequence[int], shares: Sequence[float]) -> float:
    n = sum(observed)
    return sum((o - n * p) ** 2 / (n * p) for o, p in zip(observed, shares, strict=True))


def outcomes(n: int, k: int) -> int:
    """How many ways n clients can fall on k servers (compositions of n into k parts)."""
    return math.comb(n + k - 1, k - 1)


def _compositions(n: int, k: int) -> Iterator[tuple[int, ...]]:
    if k == 1:
        yield (n,)
        return
    for first in range(n + 1):
        for rest in _compositions(n - first, k - 1):
            yield (first, *rest)


def _log_pmf(counts: Sequence[int], log_shares: Sequence[float], log_n_fact: float) -> float:
    total = log_n_fact
    for c, lp in zip(counts, log_shares, strict=True):
        total += c * lp - math.lgamma(c + 1)
    return total


def multinomial_exact_p(observed: Sequence[int], shares: Sequence[float]) -> float:
    n, k = sum(observed), len(observed)
    log_shares = [math.log(p) for p in shares]
    log_n_fact = math.lgamma(n + 1)
    cutoff = _log_pmf(observed, log_shares, log_n_fact) + 1e-9  # ties count as extreme
    p = 0.0
    for counts in _compositions(n, k):
        lp = _log_pmf(counts, log_shares, log_n_fact)
        if lp <= cutoff:
            p += math.exp(lp)
    return min(1.0, p)


def goodness_of_fit(observed: Sequence[int], shares: Sequence[float]) -> tuple[float, str]:
    """(p-value, method) for counts against expected shares (which must be > 0, sum to 1)."""
    if len(observed) != len(shares) or not observed:
        raise ValueError("one count per share, at least one")
    if any(p <= 0 for p in shares) or not math.isclose(sum(shares), 1.0, rel_tol=1e-9):
        raise ValueError("shares must be positive and sum to 1")
    n, k = sum(observed), len(observed)
    if k == 1 or n == 0:
        return 1.0, "trivial"
    if outcomes(n, k) <= EXACT_LIMIT:
        return multinomial_exact_p(observed, shares), "exact multinomial"
    return chi2_sf(chi2_statistic(observed, shares), k - 1), "chi-square"
