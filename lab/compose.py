"""Read the part of a compose file that the netns lab realises.

The same `compose.yaml` also runs under Docker. Keys that only matter to Docker (`build`,
`image`, `volumes`, `cap_add`, `devices`, `entrypoint`, ...) are ignored here; keys the lab
needs but finds wrong raise a LabError that names the service and the key.

Extension field understood inside a service:
  x-ntm-roam: {NETWORK: {ipv4_address: ..., ipv6_address: ..., routes: "..."}}
      where `ntm lab move SERVICE --to NETWORK` puts the service (and which routes it adds).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lab.errors import LabError
from lab.names import HUB

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")
ROAM_KEY = "x-ntm-roam"


@dataclass(frozen=True)
class Network:
    name: str
    subnets: tuple[IPNetwork, ...]

    def prefixlen(self, address: str, where: str) -> int:
        ip = ipaddress.ip_address(address)
        for subnet in self.subnets:
            if ip in subnet:
                return subnet.prefixlen
        raise LabError(
            f"{where}: {address} is outside every subnet of network {self.name} "
            f"({', '.join(map(str, self.subnets)) or 'none declared'}); fix the address or "
            f"add the subnet under networks.{self.name}.ipam.config"
        )


@dataclass(frozen=True)
class Attachment:
    """A service's place on one network: its addresses (with prefix length) and routes."""

    network: str
    addresses: tuple[str, ...]  # "198.51.100.40/24", "2001:db8:100::40/64"
    routes: str = ""  # NTM_LAB_ROUTES syntax; only used by x-ntm-roam entries


@dataclass(frozen=True)
class Healthcheck:
    argv: tuple[str, ...]
    interval: float
    timeout: float
    retries: int
    start_period: float

    @property
    def budget(self) -> float:
        """How long `up` keeps polling before it gives up: Docker's own bound, at least 2 s.

        `up` polls much faster than `interval` (readiness is seen at once); the declared
        numbers only bound the total wait.
        """
        return max(2.0, self.start_period + self.retries * self.interval)


@dataclass(frozen=True)
class Dependency:
    service: str
    condition: str


@dataclass(frozen=True)
class Service:
    name: str
    command: tuple[str, ...]
    environment: Mapping[str, str]
    networks: tuple[Attachment, ...]
    roam: Mapping[str, Attachment]
    sysctls: Mapping[str, str]
    dns: tuple[str, ...]
    healthcheck: Healthcheck | None
    depends_on: tuple[Dependency, ...]


@dataclass(frozen=True)
class Project:
    path: Path
    networks: Mapping[str, Network]
    services: Mapping[str, Service] = field(default_factory=dict)

    def start_order(self) -> list[str]:
        """Services ordered so each comes after what it depends on (file order otherwise)."""
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if name in order:
                return
            if name in visiting:
                cycle = " -> ".join((*chain, name))
                raise LabError(f"depends_on has a cycle ({cycle}); break it in {self.path}")
            visiting.add(name)
            for dep in self.services[name].depends_on:
                visit(dep.service, (*chain, name))
            visiting.discard(name)
            order.append(name)

        for name in self.services:
            visit(name, ())
        return order


# --- variable interpolation, as compose does it -------------------------------------------

_VAR = re.compile(r"\$(?:(\$)|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?-|:?\?)(.*))?$", re.S)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Expand $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}; `$$` is a `$`."""

    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        if m.group(3):
            return env.get(m.group(3), "")
        braced = _BRACED.match(m.group(2))
        if not braced:
            raise LabError(f"invalid variable reference ${{{m.group(2)}}} in {text!r}")
        name, op, arg = braced.groups()
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in ("-", ":-"):
            return arg if unset else str(value)
        if op in ("?", ":?"):
            if unset:
                raise LabError(f"variable {name} is required here: {arg or 'set it'}")
            return str(value)
        return value or ""

    return _VAR.sub(one, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


# --- small parsers ------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, where: str) -> float:
    """Compose durations: "1s", "500ms", "1m30s" (a bare number means seconds)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise LabError(f"{where}: {value!r} is not a duration; write it like 1s, 500ms or 1m30s")
    return sum(float(n) * _UNIT[u] for n, u in parts)


