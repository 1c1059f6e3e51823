"""Parsing of the bench's comma-separated choice options (`--only`, `--failover-events`)."""

from __future__ import annotations

from collections.abc import Sequence

from ntm_io.config import ConfigError


def pick(option: str, text: str, allowed: Sequence[str], noun: str) -> tuple[str, ...]:
    """The names in `text` that are in `allowed`, in `allowed`'s order (the run order);
    a clear error for an unknown name or an empty list."""
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in allowed]
    if unknown or not chosen:
        raise ConfigError(
            f"{option} {text!r}: unknown {noun}(s) {', '.join(unknown) or '(none given)'}; "
            f"pick from {','.join(allowed)}"
        )
    return tuple(s for s in allowed if s in chosen)
