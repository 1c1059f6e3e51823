"""The nftables backend: IPVS-like NAT load balancing for kernels without IPVS.

Modelled on kube-proxy's nftables mode. The agent owns one table (`inet ntm_lb`):

    chain prerouting  (nat, dstnat)      jump services       # clients arriving from outside
    chain output      (nat, -100)        jump services       # clients on the LB host itself
    chain services    ip  daddr . meta l4proto . th dport vmap @svc4
                      ip6 daddr . meta l4proto . th dport vmap @svc6
    chain svc-<h>     [affinity lookups] <scheduler> vmap { slot : goto ep-<h>-<r> } ; drop
    chain ep-<h>-<r>  [update @aff-<h>-<r>] dnat to REAL:PORT
    set   aff-<h>-<r> client addresses with a timeout (persistence)

Only the first packet of a connection traverses nat chains; conntrack carries the rest.
So rewriting rules never moves an established flow, and an apply is one `nft -f`
transaction (atomic). There is deliberately no SNAT/masquerade anywhere: the real server
must see the client's own address (the MN's vIP), and replies come back because the real
servers route via the LB (ip_forward on, their default route pointing at the LB).

What the table holds is read back from the kernel (`nft -j list table`): each service
chain ends in a rule whose comment states the service, each endpoint chain's dnat rule
carries its weight in a comment, and read() checks these against the map elements, the
dnat targets, the dispatch rule and the affinity sets. A service that does not verify is
left out of read(), so apply() rebuilds it.

Differences from IPVS (see slots.py for the slot tables):
- lc / wlc need live per-server connection counts, which nftables cannot consult; they
  are refused unless `[agent] nft_lc_fallback = true`, which uses rr / wrr instead.
- rr and wrr pick from a per-service counter (`numgen inc`), exactly like IPVS's rotation
  but restarted whenever the service's chain is rewritten.
- persistence is a per-real dynamic set refreshed at each new connection: a client sticks
  for `persistence` seconds after its last NEW connection (IPVS counts from when the
  template's last connection ends). A weight-0 or removed server's affinity is ignored, as
  with IPVS's expire_quiescent_template=1.
- sh/mh hash with jhash and a fixed seed (so restarts keep the mapping), not IPVS's hash
  functions: the same client may land on a different server than under IPVS.
- With no available server a new connection is dropped (IPVS also sends ICMP unreachable).
- Removing a real leaves its existing conntrack entries (IPVS with expire_nodest_conn=1
  drops them at once); for UDP services the backend deletes them via conntrack netlink.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import subprocess
from collections.abc import Sequence
from typing import Any

from ntm_io.config import ConfigError

from . import slots
from .model import LbState, Protocol, RealServer, Scheduler, ServiceKey, VirtualService
from .reconcile import (
    AddReal,
    AddService,
    DeleteReal,
    EditReal,
    EditService,
    Operation,
    canonical,
    diff,
    key_order,
    real_key,
)

log = logging.getLogger("ntm.lb.nft")

JHASH_SEED = 0x4E544D31  # fixed: a random per-rule seed would reshuffle clients on reload
AFFINITY_SIZE = 65536
NFT_TIMEOUT = 30.0
FALLBACK = {Scheduler.LC: Scheduler.RR, Scheduler.WLC: Scheduler.WRR}


class NftError(RuntimeError):
    """nft refused a command (the message carries its stderr)."""


def unsupported(state: LbState, lc_fallback: bool) -> list[str]:
    """Why `state` cannot be served by nftables (empty when it can)."""
    problems = []
    for s in state.services:
        if s.scheduler in FALLBACK and not lc_fallback:
            problems.append(
                f"service {_svc_text(s.key)}: scheduler {s.scheduler.value} balances by live "
                "connection counts, which nftables cannot see; run on a kernel with IPVS "
                f'(backend = "ipvs"), choose {FALLBACK[s.scheduler].value} instead, or set '
                f"[agent] nft_lc_fallback = true to use {FALLBACK[s.scheduler].value} for it"
            )
    return problems


def _svc_text(k: ServiceKey) -> str:
    host = f"[{k.address}]" if ":" in k.address else k.address
    return f"{k.protocol.value} {host}:{k.port}"


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def svc_chain(k: ServiceKey) -> str:
    return f"svc-{_h(f'{k.protocol.value}/{k.address}/{k.port}')}"


def ep_chain(k: ServiceKey, r: RealServer) -> str:
    return f"ep-{svc_chain(k)[4:]}-{_h(f'{r.address}/{r.port}')}"


def aff_set(k: ServiceKey, r: RealServer) -> str:
    return "aff-" + ep_chain(k, r)[3:]


def _fam(address: str) -> str:
    return "ip6" if ":" in address else "ip"


def _prefix(s: VirtualService) -> int:
    bits = 128 if ":" in s.key.address else 32
    m = s.persistence_netmask
    if not m:
        return bits
    if m.startswith("/"):
        return int(m[1:])
    return ipaddress.IPv4Network(f"0.0.0.0/{m}").prefixlen


def _client_expr(s: VirtualService) -> str:
    """The client address as persistence sees it (netmask applied)."""
    fam = _fam(s.key.address)
    bits = 128 if fam == "ip6" else 32
    p = _prefix(s)
    if p == bits:
        return f"{fam} saddr"
    net = ipaddress.ip_network(f"{'::' if fam == 'ip6' else '0.0.0.0'}/{p}")
    return f"{fam} saddr & {net.netmask}"


def _svc_comment(s: VirtualService) -> str:
    k = s.key
    return (
        f"svc {k.protocol.value} {k.address} {k.port} {s.scheduler.value} "
        f"p={s.persistence or 0} m={_prefix(s) if s.persistence else 0}"
    )


def _parse_svc_comment(text: str) -> VirtualService | None:
    try:
        _, proto, addr, port, sched, p, m = text.split()
        persistence = int(p.removeprefix("p=")) or None
        prefix = int(m.removeprefix("m="))
        key = ServiceKey(str(ipaddress.ip_address(addr)), int(port), Protocol(proto))
        mask = None
        if persistence:
            mask = (
                f"/{prefix}"
                if ":" in addr
                else str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)
            )
        return VirtualService(key, Scheduler(sched), persistence, mask)
    except ValueError:
        return None


# ---------------------------------------------------------------- reading the kernel


@dataclasses.dataclass
class _Kernel:
    exists: bool = False
    skeleton_ok: bool = False
    chains: set[str] = dataclasses.field(default_factory=set)
    sets: dict[str, int | None] = dataclasses.field(default_factory=dict)  # name -> timeout
    elements: dict[ServiceKey, str] = dataclasses.field(default_factory=dict)  # -> chain
    svc_info: dict[str, VirtualService] = dataclasses.field(default_factory=dict)  # by chain
    targets: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # chain -> gotos
    eps: dict[str, RealServer] = dataclasses.field(default_factory=dict)  # ep chain -> real
    ep_sets: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # ep -> sets updated
    state: LbState = LbState()


def _walk(node: Any, key: str) -> list[Any]:
    """Every value under `key` anywhere inside a JSON tree."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            found.extend(_walk(v, key))
    elif isinstance(node, list):
        for v in node:
            found.extend(_walk(v, key))
    return found


