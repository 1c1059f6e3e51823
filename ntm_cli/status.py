"""`ntm status [--socket PATH | --all]`: print running daemons' status as JSON.

Exit status 0 when every asked daemon answered, 1 otherwise, so it doubles as a
health check (`ntm status --socket /run/ntm/node-mn1.sock >/dev/null`).

`--forget-paths FQDN` (root) asks a node to drop its tunnels to one peer instead, through
the admin socket beside the status socket; the next lookup of that peer builds a new one.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any

from ntm_io import status as st


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--socket",
        metavar="PATH",
        help="the daemon's status socket (default daemons use /run/ntm/<role>-<name>.sock)",
    )
    which.add_argument(
        "--all",
        action="store_true",
        help=f"every socket in {st.RUN_DIR}/ and $NTM_LAB_STATE/run/ (the default)",
    )
    parser.add_argument(
        "--timeout", type=float, default=2.0, metavar="S", help="seconds to wait (default 2)"
    )
    parser.add_argument(
        "--forget-paths",
        metavar="FQDN",
        help="admin (root, with --socket): make the node drop its paths to this peer, so the "
        "next lookup builds a new tunnel",
    )


def discover_sockets() -> list[str]:
    """Status sockets of this host and, when NTM_LAB_STATE is set, of the lab."""
    found = glob.glob(os.path.join(st.RUN_DIR, "*.sock"))
    lab = os.environ.get("NTM_LAB_STATE")
    if lab:
        found += glob.glob(os.path.join(lab, "run", "*.sock"))
    return sorted(set(found))


def _print(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True, default=str))


def run(args: argparse.Namespace) -> int:
    if args.forget_paths is not None:
        return _forget_paths(args)
    if args.socket:
        try:
            _print(st.read_status(args.socket, timeout=args.timeout))
        except st.StatusError as exc:
            print(f"ntm status: {exc}", file=sys.stderr)
            return 1
        return 0

    paths = discover_sockets()
    if not paths:
        where = st.RUN_DIR + (
            "" if not os.environ.get("NTM_LAB_STATE") else " or $NTM_LAB_STATE/run"
        )
        print(
            f"ntm status: no daemon status sockets in {where}: is any daemon running?",
            file=sys.stderr,
        )
        return 1
    out: dict[str, Any] = {}
    failed = 0
    for path in paths:
        try:
            out[path] = st.read_status(path, timeout=args.timeout)
        except st.StatusError as exc:
            out[path] = {"error": str(exc)}
            failed += 1
    _print(out)
    if failed:
        print(f"ntm status: {failed} of {len(paths)} daemon(s) did not answer", file=sys.stderr)
    return 1 if failed else 0


def _forget_paths(args: argparse.Namespace) -> int:
    if not args.socket:
        print(
            "ntm status: --forget-paths needs --socket PATH (the node's status socket)",
            file=sys.stderr,
        )
        return 1
    admin = st.admin_socket_path(args.socket)
    try:
        reply = st.request_admin(
            admin, "forget-paths", timeout=args.timeout, fqdn=args.forget_paths
        )
    except st.AdminError as exc:
        print(f"ntm status: --forget-paths: {exc}", file=sys.stderr)
        return 1
    _print(reply)
    return 0
