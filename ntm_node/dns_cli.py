"""``ntm dns``: DNS diagnostics for NTMobile (``ntm dns check NAME``); logic in dns_check."""

from __future__ import annotations

import argparse
import asyncio
import json

from ntm_io.config import ConfigError
from ntm_node.dns_check import check_name, default_resolver, format_text, parse_address
from ntm_proto.marker import MarkerError, MarkerRule

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dns_command", metavar="ACTION", required=True)
    check = sub.add_parser(
        "check",
        help="show how NAME resolves and whether NTMobile would intercept it",
        description="Query the resolver for NAME A, follow its CNAME chain, and when it reaches "
        "an NTMobile-marked name check the zone's delegation and ask the DC directly. Exits 0 "
        "when everything is consistent, 1 with one line per problem otherwise.",
    )
    check.add_argument("name", metavar="NAME", help="the name an application would look up")
    check.add_argument(
        "--resolver",
        metavar="ADDR",
        help="resolver IP[:PORT] (default: first nameserver in /etc/resolv.conf)",
    )
    check.add_argument(
        "--mark", default="ntm", help="the label that marks NTMobile names (default: ntm)"
    )
    check.add_argument(
        "--dc-port", type=int, default=53, metavar="PORT", help="port of the DCs' DNS (default: 53)"
    )
    check.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="per-query timeout (default: 2)",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        marker = MarkerRule(args.mark)
    except MarkerError as exc:
        raise ConfigError(f"--mark {args.mark!r}: {exc}; use one label such as ntm") from None
    resolver = parse_address(args.resolver) if args.resolver else default_resolver()
    if not 0 < args.dc_port < 65536:
        raise ConfigError(f"--dc-port {args.dc_port}: the port must be 1..65535")
    if args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout}: must be a positive number of seconds")
    try:
        report = asyncio.run(
            check_name(args.name, resolver, marker, dc_port=args.dc_port, timeout=args.timeout)
        )
    except MarkerError as exc:
        raise ConfigError(
            f"{args.name!r} is not a DNS name ({exc}); pass a name like www.example.com"
        ) from None
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_text(report))
    return 0 if report.ok else 1
