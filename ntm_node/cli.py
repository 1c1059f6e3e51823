"""`ntm node`: run an NTM node, or (`--prefer`) tell a running one which uplink to use."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from ntm_io.config import ConfigError
from ntm_io.log import setup_logging
from ntm_io.status import AdminError, admin_socket_path, request_admin

from . import config as node_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the node's TOML file (see lab/config/mn1.toml)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--prefer",
        metavar="UPLINK",
        help="a running node with make_before_break: put this uplink (interface name or "
        "tunnel address) first; traffic moves once it has answered (needs --socket)",
    )
    parser.add_argument(
        "--socket", help="with --prefer: the running node's status socket ([node] status_socket)"
    )


def run(args: argparse.Namespace) -> int:
    if args.prefer is not None:
        return _prefer(args)
    if not args.config:
        raise ConfigError("ntm node needs --config FILE (see lab/config/mn1.toml)")
    cfg = node_config.load(args.config)
    setup_logging(args.log_level, f"node:{cfg.name}")
    from .daemon import run as serve

    asyncio.run(serve(cfg))
    return 0


def _prefer(args: argparse.Namespace) -> int:
    if not args.socket:
        raise ConfigError("ntm node --prefer needs --socket PATH (the node's status socket)")
    try:
        reply = request_admin(admin_socket_path(args.socket), "prefer", uplink=args.prefer)
    except AdminError as exc:
        print(f"ntm node: --prefer: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0
