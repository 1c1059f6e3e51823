"""`ntm swarm`: run many NTM node identities in one process (load tests)."""

from __future__ import annotations

import argparse
import asyncio

from ntm_io.log import setup_logging

from . import swarm_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="the swarm's TOML file (see lab/config/swarm.toml)"
    )
    parser.add_argument(
        "--count", type=int, metavar="N", help="how many identities (overrides [swarm] count)"
    )
    parser.add_argument(
        "--first",
        type=int,
        metavar="I",
        help="number of the first identity (overrides [swarm] first; several swarm hosts "
        "use disjoint ranges)",
    )
    parser.add_argument(
        "--identities",
        metavar="FILE",
        help="where to write the identities (fqdn, vIP, TUN) once registered "
        "(overrides [swarm] identities_file)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


def run(args: argparse.Namespace) -> int:
    cfg = swarm_config.load(
        args.config, count=args.count, first=args.first, identities_file=args.identities
    )
    setup_logging(args.log_level, f"swarm:{cfg.name}")
    from .swarm import run as serve

    asyncio.run(serve(cfg))
    return 0
