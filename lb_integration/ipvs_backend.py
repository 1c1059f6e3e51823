"""The IPVS backend: virtual services and real servers through IPVS's generic netlink API.

pyroute2's `IPVS` socket speaks the same netlink family ("IPVS") as ipvsadm; nothing here
shells out. `apply` edits in place whatever can be edited (scheduler and persistence with
IPVS_CMD_SET_SERVICE, weight with IPVS_CMD_SET_DEST): deleting and re-adding a service or a
real server would drop its connection entries, so live TCP sessions would break.

Ownership: the agent owns the address/port services in its network namespace. `apply` deletes
address/port services that are not desired; firewall-mark services (which the model cannot
express, so the agent never made them) are left alone.

Why pyroute2's dest("add") returned EINVAL (reproduced in UML, Linux 6.1, pyroute2 0.9.7):
the kernel (net/netfilter/ipvs/ip_vs_ctl.c) answers EINVAL, with nothing in dmesg, when
  * the service key lacks an identifying attribute: ip_vs_genl_parse_service needs AF plus
    either FWMARK or all of PROTOCOL, ADDR, PORT. pyroute2's IPVSService has no default
    protocol, so `IPVSService(addr=..., port=...)` (e.g. for a service that ipvsadm created)
    makes every dest command fail with EINVAL, whatever the fwd_method;
  * the dest lacks PORT (ip_vs_genl_parse_dest needs ADDR and PORT; ipvsadm always sends the
    port, defaulting `-r ADDR` to the service's port, pyroute2 has no default), or a full dest
    (add/set) lacks FWD_METHOD, WEIGHT, U_THRESH or L_THRESH (pyroute2's IPVSDest defaults
    supply these). ADDR_FAMILY and TUN_TYPE/TUN_PORT/TUN_FLAGS are optional;
  * the real's family differs from the service's and the method is not tunnelling (mixed
    pools need IP_VS_CONN_F_TUNNEL), or the real's address is 0.0.0.0/broadcast/multicast;
  * (service add/set) an IPv6 service has no NETMASK: pyroute2 fills in 255.255.255.255 for
    IPv4 only, and the kernel wants the IPv6 prefix length (1..128) as a host-order u32 there.
Fix: always build the service key with protocol, address and port; always give the dest its
port and explicit fwd_method 0 (masquerading/NAT: pyroute2's default 3 is direct routing,
which never rewrites the destination, so replies would bypass the LB); always send a netmask.
Also: pyroute2's `service("update")`/`dest("update")` send IPVS_CMD_DEL_*; never use them.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .model import (
    Forwarding,
    LbState,
    Protocol,
    RealServer,
    Scheduler,
    ServiceKey,
    VirtualService,
)

log = logging.getLogger("lb_integration.ipvs")

FWD_MASQ = 0  # IP_VS_CONN_F_MASQ: netlink fwd_method for NAT (1 local, 2 tunnel, 3 route)
F_PERSISTENT = 0x0001  # IP_VS_SVC_F_PERSISTENT
# The service flags the desired state decides: persistent, one-packet, scheduler flags
# (sh-fallback/sh-port, mh-*). HASHED (0x2) is the kernel's own and stays out of the mask.
F_MANAGED = 0x0001 | 0x0004 | 0x0008 | 0x0010 | 0x0020
PROTO_NUMBER = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP}
PROTO_BY_NUMBER = {n: p for p, n in PROTO_NUMBER.items()}
SYSCTL_DIR = Path("/proc/sys/net/ipv4/vs")
# expire_nodest_conn=1: packets of a connection whose real server was deleted are dropped
# and the entry expired at once, so the client's next packet is scheduled afresh. With the
# default 0 they are silently dropped until the entry times out (5 min for UDP): the UDP
# black hole of kubernetes #71514 / #76664, kube-router #413.
# expire_quiescent_template=1: a persistence template pointing at a weight-0 (health-failed,
# inhibited) real expires, so persistent clients move off it instead of sticking to it.
# conntrack=1: keep netfilter conntrack entries for IPVS connections, so stateful nftables
# rules in the LB's namespace (filtering, the LB's own NAT) see IPVS traffic as ESTABLISHED.
IPVS_SYSCTLS = {"expire_nodest_conn": "1", "expire_quiescent_template": "1", "conntrack": "1"}


class IpvsError(RuntimeError):
    """A netlink request failed; the message names the operation and the object."""


@dataclasses.dataclass(frozen=True)
class _Svc:
    """A service as the kernel holds it (more than the model can say: any scheduler/flags)."""

    key: ServiceKey
    sched: str
    flags: int
    timeout: int
    netmask: str  # IPv4 dotted; IPv6 "/N"


@dataclasses.dataclass(frozen=True)
class _Dest:
    address: str
    port: int
    weight: int
    fwd: int  # netlink fwd_method


def ipvs_available(netns: str | None = None) -> tuple[bool, str]:
    """Whether IPVS can be driven here, with the reason in words (for the agent's log)."""
    try:
        ipvs = _open_ipvs(netns)
    except FileNotFoundError as error:
        return False, f"network namespace {netns} does not exist: {error}"
    except Exception as error:
        # The genl family lookup autoloads ip_vs (alias net-pf-16-proto-16-family-IPVS);
        # failing here means neither built in nor loadable.
        return False, (
            f"the kernel has no IPVS (generic netlink family IPVS not found: {error}); "
            "CONFIG_IP_VS is not set or the ip_vs module cannot be loaded"
        )
    try:
        list(ipvs.service("dump"))
    except Exception as error:
        return False, f"IPVS is present but not usable: {error} (needs CAP_NET_ADMIN)"
    finally:
        ipvs.close()
    where = f" in netns {netns}" if netns else ""
    return True, f"IPVS is available{where} (ip_vs loaded, netlink family IPVS answers)"


def set_ipvs_sysctls(netns: str | None = None) -> dict[str, str]:
    """Set IPVS_SYSCTLS (per network namespace) and return them; see the comment there."""
    with _in_netns(netns):
        if not SYSCTL_DIR.is_dir():
            raise IpvsError(f"{SYSCTL_DIR} does not exist: IPVS is not loaded in this namespace")
        for name, value in IPVS_SYSCTLS.items():
            (SYSCTL_DIR / name).write_text(value + "\n")
        return {name: (SYSCTL_DIR / name).read_text().strip() for name in IPVS_SYSCTLS}


class IpvsBackend:
    """Backend over IPVS netlink, optionally in a named network namespace (/run/netns)."""

    name = "ipvs"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._ipvs: Any = _open_ipvs(netns)
        self.changes: list[str] = []  # what the last apply() changed, in order (for logs/tests)

    # -- Backend protocol ----------------------------------------------------------------

    def read(self) -> LbState:
        """Address/port services and their reals, in the canonical form of the config:
        sorted, compressed addresses, netmask only with persistence (IPv4 dotted, IPv6 /N).
        Kernel objects the model cannot express are logged and left out."""
        services: list[VirtualService] = []
        for svc, dests in self._dump().items():
            model = _to_model(svc, dests)
            if model is not None:
                services.append(model)
        return LbState(tuple(sorted(services, key=lambda s: _key_order(s.key))))

    def apply(self, desired: LbState) -> None:
        """Change only what differs, editing in place; validated first, so bad input changes
        nothing. New services and reals come before deletions, so a service never passes
        through "no real server" on its way from one set to another."""
        self.changes = []
        want = {s.key: s for s in (_normalise(s) for s in _validated(desired))}
        current = self._dump()
        cur_by_key = {svc.key: (svc, dests) for svc, dests in current.items()}
        for key in sorted(want, key=_key_order):
            vs = want[key]
            target = _svc_of(vs)
            if key not in cur_by_key:
                self._service("add", target, f"add service {_show(key)} {_settings(target)}")
                have: dict[tuple[str, int], _Dest] = {}
            else:
                svc, dests = cur_by_key[key]
                if (svc.sched, svc.flags & F_MANAGED, svc.timeout, svc.netmask) != (
                    target.sched,
                    target.flags,
                    target.timeout,
                    target.netmask,
                ):
                    self._service("set", target, f"set service {_show(key)} {_settings(target)}")
                have = {(d.address, d.port): d for d in dests}
            wanted = {(r.address, r.port): _dest_of(r) for r in vs.reals}
            for rk, dest in wanted.items():
                if rk not in have:
                    self._dest("add", target, dest, f"add real {_show(key)} -> {_show_d(dest)}")
                elif (have[rk].weight, have[rk].fwd) != (dest.weight, dest.fwd):
                    self._dest("set", target, dest, f"set real {_show(key)} -> {_show_d(dest)}")
            for rk, dest in have.items():
                if rk not in wanted:
                    self._dest("del", target, dest, f"del real {_show(key)} -> {_show_d(dest)}")
        for key, (svc, _dests) in sorted(cur_by_key.items(), key=lambda kv: _key_order(kv[0])):
            if key not in want:
                self._service("del", svc, f"del service {_show(key)}")

    def close(self) -> None:
        self._ipvs.close()

    # -- netlink -------------------------------------------------------------------------

    def _dump(self) -> dict[_Svc, list[_Dest]]:
        out: dict[_Svc, list[_Dest]] = {}
        for msg in self._ipvs.service("dump"):
            svc = _parse_service(msg.get_attr("IPVS_CMD_ATTR_SERVICE"))
            if svc is None:
                continue
            dests = [
                _parse_dest(d.get_attr("IPVS_CMD_ATTR_DEST"))
                for d in self._ipvs.dest("dump", service=_service_key_nla(svc.key))
            ]
            out[svc] = sorted(dests, key=lambda d: (_addr_order(d.address), d.port))
        return out

    def _service(self, command: str, svc: _Svc, what: str) -> None:
        from pyroute2 import IPVSService

        if command == "del":
            nla = _service_key_nla(svc.key)
        else:
            nla = IPVSService(
                addr=svc.key.address,
                port=svc.key.port,
                protocol=PROTO_NUMBER[svc.key.protocol],
                sched_name=svc.sched,
                flags={"flags": svc.flags, "mask": F_MANAGED},
                timeout=svc.timeout,
                netmask=_netmask_nla(svc.key.address, svc.netmask),
            )
        self._request(what, lambda: self._ipvs.service(command, service=nla))

    def _dest(self, command: str, svc: _Svc, dest: _Dest, what: str) -> None:
        from pyroute2 import IPVSDest

        nla = IPVSDest(
            addr=dest.address,
            port=dest.port,
            weight=dest.weight,
            fwd_method=dest.fwd,
            u_thresh=0,
            l_thresh=0,
        )
        key = _service_key_nla(svc.key)
        self._request(what, lambda: self._ipvs.dest(command, service=key, dest=nla))

    def _request(self, what: str, call: Any) -> None:
        try:
            call()
        except Exception as error:
            code = getattr(error, "code", None)
            hint = ""
            if code == errno.EINVAL:
                hint = " (EINVAL: a missing netlink attribute, a family mismatch or a bad address)"
            elif code == errno.ENOENT and what.startswith(("add service", "set service")):
                hint = " (ENOENT: unknown scheduler; is its ip_vs_<sched> module loadable?)"
            raise IpvsError(f"IPVS netlink: {what} failed: {error}{hint}") from error
        log.info("ipvs: %s", what)
        self.changes.append(what)


# -- conversions ---------------------------------------------------------------------------


def _open_ipvs(netns: str | None) -> Any:
    """A netlink socket in `netns`: opened with this thread briefly inside the namespace, so
    the socket belongs there. Not IPVS(netns=...): pyroute2 forks a helper process for that
    (seconds in UML) and creates a missing namespace silently (O_CREAT)."""
    from pyroute2 import IPVS

    with _in_netns(netns):
        return IPVS()


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _service_key_nla(key: ServiceKey) -> Any:
    """The identifying attributes only; protocol is mandatory (see the EINVAL note above)."""
    from pyroute2 import IPVSService

    return IPVSService(addr=key.address, port=key.port, protocol=PROTO_NUMBER[key.protocol])


def _netmask_nla(address: str, netmask: str) -> str:
    """IPVS_SVC_ATTR_NETMASK as pyroute2's ip4addr field: IPv4 the mask itself (network
    order); IPv6 the prefix length as a host-order u32, which the kernel checks is 1..128."""
    if _family(address) == socket.AF_INET:
        return netmask
    return socket.inet_ntoa(struct.pack("=I", int(netmask.removeprefix("/"))))


def _parse_service(attrs: Any) -> _Svc | None:
    if attrs is None or attrs.get_attr("IPVS_SVC_ATTR_FWMARK"):
        return None  # firewall-mark service: not ours
    proto = PROTO_BY_NUMBER.get(attrs.get_attr("IPVS_SVC_ATTR_PROTOCOL"))
    address = attrs.get_attr("IPVS_SVC_ATTR_ADDR")
    if proto is None or address is None:
        return None  # SCTP & co: the model has TCP and UDP only
    address = str(ipaddress.ip_address(address))
    raw_mask = attrs.get_attr("IPVS_SVC_ATTR_NETMASK") or "255.255.255.255"
    if _family(address) == socket.AF_INET:
        netmask = raw_mask
    else:
        netmask = "/" + str(struct.unpack("=I", socket.inet_aton(raw_mask))[0])
    flags = attrs.get_attr("IPVS_SVC_ATTR_FLAGS") or {"flags": 0}
    return _Svc(
        key=ServiceKey(address, int(attrs.get_attr("IPVS_SVC_ATTR_PORT")), proto),
        sched=str(attrs.get_attr("IPVS_SVC_ATTR_SCHED_NAME")),
        flags=int(flags["flags"]),
        timeout=int(attrs.get_attr("IPVS_SVC_ATTR_TIMEOUT") or 0),
        netmask=netmask,
    )


def _parse_dest(attrs: Any) -> _Dest:
    return _Dest(
        address=str(ipaddress.ip_address(attrs.get_attr("IPVS_DEST_ATTR_ADDR"))),
        port=int(attrs.get_attr("IPVS_DEST_ATTR_PORT")),
        weight=int(attrs.get_attr("IPVS_DEST_ATTR_WEIGHT")),
        fwd=int(attrs.get_attr("IPVS_DEST_ATTR_FWD_METHOD")),
    )


def _full_mask(address: str) -> str:
    return "255.255.255.255" if _family(address) == socket.AF_INET else "/128"


def _to_model(svc: _Svc, dests: list[_Dest]) -> VirtualService | None:
    try:
        scheduler = Scheduler(svc.sched)
    except ValueError:
        log.warning(
            "ipvs: service %s uses scheduler %s: not in the model", _show(svc.key), svc.sched
        )
        return None
    persistent = bool(svc.flags & F_PERSISTENT)
    reals = []
    for d in dests:
        if d.fwd != FWD_MASQ:
            log.warning(
                "ipvs: real %s of %s is not NAT (fwd %d)", _show_d(d), _show(svc.key), d.fwd
            )
            continue
        reals.append(RealServer(d.address, d.port, d.weight, Forwarding.NAT))
    return VirtualService(
        key=svc.key,
        scheduler=scheduler,
        persistence=svc.timeout if persistent else None,
        persistence_netmask=svc.netmask if persistent else None,
        reals=tuple(reals),
    )


def _validated(desired: LbState) -> list[VirtualService]:
    """Reject what the kernel would refuse halfway through (nothing is applied then)."""
    seen: set[tuple[str, int, Protocol]] = set()
    for s in desired.services:
        where = _show(s.key)
        family = _family(s.key.address)  # raises ValueError on a non-address
        ident = (str(ipaddress.ip_address(s.key.address)), s.key.port, s.key.protocol)
        if ident in seen:
            raise ValueError(f"service {where} is listed twice")
        seen.add(ident)
        if not 1 <= s.key.port <= 65535:
            raise ValueError(f"service {where}: port must be 1..65535")
        if s.persistence is not None and s.persistence <= 0:
            raise ValueError(f"service {where}: persistence must be > 0 s or None")
        if s.persistence_netmask is not None:
            _check_netmask(where, family, s.persistence_netmask)
        reals: set[tuple[str, int]] = set()
        for r in s.reals:
            if _family(r.address) != family:
                raise ValueError(f"service {where}: real {r.address} is not the same family")
            rk = (str(ipaddress.ip_address(r.address)), r.port)
            if rk in reals:
                raise ValueError(f"service {where}: real {r.address}:{r.port} is listed twice")
            reals.add(rk)
            if not 1 <= r.port <= 65535 or not 0 <= r.weight <= 65535:
                raise ValueError(f"service {where}: real {r.address}: bad port or weight")
            if r.forwarding is not Forwarding.NAT:
                raise ValueError(f"service {where}: only NAT forwarding is supported")
    return list(desired.services)


def _check_netmask(where: str, family: int, netmask: str) -> None:
    try:
        if family == socket.AF_INET and not netmask.startswith("/"):
            ipaddress.IPv4Network(f"0.0.0.0/{netmask}")
            return
        bits = 32 if family == socket.AF_INET else 128
        if netmask.startswith("/") and 1 <= int(netmask[1:]) <= bits:
            return
    except ValueError:
        pass
    raise ValueError(f"service {where}: persistence_netmask {netmask!r} is not valid here")


def _normalise(s: VirtualService) -> VirtualService:
    """The canonical form read() returns, so equal meanings compare equal."""
    address = str(ipaddress.ip_address(s.key.address))
    mask = None
    if s.persistence is not None:
        mask = s.persistence_netmask or _full_mask(address)
        if _family(address) == socket.AF_INET and mask.startswith("/"):
            mask = str(ipaddress.IPv4Network(f"0.0.0.0{mask}").netmask)
    reals = tuple(
        sorted(
            (dataclasses.replace(r, address=str(ipaddress.ip_address(r.address))) for r in s.reals),
            key=lambda r: (_addr_order(r.address), r.port),
        )
    )
    return dataclasses.replace(
        s,
        key=dataclasses.replace(s.key, address=address),
        persistence_netmask=mask,
        reals=reals,
    )


def normalise_state(state: LbState) -> LbState:
    """`state` in read()'s canonical form (addresses, netmask spelling, order)."""
    return LbState(
        tuple(sorted((_normalise(s) for s in state.services), key=lambda s: _key_order(s.key)))
    )


def _svc_of(s: VirtualService) -> _Svc:
    return _Svc(
        key=s.key,
        sched=s.scheduler.value,
        flags=F_PERSISTENT if s.persistence else 0,
        timeout=s.persistence or 0,
        netmask=s.persistence_netmask or _full_mask(s.key.address),
    )


def _dest_of(r: RealServer) -> _Dest:
    return _Dest(r.address, r.port, r.weight, FWD_MASQ)


def _addr_order(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return (ip.version, int(ip))


def _key_order(key: ServiceKey) -> tuple[tuple[int, int], int, str]:
    # Not ServiceKey's own ordering: it compares Protocol members, which are not orderable.
    return (_addr_order(key.address), key.port, key.protocol.value)


def _show(key: ServiceKey) -> str:
    host = f"[{key.address}]" if ":" in key.address else key.address
    return f"{key.protocol.value} {host}:{key.port}"


def _show_d(d: _Dest) -> str:
    host = f"[{d.address}]" if ":" in d.address else d.address
    return f"{host}:{d.port} weight {d.weight}" + ("" if d.fwd == FWD_MASQ else f" fwd {d.fwd}")


def _settings(s: _Svc) -> str:
    if s.flags & F_PERSISTENT:
        return f"{s.sched} persistent {s.timeout} mask {s.netmask}"
    return s.sched


# -- network namespaces --------------------------------------------------------------------

_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def _in_netns(netns: str | None) -> Iterator[None]:
    """Run the block with this thread in /run/netns/<netns> (for per-namespace /proc/sys)."""
    if netns is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({netns}) failed")
        try:
            yield
        finally:
            if libc.setns(home, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original namespace failed")
    finally:
        os.close(target)
        os.close(home)
