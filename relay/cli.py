"""`ntm relay`: run a Relay Server."""

from __future__ import annotations

import argparse
import asyncio

from ntm_io.log import setup_logging

from . import config as relay_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="the relay's TOML file (see relay/example.toml)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


def run(args: argparse.Namespace) -> int:
    cfg = relay_config.load(args.config)
    setup_logging(args.log_level, f"relay:{cfg.name}")
    from .server import run as serve

    asyncio.run(serve(cfg))
    return 0
