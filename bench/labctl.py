"""The benchmark's own lab: compose.yaml plus one extra node beside cn2 (no NAT between).

Driven only through `ntm lab` (like the integration tests), under a unique name and a
private state directory, so a benchmark never touches another lab and `down` finds all.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
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
# mn1<->cn2 only by the NAT.
DIRECT_NODE = "mnd"
DIRECT_ADDRESS = "198.51.100.50"
CN = "cn2"
CN_ADDRESS = "198.51.100.30"
PLAIN_WEB = "198.51.100.40"
KEEP = ("pki", "dns", "resolver", "nat-a", "dc1", "cn2", "plainweb", "mn1")


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


def bench_compose(work: Path, with_direct: bool) -> Path:
    """Write the benchmark's compose file (and the extra node's PKI spec and config)."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    # Only what the benchmark uses: fewer idle daemons, and a lab that grows elsewhere
    # does not change what is measured here.
    services = {k: v for k, v in data["services"].items() if k in KEEP}
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
        config.write_text((REPO / "lab" / "config" / "mn1.toml").read_text().replace("mn1", "mnd"))
        node = {k: v for k, v in services["mn1"].items() if k not in ("x-ntm-roam", "environment")}
        node["command"] = ["ntm", "node", "--config", str(config)]
        node["networks"] = {"internet": {"ipv4_address": DIRECT_ADDRESS}}
        _keep_deps(node, set(services) - {"nat-a"})
        node["healthcheck"] = dict(node["healthcheck"])
        node["healthcheck"]["test"] = [
            t.replace("mn1.sock", f"{DIRECT_NODE}.sock") for t in node["healthcheck"]["test"]
        ]
        services[DIRECT_NODE] = node
    out = work / "compose.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


class BenchLab:
    def __init__(self, work: Path, with_direct: bool) -> None:
        self.name = unique_name()
        self.work = work
        self.state = work / "state"  # short: unix socket paths are limited to 107 bytes
        self.with_direct = with_direct
        self.compose = bench_compose(work, with_direct)
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

    def node_pid(self, service: str) -> int:
        """The `ntm node` process of a service (cn2 runs it under `ntm lab run-all`)."""
        for pid in self.pids(service):
            argv = procstat.cmdline(pid)
            if "node" in argv and "--config" in argv and "run-all" not in argv:
                return pid
        raise LabFailure(f"no `ntm node` process runs in {self.ns(service)}")

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
