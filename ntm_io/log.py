"""One logging setup for every daemon: one line per event, to stderr.

    12:03:04.567 node-mn1 INFO ntm_node.tunnel: path to 198.51.100.30 up

Every daemon takes `--log-level {debug,info,warning,error}` (see `add_log_level_argument`)
and calls `setup_logging(args.log_level, name)` first thing in `run()`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TextIO

from ntm_io.config import ConfigError

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
CHOICES = ("debug", "info", "warning", "error")

# Libraries that are chatty at INFO/DEBUG; they only get our level when it is debug.
_NOISY = ("pyroute2", "aioquic", "quic", "asyncio")


def parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return LEVELS[level.strip().lower()]
    except KeyError:
        raise ConfigError(
            f"log level {level!r} is unknown; use one of {', '.join(CHOICES)}"
        ) from None


def add_log_level_argument(parser: argparse.ArgumentParser, default: str = "info") -> None:
    parser.add_argument(
        "--log-level",
        default=default,
        type=str.lower,
        choices=CHOICES,
        help=f"how much to log (default: {default})",
    )


def setup_logging(
    level: str | int = "info", name: str = "ntm", stream: TextIO | None = None
) -> logging.Logger:
    """Configure the root logger and return the logger called `name`.

    Idempotent: a second call replaces the handler the first one installed (handlers
    installed by others, e.g. pytest's capture, are left alone)."""
    lvl = parse_level(level)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    # The daemon name goes into the format itself: `%` in it must not be a field.
    safe = name.replace("%", "%%")
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s.%(msecs)03d {safe} %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        if getattr(old, "_ntm_handler", False):
            root.removeHandler(old)
            old.close()
    handler._ntm_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(lvl)
    for lib in _NOISY:
        logging.getLogger(lib).setLevel(lvl if lvl <= logging.DEBUG else max(lvl, logging.WARNING))
    logging.captureWarnings(True)
    return logging.getLogger(name)
