"""The NTMA's configuration file: a node file (lab/config/mn1.toml) plus `[adaptor]` and
`[claims]`, documented by example in lab/config/ntma1.toml.

    [adaptor]
    service_interface = "dmz"          # the LB side; its addresses are never tunnel endpoints
    next_hop = "10.30.0.2"             # our address there: the LB's return routes point here
    lb_address = "10.30.0.100"         # the LB's virtual service address
    forward = ["tcp/80", "udp/9000"]   # inner (our vIP, port) -> (lb_address, port)
    public_addresses = ["198.51.100.60"]
    public_forward = ["tcp/80"]        # (public address, port) -> (lb_address, port)
    gateway = "ntma1.ntm.example.com"  # one of several gateways of the service ("" = the only one)
    weight = 100                       # share of new MNs among the gateways; 0 = drain
    report_interval = 5.0              # seconds between health reports to the DC

    [claims]                           # leave out to run without route claims
    agent = "10.30.0.10"               # the LB agent (`ntm lb`, [claims] table there)
    port = 4434
    server_name = "lb.dmz.example.com" # the name in the agent's certificate
    lifetime = 60                      # seconds a claim lives at the agent unless refreshed
    refresh = 20                       # resend every N seconds while the path lives
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

from ntm_io.config import ConfigError, Section, load_toml, section
from ntm_node import config as node_config
from ntm_node.config import NodeConfig
from ntm_proto.messages import check_fqdn

PROTOCOLS = ("tcp", "udp")


@dataclasses.dataclass(frozen=True)
class Forward:
    protocol: str  # tcp | udp
    port: int

    def __str__(self) -> str:
        return f"{self.protocol}/{self.port}"


@dataclasses.dataclass(frozen=True)
class ClaimsConfig:
    agent: str
    port: int
    server_name: str
    lifetime: int
    refresh: float
    retry: float  # after a failed send or a refusal


@dataclasses.dataclass(frozen=True)
class AdaptorConfig:
    node: NodeConfig
    service_interface: str
    next_hop: str
    lb_address: str
    forward: tuple[Forward, ...]
    public_addresses: tuple[str, ...]
    public_forward: tuple[Forward, ...]
    nft_table: str
    claims: ClaimsConfig | None
    gateway: str = ""  # this gateway's name when several front the service; "" = the only one
    weight: int = 100  # its share of new MNs (u16); 0 = drain
    report_interval: float = 5.0  # seconds between GatewayReports (only with a gateway name)

    @property
    def name(self) -> str:
        return self.node.name


def parse_forward(items: list[str], where: str) -> tuple[Forward, ...]:
    out: list[Forward] = []
    for item in items:
        proto, _, port = item.strip().lower().partition("/")
        if proto not in PROTOCOLS or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f'{where}: {item!r} is not a forward; write it like "tcp/80" or "udp/9000"'
            )
        fwd = Forward(proto, int(port))
        if fwd in out:
            raise ConfigError(f"{where}: {item!r} is listed twice; list each port once")
        out.append(fwd)
    return tuple(out)


def load(path: str | Path) -> AdaptorConfig:
    node = node_config.load(path)
    data = load_toml(path)
    unknown = sorted(set(data) - {"node", "dc", "dns", "tls", "adaptor", "claims"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown table(s) {', '.join(unknown)}; an adaptor file has [node], [dc], "
            "[dns], [tls], [adaptor] and [claims]"
        )
    if node.dns.enabled:
        raise ConfigError(
            "[dns] enabled = true: an NTMA answers tunnels, it resolves nothing for "
            "applications; set [dns] enabled = false"
        )
    a = section(data, "adaptor")
    iface = a.text("service_interface", what="the interface toward the LB, like dmz")
    if not 1 <= len(iface) <= 15 or iface == node.tun_name:
        raise ConfigError(
            f"[adaptor] service_interface = {iface!r}: name the LB-side interface (1..15 "
            f"characters, not the TUN {node.tun_name})"
        )
    next_hop = _v4(a, "next_hop", "our IPv4 address on the service interface")
    lb_address = _v4(a, "lb_address", "the LB's virtual service address")
    forward = parse_forward(a.texts("forward"), "[adaptor] forward")
    if not forward:
        raise ConfigError('[adaptor] forward is empty; list the service\'s ports like "tcp/80"')
    public = tuple(a.ip_list("public_addresses", []))
    for addr in public:
        if ipaddress.ip_address(addr).version != 4:
            raise ConfigError(
                f"[adaptor] public_addresses: {addr} is IPv6; the LB's virtual service is "
                "IPv4 and NAT between the families is not done here; list IPv4 addresses"
            )
    public_forward = parse_forward(a.texts("public_forward", []), "[adaptor] public_forward")
    if public_forward and not public:
        raise ConfigError(
            "[adaptor] public_forward needs public_addresses (where ordinary clients arrive)"
        )
    table = a.text("nft_table", f"ntm_adaptor_{node.name}")
    gateway = _gateway(a.text("gateway", ""), node.fqdn)
    weight = a.integer("weight", 100, 0, 65535)
    report_interval = a.number("report_interval", 5.0, lo=MIN_REPORT_INTERVAL)
    if report_interval > MAX_REPORT_INTERVAL:
        raise ConfigError(
            f"[adaptor] report_interval = {report_interval} is above {MAX_REPORT_INTERVAL} s; "
            "the DC's view of this gateway would be stale, use a few seconds"
        )
    a.check_unknown()
    claims = None
    if "claims" in data:
        c = section(data, "claims")
        lifetime = c.integer("lifetime", 60, 5, 86400)
        claims = ClaimsConfig(
            agent=c.ip("agent"),
            port=c.integer("port", 4434, 1, 65535),
            server_name=c.text("server_name", what="the name in the LB agent's certificate"),
            lifetime=lifetime,
            refresh=c.number("refresh", lifetime / 3, lo=1.0),
            retry=c.number("retry", 2.0, lo=0.1),
        )
        c.check_unknown()
        if claims.refresh >= claims.lifetime:
            raise ConfigError(
                f"[claims] refresh = {claims.refresh} must be below lifetime = "
                f"{claims.lifetime}, or claims lapse between refreshes (use lifetime / 3)"
            )
    return AdaptorConfig(
        node=node,
        service_interface=iface,
        next_hop=next_hop,
        lb_address=lb_address,
        forward=forward,
        public_addresses=public,
        public_forward=public_forward,
        nft_table=table,
        claims=claims,
        gateway=gateway,
        weight=weight,
        report_interval=report_interval,
    )


MIN_REPORT_INTERVAL, MAX_REPORT_INTERVAL = 0.5, 3600.0


def _gateway(value: str, service: str) -> str:
    if not value:
        return ""
    name = value.lower().rstrip(".")
    if why := check_fqdn(name):
        raise ConfigError(
            f"[adaptor] gateway = {value!r} is not a valid name: {why}; use this gateway's own "
            "DNS name from its certificate, like ntma1.ntm.example.com"
        )
    if name == service:
        raise ConfigError(
            f"[adaptor] gateway = {value!r} is the service name ([node] fqdn); name this "
            "gateway itself (a second DNS name in its certificate, like ntma1.ntm.example.com)"
        )
    return name


def _v4(s: Section, key: str, what: str) -> str:
    value: str = s.ip(key)
    if ipaddress.ip_address(value).version != 4:
        raise ConfigError(f"[{s.where}] {key} = {value}: must be IPv4 ({what})")
    return value