def parse_table(doc: dict[str, Any]) -> _Kernel:
    """Parse `nft -j list table inet NAME` output into what read()/apply() need."""
    k = _Kernel(exists=True)
    base: dict[str, list[Any]] = {"prerouting": [], "output": [], "services": []}
    hooks: dict[str, str] = {}
    for item in doc.get("nftables", []):
        if "chain" in item:
            c = item["chain"]
            k.chains.add(c["name"])
            if "hook" in c:
                hooks[c["name"]] = c["hook"]
        elif "set" in item:
            k.sets[item["set"]["name"]] = item["set"].get("timeout")
        elif "map" in item and item["map"]["name"] in ("svc4", "svc6"):
            for key, verdict in item["map"].get("elem", []):
                parts = key.get("concat", []) if isinstance(key, dict) else []
                gotos = _walk(verdict, "goto")
                if len(parts) != 3 or not gotos:
                    continue
                with contextlib.suppress(ValueError, TypeError):
                    sk = ServiceKey(
                        str(ipaddress.ip_address(parts[0])), int(parts[2]), Protocol(parts[1])
                    )
                    k.elements[sk] = gotos[0]["target"]
        elif "rule" in item:
            _parse_rule(k, item["rule"], base)
    k.skeleton_ok = (
        hooks.get("prerouting") == "prerouting"
        and hooks.get("output") == "output"
        and {"svc4", "svc6"} <= _map_names(doc)
        and [_walk(e, "jump") for e in base["prerouting"]] == [[{"target": "services"}]]
        and [_walk(e, "jump") for e in base["output"]] == [[{"target": "services"}]]
        and sorted(str(_walk(e, "data")) for e in base["services"]) == ["['@svc4']", "['@svc6']"]
    )
    k.state = _verified_state(k)
    return k


