"""The LB agent's configuration file (TOML), documented by example in lb_integration/example.toml.

Every check runs before the agent touches the kernel, so a bad file changes nothing. Errors
name the file, the LINE and the table they are about: tomllib keeps no positions, so
:class:`_Lines` finds the N-th ``[[service]]`` header (and its keys) in the raw text.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ntm_io.config import ConfigError, Section, expand

from .model import LbState, Protocol, RealServer, Scheduler, ServiceKey, VirtualService

T = TypeVar("T")
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

BACKENDS = ("auto", "ipvs", "nftables")
HEALTH_KINDS = ("tcp", "http", "udp", "none")
ON_FAILURE = ("remove", "weight0")
MAX_WEIGHT = 65535  # IPVS keeps weights in a signed 32-bit field; keep them sane


@dataclasses.dataclass(frozen=True)
class HealthCheck:
    kind: str  # tcp | http | udp | none
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 2
    port: int | None = None  # None: the real server's own port
    path: str = "/"  # http
    expect_status: int = 200  # http
    expect: str = ""  # http: body substring; udp: reply substring ("" = any reply)
    payload: str = "ping\n"  # udp
    on_failure: str = "remove"  # remove | weight0

    @property
    def detection_s(self) -> float:
        """Worst case from failure to action: `fall` failed checks, the last one timing out."""
        return round(self.interval * self.fall + self.timeout, 3)

    @property
    def recovery_s(self) -> float:
        return round(self.interval * self.rise + self.timeout, 3)


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    name: str
    service: VirtualService
    health: HealthCheck
    line: int
    scheduler_line: int = 0  # for errors found later (a backend that lacks the scheduler)


@dataclasses.dataclass(frozen=True)
class ClaimsConfig:
    listen: str
    port: int
    ca: str
    cert: str
    key: str
    vip_networks: tuple[IpNetwork, ...]
    next_hop_networks: tuple[IpNetwork, ...]  # empty: any unicast next hop of the vIP's family
    interface: str | None  # return routes leave through this interface
    table: int
    max_lifetime: int


@dataclasses.dataclass(frozen=True)
class LbConfig:
    path: str
    name: str
    status_socket: str
    backend: str
    nft_table: str
    nft_lc_fallback: bool
    services: tuple[ServiceConfig, ...]
    claims: ClaimsConfig | None

    def desired(self) -> LbState:
        return LbState(tuple(s.service for s in self.services))

    def service_line(self, key: ServiceKey) -> int:
        return next((s.line for s in self.services if s.service.key == key), 0)


# ---------------------------------------------------------------- line numbers

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


@dataclasses.dataclass
class _Span:
    path: tuple[str | int, ...]  # ("service", 1, "real", 0) = the 2nd service's 1st real
    start: int  # 1-based line of the header (0 for the root table)
    end: int  # first line after the span


class _Lines:
    """Where each table instance and key sits in the raw TOML text (best effort)."""

    def __init__(self, text: str) -> None:
        self.spans: list[_Span] = []
        counts: dict[tuple[str | int, ...], int] = {}
        current_service = -1
        lines = text.splitlines()
        headers: list[tuple[int, tuple[str | int, ...]]] = [(0, ())]
        for no, raw in enumerate(lines, start=1):
            m = _HEADER.match(raw)
            if not m:
                continue
            parts = [p.strip().strip("\"'") for p in m.group(2).split(".")]
            if m.group(1) == "[[" and parts == ["service"]:
                current_service += 1
                path: tuple[str | int, ...] = ("service", current_service)
            elif parts[:1] == ["service"] and len(parts) > 1:
                sub = tuple(parts[1:])
                path = ("service", current_service, *sub)
                if m.group(1) == "[[":
                    k = ("service", current_service, *sub)
                    counts[k] = counts.get(k, -1) + 1
                    path = (*k, counts[k])
            else:
                path = tuple(parts)
            headers.append((no, path))
        for i, (start, path) in enumerate(headers):
            end = headers[i + 1][0] if i + 1 < len(headers) else len(lines) + 1
            self.spans.append(_Span(path, start, end))
        self._lines = lines

    def table(self, path: tuple[str | int, ...]) -> int:
        for span in self.spans:
            if span.path == path:
                return span.start
        # e.g. an inline table: fall back to the nearest enclosing table we know
        return self.table(path[:-1]) if path else 0

    def key(self, path: tuple[str | int, ...], key: str) -> int:
        for span in self.spans:
            if span.path != path:
                continue
            for no in range(max(span.start, 1), span.end):
                m = _KEY.match(self._lines[no - 1])
                if m and m.group(1) == key:
                    return no
        return self.table(path)


class _Table:
    """A Section that knows its line numbers: every error says FILE:LINE: [table] ..."""

    def __init__(
        self, data: Any, path: tuple[str | int, ...], title: str, file: str, lines: _Lines
    ) -> None:
        self.path, self.title, self.file, self.lines = path, title, file, lines
        if not isinstance(data, dict):
            self.fail(f"{title} must be a table, not {type(data).__name__}; write it as {title}")
        self.data: dict[str, Any] = data
        self.section = Section(data, title.strip("[]"))

    def at(self, key: str | None = None) -> str:
        line = self.lines.table(self.path) if key is None else self.lines.key(self.path, key)
        return f"{self.file}:{line}" if line else self.file

    def fail(self, message: str, key: str | None = None) -> Any:
        raise ConfigError(f"{self.at(key)}: {self.title}: {message}")

    def get(self, key: str, getter: Callable[[Section], T]) -> T:
        try:
            return getter(self.section)
        except ConfigError as exc:
            # Section's message already names [table] and the key; add the location.
            raise ConfigError(f"{self.at(key if key in self.data else None)}: {exc}") from None

    def check_unknown(self, allowed_subtables: tuple[str, ...] = ()) -> None:
        unknown = sorted(set(self.data) - self.section._used - set(allowed_subtables))
        if unknown:
            self.fail(
                f"unknown key(s) {', '.join(unknown)}; check the spelling against "
                "lb_integration/example.toml",
                unknown[0],
            )


# ---------------------------------------------------------------- loading


def load(path: str | Path, *, check_interfaces: bool = True) -> LbConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file; pass --config with an existing TOML file") from None
    return parse(text, str(p), check_interfaces=check_interfaces)


def parse(text: str, file: str = "<config>", *, check_interfaces: bool = True) -> LbConfig:
    import tomllib

    try:
        data = expand(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML ({exc}); fix the syntax at that spot") from None
    lines = _Lines(text)
    root = _Table(data, (), "the file", file, lines)
    root.section._used.update({"agent", "service", "claims"})
    root.check_unknown()

    agent = _Table(data.get("agent", {}), ("agent",), "[agent]", file, lines)
    name = agent.get("name", lambda s: s.text("name", what="a short name like lb1"))
    backend = agent.get("backend", lambda s: s.text("backend", "auto"))
    if backend not in BACKENDS:
        agent.fail(f"backend = {backend!r} is unknown; use one of {', '.join(BACKENDS)}", "backend")
    cfg_status = agent.get(
        "status_socket", lambda s: s.text("status_socket", f"/run/ntm/lb-{name}.sock")
    )
    nft_table = agent.get("nft_table", lambda s: s.text("nft_table", "ntm_lb"))
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,30}", nft_table):
        agent.fail(f"nft_table = {nft_table!r}: use letters, digits and _ only", "nft_table")
    lc_fallback = agent.get("nft_lc_fallback", lambda s: s.flag("nft_lc_fallback", False))
    agent.check_unknown()

    raw_services = data.get("service", [])
    if not isinstance(raw_services, list):
        root.fail("service must be an array of tables: write each one as [[service]]", None)
    services: list[ServiceConfig] = []
    seen: dict[ServiceKey, int] = {}
    names: dict[str, int] = {}
    for i, raw in enumerate(raw_services):
        svc = _service(raw, i, file, lines)
        if svc.service.key in seen:
            k = svc.service.key
            raise ConfigError(
                f"{file}:{svc.line}: [[service]] {svc.name!r}: {k.protocol.value} "
                f"{_hostport(k.address, k.port)} is already defined at line {seen[k]}; "
                "merge the two or change the address, port or protocol"
            )
        if svc.name in names:
            raise ConfigError(
                f"{file}:{svc.line}: [[service]] name {svc.name!r} is already used at line "
                f"{names[svc.name]}; give every service its own name"
            )
        seen[svc.service.key] = svc.line
        names[svc.name] = svc.line
        services.append(svc)

    claims = None
    if "claims" in data:
        claims = _claims(_Table(data["claims"], ("claims",), "[claims]", file, lines))
        if check_interfaces and claims.interface is not None:
            try:
                socket.if_nametoindex(claims.interface)
            except OSError:
                raise ConfigError(
                    f"{file}:{lines.key(('claims',), 'interface')}: [claims]: interface "
                    f"{claims.interface!r} does not exist on this host; name the interface "
                    "that faces the NTMAs (see `ip link`)"
                ) from None
    return LbConfig(
        path=file,
        name=name,
        status_socket=cfg_status,
        backend=backend,
        nft_table=nft_table,
        nft_lc_fallback=lc_fallback,
        services=tuple(services),
        claims=claims,
    )


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _ip(
    table: _Table, key: str, default: Any = None
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    value = table.get(key, lambda s: s.text(key, default, "an IP address"))
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return table.fail(  # type: ignore[no-any-return]
            f"{key} = {value!r} is not an IP address; write it like 192.0.2.10 or 2001:db8::10",
            key,
        )


def _service(raw: Any, index: int, file: str, lines: _Lines) -> ServiceConfig:
    path: tuple[str | int, ...] = ("service", index)
    t = _Table(raw, path, f"[[service]] #{index + 1}", file, lines)
    name = t.get("name", lambda s: s.text("name", what="a short name like www"))
    t.title = f"[[service]] {name!r}"
    address = _ip(t, "address")
    port = t.get("port", lambda s: s.integer("port", None, 1, 65535))
    proto_text = t.get("protocol", lambda s: s.text("protocol", "tcp"))
    try:
        protocol = Protocol(proto_text)
    except ValueError:
        t.fail(f"protocol = {proto_text!r} is unknown; use tcp or udp", "protocol")
    sched_text = t.get("scheduler", lambda s: s.text("scheduler", "rr"))
    try:
        scheduler = Scheduler(sched_text)
    except ValueError:
        t.fail(
            f"scheduler = {sched_text!r} is unknown; use one of "
            f"{', '.join(s.value for s in Scheduler)}",
            "scheduler",
        )
    persistence = t.get("persistence", lambda s: s.integer("persistence", 0, 0, 31 * 86400))
    mask_text = t.get("persistence_netmask", lambda s: s.opt_text("persistence_netmask"))
    netmask = _netmask(t, address.version, persistence, mask_text)

    raw_reals = t.data.get("real", [])
    if not isinstance(raw_reals, list) or not raw_reals:
        t.fail("has no real servers; add at least one [[service.real]] with address and port")
    reals: list[RealServer] = []
    seen: dict[tuple[str, int], int] = {}
    for j, raw_real in enumerate(raw_reals):
        r = _Table(raw_real, (*path, "real", j), f"{t.title} real #{j + 1}", file, lines)
        r_addr = _ip(r, "address")
        if r_addr.version != address.version:
            r.fail(
                f"address {r_addr} is IPv{r_addr.version} but the service address {address} is "
                f"IPv{address.version}; NAT forwarding cannot change the family, so give an "
                f"IPv{address.version} real server (or a separate IPv{r_addr.version} service)",
                "address",
            )
        r_port = r.get("port", lambda s: s.integer("port", port, 1, 65535))
        weight = r.get("weight", lambda s: s.integer("weight", 1, 0, MAX_WEIGHT))
        r.check_unknown()
        rk = (str(r_addr), r_port)
        if rk in seen:
            r.fail(
                f"{_hostport(*rk)} is listed twice (first at line {seen[rk]}); keep one entry",
                "address",
            )
        seen[rk] = lines.table((*path, "real", j))
        reals.append(RealServer(str(r_addr), r_port, weight))

    health = _health(t, protocol, file, lines)
    t.check_unknown(("real", "health"))
    service = VirtualService(
        key=ServiceKey(str(address), port, protocol),
        scheduler=scheduler,
        persistence=persistence or None,
        persistence_netmask=netmask,
        reals=tuple(reals),
    )
    return ServiceConfig(name, service, health, lines.table(path), lines.key(path, "scheduler"))


def _netmask(t: _Table, version: int, persistence: int, text: str | None) -> str | None:
    """Normalise to the model's form: IPv4 dotted ("255.255.255.0"), IPv6 "/64"."""
    if not persistence:
        if text is not None:
            t.fail(
                "persistence_netmask is set but persistence is not; set persistence = "
                "SECONDS or drop the netmask",
                "persistence_netmask",
            )
        return None
    bits = 32 if version == 4 else 128
    if text is None:
        prefix = bits
    else:
        try:
            prefix = (
                int(text[1:])
                if text.startswith("/")
                else ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen
            )
            if version == 6 and not text.startswith("/"):
                raise ValueError
            if not 1 <= prefix <= bits:
                raise ValueError
        except ValueError:
            example = "255.255.255.0 or /24" if version == 4 else "/64"
            return t.fail(  # type: ignore[no-any-return]
                f"persistence_netmask = {text!r} is not a netmask for an IPv{version} service; "
                f"write it like {example}",
                "persistence_netmask",
            )
    if version == 4:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)
    return f"/{prefix}"