def parse_command(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return tuple(str(v) for v in value)
    raise LabError(f"{where}: write the command as a string or a list of strings")


def parse_mapping(value: Any, where: str) -> dict[str, str]:
    """`environment`/`sysctls`: a mapping or a list of KEY=VALUE strings."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): "" if v is None else _scalar(v) for k, v in value.items()}
    if isinstance(value, list):
        out: dict[str, str] = {}
        for item in value:
            key, sep, val = str(item).partition("=")
            if not sep:
                raise LabError(f"{where}: {item!r} is not KEY=VALUE")
            out[key] = val
        return out
    raise LabError(f"{where}: write it as a mapping or a list of KEY=VALUE")


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def parse_healthcheck(value: Any, where: str) -> Healthcheck | None:
    if not value or value.get("disable"):
        return None
    test = value.get("test")
    if isinstance(test, str):
        argv: tuple[str, ...] = ("sh", "-c", test)
    elif isinstance(test, list) and test and test[0] == "CMD":
        argv = tuple(str(t) for t in test[1:])
    elif isinstance(test, list) and test and test[0] == "CMD-SHELL":
        argv = ("sh", "-c", " ".join(str(t) for t in test[1:]))
    elif isinstance(test, list) and test == ["NONE"]:
        return None
    else:
        raise LabError(f'{where}.test: write it as ["CMD", ...], ["CMD-SHELL", "..."] or a string')
    if not argv:
        raise LabError(f"{where}.test has no command")
    return Healthcheck(
        argv=argv,
        interval=parse_duration(value.get("interval", "1s"), f"{where}.interval"),
        timeout=parse_duration(value.get("timeout", "5s"), f"{where}.timeout"),
        retries=int(value.get("retries", 30)),
        start_period=parse_duration(value.get("start_period", 0), f"{where}.start_period"),
    )


def parse_depends_on(value: Any, where: str) -> tuple[Dependency, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(Dependency(str(v), "service_started") for v in value)
    if isinstance(value, dict):
        deps = []
        for name, spec in value.items():
            condition = (spec or {}).get("condition", "service_started")
            if condition not in CONDITIONS:
                raise LabError(f"{where}.{name}.condition {condition!r}: use one of {CONDITIONS}")
            deps.append(Dependency(str(name), condition))
        return tuple(deps)
    raise LabError(f"{where}: write depends_on as a list or a mapping")


# --- the model ----------------------------------------------------------------------------


def parse_network(name: str, spec: Any) -> Network:
    subnets: list[IPNetwork] = []
    for entry in ((spec or {}).get("ipam") or {}).get("config") or []:
        try:
            subnets.append(ipaddress.ip_network(str(entry["subnet"])))
        except (KeyError, TypeError, ValueError):
            raise LabError(
                f"networks.{name}.ipam.config: {entry!r} needs a valid `subnet` "
                "(e.g. 198.51.100.0/24) with the host bits zero"
            ) from None
    return Network(name, tuple(subnets))


def _attachment(net: Network, spec: Any, where: str, routes_allowed: bool) -> Attachment:
    spec = spec or {}
    addresses = []
    for key in ("ipv4_address", "ipv6_address"):
        if spec.get(key):
            addr = str(spec[key])
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise LabError(f"{where}.{key}: {addr!r} is not an IP address") from None
            addresses.append(f"{addr}/{net.prefixlen(addr, where)}")
    if not addresses:
        raise LabError(
            f"{where}: no ipv4_address/ipv6_address; the netns lab assigns no addresses on its "
            "own, so declare one"
        )
    routes = str(spec.get("routes", "")) if routes_allowed else ""
    return Attachment(net.name, tuple(addresses), routes)


def parse_service(name: str, spec: Any, networks: Mapping[str, Network]) -> Service:
    where = f"services.{name}"
    if name == HUB:
        raise LabError(f"{where}: the name {HUB!r} is reserved for the lab's hub; rename it")
    if not isinstance(spec, dict):
        raise LabError(f"{where}: a service must be a mapping")
    if "command" not in spec:
        raise LabError(f"{where}: no command; the netns lab runs `command` (images are ignored)")

    def known(net: str, key: str) -> Network:
        if net not in networks:
            raise LabError(f"{key}: network {net!r} is not declared under the top-level networks")
        return networks[net]

    raw_nets = spec.get("networks") or {}
    if isinstance(raw_nets, list):
        raw_nets = {n: None for n in raw_nets}
    attachments = tuple(
        _attachment(known(n, f"{where}.networks"), s, f"{where}.networks.{n}", False)
        for n, s in raw_nets.items()
    )
    roam = {
        n: _attachment(known(n, f"{where}.{ROAM_KEY}"), s, f"{where}.{ROAM_KEY}.{n}", True)
        for n, s in (spec.get(ROAM_KEY) or {}).items()
    }
    if roam and not any(a.network in roam for a in attachments):
        raise LabError(
            f"{where}.{ROAM_KEY}: list the service's starting network there too, so "
            "`ntm lab move` knows which network it leaves"
        )
    dns = spec.get("dns") or []
    return Service(
        name=name,
        command=parse_command(spec["command"], f"{where}.command"),
        environment=parse_mapping(spec.get("environment"), f"{where}.environment"),
        networks=attachments,
        roam=roam,
        sysctls=parse_mapping(spec.get("sysctls"), f"{where}.sysctls"),
        dns=tuple(str(d) for d in ([dns] if isinstance(dns, str) else dns)),
        healthcheck=parse_healthcheck(spec.get("healthcheck"), f"{where}.healthcheck"),
        depends_on=parse_depends_on(spec.get("depends_on"), f"{where}.depends_on"),
    )


def parse_project(data: Any, path: Path, env: Mapping[str, str]) -> Project:
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        raise LabError(f"{path}: no `services:` mapping; is this a compose file?")
    data = interpolate_tree(data, env)
    networks = {n: parse_network(n, s) for n, s in (data.get("networks") or {}).items()}
    services = {n: parse_service(n, s, networks) for n, s in data["services"].items()}
    for svc in services.values():
        for dep in svc.depends_on:
            if dep.service not in services:
                raise LabError(f"services.{svc.name}.depends_on: no service named {dep.service!r}")
    project = Project(path, networks, services)
    project.start_order()  # reject cycles now rather than halfway through `up`
    return project


def load_project(path: Path, env: Mapping[str, str]) -> Project:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise LabError(f"{path}: no such compose file; pass --file PATH") from None
    except yaml.YAMLError as exc:
        raise LabError(f"{path}: not valid YAML ({exc})") from None
    return parse_project(data, path, env)
