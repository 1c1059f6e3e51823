"""Sliding anti-replay window over 64-bit packet counters (RFC 6479).

The window remembers the highest counter accepted (`highest`) and, for the `WINDOW_SIZE`
counters at and below it, which ones were seen. A counter is acceptable when it is above
`highest`, or less than `WINDOW_SIZE` below it and not yet seen. Anything at or below
`highest - WINDOW_SIZE` is too old to judge and is refused.

Layout (RFC 6479): a ring of 64-bit words; counter c lives in word (c >> 6) mod 33, bit
c & 63. Advancing clears only the words skipped, so an in-order packet costs a few
small-int operations and never shifts the whole bitmap. 33 words (2112 bits) hold every
counter of a 2048-wide window without two live counters sharing a bit; the age check
keeps the window exactly 2048 packets.

Protocol rule: `check` before decrypting, `update` only after the AEAD tag verified,
otherwise a forged packet with a huge counter would slide the window and block real ones.
"""

from __future__ import annotations

WINDOW_SIZE = 2048
_WORD_BITS = 64
_WORDS = WINDOW_SIZE // _WORD_BITS + 1  # one spare word: the top word is partly filled


class ReplayWindow:
    __slots__ = ("_words", "highest")

    def __init__(self) -> None:
        # The highest counter accepted so far, -1 before the first (counter 0 is valid).
        # A plain attribute, read on the fast path; only update() writes it.
        self.highest = -1
        self._words = [0] * _WORDS

    def check(self, counter: int) -> bool:
        """Would `counter` be accepted? Does not change the window."""
        if counter > self.highest:
            return True
        if self.highest - counter >= WINDOW_SIZE or counter < 0:
            return False
        return not (self._words[(counter >> 6) % _WORDS] >> (counter & 63)) & 1

    def update(self, counter: int) -> None:
        """Record `counter` as seen. Call only after `check` and AEAD authentication."""
        block = counter >> 6
        highest = self.highest
        if counter > highest:
            top = highest >> 6  # -1 >> 6 == -1: before the first packet
            if block != top:  # entering new words: forget what they held
                if block - top >= _WORDS:
                    self._words = [0] * _WORDS
                else:
                    words = self._words
                    for b in range(top + 1, block + 1):
                        words[b % _WORDS] = 0
            self.highest = counter
        elif highest - counter >= WINDOW_SIZE:
            return  # too old to record (check() refused it already)
        self._words[block % _WORDS] |= 1 << (counter & 63)

    def accept(self, counter: int) -> bool:
        """`check` and `update` in one step (for callers that already authenticated)."""
        if not self.check(counter):
            return False
        self.update(counter)
        return True

    def reset(self) -> None:
        self.highest = -1
        self._words = [0] * _WORDS

    def __repr__(self) -> str:
        return f"ReplayWindow(highest={self.highest})"
