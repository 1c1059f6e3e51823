"""`ntm loadtest demo` (what `make demo` runs): bring the lab up with a swarm of mobile
identities, run the default scenario under Locust, print the verdict and where the reports
are, tear the lab down.

The scenario (offsets are fractions of --duration, after every user has started): the swarm
host mn2 moves from access-a (IPv4 behind NAT) to access-b (IPv6-only); ntma1 is killed, so
its MNs fail over to ntma2; ntma1 comes back (MNs fail back after their hold-down); one of
ntma2's uplinks is cut and restored; mn2 moves back. Persistence must hold through all of it
because the LB only ever sees the MNs' vIPs.

`--snat-at-gateway` is the counter-proof, meant to show why the product never SNATs: both
NTMAs masquerade the vIPs behind their own dmz address (an nftables rule put into their
namespaces for the run), so the LB keys persistence and `sh` on the gateway's address, and
every gateway switch moves sessions to other backends: the verdict fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NTM = [sys.executable, "-m", "ntm_cli.main"]
GATEWAYS = ("ntma1", "ntma2")
SNAT_TABLE = "ntm_demo_snat"
# Fractions of the measured part of the run at which each event fires.
SCENARIO = (
    (0.10, "move:mn2:access-b"),
    (0.25, "kill:ntma1"),
    (0.40, "start:ntma1"),
    (0.55, "link:ntma2:isp1:down"),
    (0.70, "link:ntma2:isp1:up"),
    (0.85, "move:mn2:access-a"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", "-u", type=int, default=200, help="swarm identities = users")
    p.add_argument("--spawn-rate", "-r", type=float, default=10.0, help="users started per s")
    p.add_argument("--duration", "-t", type=float, default=180.0, help="seconds of load")
    p.add_argument("--out", type=Path, help="default results/demo-<time>/")
    p.add_argument("--lab", default="ntmdemo", help="lab name (default ntmdemo)")
    p.add_argument(
        "--snat-at-gateway",
        action="store_true",
        help="masquerade the vIPs at both NTMAs (shows why the product never does): fails",
    )
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")


def schedule(duration: float, ramp: float) -> list[str]:
    """The scenario's --event arguments: events start once every user is running."""
    span = max(duration - ramp, 1.0)
    return [f"{ramp + f * span:.0f}:{action}" for f, action in SCENARIO]


def snat_rules(vip_network: str = "100.64.0.0/10") -> str:
    return (
        f"table ip {SNAT_TABLE} {{\n"
        "  chain post {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "dmz" ip saddr {vip_network} masquerade\n'
        "  }\n"
        "}\n"
    )


def _lab(
    verb: str,
    lab: str,
    state: Path,
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> int:
    argv = [*NTM, "lab", verb, "--name", lab, "--state", str(state), *args]
    return subprocess.run(argv, check=False, env=env, input=stdin, text=True).returncode


def run(args: argparse.Namespace) -> int:
    if args.users < 1 or args.spawn_rate <= 0 or args.duration <= 0:
        print("ntm: error: --users, --spawn-rate and --duration must be positive")
        return 2
    out: Path = (args.out or Path("results") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    state = Path(tempfile.mkdtemp(prefix="ntm-demo-")) / "state"
    ramp = args.users / args.spawn_rate + 5.0
    duration = args.duration + ramp
    env = {**os.environ, "NTM_SWARM_COUNT": str(args.users)}
    print(f"== lab {args.lab} up with {args.users} swarm identities on mn2 (state {state})")
    started = time.monotonic()
    if _lab("up", args.lab, state, env=env) != 0:
        _lab("down", args.lab, state)
        print("ntm: error: the lab did not come up; see the messages above")
        return 1
    print(f"== lab up in {time.monotonic() - started:.0f} s")
    try:
        if args.snat_at_gateway:
            print("== SNAT at both gateways (counter-proof): the verdict should FAIL")
            for gw in GATEWAYS:
                rc = _lab("exec", args.lab, state, gw, "--", "nft", "-f", "-", stdin=snat_rules())
                if rc != 0:
                    print(f"ntm: error: could not install the SNAT rule in {gw}")
                    return 1
        events = schedule(duration, ramp)
        argv = [*NTM, "loadtest", "run", "--lab", args.lab, "--state", str(state)]
        argv += ["--service", "mn2", "--users", str(args.users)]
        argv += ["--spawn-rate", str(args.spawn_rate), "--duration", f"{duration:.0f}"]
        argv += ["--out", str(out)]
        for ev in events:
            argv += ["--event", ev]
        print("== load:", " ".join(argv[len(NTM) :]))
        rc = subprocess.run(argv, check=False).returncode
        print(f"== reports: {out} (summary.json, *.png, Locust's report.html and CSV)")
        return rc
    finally:
        if args.keep:
            print(f"== lab left up: ntm lab down --name {args.lab} --state {state}")
        else:
            _lab("down", args.lab, state)
