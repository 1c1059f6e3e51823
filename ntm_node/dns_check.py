"""``ntm dns check NAME``: how does NAME resolve for NTMobile, and is every piece in place?

The check walks what a node and its DC depend on, in order:

1. the resolver's answer for ``NAME A`` and its CNAME chain;
2. whether the chain reaches a marked FQDN (then a node intercepts; otherwise it passes
   through);
3. the marked zone's NS records and the NS names' addresses, through the same resolver;
4. each DC's own answer for the marked name (asked directly, RD=0): is it authoritative, is
   the node registered (A/AAAA present) or unknown (NXDOMAIN)?

Every problem found is one line saying what is wrong and how to fix it; the report is
consistent (exit 0) when there is none.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

from dnslib import CLASS, EDNS0, QTYPE, RCODE, DNSRecord

from ntm_io.config import ConfigError
from ntm_node.dns_intercept import cname_chain, find_marked_target
from ntm_node.dns_server import Address, exchange
from ntm_proto.marker import MarkerError, MarkerRule, normalize_fqdn

__all__ = [
    "CheckReport",
    "DcReport",
    "check_name",
    "default_resolver",
    "format_text",
    "parse_address",
]

VIP_RANGE = ipaddress.ip_network("100.64.0.0/10")


def parse_address(text: str, default_port: int = 53) -> Address:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address -> (ip, port)."""
    t = text.strip()
    host, port = t, default_port
    if t.startswith("["):
        end = t.find("]")
        host = t[1:end] if end > 0 else ""
        rest = t[end + 1 :] if end > 0 else ""
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                host = ""
            else:
                port = int(rest[1:])
    elif t.count(":") == 1:
        host, _, p = t.partition(":")
        port = int(p) if p.isdigit() else -1
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise ConfigError(
            f"{text!r} is not a resolver address; write it as an IP address, optionally with a "
            "port: 192.0.2.53, 192.0.2.53:5353 or [2001:db8::53]:53"
        ) from None
    if not 0 < port < 65536:
        raise ConfigError(f"{text!r}: the port must be 1..65535")
    return host, port


