"""FQDN marker rules: which DNS names are NTMobile names.

A name is *marked* when one of its labels, other than the first, equals the mark
(default ``ntm``), compared case-insensitively::

    cn2.ntm.example.com    marked, zone ntm.example.com, node label cn2
    a.b.ntm.example.com    marked, zone ntm.example.com
    ntm.example.com        NOT marked: it is the zone apex (SOA/NS live there), not a node
    www.example.com        NOT marked
    xntm.example.com       NOT marked: the whole label must equal the mark

When the mark occurs more than once after the first label, the leftmost one decides
(``x.ntm.ntm.example.com`` is in zone ``ntm.ntm.example.com``): the most specific zone wins,
as DNS delegation would.

Names are normalised before any test: lowercase, one trailing dot stripped, total length at most
253 characters, each label 1..63 characters of letters, digits, ``-`` and ``_``. Anything else
raises :class:`MarkerError` (a ``ValueError``), so a caller handling names from the wire can treat
the error as "not an NTMobile name".

Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MAX_LABEL", "MAX_NAME", "MarkerError", "MarkerRule", "normalize_fqdn"]

MAX_NAME = 253  # presentation length without the trailing dot (255 octets on the wire)
MAX_LABEL = 63

_LABEL_RE = re.compile(r"[a-z0-9_-]{1,63}")


class MarkerError(ValueError):
    """A name or mark is not a valid DNS name; the message says which part and why."""


def normalize_fqdn(name: str) -> str:
    """Lowercase, strip one trailing dot, validate; raise MarkerError when invalid."""
    if not isinstance(name, str):
        raise MarkerError(f"{name!r} is not a string")
    n = name.lower()
    if n.endswith("."):
        n = n[:-1]
    if not n:
        raise MarkerError("empty name (the root is not a usable name here)")
    if len(n) > MAX_NAME:
        raise MarkerError(f"name is {len(n)} characters long; DNS allows at most {MAX_NAME}")
    for label in n.split("."):
        if not label:
            raise MarkerError(f"{name!r} has an empty label (two dots in a row or a leading dot)")
        if len(label) > MAX_LABEL:
            raise MarkerError(
                f"label {label[:20]!r}... of {name!r} is {len(label)} characters; "
                f"at most {MAX_LABEL}"
            )
        if not _LABEL_RE.fullmatch(label):
            raise MarkerError(
                f"label {label!r} of {name!r} may contain only letters, digits, '-' and '_'"
            )
    return n


@dataclass(frozen=True, slots=True)
class MarkerRule:
    """The mark that makes a name an NTMobile name: a label equal to ``label``."""

    label: str = "ntm"

    def __post_init__(self) -> None:
        try:
            norm = normalize_fqdn(self.label)
        except MarkerError as exc:
            raise MarkerError(f"mark {self.label!r} is not a DNS label: {exc}") from None
        if "." in norm:
            raise MarkerError(f"mark {self.label!r} must be one label (like 'ntm'), not a name")
        # frozen dataclass: store the normalised form so comparisons are cheap.
        object.__setattr__(self, "label", norm)

    def _mark_index(self, labels: list[str]) -> int | None:
        # Index 0 is skipped: a name starting with the mark is a zone apex, not a node name.
        for i in range(1, len(labels)):
            if labels[i] == self.label:
                return i
        return None

    def is_marked(self, fqdn: str) -> bool:
        """True when a label after the first equals the mark. Raises MarkerError if invalid."""
        return self._mark_index(normalize_fqdn(fqdn).split(".")) is not None

    def zone_of(self, fqdn: str) -> str | None:
        """The marked zone (from the mark label on), e.g. ``ntm.example.com``; None if unmarked."""
        labels = normalize_fqdn(fqdn).split(".")
        i = self._mark_index(labels)
        return None if i is None else ".".join(labels[i:])

    def is_zone_apex(self, fqdn: str) -> bool:
        """True for a name whose first label is the mark (``ntm.example.com``)."""
        labels = normalize_fqdn(fqdn).split(".")
        return len(labels) > 1 and labels[0] == self.label
