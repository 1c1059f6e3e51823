"""`ntm lb`: run the load balancer host agent (IPVS or nftables)."""

from __future__ import annotations

import argparse
import asyncio

from ntm_io.log import setup_logging

from . import config as lb_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="the agent's TOML file (see lb_integration/example.toml)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only validate the config file (and which backend would run), then exit",
    )
    parser.add_argument(
        "--flush-on-exit",
        action="store_true",
        help="remove the virtual services and return routes on exit (default: leave them, "
        "so a restart does not drop connections)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


def run(args: argparse.Namespace) -> int:
    cfg = lb_config.load(args.config)
    setup_logging(args.log_level, f"lb:{cfg.name}")
    from .agent import check_fits, choose_backend
    from .agent import run as serve

    if args.check:
        backend, why = choose_backend(cfg)
        check_fits(cfg, backend)
        print(f"{args.config}: OK, {len(cfg.services)} service(s); {why}")
        return 0
    asyncio.run(serve(cfg, flush_on_exit=args.flush_on_exit))
    return 0
