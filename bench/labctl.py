"""The benchmark's own lab: a subset of compose.yaml, plus two hosts of its own.

Only what the chosen sections measure is started (fewer idle daemons on a small machine):
the base (mn1 behind nat-a, cn2, dc1, DNS, plainweb), plus `direct` (an extra node `mnd`
beside cn2, no NAT between), `reach` (cn1 behind nat-b, the relays), `lb` (ntma1, the LB
agent, web1..3 and a plain client `dmzc` on dmz) and `failover` (ntma2 and its routers,
access-b's router, mn3 on two uplinks, an IPv4 access network of the benchmark's own).
Driven only through `ntm lab` (like the integration tests), under a unique name and a
private state directory, so a benchmark never touches another lab and `down` finds all.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import yaml

from ntm_io.status import StatusError, read_status

from . import procstat

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose.yaml"
UP_TIMEOUT = 240.0
DOWN_TIMEOUT = 120.0

# The extra node: on `internet` beside cn2, IPv4 only like mn1, so the pair differs from
# mn1<->cn2 only by the NAT. The benchmark's own hosts take high addresses, away from the
# lab's plan; bench_compose refuses to build a lab where compose.yaml took them meanwhile.
DIRECT_NODE = "mnd"
DIRECT_ADDRESS = "198.51.100.200"
CN = "cn2"
CN_ADDRESS = "198.51.100.30"
PLAIN_WEB = "198.51.100.40"
DC_ADDRESS = "198.51.100.20"
RESOLVER = "198.51.100.11"
# A plain host on dmz beside the NTMA: sends the same HTTP load straight to the LB's VIP.
DMZ_CLIENT = "dmzc"
DMZ_CLIENT_ADDRESS = "10.30.0.200"
LB_VIP = "10.30.0.100"
NTMA_PUBLIC = "198.51.100.60"
KEEP = ("pki", "dns", "resolver", "nat-a", "dc1", "cn2", "plainweb", "mn1")
FEATURES = {
    "reach": ("nat-b", "cn1", "rs1", "rs2"),
    "lb": ("ntma1", "lb", "web1", "web2", "web3"),
    # with "lb"; mn3 (on access-a and access-b at once) for make-before-break
    "failover": ("rtr-b", "rtr-isp1", "rtr-isp2", "ntma2", "mn3"),
}
# The failover section's own IPv4 access network behind a NAT of its own, so mn1 can also
# hand over within one family (access-a -> access-c: another private address, another
# public one). Its addresses are the benchmark's, checked against compose.yaml like the rest.
SAME_FAMILY_NET = "access-c"
SAME_FAMILY_NAT = "nat-c"
NAT_C_ADDRESS = "198.51.100.201"
ACCESS_C = {"subnet": "10.10.3.0/24", "gateway": "10.10.3.254", "router": "10.10.3.1"}
MN_ACCESS_C = "10.10.3.100"
MN1_CONFIG = REPO / "lab" / "config" / "mn1.toml"
# ntm_node.config's defaults for the [node] settings the failover section reports.
NODE_DEFAULTS = {"failback_hold_down": 60.0, "allowed_outage": 1.0}


class LabFailure(Exception):
    """The lab did not come up or a lab verb failed; the message carries its output."""


def unique_name() -> str:
    return "b" + secrets.token_hex(3)


def _keep_deps(spec: dict[str, Any], allowed: set[str]) -> None:
    deps = spec.get("depends_on")
    if isinstance(deps, dict):
        spec["depends_on"] = {k: v for k, v in deps.items() if k in allowed}
    elif isinstance(deps, list):
        spec["depends_on"] = [d for d in deps if d in allowed]


def taken_addresses(services: dict[str, Any]) -> set[str]:
    """Every fixed address the services of a compose file claim, on any network."""
    out: set[str] = set()
    for spec in services.values():
        for net in (spec.get("networks") or {}).values():
            if isinstance(net, dict):
                out |= {str(net[k]) for k in ("ipv4_address", "ipv6_address") if k in net}
    return out


def node_seconds(config: str, key: str) -> float:
    """A [node] timer of a node config (TOML text), or the node's default for it. The
    failover section reports mn1's allowed outage, and each gateway-failure run waits for
    mn1's fail-back hold-down, which sets that section's pace."""
    try:
        node = tomllib.loads(config).get("node") or {}
    except tomllib.TOMLDecodeError as exc:
        raise LabFailure(f"the node config is not valid TOML: {exc}") from None
    value = node.get(key, NODE_DEFAULTS[key])
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise LabFailure(f"[node] {key} = {value!r}: not a number of seconds")
    return float(value)


def lab_mn1_seconds(key: str) -> float:
    """A [node] timer of mn1 in the lab (lab/config/mn1.toml, which the lab runs)."""
    return node_seconds(MN1_CONFIG.read_text(), key)


def _add_same_family_net(data: dict[str, Any], services: dict[str, Any]) -> None:
    """nat-c and access-c (the benchmark's), and access-c among mn1's roaming networks."""
    if SAME_FAMILY_NET in data["networks"] or SAME_FAMILY_NAT in data["services"]:
        raise LabFailure(
            f"compose.yaml now has {SAME_FAMILY_NET} or {SAME_FAMILY_NAT}, names of the "
            "benchmark's own: rename SAME_FAMILY_NET / SAME_FAMILY_NAT in bench/labctl.py"
        )
    data["networks"][SAME_FAMILY_NET] = {
        "internal": True,
        "ipam": {"config": [{"subnet": ACCESS_C["subnet"], "gateway": ACCESS_C["gateway"]}]},
    }
    nat = dict(services["nat-a"])
    env = dict(nat.get("environment", {}))
    # IPv4 only on `internet`: nat-a's IPv6 routes would have no way out here.
    routes = [r.strip() for r in str(env.get("NTM_LAB_ROUTES", "")).split(";")]
    env["NTM_LAB_ROUTES"] = "; ".join(r for r in routes if r and not r.startswith("-6"))
    env["NTM_LAB_MASQUERADE"] = ACCESS_C["subnet"]
    nat["environment"] = env
    nat["networks"] = {
        "internet": {"ipv4_address": NAT_C_ADDRESS},
        SAME_FAMILY_NET: {"ipv4_address": ACCESS_C["router"]},
    }
    services[SAME_FAMILY_NAT] = nat
    mn1 = services["mn1"]
    mn1["x-ntm-roam"] = {
        **mn1["x-ntm-roam"],
        SAME_FAMILY_NET: {
            "ipv4_address": MN_ACCESS_C,
            "routes": f"default via {ACCESS_C['router']}",
        },
    }
    mn1["depends_on"] = {**mn1["depends_on"], SAME_FAMILY_NAT: {"condition": "service_healthy"}}


def bench_compose(
    work: Path, with_direct: bool, reach: bool = False, lb: bool = False, failover: bool = False
) -> Path:
    """Write the benchmark's compose file (and the extra node's PKI spec and config)."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    ours = {DIRECT_ADDRESS, DMZ_CLIENT_ADDRESS, NAT_C_ADDRESS, MN_ACCESS_C, ACCESS_C["router"]}
    clash = ours & taken_addresses(data["services"])
    if clash:
        raise LabFailure(
            f"compose.yaml now uses {', '.join(sorted(clash))}, an address of the benchmark's "
            "own hosts: change DIRECT_ADDRESS / DMZ_CLIENT_ADDRESS / NAT_C_ADDRESS / ACCESS_C "
            "in bench/labctl.py"
        )
    # Only what the benchmark uses: fewer idle daemons, and a lab that grows elsewhere
    # does not change what is measured here.
    lb = lb or failover
    keep = set(KEEP)
    keep |= set(FEATURES["reach"]) if reach else set()
    keep |= set(FEATURES["lb"]) if lb else set()
    keep |= set(FEATURES["failover"]) if failover else set()
    services = {k: v for k, v in data["services"].items() if k in keep}
    for spec in services.values():
        _keep_deps(spec, set(services))
    data["services"] = services
    if with_direct:
        spec_path = work / "pki.toml"
        spec_path.write_text(
            (REPO / "lab" / "pki.toml").read_text()
            + f'\n[[identity]]\nname = "{DIRECT_NODE}"\nrole = "node"\n'
            f'dns = ["{DIRECT_NODE}.ntm.example.com"]\n'
        )
        pki = services["pki"]
        pki["command"] = [str(spec_path) if c == "lab/pki.toml" else c for c in pki["command"]]
        config = work / f"{DIRECT_NODE}.toml"
        config.write_text(MN1_CONFIG.read_text().replace("mn1", "mnd"))
        node = {k: v for k, v in services["mn1"].items() if k not in ("x-ntm-roam", "environment")}
        node["command"] = ["ntm", "node", "--config", str(config)]
        node["networks"] = {"internet": {"ipv4_address": DIRECT_ADDRESS}}
        _keep_deps(node, set(services) - {"nat-a"})
        node["healthcheck"] = dict(node["healthcheck"])
        node["healthcheck"]["test"] = [
            t.replace("mn1.sock", f"{DIRECT_NODE}.sock") for t in node["healthcheck"]["test"]
        ]
        services[DIRECT_NODE] = node
    if failover:
        _add_same_family_net(data, services)
    if lb:
        plain = {k: v for k, v in services["lb"].items() if k in ("build", "image", "working_dir")}
        services[DMZ_CLIENT] = {
            **plain,
            "command": ["sleep", "infinity"],
            "networks": {"dmz": {"ipv4_address": DMZ_CLIENT_ADDRESS}},
            "depends_on": {"lb": {"condition": "service_healthy"}},
        }
    out = work / "compose.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


