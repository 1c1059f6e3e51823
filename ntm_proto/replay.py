"""Sliding anti-replay window over 64-bit packet counters (RFC 6479 in spirit).

The window remembers the highest counter accepted (`highest`) and, for the `WINDOW_SIZE`
counters at and below it, which ones were seen. A counter is acceptable when it is above
`highest`, or inside the window and not yet seen. Anything at or below
`highest - WINDOW_SIZE` is too old to judge and is refused.

The bitmap is one Python int: bit i stands for counter `highest - i`. Moving forward is a
single shift-or-mask on a 2048-bit int, which CPython does in well under a microsecond and
which, unlike RFC 6479's ring of words, keeps the whole window exact (no 64-bit slack).

Protocol rule: `check` before decrypting, `update` only after the AEAD tag verified,
otherwise a forged packet with a huge counter would slide the window and block real ones.
"""

from __future__ import annotations

WINDOW_SIZE = 2048
_MASK = (1 << WINDOW_SIZE) - 1


class ReplayWindow:
    __slots__ = ("_bits", "_highest")

    def __init__(self) -> None:
        self._highest = -1  # nothing seen yet; counter 0 is a valid first packet
        self._bits = 0

    @property
    def highest(self) -> int:
        """The highest counter accepted so far, -1 before the first."""
        return self._highest

    def check(self, counter: int) -> bool:
        """Would `counter` be accepted? Does not change the window."""
        diff = self._highest - counter
        if diff < 0:
            return True  # above everything seen (and so >= 0)
        if diff >= WINDOW_SIZE or counter < 0:
            return False
        return not (self._bits >> diff) & 1

    def update(self, counter: int) -> None:
        """Record `counter` as seen. Call only after `check` and AEAD authentication."""
        diff = counter - self._highest
        if diff > 0:
            if diff >= WINDOW_SIZE:
                self._bits = 1
            else:
                self._bits = ((self._bits << diff) | 1) & _MASK
            self._highest = counter
        elif -diff < WINDOW_SIZE:
            self._bits |= 1 << -diff

    def accept(self, counter: int) -> bool:
        """`check` and `update` in one step (for callers that already authenticated)."""
        if not self.check(counter):
            return False
        self.update(counter)
        return True

    def reset(self) -> None:
        self._highest = -1
        self._bits = 0

    def __repr__(self) -> str:
        return f"ReplayWindow(highest={self._highest})"
