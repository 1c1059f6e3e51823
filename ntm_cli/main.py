"""The `ntm` console script: one subcommand per role."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ntm_io.config import ConfigError

# subcommand -> (module with add_arguments/run, help line)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "node": ("ntm_node.cli", "run an NTM node (mobile or correspondent endpoint)"),
    "swarm": ("ntm_node.swarm_cli", "run many NTM node identities in one process (load tests)"),
    "dc": ("dc.cli", "run a Direction Coordinator"),
    "relay": ("relay.cli", "run a Relay Server"),
    "pki": ("ntm_pki.cli", "create a lab CA and issue certificates"),
    "dns": ("ntm_node.dns_cli", "diagnose how a name resolves for NTMobile"),
    "lab": ("lab.cli", "bring the lab up and down, run commands in it"),
    "adaptor": ("adaptor.cli", "run an NTMobile Adaptor in front of a service"),
    "lb": ("lb_integration.cli", "run the load balancer host agent (IPVS or nftables)"),
    "bench": ("bench.cli", "run the benchmarks (tunnel, setup, DC capacity)"),
    "loadtest": ("loadtests.cli", "Locust load test with handovers: verdict, reports, plots"),
    "status": ("ntm_cli.status", "show a running daemon's status as JSON"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ntm", description="NTMobile suite")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only == name:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_module=module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the chosen role's module: start-up stays fast and one role's
    # missing optional dependency never breaks another.
    only = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except ConfigError as exc:
        print(f"ntm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
