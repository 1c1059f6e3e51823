"""The node's configuration file (TOML), documented by example in lab/config/mn1.toml."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

from ntm_io.config import ConfigError, Section, load_toml, parse_ip, section
from ntm_proto.liveness import LivenessTimers
from ntm_proto.messages import check_fqdn


@dataclasses.dataclass(frozen=True)
class DnsConfig:
    enabled: bool
    listen: tuple[str, int]
    upstreams: tuple[str, ...]
    direction_timeout: float
    upstream_timeout: float
    redirect: bool  # catch port 53 transparently with nftables


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    name: str
    fqdn: str
    tunnel_port: int
    tun_name: str
    mtu: int
    mark: str
    key_file: str
    status_socket: str
    dc_addresses: tuple[str, ...]
    dc_port: int
    dc_server_name: str
    ca: str
    cert: str
    key: str
    dns: DnsConfig
    nat_timeout: float  # the shortest UDP mapping lifetime of NATs on the way
    keepalive_interval: float  # derived: a quiet path says something before NATs forget it
    # One tunnel socket per address instead of the wildcard (a host with several uplinks).
    tunnel_addresses: tuple[str, ...] = ()
    # Keep every path ready on each tunnel address, preferred in the order listed, and move
    # traffic between them make-before-break (ntm_node/multihome.py).
    make_before_break: bool = False
    standby_interval: float = 1.0  # s between standby probes on each unused leg
    # Gateway failover (docs/failover.md): every timer derives from allowed_outage.
    allowed_outage: float = 1.0  # A, seconds
    switch_time_estimate: float = 0.3  # C until the node has measured its own
    dead_after_losses: int = 8  # K
    failback_hold_down: float = 60.0
    # False: probe only paths with unanswered outbound data (docs/failover.md, a swarm)
    probe_idle_paths: bool = True

    def liveness_timers(self) -> LivenessTimers:
        """The failover timers with the configured estimate of the switch time."""
        return LivenessTimers(
            allowed_outage=self.allowed_outage,
            switch_time=self.switch_time_estimate,
            dead_after_losses=self.dead_after_losses,
            failback_hold_down=self.failback_hold_down,
        )


def load(path: str | Path) -> NodeConfig:
    data = load_toml(path)
    node, dc, dns, tls = (
        section(data, "node"),
        section(data, "dc"),
        section(data, "dns", required=False),
        section(data, "tls"),
    )
    name = node.text("name", what="a short name like mn1")
    fqdn = node.text("fqdn", what="this node's NTMobile name, like mn1.ntm.example.com")
    if why := check_fqdn(fqdn):
        raise ConfigError(f"[node] fqdn = {fqdn!r} is not a valid name: {why}")
    tun_name = node.text("tun_name", "ntm0")
    if not 1 <= len(tun_name) <= 15:
        raise ConfigError(f"[node] tun_name = {tun_name!r}: interface names are 1..15 characters")
    cfg = NodeConfig(
        name=name,
        fqdn=fqdn,
        tunnel_port=node.integer("tunnel_port", 7400, 1, 65535),
        tun_name=tun_name,
        mtu=node.integer("mtu", 1400, 576, 9000),
        mark=node.text("mark", "ntm").lower(),
        key_file=node.text("key_file", f"/var/lib/ntm/{name}.x25519"),
        status_socket=node.text("status_socket", f"/run/ntm/node-{name}.sock"),
        nat_timeout=(nat := node.number("nat_timeout", 30.0, lo=2.0)),
        keepalive_interval=keepalive_for(nat),
        tunnel_addresses=_tunnel_addresses(node),
        make_before_break=node.flag("make_before_break", False),
        standby_interval=node.number("standby_interval", 1.0, lo=0.05),
        allowed_outage=node.number("allowed_outage", 1.0, lo=0.01),
        switch_time_estimate=node.number("switch_time_estimate", 0.3, lo=0.0),
        dead_after_losses=node.integer("dead_after_losses", 8, 1, 64),
        failback_hold_down=node.number("failback_hold_down", 60.0, lo=0.0),
        probe_idle_paths=node.flag("probe_idle_paths", True),
        dc_addresses=tuple(dc.ip_list("addresses")),
        dc_port=dc.integer("port", 4433, 1, 65535),
        dc_server_name=dc.text("server_name", what="the name in the DC's certificate"),
        ca=tls.text("ca"),
        cert=tls.text("cert"),
        key=tls.text("key"),
        dns=DnsConfig(
            enabled=dns.flag("enabled", True),
            listen=_hostport(dns.text("listen", "127.0.0.1:53"), 53),
            upstreams=tuple(dns.ip_list("upstreams", [])),
            direction_timeout=dns.number("direction_timeout", 3.0, lo=0.1),
            upstream_timeout=dns.number("upstream_timeout", 2.0, lo=0.1),
            redirect=dns.flag("redirect", False),
        ),
    )
    for s in (node, dc, dns, tls):
        s.check_unknown()
    if problem := cfg.liveness_timers().problem:
        raise ConfigError(
            f"[node] {problem}; raise allowed_outage, or lower switch_time_estimate if your "
            "paths build faster (ntm status shows the measured switch time)"
        )
    if cfg.make_before_break and len(cfg.tunnel_addresses) < 2:
        raise ConfigError(
            "[node] make_before_break = true needs two or more tunnel_addresses (one per "
            f"uplink, best first); it has {len(cfg.tunnel_addresses)}"
        )
    if cfg.standby_interval > cfg.keepalive_interval:
        raise ConfigError(
            f"[node] standby_interval = {cfg.standby_interval:g} s is longer than the "
            f"keepalive interval {cfg.keepalive_interval:g} s (from nat_timeout): a standby "
            "leg would lose its NAT binding; lower standby_interval"
        )
    if not cfg.dc_addresses:
        raise ConfigError("[dc] addresses is empty; list the DC's IPv4 and/or IPv6 addresses")
    if cfg.dns.enabled and not cfg.dns.upstreams:
        raise ConfigError(
            "[dns] upstreams is empty; list your recursive resolver(s), or set enabled = false"
        )
    if cfg.dns.redirect and not cfg.dns.listen[0].startswith("127."):
        raise ConfigError(
            '[dns] redirect = true needs the stub on a 127.x address (listen = "127.0.0.1:53"): '
            "the nftables redirect delivers to the loopback address"
        )
    for what, file in (("ca", cfg.ca), ("cert", cfg.cert), ("key", cfg.key)):
        if not Path(file).is_file():
            raise ConfigError(
                f"[tls] {what} = {file!r} does not exist; create it with `ntm pki` (README: PKI)"
            )
    return cfg


def _tunnel_addresses(node: Section) -> tuple[str, ...]:
    """[node] tunnel_addresses: unicast addresses of this host, each listed once."""
    out: list[str] = []
    for text in node.ip_list("tunnel_addresses", []):
        ip = ipaddress.ip_address(text)
        if ip.is_unspecified or ip.is_multicast or ip.is_link_local:
            raise ConfigError(
                f"[node] tunnel_addresses: {text} is not a usable unicast address; list this "
                "host's addresses on each uplink (or leave tunnel_addresses out for all)"
            )
        if text in out:
            raise ConfigError(f"[node] tunnel_addresses: {text} is listed twice; list it once")
        out.append(text)
    return tuple(out)


def _hostport(value: str, default_port: int) -> tuple[str, int]:
    """'127.0.0.1:53', '[::1]:53' or a bare address."""
    host, port = value, default_port
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
    elif value.count(":") == 1:
        host, _, p = value.partition(":")
        port = int(p) if p.isdigit() else -1
    if not 0 < port < 65536:
        raise ConfigError(f"[dns] listen {value!r}: bad port; write it like 127.0.0.1:53")
    return parse_ip(host, "[dns] listen"), port


def keepalive_for(nat_timeout: float) -> float:
    """Keepalive interval for a NAT mapping lifetime: two chances per lifetime, so one lost
    keepalive does not let the mapping expire. Sent only when the path is otherwise quiet."""
    return max(nat_timeout / 2.0 - 1.0, 1.0)
