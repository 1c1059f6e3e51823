"""`ntm adaptor`: run an NTMobile Adaptor (NTMA) in front of a load-balanced service."""

from __future__ import annotations

import argparse
import asyncio

from ntm_io.log import setup_logging

from . import config as adaptor_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="the adaptor's TOML file (see lab/config/ntma1.toml)"
    )
    parser.add_argument(
        "--check", action="store_true", help="only validate the config file, then exit"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


def run(args: argparse.Namespace) -> int:
    cfg = adaptor_config.load(args.config)
    if args.check:
        gateway = f" as gateway {cfg.gateway} (weight {cfg.weight})" if cfg.gateway else ""
        print(
            f"{args.config}: OK, {cfg.node.fqdn}{gateway} -> {cfg.lb_address} "
            f"({', '.join(map(str, cfg.forward))})"
        )
        return 0
    setup_logging(args.log_level, f"adaptor:{cfg.name}")
    from .daemon import run as serve

    asyncio.run(serve(cfg))
    return 0
