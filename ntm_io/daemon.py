"""Run a daemon until SIGTERM or SIGINT, then close it (also after a failed start)."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Protocol

log = logging.getLogger("ntm.daemon")


class Service(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...


async def serve_until_signalled(service: Service) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
        await stop.wait()
    finally:
        try:
            await service.close()
        except Exception:  # shutting down anyway: say so, never mask the original error
            log.exception("error while closing")
