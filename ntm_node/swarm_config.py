"""`ntm swarm`'s configuration (TOML), documented by example in lab/config/swarm.toml.

One file describes N identities: what they share ([dc], [tls], the stub resolver in [dns])
and a rule for what each gets on its own (name, tunnel port, TUN device, key file, routing
table). :func:`load` turns it into one :class:`~ntm_node.config.NodeConfig` per identity,
so every identity is configured exactly like a single `ntm node`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cryptography import x509

from ntm_io.config import ConfigError, load_toml, parse_ip, section
from ntm_proto.messages import check_fqdn

from .config import DnsConfig, NodeConfig, keepalive_for

PLACEHOLDER = "{i}"
IFNAME_MAX = 15
FIRST_FREE_TABLE = 256  # 253..255 are default/main/local; 1..252 are often taken by hand


@dataclasses.dataclass(frozen=True)
class SwarmDns:
    listen: tuple[str, int]
    upstreams: tuple[str, ...]
    direction_timeout: float
    upstream_timeout: float


@dataclasses.dataclass(frozen=True)
class SwarmConfig:
    name: str
    fqdn_template: str  # "s{i}.swarm.ntm.example.com"
    first: int  # index of the first identity here (several swarm hosts use disjoint ranges)
    count: int
    tunnel_port: int  # identity k of this swarm (0-based) listens on tunnel_port + k
    tun_prefix: str  # its TUN is <tun_prefix><first + k>
    route_table: int  # its policy routing table is route_table + k
    rule_priority: int
    start_concurrency: int
    start_timeout: float
    key_dir: str
    status_socket: str
    identities_file: str
    dns: SwarmDns
    node: NodeConfig  # the identity template: everything the identities share

    def fqdn(self, index: int) -> str:
        return self.fqdn_template.replace(PLACEHOLDER, str(index))

    def indices(self) -> range:
        return range(self.first, self.first + self.count)

    def identity(self, k: int) -> NodeConfig:
        """The node configuration of this swarm's k-th identity (0 <= k < count)."""
        if not 0 <= k < self.count:
            raise IndexError(k)
        i = self.first + k
        fqdn = self.fqdn(i)
        return dataclasses.replace(
            self.node,
            name=f"{self.name}-{i}",
            fqdn=fqdn,
            tunnel_port=self.tunnel_port + k,
            tun_name=f"{self.tun_prefix}{i}",
            key_file=str(Path(self.key_dir) / f"{fqdn}.x25519"),
        )