class BenchLab:
    def __init__(
        self,
        work: Path,
        with_direct: bool,
        reach: bool = False,
        lb: bool = False,
        failover: bool = False,
    ) -> None:
        self.name = unique_name()
        self.work = work
        self.state = work / "state"  # short: unix socket paths are limited to 107 bytes
        self.with_direct = with_direct
        self.compose = bench_compose(work, with_direct, reach, lb, failover)
        self.history: list[str] = []

    def ntm_lab(self, verb: str, *args: str, timeout: float = 60.0) -> str:
        argv = [sys.executable, "-m", "ntm_cli.main", "lab", verb, "--name", self.name]
        argv += ["--state", str(self.state), *args]
        try:
            done = subprocess.run(
                argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise LabFailure(
                f"ntm lab {verb} {' '.join(args)}: no result in {timeout:g} s"
            ) from None
        self.history.append(f"ntm lab {verb} {' '.join(args)} -> {done.returncode}")
        if done.returncode != 0:
            raise LabFailure(
                f"ntm lab {verb} {' '.join(args)} failed ({done.returncode}): "
                f"{(done.stdout + done.stderr).strip()[-2000:]}"
            )
        return done.stdout

    def up(self) -> None:
        self.ntm_lab("up", "--file", str(self.compose), timeout=UP_TIMEOUT)

    def down(self) -> None:
        self.ntm_lab("down", timeout=DOWN_TIMEOUT)

    def kill(self, service: str) -> None:
        self.ntm_lab("kill", service)

    def start(self, service: str) -> None:
        self.ntm_lab("start", service, timeout=UP_TIMEOUT)

    def move(self, service: str, network: str) -> None:
        self.ntm_lab("move", service, "--to", network)

    def link(self, service: str, network: str, up: bool) -> None:
        self.ntm_lab("link", service, network, "up" if up else "down")

    def ns(self, service: str) -> str:
        return f"{self.name}-{service}"

    def socket(self, service: str) -> str:
        return str(self.state / "run" / f"{service}.sock")

    def status(self, service: str) -> dict[str, Any]:
        return read_status(self.socket(service), timeout=2.0)

    def wait_registered(self, service: str, bound: float = 30.0) -> dict[str, Any]:
        """Poll the node's status socket until the DC gave it a vIP."""
        deadline = time.monotonic() + bound
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                doc = self.status(service)
                if doc.get("registered") and doc.get("vip"):
                    return doc
                last = f"registered={doc.get('registered')} dc_error={doc.get('dc_error')}"
            except StatusError as exc:
                last = str(exc)
            time.sleep(0.02)
        raise LabFailure(f"{service} did not register within {bound:g} s ({last})")

    def pids(self, service: str) -> list[int]:
        done = subprocess.run(
            ["ip", "netns", "pids", self.ns(service)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return [int(p) for p in done.stdout.split()]

    def node_pid(self, service: str, role: str = "node") -> int:
        """The `ntm <role>` process of a service (cn2 runs its node under `ntm lab run-all`)."""
        for pid in self.pids(service):
            argv = procstat.cmdline(pid)
            if role in argv and "--config" in argv and "run-all" not in argv:
                return pid
        raise LabFailure(f"no `ntm {role}` process runs in {self.ns(service)}")

    def mtu(self, service: str, ifname: str) -> int | None:
        done = subprocess.run(
            ["ip", "-n", self.ns(service), "-j", "link", "show", "dev", ifname],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        try:
            return int(json.loads(done.stdout)[0]["mtu"])
        except (ValueError, LookupError, TypeError):
            return None