def _health(svc: _Table, protocol: Protocol, file: str, lines: _Lines) -> HealthCheck:
    raw = svc.data.get("health")
    if raw is None:
        # No [service.health]: check the port with the protocol's own kind, except UDP,
        # where only a reply proves life and we do not know what to send: say so.
        if protocol is Protocol.UDP:
            svc.fail(
                'a UDP service needs [service.health] with kind = "udp", payload and expect '
                '(a UDP check must get a reply; silence is not health), or kind = "none"'
            )
        return HealthCheck(kind="tcp")
    h = _Table(raw, (*svc.path, "health"), f"{svc.title} health", file, lines)
    kind = h.get("kind", lambda s: s.text("kind", "tcp" if protocol is Protocol.TCP else None))
    if kind not in HEALTH_KINDS:
        h.fail(f"kind = {kind!r} is unknown; use one of {', '.join(HEALTH_KINDS)}", "kind")
    if protocol is Protocol.UDP and kind in ("tcp", "http"):
        h.fail(f'kind = {kind!r} cannot check a UDP service; use kind = "udp"', "kind")
    if protocol is Protocol.TCP and kind == "udp":
        h.fail('kind = "udp" cannot check a TCP service; use "tcp" or "http"', "kind")
    interval = h.get("interval", lambda s: s.number("interval", 2.0, 0.05))
    timeout = h.get("timeout", lambda s: s.number("timeout", min(1.0, interval), 0.01))
    if timeout > interval:
        h.fail(
            f"timeout = {timeout:g} is longer than interval = {interval:g}; checks would "
            "overlap: make the timeout at most the interval",
            "timeout",
        )
    on_failure = h.get("on_failure", lambda s: s.text("on_failure", "remove"))
    if on_failure not in ON_FAILURE:
        h.fail(f"on_failure = {on_failure!r} is unknown; use remove or weight0", "on_failure")
    check = HealthCheck(
        kind=kind,
        interval=interval,
        timeout=timeout,
        rise=h.get("rise", lambda s: s.integer("rise", 2, 1, 100)),
        fall=h.get("fall", lambda s: s.integer("fall", 2, 1, 100)),
        port=h.get("port", lambda s: s.integer("port", 0, 0, 65535)) or None,
        path=h.get("path", lambda s: s.text("path", "/")),
        expect_status=h.get("expect_status", lambda s: s.integer("expect_status", 200, 100, 599)),
        expect=h.get("expect", lambda s: s.text("expect", "")),
        payload=h.get("payload", lambda s: s.text("payload", "ping\n")),
        on_failure=on_failure,
    )
    if kind == "http" and not check.path.startswith("/"):
        h.fail(f"path = {check.path!r} must start with /", "path")
    if kind == "udp" and not check.payload:
        h.fail("payload is empty; a UDP check must send something the server answers", "payload")
    h.check_unknown()
    return check


