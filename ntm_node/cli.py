"""`ntm node`: run an NTM node."""

from __future__ import annotations

import argparse
import asyncio

from ntm_io.log import setup_logging

from . import config as node_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="the node's TOML file (see lab/config/mn1.toml)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


def run(args: argparse.Namespace) -> int:
    cfg = node_config.load(args.config)
    setup_logging(args.log_level, f"node:{cfg.name}")
    from .daemon import run as serve

    asyncio.run(serve(cfg))
    return 0
