"""The lab's LB path inside User-Mode Linux: mn1 -> tunnel -> ntma1 -> lb (real IPVS) -> web1..3.

The netns lab runner (`ntm lab up`) builds compose.yaml reduced to pki, dns, resolver, dc1,
web1..3, lb, ntma1 and mn1 inside the UML instance, with the lab's own programs, configs,
addresses and DNS. What differs from the host lab, and why (each is the UML kernel or its
speed; measured in docs/ipvs-in-uml.md):

- lb runs `backend = "ipvs"` (the point of the lane) with health checks every 3 s, timeout
  3 s (the lab's 0.5 s / 0.4 s time out under UML's slow syscalls and flap the reals);
  services and real servers are the lab's, unchanged.
- ntma1 finds nft_xtables.py first on its PATH as `nft`: Debian's UML kernel has nf_tables
  without the ip/ip6/inet families, so its DNAT is the same rules in xtables.
- mn1 sits on `internet` (198.51.100.70), not behind nat-a (whose masquerade is nftables),
  with [dns] redirect = false (an nftables redirect too) and direction_timeout = 10 s.
- web1..3 run the lab's `lab.httpd` and `lab.udpecho` in one `python -S` process each
  instead of three `ntm` processes (each Python start costs seconds in UML).
- health checks of the runner: `ntm status [| grep registered]` and `ntm lab dnsprobe`
  become `python -S` probes that do the same (read the status socket; one A query) without
  importing the CLI, with a 30 s timeout and a 120 s start period.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SERVICES = ["pki", "dns", "resolver", "dc1", "web1", "web2", "web3", "lb", "ntma1"]
MN1_ADDRESS = "198.51.100.70"
UP_TIMEOUT = 480.0
HEALTHCHECK = {"interval": "1s", "timeout": "30s", "retries": 30, "start_period": "120s"}
LB_HEALTH = {"interval": "3.0", "timeout": "3.0"}

# A status socket answers every connection with one JSON document (ntm_io/status.py); a
# daemon that registers with a DC must say so (what compose.yaml's own checks grep for).
STATUS_PROBE = (
    "import json,socket,sys\n"
    "s=socket.socket(socket.AF_UNIX)\n"
    "s.settimeout(20)\n"
    "s.connect(sys.argv[1])\n"
    "data=b''\n"
    "while chunk:=s.recv(65536): data+=chunk\n"
    "sys.exit(0 if json.loads(data).get('registered',True) is True else 1)\n"
)
# `ntm lab dnsprobe --server S --expect A NAME`, minus the CLI: one A query; the answer must
# carry the expected address.
DNS_PROBE = (
    "import socket,struct,sys\n"
    "server,expect,name=sys.argv[1:4]\n"
    "q=struct.pack('!6H',0x4E54,0x0100,1,0,0,0)\n"
    "q+=b''.join(bytes([len(p)])+p.encode() for p in name.split('.'))\n"
    "q+=b'\\0'+struct.pack('!HH',1,1)\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "s.settimeout(5)\n"
    "s.sendto(q,(server,53))\n"
    "r=s.recv(4096)\n"
    "sys.exit(0 if r[:2]==q[:2] and socket.inet_aton(expect) in r[len(q):] else 1)\n"
)
WEB = (
    "import sys,threading\n"
    "from lab import httpd,udpecho\n"
    "name=sys.argv[1]\n"
    "threading.Thread(target=udpecho.serve,args=(name,9000),daemon=True).start()\n"
    "httpd.serve(name,80)\n"
)


@dataclass
class NtmLab:
    """A running lab (tests.integration.conftest.Lab) and the LB agent's config file."""

    lab: Any
    lb_config: Path

    def ns(self, service: str) -> str:
        from lab import names

        return names.namespace(self.lab.name, service)

    def status(self, service: str) -> dict[str, Any]:
        """A daemon's status straight from its socket (no `ntm status` start-up)."""
        from ntm_io.status import read_status

        return read_status(f"{self.lab.state}/run/{service}.sock", timeout=15.0)

    def run(self, service: str, *argv: str, timeout: float = 90.0) -> str:
        """A command in a service's namespace: `ntm lab exec` without its Python start-up."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns(service), *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"{service}: {' '.join(argv)} failed ({done.returncode}): "
                f"{done.stderr.strip()}\n{done.stdout}"
            )
        return done.stdout

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for log in sorted((self.lab.state / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name} ---\n" + "\n".join(tail))
        return "\n".join(out)


def _edit(source: Path, target: Path, changes: dict[str, str]) -> Path:
    """A copy of a lab config with settings changed (pattern -> replacement); each pattern
    must match, so a renamed setting fails here instead of silently going unchanged."""
    text = source.read_text()
    for pattern, replacement in changes.items():
        text, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        if n == 0:
            raise AssertionError(f"{source} has no {pattern!r} any more: update {__file__}")
    target.write_text(text)
    return target


def compose_text(where: Path) -> tuple[str, Path]:
    """The reduced compose file (as text) and the path of the LB agent's config it uses."""
    import yaml

    from tests.integration.conftest import compose_subset

    lb_cfg = _edit(
        REPO / "lab/config/lb.toml",
        where / "lb.toml",
        {
            r'^backend = "nftables"': 'backend = "ipvs"',
            r"^(\s*)interval = [\d.]+": rf"\g<1>interval = {LB_HEALTH['interval']}",
            r"^(\s*)timeout = [\d.]+": rf"\g<1>timeout = {LB_HEALTH['timeout']}",
        },
    )
    mn1_cfg = _edit(
        REPO / "lab/config/mn1.toml",
        where / "mn1.toml",
        {
            r"^redirect = true": "redirect = false",
            r"^direction_timeout = [\d.]+": "direction_timeout = 10.0",
        },
    )
    shim_dir = where / "bin"
    shim_dir.mkdir()
    shim = shim_dir / "nft"
    translator = Path(__file__).parent / "nft_xtables.py"
    # -S: no site module (the venv's .pth files); the translator needs only the stdlib
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -S {translator} "$@"\n')
    shim.chmod(0o755)

    data = yaml.safe_load(compose_subset(SERVICES))
    services: dict[str, Any] = data["services"]
    services["lb"]["command"] = ["ntm", "lb", "--config", str(lb_cfg)]
    venv_bin = Path(sys.prefix) / "bin"
    path = f"{shim_dir}:{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    services["ntma1"].setdefault("environment", {})["PATH"] = path
    for web in ("web1", "web2", "web3"):
        services[web]["command"] = [sys.executable, "-S", "-c", WEB, web]
    mn1 = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]["mn1"]
    mn1.pop("x-ntm-roam", None)
    mn1.update(
        command=["ntm", "node", "--config", str(mn1_cfg)],
        environment={},
        networks={"internet": {"ipv4_address": MN1_ADDRESS}},
        depends_on={
            "pki": {"condition": "service_completed_successfully"},
            "resolver": {"condition": "service_healthy"},
            "dc1": {"condition": "service_healthy"},
            "ntma1": {"condition": "service_healthy"},
        },
    )
    services["mn1"] = mn1
    for spec in services.values():
        check = spec.get("healthcheck")
        if check is None:
            continue
        check.update(HEALTHCHECK)
        test = " ".join(check["test"])
        if socket := re.search(r"\bntm status --socket (\S+)", test):
            check["test"] = ["CMD", sys.executable, "-S", "-c", STATUS_PROBE, socket[1]]
        elif dns := re.search(r"\bntm lab dnsprobe --server (\S+) --expect (\S+) (\S+)", test):
            check["test"] = ["CMD", sys.executable, "-S", "-c", DNS_PROBE, *dns.groups()]
    return yaml.safe_dump(data, sort_keys=False), lb_cfg