def _claims(t: _Table) -> ClaimsConfig:
    def nets(key: str, default: Any) -> tuple[IpNetwork, ...]:
        out = []
        for text in t.get(key, lambda s: s.texts(key, default)):
            try:
                out.append(ipaddress.ip_network(text))
            except ValueError:
                t.fail(
                    f"{key}: {text!r} is not a network; write it like 100.64.0.0/10 with the "
                    "host bits zero",
                    key,
                )
        return tuple(out)

    listen = str(_ip(t, "listen", "0.0.0.0"))
    vip_networks = nets("vip_networks", None)
    if not vip_networks:
        t.fail("vip_networks is empty; list the vIP pools of your DCs (e.g. 100.64.0.0/10)")
    cfg = ClaimsConfig(
        listen=listen,
        port=t.get("port", lambda s: s.integer("port", 4434, 1, 65535)),
        ca=t.get("ca", lambda s: s.text("ca", what="the lab CA certificate (ca.pem)")),
        cert=t.get("cert", lambda s: s.text("cert", what="this agent's certificate")),
        key=t.get("key", lambda s: s.text("key", what="this agent's private key")),
        vip_networks=vip_networks,
        next_hop_networks=nets("next_hop_networks", []),
        interface=t.get("interface", lambda s: s.opt_text("interface")),
        table=t.get("table", lambda s: s.integer("table", 254, 1, 2**31 - 1)),
        max_lifetime=t.get("max_lifetime", lambda s: s.integer("max_lifetime", 120, 5, 86400)),
    )
    t.check_unknown()
    for what in ("ca", "cert", "key"):
        if not Path(getattr(cfg, what)).is_file():
            t.fail(
                f"{what} = {getattr(cfg, what)!r} does not exist; create it with `ntm pki` "
                "(the agent needs a certificate from the lab CA)",
                what,
            )
    return cfg
