"""The one error type of the lab: a message that says what went wrong and what to do."""

from __future__ import annotations


class LabError(Exception):
    """A problem the user can act on; `ntm lab` prints it without a traceback and exits 2."""