def _map_names(doc: dict[str, Any]) -> set[str]:
    return {i["map"]["name"] for i in doc.get("nftables", []) if "map" in i}


def _parse_rule(k: _Kernel, rule: dict[str, Any], base: dict[str, list[Any]]) -> None:
    chain = rule["chain"]
    expr = rule.get("expr", [])
    comment = rule.get("comment", "")
    if chain in base:
        base[chain].append(expr)
    elif chain.startswith("svc-"):
        k.targets.setdefault(chain, set()).update(g["target"] for g in _walk(expr, "goto"))
        if comment.startswith("svc "):
            svc = _parse_svc_comment(comment)
            if svc is not None:
                k.svc_info[chain] = svc
    elif chain.startswith("ep-"):
        for upd in _walk(expr, "set"):
            if isinstance(upd, dict) and upd.get("op") == "update":
                k.ep_sets.setdefault(chain, set()).add(str(upd.get("set", "")).lstrip("@"))
        dnats = _walk(expr, "dnat")
        if comment.startswith("real ") and dnats:
            try:
                _, addr, port, w = comment.split()
                d = dnats[0]
                real = RealServer(str(ipaddress.ip_address(addr)), int(port), int(w[2:]))
                if (str(ipaddress.ip_address(d["addr"])), int(d["port"])) == real_key(real):
                    k.eps[chain] = real  # the comment agrees with what the kernel does
            except (ValueError, KeyError, TypeError):
                pass


def _verified_state(k: _Kernel) -> LbState:
    services = []
    for chain, svc in sorted(k.svc_info.items()):
        key = svc.key
        if chain != svc_chain(key) or k.elements.get(key) != chain:
            log.debug("service %s: not wired into the services map; will rebuild", key)
            continue
        reals = tuple(r for ep, r in sorted(k.eps.items()) if ep == ep_chain(key, r))
        ok = all(
            ep_chain(key, r) in k.targets.get(chain, set()) for r in reals if r.weight > 0
        ) and sum(1 for ep in k.chains if ep.startswith(f"ep-{chain[4:]}-")) == len(reals)
        if ok and svc.persistence:
            ok = all(
                k.sets.get(aff_set(key, r)) == svc.persistence
                and aff_set(key, r) in k.ep_sets.get(ep_chain(key, r), set())
                for r in reals
            )
        if not ok:
            log.debug("service %s: its chains do not match their comments; will rebuild", key)
            continue
        services.append(dataclasses.replace(svc, reals=reals))
    return canonical(LbState(tuple(services)))


# ---------------------------------------------------------------- writing


def _vmap(owners: Sequence[str]) -> str:
    """`{ 0 : goto a, 1-3 : goto b, … }` with runs of one target folded into ranges."""
    parts = []
    i = 0
    while i < len(owners):
        j = i
        while j + 1 < len(owners) and owners[j + 1] == owners[i]:
            j += 1
        slot = f"{i}" if i == j else f"{i}-{j}"
        parts.append(f"{slot} : goto {owners[i]}")
        i = j + 1
    return "{ " + ", ".join(parts) + " }"


def dispatch_rule(s: VirtualService, lc_fallback: bool = False) -> str | None:
    """The rule that picks a real server for a new client (None: nobody is available)."""
    sched = FALLBACK.get(s.scheduler, s.scheduler) if lc_fallback else s.scheduler
    table = {
        Scheduler.RR: slots.rr,
        Scheduler.WRR: slots.wrr,
        Scheduler.SH: slots.sh,
        Scheduler.MH: slots.mh,
    }[sched](s.reals)
    if not table:
        return None
    owners = [ep_chain(s.key, s.reals[i]) for i in table]
    if sched in (Scheduler.RR, Scheduler.WRR):
        return f"numgen inc mod {len(owners)} vmap {_vmap(owners)}"
    fam = _fam(s.key.address)
    return f"jhash {fam} saddr mod {len(owners)} seed {JHASH_SEED:#x} vmap {_vmap(owners)}"


