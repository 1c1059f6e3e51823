"""What every load-balancing backend offers the agent."""

from __future__ import annotations

from typing import Protocol

from .model import LbState


class Backend(Protocol):
    name: str  # "ipvs" or "nftables"

    def read(self) -> LbState:
        """The state the kernel holds now (services and real servers the agent manages)."""
        ...

    def apply(self, desired: LbState) -> None:
        """Make the kernel hold `desired`: idempotent, touching only what differs, never
        flushing what is already right (live connections survive a reload or restart)."""
        ...

    def close(self) -> None: ...
