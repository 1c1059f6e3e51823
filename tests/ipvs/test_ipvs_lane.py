"""IpvsBackend against real IPVS, checked with real traffic and with `ipvsadm -Ln`.

Runs inside UML (see conftest.py and tests/integration/test_uml_ipvs.py). The tests share one
topology and one backend and run in file order; each applies the whole state it needs.
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import socket
import subprocess
from collections.abc import Iterator

import pytest

from lb_integration.ipvs_backend import (
    IpvsBackend,
    ipvs_available,
    normalise_state,
    set_ipvs_sysctls,
)
from lb_integration.model import (
    LbState,
    Protocol,
    RealServer,
    Scheduler,
    ServiceKey,
    VirtualService,
)

from .conftest import CLIENT4, CLIENT4_B, CLIENT6, VIP4, VIP6, WEBS, Topo, in_netns, sh

pytestmark = pytest.mark.ipvs

RR, SH, PERSIST, WRR, UDP = 80, 81, 82, 83, 9000


def tcp(address: str, port: int) -> ServiceKey:
    return ServiceKey(address, port, Protocol.TCP)


def reals(
    topo: Topo, port: int, *, v6: bool = False, weights: dict[str, int] | None = None
) -> tuple[RealServer, ...]:
    addrs = topo.web6 if v6 else topo.web4
    return tuple(RealServer(addrs[w], port, (weights or {}).get(w, 1)) for w in WEBS)


def base_state(topo: Topo) -> LbState:
    return LbState(
        (
            VirtualService(tcp(VIP4, RR), Scheduler.RR, reals=reals(topo, 80)),
            VirtualService(tcp(VIP4, SH), Scheduler.SH, reals=reals(topo, 80)),
            VirtualService(
                tcp(VIP4, PERSIST),
                Scheduler.RR,
                persistence=300,
                persistence_netmask="255.255.255.0",
                reals=reals(topo, 80),
            ),
            VirtualService(tcp(VIP4, WRR), Scheduler.WRR, reals=reals(topo, 80)),
            VirtualService(
                ServiceKey(VIP4, UDP, Protocol.UDP), Scheduler.RR, reals=reals(topo, 9000)
            ),
            VirtualService(tcp(VIP6, RR), Scheduler.RR, reals=reals(topo, 80, v6=True)),
            VirtualService(
                ServiceKey(VIP6, UDP, Protocol.UDP),
                Scheduler.MH,
                persistence=60,
                persistence_netmask="/64",
                reals=reals(topo, 9000, v6=True),
            ),
        )
    )


def replace_service(state: LbState, new: VirtualService) -> LbState:
    return LbState(tuple(new if s.key == new.key else s for s in state.services))


@pytest.fixture(scope="module")
def lb(topo: Topo) -> Iterator[IpvsBackend]:
    backend = IpvsBackend(netns=topo.lb)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def applied(topo: Topo, lb: IpvsBackend) -> LbState:
    state = base_state(topo)
    lb.apply(state)
    return state


def test_ipvs_available_and_sysctls(topo: Topo) -> None:
    ok, reason = ipvs_available(topo.lb)
    assert ok, reason
    assert set_ipvs_sysctls(topo.lb) == {
        "expire_nodest_conn": "1",
        "expire_quiescent_template": "1",
        "conntrack": "1",
    }
    out = sh("ip", "netns", "exec", topo.lb, "sysctl", "-n", "net.ipv4.vs.expire_nodest_conn")
    assert out.strip() == "1"


def test_ipvsadm_shows_what_the_backend_configured(topo: Topo, applied: LbState) -> None:
    lines = topo.ipvsadm_lines()
    expected = [
        f"TCP {VIP4}:{RR} rr",
        f"TCP {VIP4}:{SH} sh",
        f"TCP {VIP4}:{PERSIST} rr persistent 300 mask 255.255.255.0",
        f"TCP {VIP4}:{WRR} wrr",
        f"UDP {VIP4}:{UDP} rr",
        f"TCP [{VIP6}]:{RR} rr",
        f"UDP [{VIP6}]:{UDP} mh persistent 60 mask 64",
    ]
    for line in expected:
        assert line in lines, f"{line!r} missing from ipvsadm -Ln:\n" + "\n".join(lines)
    for web in WEBS:
        assert f"-> {topo.web4[web]}:80 Masq 1 0 0" in lines or any(
            ln.startswith(f"-> {topo.web4[web]}:80 Masq 1 ") for ln in lines
        )
        assert any(ln.startswith(f"-> [{topo.web6[web]}]:9000 Masq 1 ") for ln in lines)
    # Nothing but NAT: pyroute2's default (direct routing, "Route") must not leak in.
    assert not [ln for ln in lines if " Route " in ln or " Tunnel " in ln]


def test_read_matches_desired_and_second_apply_changes_nothing(
    topo: Topo, lb: IpvsBackend, applied: LbState
) -> None:
    assert lb.read() == normalise_state(applied)
    lb.apply(applied)
    assert lb.changes == []
    # A restarted agent (a fresh netlink socket) sees the same and changes nothing either.
    again = IpvsBackend(netns=topo.lb)
    try:
        assert again.read() == normalise_state(applied)
        again.apply(applied)
        assert again.changes == []
    finally:
        again.close()


def test_rr_spreads_30_new_connections_10_10_10(topo: Topo, applied: LbState) -> None:
    seen = [topo.get(VIP4, RR) for _ in range(30)]
    counts = collections.Counter(server for server, _ in seen)
    assert counts == {"web1": 10, "web2": 10, "web3": 10}, counts
    # NAT forwarding: the server sees the client's own address, not the LB's.
    assert {client for _, client in seen} == {CLIENT4}


def test_sh_keeps_each_client_on_one_real(topo: Topo, applied: LbState) -> None:
    for source in (CLIENT4, CLIENT4_B):
        servers = {topo.get(VIP4, SH, source=source)[0] for _ in range(20)}
        assert len(servers) == 1, (source, servers)


def test_persistence_keeps_client_and_its_netmask_on_one_real(topo: Topo, applied: LbState) -> None:
    seen = [topo.get(VIP4, PERSIST) for _ in range(20)]
    servers = {server for server, _ in seen}
    assert len(servers) == 1, servers
    # netmask 255.255.255.0: another address of the same /24 joins the same real ...
    other = {topo.get(VIP4, PERSIST, source=CLIENT4_B) for _ in range(5)}
    assert other == {(servers.pop(), CLIENT4_B)}


def test_ipv6_service_balances_and_keeps_client_address(topo: Topo, applied: LbState) -> None:
    seen = [topo.get(VIP6, RR) for _ in range(6)]
    assert collections.Counter(s for s, _ in seen) == {"web1": 2, "web2": 2, "web3": 2}
    assert {client for _, client in seen} == {CLIENT6}


def _udp_ask(sock: socket.socket, vip: str, port: int) -> tuple[str, str, str]:
    """(server, client seen, reply source) for one datagram; retries twice on loss."""
    for _ in range(3):
        sock.sendto(b"hello", (vip, port))
        try:
            data, peer = sock.recvfrom(2048)
        except TimeoutError:
            continue
        server, client = dict(p.split("=", 1) for p in data.decode().split()).values()
        return server, client, peer[0]
    raise AssertionError(f"no UDP reply from {vip}:{port}")


def test_udp_service_answers_from_the_vip(topo: Topo, applied: LbState) -> None:
    socks = [topo.udp_socket() for _ in range(6)]
    try:
        answers = [_udp_ask(s, VIP4, UDP) for s in socks]
        # each socket (client port) is a new IPVS UDP connection: rr spreads them
        assert collections.Counter(a[0] for a in answers) == {"web1": 2, "web2": 2, "web3": 2}
        assert {(a[1], a[2]) for a in answers} == {(CLIENT4, VIP4)}
        # the same socket stays on its real while its connection entry lives
        assert {_udp_ask(socks[0], VIP4, UDP)[0] for _ in range(3)} == {answers[0][0]}
    finally:
        for s in socks:
            s.close()
    s6 = topo.udp_socket(socket.AF_INET6)
    try:
        server, client, source = _udp_ask(s6, VIP6, UDP)
        assert (client, source) == (CLIENT6, VIP6)
        assert server in WEBS
    finally:
        s6.close()


def test_weight_and_scheduler_edit_in_place_keep_an_established_connection(
    topo: Topo, lb: IpvsBackend, applied: LbState
) -> None:
    with in_netns(topo.client):
        conn = http.client.HTTPConnection(VIP4, WRR, timeout=5)
        conn.connect()  # the socket is made here, inside the client namespace
    try:
        conn.request("GET", "/whoami")
        first = conn.getresponse().read().decode()
        server = first.split()[0].removeprefix("server=")
        local_port = conn.sock.getsockname()[1]

        # Drain the chosen server (weight 0 = quiescent) and switch wrr -> rr, in place.
        svc = applied.by_key()[tcp(VIP4, WRR)]
        weights = {w: (0 if w == server else 5) for w in WEBS}
        edited = dataclasses.replace(
            svc, scheduler=Scheduler.RR, reals=reals(topo, 80, weights=weights)
        )
        lb.apply(replace_service(applied, edited))
        assert lb.changes, "nothing was changed"
        assert all(c.startswith(("set service", "set real")) for c in lb.changes), lb.changes
        assert lb.read().by_key()[tcp(VIP4, WRR)] == normalise_state(LbState((edited,))).services[0]

        # The established connection still reaches its server through the same IPVS entry.
        conn.request("GET", "/whoami")
        assert conn.getresponse().read().decode() == first
        entries = topo.ipvsadm("-Lnc")
        assert f"{CLIENT4}:{local_port}" in entries and "ESTABLISHED" in entries, entries
        # New connections avoid the quiescent real.
        assert server not in {topo.get(VIP4, WRR)[0] for _ in range(6)}
    finally:
        conn.close()
        lb.apply(applied)


def test_deleting_a_real_moves_its_udp_client_at_once(
    topo: Topo, lb: IpvsBackend, applied: LbState
) -> None:
    """expire_nodest_conn=1: no 5-minute UDP black hole after a real is removed (k8s #71514)."""
    set_ipvs_sysctls(topo.lb)
    sock = topo.udp_socket()
    try:
        server = _udp_ask(sock, VIP4, UDP)[0]
        svc = applied.by_key()[ServiceKey(VIP4, UDP, Protocol.UDP)]
        without = dataclasses.replace(
            svc, reals=tuple(r for r in svc.reals if r.address != topo.web4[server])
        )
        lb.apply(replace_service(applied, without))
        assert lb.changes == [f"del real udp {VIP4}:{UDP} -> {topo.web4[server]}:9000 weight 1"]
        # The first datagram may be dropped while the stale entry expires; _udp_ask retries.
        assert _udp_ask(sock, VIP4, UDP)[0] != server
    finally:
        sock.close()
        lb.apply(applied)


def test_removing_services_and_reals_touches_only_them(
    topo: Topo, lb: IpvsBackend, applied: LbState
) -> None:
    smaller = LbState(
        tuple(
            dataclasses.replace(s, reals=s.reals[:2]) if s.key == tcp(VIP4, RR) else s
            for s in applied.services
            if s.key.protocol is Protocol.TCP
        )
    )
    lb.apply(smaller)
    assert sorted(lb.changes) == sorted(
        [
            f"del real tcp {VIP4}:{RR} -> {topo.web4['web3']}:80 weight 1",
            f"del service udp {VIP4}:{UDP}",
            f"del service udp [{VIP6}]:{UDP}",
        ]
    )
    lines = topo.ipvsadm_lines()
    assert not [ln for ln in lines if ln.startswith("UDP ")]
    assert lb.read() == normalise_state(smaller)
    lb.apply(applied)
    assert lb.read() == normalise_state(applied)


def test_bad_input_changes_nothing(topo: Topo, lb: IpvsBackend, applied: LbState) -> None:
    before = topo.ipvsadm("-Ln")
    wrong_family = VirtualService(
        tcp(VIP4, 99), Scheduler.RR, reals=(RealServer(topo.web6["web1"], 80),)
    )
    duplicate = applied.services[0]
    for bad in (
        LbState((*applied.services[1:], wrong_family)),  # would be kernel EINVAL mid-way
        LbState((*applied.services, duplicate)),
    ):
        with pytest.raises(ValueError):
            lb.apply(bad)
        assert lb.changes == []
    assert topo.ipvsadm("-Ln") == before


def test_lane_ran_under_real_ipvs() -> None:
    """A marker for the host side: this lane saw a kernel with IPVS."""
    version = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout
    with open("/proc/net/ip_vs") as proc:
        assert proc.readline().startswith("IP Virtual Server"), version
