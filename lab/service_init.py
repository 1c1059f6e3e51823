"""Per-service network setup, the same in both lab modes.

A service declares its routes and NAT in environment variables, so one description works in
the netns runner (which applies it inside the service's namespace at `up`) and in Docker (where
`ntm lab service-init -- CMD` is the image's ENTRYPOINT and then execs CMD):

  NTM_LAB_ROUTES      `ip route` arguments separated by `;`, e.g.
                      "default via 10.10.1.1; -6 default via 2001:db8:b::1"
                      (leading options such as -6 go before `route`; `replace` makes it
                      idempotent, so a restarted container does not fail on existing routes;
                      `table N` and multipath `nexthop via A weight W nexthop via B` pass through)
  NTM_LAB_RULES       `ip rule` arguments separated by `;`, e.g.
                      "from 192.0.2.10 lookup 101; -6 from 2001:db8:201::10 lookup 101"
                      (policy routing; applied after the routes, each as `del` then `add`,
                      since `ip rule` has no `replace`)
  NTM_LAB_MASQUERADE  source CIDRs (separated by spaces, commas or `;`) masqueraded by nftables
                      when leaving toward any other destination

Forwarding sysctls are compose `sysctls:` (Docker applies them; the netns runner writes them).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lab.errors import LabError

ROUTES_VAR = "NTM_LAB_ROUTES"
RULES_VAR = "NTM_LAB_RULES"
MASQUERADE_VAR = "NTM_LAB_MASQUERADE"
NFT_TABLE = "ntm_lab_nat"


@dataclass(frozen=True)
class Step:
    """One command of the setup; `stdin` is fed to it (used for `nft -f -`)."""

    argv: tuple[str, ...]
    stdin: str = ""
    check: bool = True  # False: a failure is expected and fine (deleting what may not exist)


def parse_routes(text: str, var: str = ROUTES_VAR) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Split NTM_LAB_ROUTES (or NTM_LAB_RULES) into (ip options, arguments) pairs."""
    routes = []
    for entry in text.split(";"):
        try:
            tokens = shlex.split(entry)
        except ValueError as exc:
            raise LabError(f"{var}: cannot parse {entry.strip()!r} ({exc})") from None
        if not tokens:
            continue
        options = []
        while tokens and tokens[0].startswith("-"):
            options.append(tokens.pop(0))
        if not tokens:
            if var == ROUTES_VAR:
                what, example = "route", "-6 default via 2001:db8:b::1"
            else:
                what, example = "rule", "-6 from 2001:db8:201::10 lookup 101"
            raise LabError(
                f"{var}: {entry.strip()!r} has options but no {what}; write e.g. '{example}'"
            )
        routes.append((tuple(options), tuple(tokens)))
    return routes


def parse_masquerade(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for item in re.split(r"[\s,;]+", text.strip()):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item))
        except ValueError:
            raise LabError(
                f"{MASQUERADE_VAR}: {item!r} is not a network; write it like 10.10.1.0/24 "
                "with the host bits zero"
            ) from None
    return nets


def nft_masquerade_ruleset(nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str:
    """A ruleset that replaces any earlier one of ours (declare, delete, define)."""
    rules = []
    for net in nets:
        family = "ip" if net.version == 4 else "ip6"
        rules.append(f"        {family} saddr {net} {family} daddr != {net} masquerade")
    return "\n".join(
        [
            f"table inet {NFT_TABLE}",
            f"delete table inet {NFT_TABLE}",
            f"table inet {NFT_TABLE} {{",
            "    chain postrouting {",
            "        type nat hook postrouting priority srcnat; policy accept;",
            *rules,
            "    }",
            "}",
            "",
        ]
    )


def route_steps(text: str) -> list[Step]:
    return [Step(("ip", *opts, "route", "replace", *args)) for opts, args in parse_routes(text)]


def route_batch_lines(text: str) -> list[str]:
    """NTM_LAB_ROUTES as `ip -batch` lines (`route replace ...`). A batch line takes no
    options, so -4/-6 become the family's explicit prefix in place of `default`."""
    lines = []
    for opts, args in parse_routes(text):
        other = [o for o in opts if o not in ("-4", "-6")]
        if other:
            raise LabError(
                f"{ROUTES_VAR}: option {other[0]} in {shlex.join((*opts, *args))!r} cannot be"
                " applied to a roaming network; only -4 and -6 can (write the route without it)"
            )
        if opts and "default" in args:
            prefix = "::/0" if "-6" in opts else "0.0.0.0/0"
            i = args.index("default")
            args = (*args[:i], prefix, *args[i + 1 :])
        lines.append(shlex.join(("route", "replace", *args)))
    return lines


def rule_steps(text: str) -> list[Step]:
    """`ip rule del` (may fail: not there yet) then `ip rule add`, so re-running is harmless."""
    steps = []
    for opts, args in parse_routes(text, RULES_VAR):
        steps.append(Step(("ip", *opts, "rule", "del", *args), check=False))
        steps.append(Step(("ip", *opts, "rule", "add", *args)))
    return steps


def plan(env: Mapping[str, str]) -> list[Step]:
    """Every command that sets up a service's routes, policy rules and NAT, in order."""
    steps = route_steps(env.get(ROUTES_VAR, ""))
    steps += rule_steps(env.get(RULES_VAR, ""))
    nets = parse_masquerade(env.get(MASQUERADE_VAR, ""))
    if nets:
        steps.append(Step(("nft", "-f", "-"), nft_masquerade_ruleset(nets)))
    return steps


def sysctl_steps(sysctls: Mapping[str, str]) -> list[Step]:
    return [Step(("sysctl", "-q", "-w", f"{key}={value}")) for key, value in sysctls.items()]


def run_steps(steps: Sequence[Step], prefix: Sequence[str] = ()) -> None:
    """Run the steps (optionally through a prefix such as `ip netns exec NS`)."""
    for step in steps:
        argv = [*prefix, *step.argv]
        try:
            done = subprocess.run(
                argv, input=step.stdin, text=True, capture_output=True, timeout=30, check=False
            )
        except FileNotFoundError:
            raise LabError(
                f"{argv[0]} is not installed; install iproute2/nftables/procps"
            ) from None
        if done.returncode != 0 and step.check:
            raise LabError(
                f"network setup failed: {shlex.join(step.argv)}: {done.stderr.strip()}"
                " (check NTM_LAB_ROUTES / NTM_LAB_RULES / NTM_LAB_MASQUERADE / sysctls of"
                " the service)"
            )


def main(command: Sequence[str]) -> int:
    """`ntm lab service-init [-- CMD...]`: apply the setup, then become CMD."""
    try:
        run_steps(plan(os.environ))
    except LabError as exc:
        print(f"ntm lab service-init: error: {exc}", file=sys.stderr)
        return 1
    if not command:
        return 0
    try:
        os.execvp(command[0], list(command))
    except OSError as exc:
        print(f"ntm lab service-init: cannot run {command[0]}: {exc}", file=sys.stderr)
        return 127