def load(
    path: str | Path,
    *,
    count: int | None = None,
    first: int | None = None,
    identities_file: str | None = None,
) -> SwarmConfig:
    """Read the file; `count`, `first` and `identities_file` override it (command line)."""
    data = load_toml(path)
    sw, dc, dns, tls = (
        section(data, "swarm"),
        section(data, "dc"),
        section(data, "dns"),
        section(data, "tls"),
    )
    name = sw.text("name", what="a short name like mn2")
    template = sw.text("fqdn", what='a name pattern like "s{i}.swarm.ntm.example.com"')
    if template.count(PLACEHOLDER) != 1:
        raise ConfigError(
            f"[swarm] fqdn = {template!r} must contain {PLACEHOLDER} exactly once (the "
            'identity number), like "s{i}.swarm.ntm.example.com"'
        )
    if why := check_fqdn(template.replace(PLACEHOLDER, "0")):
        raise ConfigError(f"[swarm] fqdn = {template!r} does not give valid names: {why}")
    # The file's values are read (and checked) even when the command line overrides them.
    n, i0 = sw.integer("count", 50, 1, 10000), sw.integer("first", 0, 0, 1_000_000)
    n, i0 = n if count is None else count, i0 if first is None else first
    if not 1 <= n <= 10000 or i0 < 0:
        raise ConfigError(f"--count {n} / --first {i0}: count is 1..10000, first is >= 0")
    port = sw.integer("tunnel_port", 7400, 1, 65535)
    if port + n - 1 > 65535:
        raise ConfigError(
            f"[swarm] tunnel_port = {port} with {n} identities runs past 65535; lower it"
        )
    prefix = sw.text("tun_prefix", "ntms")
    if len(prefix) + len(str(i0 + n - 1)) > IFNAME_MAX:
        raise ConfigError(
            f"[swarm] tun_prefix = {prefix!r}: {prefix}{i0 + n - 1} is longer than "
            f"{IFNAME_MAX} characters; use a shorter prefix"
        )
    table = sw.integer("route_table", 1000, FIRST_FREE_TABLE, 2**31 - 1 - n)
    nat_timeout = sw.number("nat_timeout", 30.0, lo=2.0)
    ids_file = sw.text("identities_file", f"/run/ntm/{name}.json")
    listen = _listen(dns.text("listen", "127.0.0.53:53"))
    swarm_dns = SwarmDns(
        listen=listen,
        upstreams=tuple(dns.ip_list("upstreams")),
        direction_timeout=dns.number("direction_timeout", 3.0, lo=0.1),
        upstream_timeout=dns.number("upstream_timeout", 2.0, lo=0.1),
    )
    node = NodeConfig(
        name=name,
        fqdn=template.replace(PLACEHOLDER, str(i0)),
        tunnel_port=port,
        tun_name=f"{prefix}{i0}",
        mtu=sw.integer("mtu", 1400, 576, 9000),
        mark=sw.text("mark", "ntm").lower(),
        key_file="",
        status_socket="",  # identities answer through the swarm's socket
        dc_addresses=tuple(dc.ip_list("addresses")),
        dc_port=dc.integer("port", 4433, 1, 65535),
        dc_server_name=dc.text("server_name", what="the name in the DC's certificate"),
        ca=tls.text("ca"),
        cert=tls.text("cert"),
        key=tls.text("key"),
        # Identities answer no DNS themselves (the swarm's one resolver does); the timeout
        # still bounds how long an identity waits for a new tunnel.
        dns=DnsConfig(
            enabled=False,
            listen=listen,
            upstreams=swarm_dns.upstreams,
            direction_timeout=swarm_dns.direction_timeout,
            upstream_timeout=swarm_dns.upstream_timeout,
            redirect=False,
        ),
        nat_timeout=nat_timeout,
        keepalive_interval=keepalive_for(nat_timeout),
        # Gateway failover as in [node] (docs/failover.md), but by default hundreds of
        # quiet paths are not probed: only a path with unanswered outbound data is.
        allowed_outage=sw.number("allowed_outage", 1.0, lo=0.01),
        switch_time_estimate=sw.number("switch_time_estimate", 0.3, lo=0.0),
        dead_after_losses=sw.integer("dead_after_losses", 8, 1, 64),
        failback_hold_down=sw.number("failback_hold_down", 60.0, lo=0.0),
        probe_idle_paths=sw.flag("probe_idle_paths", False),
    )
    if problem := node.liveness_timers().problem:
        raise ConfigError(f"[swarm] {problem}; raise allowed_outage or lower switch_time_estimate")
    cfg = SwarmConfig(
        name=name,
        fqdn_template=template,
        first=i0,
        count=n,
        tunnel_port=port,
        tun_prefix=prefix,
        route_table=table,
        rule_priority=sw.integer("rule_priority", 1000, 1, 32765),
        start_concurrency=sw.integer("start_concurrency", 20, 1, 1000),
        start_timeout=sw.number("start_timeout", 30.0, lo=1.0),
        key_dir=sw.text("key_dir", f"/var/lib/ntm/{name}"),
        status_socket=sw.text("status_socket", f"/run/ntm/swarm-{name}.sock"),
        identities_file=identities_file or ids_file,
        dns=swarm_dns,
        node=node,
    )
    for s in (sw, dc, dns, tls):
        s.check_unknown()
    if not node.dc_addresses:
        raise ConfigError("[dc] addresses is empty; list the DC's IPv4 and/or IPv6 addresses")
    if not swarm_dns.upstreams:
        raise ConfigError("[dns] upstreams is empty; list your recursive resolver(s)")
    for what, file in (("ca", node.ca), ("cert", node.cert), ("key", node.key)):
        if not Path(file).is_file():
            raise ConfigError(
                f"[tls] {what} = {file!r} does not exist; create it with `ntm pki` (README: PKI)"
            )
    check_certificate_names(cfg)
    return cfg


def check_certificate_names(cfg: SwarmConfig) -> None:
    """Every identity's name must be in the certificate: the DC refuses the others."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cfg.node.cert).read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = {d.lower() for d in san.get_values_for_type(x509.DNSName)}
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise ConfigError(
            f"[tls] cert = {cfg.node.cert!r}: cannot read its DNS names ({exc})"
        ) from None
    missing = [cfg.fqdn(i) for i in cfg.indices() if cfg.fqdn(i) not in names]
    if missing:
        raise ConfigError(
            f"{len(missing)} of {cfg.count} identities are not named in {cfg.node.cert} "
            f"(first: {missing[0]}; it names {len(names)}); lower --count/--first or issue a "
            'certificate that names them (lab/pki.toml: dns = ["s{0..255}.swarm.ntm.example.com"])'
        )


def _listen(value: str) -> tuple[str, int]:
    """'127.0.0.53:53', '[::1]:53' or a bare address (port 53)."""
    host, port = value, "53"
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else port
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"[dns] listen = {value!r}: bad port; write it like 127.0.0.53:53")
    return parse_ip(host, "[dns] listen"), int(port)
