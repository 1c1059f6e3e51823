"""Slot tables for schedulers that nftables expresses as `<number> mod N vmap { … }` (pure).

Each function returns a list whose i-th entry is the index (into the `reals` argument) of
the real server that slot i sends new clients to. Weight 0 servers get no slot (no new
clients); all of them at weight 0 gives an empty table.

- rr: one slot per available server (`numgen inc mod N`), weights ignored as in IPVS rr.
- wrr: the IPVS wrr sequence (interleaved, gcd-reduced), walked by `numgen inc`.
- sh: IPVS sh's 256-bucket table filled round-robin, each server `weight` buckets a round.
- mh: Maglev (the algorithm behind IPVS mh) over a prime table of M slots, M >= 100 x N.

For sh and mh the table is first built over every configured server (weight 0 counted as
1) and only the slots of unavailable servers are then refilled from a table built over the
available ones: taking a server to weight 0 moves only its own clients (IPVS sh/mh with the
"fallback" flag behave alike). Removing a server changes N: sh then reshuffles (as IPVS sh
does), mh moves its clients plus a small share (< 2 % at M = 4093) of others, as Maglev does.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

from .model import RealServer

SH_TABLE = 256  # IPVS: CONFIG_IP_VS_SH_TAB_BITS = 8
MH_TABLES = (4093, 65521)  # primes; IPVS mh's default table is 4093 slots

_Builder = Callable[[list[int]], list[int]]


def mh_size(n: int) -> int:
    return next((m for m in MH_TABLES if m >= 100 * n), MH_TABLES[-1])


def available(reals: tuple[RealServer, ...]) -> list[int]:
    return [i for i, r in enumerate(reals) if r.weight > 0]


def rr(reals: tuple[RealServer, ...]) -> list[int]:
    return available(reals)


def wrr(reals: tuple[RealServer, ...]) -> list[int]:
    """IPVS ip_vs_wrr: current weight cw steps down by gcd from max weight each round."""
    idx = available(reals)
    if not idx:
        return []
    weights = [reals[i].weight for i in idx]
    g = 0
    for w in weights:
        g = math.gcd(g, w)
    mw = max(weights)
    length = sum(w // g for w in weights)
    out: list[int] = []
    cw = mw
    while len(out) < length:
        for i, w in zip(idx, weights, strict=True):
            if w >= cw:
                out.append(i)
        cw -= g
        if cw <= 0:
            cw = mw
    return out[:length]


def _sh_fill(reals: tuple[RealServer, ...], members: list[int]) -> list[int]:
    table: list[int] = []
    while len(table) < SH_TABLE:
        for i in members:
            table.extend([i] * max(reals[i].weight, 1))
    return table[:SH_TABLE]


def sh(reals: tuple[RealServer, ...]) -> list[int]:
    return _with_fallback(reals, lambda members: _sh_fill(reals, members))


def _h(data: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}|{data}".encode()).digest()[:8], "big")


def _maglev(reals: tuple[RealServer, ...], members: list[int], m: int) -> list[int]:
    """Maglev population; a weight-w server takes w turns per round (as IPVS mh does)."""
    names = {i: f"{reals[i].address}/{reals[i].port}" for i in members}
    offset = {i: _h(names[i], "offset") % m for i in members}
    skip = {i: _h(names[i], "skip") % (m - 1) + 1 for i in members}
    nxt = dict.fromkeys(members, 0)
    table = [-1] * m
    filled = 0
    gw = 0
    for i in members:
        gw = math.gcd(gw, max(reals[i].weight, 1))
    turns = {i: max(reals[i].weight, 1) // gw for i in members}
    while filled < m:
        for i in members:
            for _ in range(turns[i]):
                while True:
                    c = (offset[i] + nxt[i] * skip[i]) % m
                    nxt[i] += 1
                    if table[c] < 0:
                        break
                table[c] = i
                filled += 1
                if filled == m:
                    return table
    return table


def mh(reals: tuple[RealServer, ...]) -> list[int]:
    m = mh_size(len(reals))
    return _with_fallback(reals, lambda members: _maglev(reals, members, m))


def _with_fallback(reals: tuple[RealServer, ...], build: _Builder) -> list[int]:
    if not available(reals):
        return []
    everyone = build(list(range(len(reals))))
    avail = available(reals)
    if len(avail) == len(reals):
        return everyone
    spare = build(avail)
    return [i if reals[i].weight > 0 else spare[n] for n, i in enumerate(everyone)]
