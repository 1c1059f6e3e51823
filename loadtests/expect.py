"""What the load balancer should do with our clients: read from the LB agent's own config.

The verdict compares what clients saw with the scheduler's promise, so it needs, per service
the load run uses, the scheduler, whether it keeps a client on one server (persistence or a
source hash) and the weight of each real server under the name it answers with. Names come
from the lab's compose file: the service whose address is the real server's address (web1 is
10.40.0.11), since the web servers answer with their service name.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ntm_io.config import ConfigError

SCHEDULERS = ("rr", "wrr", "lc", "wlc", "sh", "mh")
HASHED = ("sh", "mh")


@dataclass(frozen=True)
class ServiceExpectation:
    kind: str  # "http" (tcp) | "udp"
    port: int
    scheduler: str
    persistence: bool  # one client stays on one server across its sessions
    weights: dict[str, int] = field(default_factory=dict)  # backend name -> weight

    @property
    def client_sticky(self) -> bool:
        return self.persistence or self.scheduler in HASHED

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "port": self.port,
            "scheduler": self.scheduler,
            "persistence": self.persistence,
            "weights": dict(self.weights),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ServiceExpectation:
        return cls(
            str(doc["kind"]),
            int(doc["port"]),
            str(doc["scheduler"]),
            bool(doc["persistence"]),
            {str(k): int(v) for k, v in doc.get("weights", {}).items()},
        )


def address_names(compose: dict[str, Any]) -> dict[str, str]:
    """IP address -> service name, over every network attachment in a compose document."""
    names: dict[str, str] = {}
    for name, spec in (compose.get("services") or {}).items():
        nets = (spec or {}).get("networks") or {}
        if isinstance(nets, dict):
            for att in nets.values():
                for key in ("ipv4_address", "ipv6_address"):
                    if att and att.get(key):
                        names[str(att[key])] = str(name)
    return names


def service_expectation(
    lb: dict[str, Any], names: dict[str, str], kind: str, port: int
) -> ServiceExpectation:
    """The LB service on `port` for `kind` (http -> tcp), with backends named."""
    proto = "tcp" if kind == "http" else "udp"
    found = [
        s
        for s in lb.get("service", [])
        if int(s.get("port", -1)) == port and str(s.get("protocol", "tcp")) == proto
    ]
    if not found:
        known = ", ".join(
            f"{s.get('protocol', 'tcp')}/{s.get('port')}" for s in lb.get("service", [])
        )
        raise ConfigError(
            f"the LB config has no {proto}/{port} service (it has: {known or 'none'}); "
            f"pick a port it balances or pass --lb-config of the right agent"
        )
    svc = found[0]
    sched = str(svc.get("scheduler", "wlc"))
    if sched not in SCHEDULERS:
        raise ConfigError(f"LB service {proto}/{port}: unknown scheduler {sched!r}")
    weights: dict[str, int] = {}
    for real in svc.get("real", []):
        addr = str(real["address"])
        weights[names.get(addr, addr)] = int(real.get("weight", 1))
    return ServiceExpectation(kind, port, sched, int(svc.get("persistence") or 0) > 0, weights)


def load_expectations(
    lb_config: Path, compose_file: Path, http_port: int | None, udp_port: int | None
) -> list[ServiceExpectation]:
    try:
        lb = tomllib.loads(lb_config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"cannot read the LB config {lb_config}: {exc}; pass --lb-config"
        ) from exc
    try:
        compose = yaml.safe_load(compose_file.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {compose_file}: {exc}; pass --compose") from exc
    names = address_names(compose)
    out = []
    if http_port:
        out.append(service_expectation(lb, names, "http", http_port))
    if udp_port:
        out.append(service_expectation(lb, names, "udp", udp_port))
    return out


def with_persistence(exp: ServiceExpectation, mode: str) -> ServiceExpectation:
    """Apply --persistence auto|on|off (auto: what the LB config says)."""
    if mode == "auto":
        return exp
    return ServiceExpectation(exp.kind, exp.port, exp.scheduler, mode == "on", dict(exp.weights))