def default_resolver(path: str = "/etc/resolv.conf") -> Address:
    """The first ``nameserver`` of resolv.conf, port 53."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    return parse_address(words[1])
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror}); pass --resolver ADDR") from None
    raise ConfigError(f"{path} lists no nameserver; pass --resolver ADDR")


@dataclass
class DcReport:
    """One DC address asked directly for the marked name."""

    ns_name: str
    address: str
    port: int
    answered: bool = False
    authoritative: bool = False
    rcode: str | None = None
    a: list[str] = field(default_factory=list)
    aaaa: list[str] = field(default_factory=list)

    @property
    def registered(self) -> bool:
        return bool(self.a or self.aaaa)


@dataclass
class CheckReport:
    name: str
    resolver: str
    mark: str
    rcode: str | None = None
    chain: list[str] = field(default_factory=list)  # "a CNAME b", then "b A x" lines
    addresses: list[str] = field(default_factory=list)
    marked: str | None = None
    zone: str | None = None
    ns: dict[str, list[str]] = field(default_factory=dict)
    dcs: list[DcReport] = field(default_factory=list)
    action: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for dc, src in zip(d["dcs"], self.dcs, strict=True):
            dc["registered"] = src.registered
        d["ok"] = self.ok
        return d


def _rcode(rec: DNSRecord) -> str:
    return str(RCODE.get(rec.header.rcode, str(rec.header.rcode)))


def _name(label: Any) -> str:
    return str(label).rstrip(".").lower()


async def _ask(
    server: Address, qname: str, qtype: str, timeout: float, *, rd: bool = True
) -> DNSRecord | None:
    q = DNSRecord.question(qname, qtype)
    q.header.id = secrets.randbelow(65536)  # unpredictable, like any resolver client
    q.header.rd = int(rd)
    q.add_ar(EDNS0(udp_len=1232))
    ans = await exchange(bytes(q.pack()), q, [server], timeout, client_tcp=False, udp_limit=65535)
    return None if ans is None else ans.record


def _fmt(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def check_name(
    name: str,
    resolver: Address,
    marker: MarkerRule | None = None,
    *,
    dc_port: int = 53,
    timeout: float = 2.0,
) -> CheckReport:
    """Diagnose ``name`` (raises MarkerError when it is not a valid DNS name)."""
    rule = marker or MarkerRule()
    fqdn = normalize_fqdn(name)
    rep = CheckReport(name=fqdn, resolver=_fmt(resolver), mark=rule.label)

    rec = await _ask(resolver, fqdn, "A", timeout)
    if rec is None:
        rep.action = "unknown: the resolver did not answer"
        rep.problems.append(
            f"resolver {rep.resolver} did not answer {fqdn} A within {timeout:g} s: check that "
            "it runs and is reachable, or pass --resolver ADDR"
        )
        return rep
    rep.rcode = _rcode(rec)
    chain = cname_chain(rec)
    rep.chain = [f"{_name(rr.rname)} CNAME {_name(rr.rdata.label)}" for rr in chain.records]
    last = chain.names[-1]
    for rr in rec.rr:
        if rr.rtype == QTYPE.A and rr.rclass == CLASS.IN and _name(rr.rname) == last.lower():
            rep.addresses.append(str(rr.rdata))
            rep.chain.append(f"{last.lower()} A {rr.rdata}")
    if chain.broken:
        rep.problems.append(
            f"the CNAME chain of {fqdn} loops or is longer than 16 names: fix the CNAME records "
            "so the chain ends at a name with an address"
        )
    target = find_marked_target(rec, rule)
    for n in chain.names:
        try:
            if rule.is_zone_apex(n) and not rule.is_marked(n):
                rep.notes.append(
                    f"{n} is an NTM zone apex, not a node name: point the CNAME "
                    f"at a node name such as <node>.{n}"
                )
        except MarkerError:
            pass

    if target is None:
        rep.action = "pass through: not an NTMobile name"
        if rep.rcode == "NXDOMAIN":
            rep.problems.append(
                f"{fqdn} does not exist (NXDOMAIN): check the spelling or add "
                "the record to its zone"
            )
        elif rep.rcode != "NOERROR":
            rep.problems.append(
                f"the resolver answered {rep.rcode} for {fqdn}: check the "
                "resolver and the name's authoritative servers"
            )
        return rep

    rep.marked = target
    rep.zone = zone = rule.zone_of(target)
    assert zone is not None  # target is marked, so it has a zone
    if any(ipaddress.ip_address(a) in VIP_RANGE for a in rep.addresses):
        rep.notes.append(
            f"the resolver answered {target} with a vIP ({', '.join(rep.addresses)})"
            ": it is an NTM node's stub resolver, already intercepting; pass "
            "--resolver with the real resolver to check plain DNS"
        )

    await _check_delegation(rep, resolver, zone, timeout)
    for ns_name, addrs in rep.ns.items():
        reports = [await _ask_dc(ns_name, a, dc_port, target, timeout) for a in addrs]
        rep.dcs.extend(reports)
        _judge_dc(rep, ns_name, reports, target, zone, dc_port)

    who = f"DC {', '.join(rep.ns)}" if rep.ns else f"the DC of {zone}"
    if rep.rcode == "NOERROR":
        rep.action = f"intercept: ask {who} for directions, answer with the peer's vIP"
    else:
        rep.action = (
            f"pass through: {target} is an NTMobile name but the resolver answered "
            f"{rep.rcode}, so there is nothing to direct"
        )
        if any(d.registered for d in rep.dcs):
            rep.problems.append(
                f"the resolver answers {rep.rcode} for {target} but its DC has addresses for it:"
                " the resolver holds an old negative answer or does not reach the DC; flush its "
                "cache and check the delegation"
            )
        elif not rep.dcs:
            rep.problems.append(
                f"the resolver answered {rep.rcode} for {target}; see the delegation problems above"
            )
    return rep


async def _check_delegation(rep: CheckReport, resolver: Address, zone: str, timeout: float) -> None:
    fix_ns = (
        f"delegate it to your DC: `{zone}. NS dc1.{zone}.` plus glue "
        f"`dc1.{zone}. A <DC address>` in the parent zone"
    )
    rec = await _ask(resolver, zone, "NS", timeout)
    if rec is None:
        rep.problems.append(
            f"the resolver did not answer {zone} NS within {timeout:g} s: "
            "check the resolver, then the delegation of the zone"
        )
        return
    ns_names = [
        _name(rr.rdata.label) for rr in rec.rr if rr.rtype == QTYPE.NS and _name(rr.rname) == zone
    ]
    if not ns_names:
        rep.problems.append(f"{zone} has no NS records ({_rcode(rec)}): {fix_ns}")
        return
    glue: dict[str, list[str]] = {}
    for rr in rec.ar:
        if rr.rtype in (QTYPE.A, QTYPE.AAAA):
            glue.setdefault(_name(rr.rname), []).append(str(rr.rdata))
    for ns in ns_names:
        addrs = list(glue.get(ns, []))
        if not addrs:
            for qtype in ("A", "AAAA"):
                r = await _ask(resolver, ns, qtype, timeout)
                if r is not None:
                    addrs += [
                        str(rr.rdata)
                        for rr in r.rr
                        if rr.rtype == getattr(QTYPE, qtype) and _name(rr.rname) == ns
                    ]
        rep.ns[ns] = addrs
        if not addrs:
            where = "glue in the parent zone" if ns.endswith("." + zone) else "its zone"
            rep.problems.append(
                f"NS {ns} of {zone} has no address: add `{ns}. A <DC address>` ({where})"
            )


async def _ask_dc(ns_name: str, address: str, port: int, target: str, timeout: float) -> DcReport:
    dc = DcReport(ns_name=ns_name, address=address, port=port)
    for qtype in ("A", "AAAA"):
        rec = await _ask((address, port), target, qtype, timeout, rd=False)
        if rec is None:  # down, filtered, or an address family this host lacks
            continue
        dc.answered = True
        dc.authoritative = bool(rec.header.aa)
        dc.rcode = _rcode(rec)
        want = getattr(QTYPE, qtype)
        vals = [str(rr.rdata) for rr in rec.rr if rr.rtype == want and _name(rr.rname) == target]
        (dc.a if qtype == "A" else dc.aaaa).extend(vals)
    return dc


def _judge_dc(
    rep: CheckReport, ns: str, reports: list[DcReport], target: str, zone: str, port: int
) -> None:
    answered = [d for d in reports if d.answered]
    if not answered:
        if reports:
            where = ", ".join(_fmt((d.address, d.port)) for d in reports)
            rep.problems.append(
                f"DC {ns} did not answer at {where}: check that `ntm dc` runs "
                f"there and that {port}/udp is open"
            )
        return
    for d in reports:
        if not d.answered:
            rep.notes.append(
                f"DC {ns} did not answer at {_fmt((d.address, d.port))} (another "
                "address did; this host may lack that address family)"
            )
    d = answered[0]
    at = f"DC {ns} ({_fmt((d.address, d.port))})"
    if d.rcode == "REFUSED":
        rep.problems.append(
            f"{at} refuses {target}: it does not serve {zone}; set the DC's "
            f"zone to {zone} or fix the NS record"
        )
    elif not d.authoritative:
        rep.problems.append(
            f"{at} answered without the AA flag, so it is not authoritative for "
            f"{zone}: point the NS record at the DC itself"
        )
    elif d.rcode == "NXDOMAIN":
        rep.problems.append(
            f"{target} is not registered at {at} (NXDOMAIN): run `ntm node` on "
            f"the host that should be {target}, with a certificate naming it, "
            "and check its log for the registration"
        )
    elif d.rcode != "NOERROR":
        rep.problems.append(f"{at} answered {d.rcode} for {target}: check the DC's log")
    elif not d.registered:
        rep.problems.append(
            f"{at} knows {target} but has no A/AAAA for it: the node registered "
            "no public address; check its config and its DC log"
        )


def format_text(rep: CheckReport) -> str:
    lines = [
        f"name:      {rep.name}",
        f"resolver:  {rep.resolver}",
        f"answer:    {rep.rcode or 'none'}",
    ]
    for i, link in enumerate(rep.chain or ["(no records)"]):
        lines.append(("chain:     " if i == 0 else "           ") + link)
    if rep.marked:
        lines.append(f"marked:    {rep.marked} (mark {rep.mark!r}, zone {rep.zone})")
    elif rep.rcode is None:
        lines.append("marked:    unknown (no answer to follow)")
    else:
        lines.append(f"marked:    no (no name on the chain has a {rep.mark!r} label)")
    for ns, addrs in rep.ns.items():
        lines.append(f"zone NS:   {ns} -> {', '.join(addrs) or 'no address'}")
    for d in rep.dcs:
        at = f"DC {d.ns_name} ({_fmt((d.address, d.port))}): "
        if not d.answered:
            lines.append(at + "no answer")
            continue
        auth = "authoritative" if d.authoritative else "NOT authoritative"
        reg = (
            f"{rep.marked} registered ("
            + "; ".join(
                x
                for x in (", ".join(f"A {a}" for a in d.a), ", ".join(f"AAAA {a}" for a in d.aaaa))
                if x
            )
            + ")"
            if d.registered
            else f"{rep.marked} not registered ({d.rcode}, no addresses)"
        )
        lines.append(at + f"{auth}, {reg}")
    lines.append(f"node:      {rep.action}")
    lines += [f"note:      {n}" for n in rep.notes]
    lines += [f"problem:   {p}" for p in rep.problems]
    lines.append("result:    OK" if rep.ok else f"result:    {len(rep.problems)} problem(s)")
    return "\n".join(lines)