class NftBackend:
    """Backend over `nft -f` (one transaction per apply). `argv` prefixes nft, e.g. for
    `ip netns exec NS nft` in tests."""

    name = "nftables"

    def __init__(
        self,
        table: str = "ntm_lb",
        *,
        lc_fallback: bool = False,
        argv: Sequence[str] = ("nft",),
        forget_udp_conntrack: bool = True,
    ) -> None:
        self.table = table
        self.lc_fallback = lc_fallback
        self.argv = tuple(argv)
        self.forget_udp_conntrack = forget_udp_conntrack
        self.last_script = ""  # what the last apply sent (for logs, tests and the report)
        self.last_ops: list[Operation] = []
        self.applies = 0  # transactions actually sent

    # -- Backend protocol ---------------------------------------------------------------

    def read(self) -> LbState:
        return self._inspect().state

    def apply(self, desired: LbState) -> None:
        problems = unsupported(desired, self.lc_fallback)
        if problems:
            raise ConfigError("; ".join(problems))
        kernel = self._inspect()
        ops = diff(kernel.state, desired)
        script = self.script(kernel, desired, ops)
        self.last_ops = ops
        if not script:
            return
        self._run(["-f", "-"], "\n".join(script) + "\n")
        self.last_script = "\n".join(script)
        self.applies += 1
        for op in ops:
            if isinstance(op, DeleteReal):
                log.info("%s: removed real %s:%d", _svc_text(op.key), op.real.address, op.real.port)
                if op.key.protocol is Protocol.UDP and self.forget_udp_conntrack:
                    forget_conntrack(op.key, op.real)

    def close(self) -> None:
        pass

    # -- extras -------------------------------------------------------------------------

    def remove_table(self) -> None:
        """Drop everything the agent made (for --flush-on-exit)."""
        if self._inspect().exists:
            self._run(["delete", "table", "inet", self.table])

    def _run(self, args: list[str], stdin: str | None = None) -> str:
        try:
            done = subprocess.run(
                [*self.argv, *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=NFT_TIMEOUT,
                check=False,
            )
        except FileNotFoundError:
            raise NftError(
                f"{self.argv[0]} not found; install nftables (apt-get install nftables)"
            ) from None
        if done.returncode != 0:
            raise NftError(f"nft {' '.join(args[:3])} failed: {done.stderr.strip()}")
        return done.stdout

    def _inspect(self) -> _Kernel:
        try:
            out = self._run(["-j", "list", "table", "inet", self.table])
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return _Kernel()
            raise
        return parse_table(json.loads(out))

    # -- script -------------------------------------------------------------------------

    def script(self, k: _Kernel, desired: LbState, ops: list[Operation]) -> list[str]:
        """The nft commands that carry out `ops` (empty when nothing differs)."""
        t = f"inet {self.table}"
        out: list[str] = []
        if not k.skeleton_ok:
            out += self._skeleton(k)
        want = desired.by_key()
        rewrite_all: set[ServiceKey] = set()
        rewrite_eps: dict[ServiceKey, set[tuple[str, int]]] = {}
        for op in ops:
            if isinstance(op, AddService | EditService):
                rewrite_all.add(op.new.key if isinstance(op, EditService) else op.service.key)
            elif isinstance(op, AddReal | EditReal):
                new = op.real if isinstance(op, AddReal) else op.new
                rewrite_eps.setdefault(op.key, set()).add(real_key(new))
            elif isinstance(op, DeleteReal):
                rewrite_eps.setdefault(op.key, set())
        keep_chains = {"prerouting", "output", "services"}
        keep_sets: set[str] = set()
        for s in want.values():
            keep_chains.add(svc_chain(s.key))
            for r in s.reals:
                keep_chains.add(ep_chain(s.key, r))
                if s.persistence:
                    keep_sets.add(aff_set(s.key, r))
        for key in sorted(set(rewrite_all) | set(rewrite_eps), key=key_order):
            s = want[key]
            eps = (
                list(s.reals)
                if key in rewrite_all
                else [r for r in s.reals if real_key(r) in rewrite_eps[key]]
            )
            out += self._service(k, s, eps)
        # Deletions come last: nothing references them any more by now.
        for key, chain in sorted(k.elements.items(), key=lambda kv: key_order(kv[0])):
            if key not in want or (svc_chain(key) != chain):
                out.append(f"delete element {t} {self._map(key)} {{ {self._elem(key)} }}")
        gone = sorted(c for c in k.chains if c not in keep_chains)
        out += [f"flush chain {t} {c}" for c in gone]
        out += [f"delete chain {t} {c}" for c in gone if c.startswith("ep-")]
        out += [f"delete chain {t} {c}" for c in gone if not c.startswith("ep-")]
        out += [f"delete set {t} {n}" for n in sorted(k.sets) if n not in keep_sets]
        return out

    def _skeleton(self, k: _Kernel) -> list[str]:
        t = f"inet {self.table}"
        out = [
            f'add table {t} {{ comment "ntm lb agent: managed, do not edit"; }}',
            f"add map {t} svc4 {{ type ipv4_addr . inet_proto . inet_service : verdict; }}",
            f"add map {t} svc6 {{ type ipv6_addr . inet_proto . inet_service : verdict; }}",
            # dstnat (-100) as kube-proxy: before any filter that looks at the real address
            f"add chain {t} prerouting {{ type nat hook prerouting priority dstnat; }}",
            f"add chain {t} output {{ type nat hook output priority -100; }}",
            f"add chain {t} services",
        ]
        for chain in ("prerouting", "output", "services"):
            out.append(f"flush chain {t} {chain}")
        out += [
            f"add rule {t} prerouting jump services",
            f"add rule {t} output jump services",
            f"add rule {t} services ip daddr . meta l4proto . th dport vmap @svc4",
            f"add rule {t} services ip6 daddr . meta l4proto . th dport vmap @svc6",
        ]
        return out

    @staticmethod
    def _map(key: ServiceKey) -> str:
        return "svc6" if ":" in key.address else "svc4"

    @staticmethod
    def _elem(key: ServiceKey) -> str:
        return f"{key.address} . {key.protocol.value} . {key.port}"

    def _service(self, k: _Kernel, s: VirtualService, eps: list[RealServer]) -> list[str]:
        """Rewrite one service's chain (always) and the endpoint chains in `eps`."""
        t = f"inet {self.table}"
        key = s.key
        sc = svc_chain(key)
        fam = _fam(key.address)
        client = _client_expr(s)
        out = [f"add chain {t} {sc}", f"flush chain {t} {sc}"]
        for r in eps:
            out += [f"add chain {t} {ep_chain(key, r)}", f"flush chain {t} {ep_chain(key, r)}"]
        if s.persistence:
            for r in s.reals:
                name = aff_set(key, r)
                if name in k.sets and k.sets[name] != s.persistence:
                    out.append(f"delete set {t} {name}")  # its ep chain is rewritten (flushed)
                out.append(
                    f"add set {t} {name} {{ type {'ipv6_addr' if fam == 'ip6' else 'ipv4_addr'}; "
                    f"flags dynamic,timeout; timeout {s.persistence}s; size {AFFINITY_SIZE}; }}"
                )
        proto = key.protocol.value
        for r in eps:
            ec = ep_chain(key, r)
            if s.persistence:
                out.append(f"add rule {t} {ec} update @{aff_set(key, r)} {{ {client} }}")
            host = f"[{r.address}]" if fam == "ip6" else r.address
            out.append(
                f"add rule {t} {ec} meta l4proto {proto} counter dnat {fam} to {host}:{r.port} "
                f'comment "real {r.address} {r.port} w={r.weight}"'
            )
        if s.persistence:
            # Affinity first, but only to servers that take new clients (weight > 0).
            for r in s.reals:
                if r.weight > 0:
                    out.append(
                        f"add rule {t} {sc} {client} @{aff_set(key, r)} goto {ep_chain(key, r)}"
                    )
        rule = dispatch_rule(s, self.lc_fallback)
        if rule is not None:
            out.append(f"add rule {t} {sc} {rule}")
        out.append(f'add rule {t} {sc} counter drop comment "{_svc_comment(s)}"')
        if k.elements.get(key) != sc:
            out.append(f"add element {t} {self._map(key)} {{ {self._elem(key)} : goto {sc} }}")
        return out


def forget_conntrack(key: ServiceKey, real: RealServer) -> int:
    """Delete UDP conntrack entries of clients of `key` that were sent to `real`.

    A UDP "flow" never ends, so without this the clients of a removed server keep being
    sent to it until the entry times out: the black hole kube-proxy clears the same way
    (IPVS's expire_nodest_conn=1 does it for IPVS). Best effort: logged, never raised.
    """
    count = 0
    try:
        import socket

        from pyroute2 import NFCTSocket
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        family = socket.AF_INET6 if ":" in key.address else socket.AF_INET
        match = NFCTAttrTuple(family=family, daddr=key.address, proto=17, dport=key.port)
        with NFCTSocket(nfgen_family=family) as ct:
            for entry in list(ct.dump(tuple_orig=match)):
                reply = NFCTAttrTuple.from_netlink(family, entry.get_attr("CTA_TUPLE_REPLY"))
                if reply.saddr != real.address or reply.sport != real.port:
                    continue
                orig = NFCTAttrTuple.from_netlink(family, entry.get_attr("CTA_TUPLE_ORIG"))
                ct.entry("del", tuple_orig=orig)
                count += 1
    except Exception as exc:  # never let cleanup break an apply that already happened
        log.warning("could not clear UDP conntrack entries for %s: %s", real.address, exc)
    if count:
        log.info("%s: forgot %d UDP conntrack entries to %s", _svc_text(key), count, real.address)
    return count
