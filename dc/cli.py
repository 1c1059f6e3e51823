"""`ntm dc`: run a Direction Coordinator."""

from __future__ import annotations

import argparse
import asyncio

from ntm_io.log import setup_logging

from . import config as dc_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="the DC's TOML file (see lab/config/dc1.toml)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


def run(args: argparse.Namespace) -> int:
    cfg = dc_config.load(args.config)
    setup_logging(args.log_level, f"dc:{cfg.name}")
    from .server import run as serve

    asyncio.run(serve(cfg))
    return 0
