"""The DC's configuration file (TOML), documented by example in lab/config/dc1.toml."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

from ntm_io.config import ConfigError, Section, load_toml, parse_ip, section
from ntm_proto.messages import check_fqdn


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    ca: str
    cert: str
    key: str


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    resolvers: tuple[str, ...]  # where to look up other zones' NS records
    timeout: float  # the whole look-up and request; keep it below nodes' direction_timeout
    peer_port: int  # other DCs' QUIC port


@dataclasses.dataclass(frozen=True)
class RelaySpec:
    name: str
    host: str  # control address (QUIC, mutual TLS)
    control_port: int
    server_name: str  # the DNS name in the relay's certificate
    endpoints: tuple[tuple[str, int], ...]  # where nodes send tunnel packets, per family


@dataclasses.dataclass(frozen=True)
class DcConfig:
    name: str
    zone: str
    listen: tuple[str, ...]
    quic_port: int
    dns_port: int
    vip_pool: ipaddress.IPv4Network
    vip_route: ipaddress.IPv4Network
    ns_name: str
    ns_addresses: tuple[str, ...]
    registration_lifetime: int
    status_socket: str
    state_file: str | None
    tls: TlsConfig
    federation: FederationConfig | None
    relays: tuple[RelaySpec, ...] = ()
    # seconds a (re)connected gateway waits before it gets MNs again (dc/gateways.py)
    gateway_hold_down: float = 30.0
    # seconds a Route Direction (and a relay binding) is good for; requesters renew paths
    # they use before it ends (ntm_proto/renewal.py)
    path_lifetime: int = 3600


def load(path: str | Path) -> DcConfig:
    data = load_toml(path)
    dc = section(data, "dc")
    tls = section(data, "tls")
    fed = section(data, "federation", required=False)
    name = dc.text("name", what="a short name like dc1")
    zone = _fqdn(dc.text("zone", what="the NTM zone this DC serves, like ntm.example.com"), "zone")
    pool = dc.network("vip_pool")
    route = dc.network("vip_route", "100.64.0.0/10")
    if not isinstance(pool, ipaddress.IPv4Network) or not isinstance(route, ipaddress.IPv4Network):
        raise ConfigError("[dc] vip_pool and vip_route must be IPv4 networks (vIPs are IPv4)")
    if not pool.subnet_of(route):
        raise ConfigError(
            f"[dc] vip_pool {pool} is not inside vip_route {route}; nodes route only "
            "vip_route into their tunnel, so pick a pool inside it"
        )
    ns_name = _fqdn(dc.text("ns_name", f"{name}.{zone}"), "ns_name")
    cfg = DcConfig(
        name=name,
        zone=zone,
        listen=tuple(dc.ip_list("listen", ["0.0.0.0"])),
        quic_port=dc.integer("quic_port", 4433, 1, 65535),
        dns_port=dc.integer("dns_port", 53, 0, 65535),
        vip_pool=pool,
        vip_route=route,
        ns_name=ns_name,
        ns_addresses=tuple(dc.ip_list("ns_addresses", [])),
        registration_lifetime=dc.integer("registration_lifetime", 300, 10, 86400),
        path_lifetime=dc.integer("path_lifetime", 3600, 10, 86400),
        status_socket=dc.text("status_socket", f"/run/ntm/dc-{name}.sock"),
        state_file=dc.opt_text("state_file"),
        gateway_hold_down=_hold_down(dc),
        tls=TlsConfig(ca=tls.text("ca"), cert=tls.text("cert"), key=tls.text("key")),
        federation=None
        if "federation" not in data
        else FederationConfig(
            resolvers=tuple(fed.ip_list("resolvers")),
            timeout=fed.number("timeout", 2.0, lo=0.1),
            peer_port=fed.integer("peer_port", 4433, 1, 65535),
        ),
    )
    dc.check_unknown()
    tls.check_unknown()
    fed.check_unknown()
    cfg = dataclasses.replace(cfg, relays=_relays(data.get("relay", [])))
    for what, file in (("ca", cfg.tls.ca), ("cert", cfg.tls.cert), ("key", cfg.tls.key)):
        if not Path(file).is_file():
            raise ConfigError(
                f"[tls] {what} = {file!r} does not exist; create it with `ntm pki` "
                "(see README: PKI)"
            )
    return cfg


def _hold_down(dc: Section) -> float:
    value = dc.number("gateway_hold_down", 30.0)
    if value < 0:
        raise ConfigError(
            f"[dc] gateway_hold_down = {value} is negative; give the seconds a recovered "
            "gateway must stay connected before it gets MNs back (0 turns the hold-down off)"
        )
    return float(value)


def _fqdn(value: str, key: str) -> str:
    name = value.lower().rstrip(".")
    if why := check_fqdn(name):
        raise ConfigError(f"[dc] {key} = {value!r} is not a valid name: {why}")
    return name


def _relays(tables: object) -> tuple[RelaySpec, ...]:
    if not isinstance(tables, list):
        raise ConfigError("relays are written as [[relay]] tables (an array), one per relay")
    out: list[RelaySpec] = []
    for i, table in enumerate(tables, 1):
        if not isinstance(table, dict):
            raise ConfigError(f"[[relay]] #{i} must be a table")
        r = Section(table, f"relay #{i}")
        endpoints = []
        for text in r.texts("endpoints"):
            host, sep, port = text.rpartition(":")
            host = host.strip("[]")
            if not sep or not port.isdigit():
                raise ConfigError(
                    f"[[relay]] #{i} endpoint {text!r}: write it as 198.51.100.50:7500 "
                    "or [2001:db8::50]:7500"
                )
            endpoints.append((parse_ip(host, f"[[relay]] #{i} endpoints"), int(port)))
        spec = RelaySpec(
            name=r.text("name"),
            host=r.ip("host"),
            control_port=r.integer("control_port", 4434, 1, 65535),
            server_name=r.text("server_name", what="the DNS name in the relay's certificate"),
            endpoints=tuple(endpoints),
        )
        r.check_unknown()
        out.append(spec)
    return tuple(out)
