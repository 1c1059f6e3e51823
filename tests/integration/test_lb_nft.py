"""`ntm lb` with the nftables backend in a small topology of its own (root, netns).

    client ns ──veth── lb ns ──veth── web1 ns (10.77.11.2)
    10.77.0.2..5        │    ──veth── web2 ns (10.77.12.2)
                        │    ──veth── web3 ns (10.77.13.2)
    services: 10.77.99.10:80 rr · .11 sh · .12 rr + persistence (weight0 on failure)

The agent runs in the lb ns as `ntm lb` (a real daemon: config file, SIGHUP, status socket).
Each web ns runs `ntm lab httpd`, answering `server=<name> client=<ip>`. The test's client
sockets are made inside the client ns by a short-lived thread that setns()es first, so the
pytest process itself never changes namespace. Every wait polls a condition with a bound.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ntm_io.status import StatusError, read_status
from ntm_pki import ca

REPO = Path(__file__).resolve().parents[2]
NTM = [sys.executable, "-m", "ntm_cli.main"]
CLONE_NEWNET = 0x40000000
BOUND = 10.0  # seconds for any "eventually"
VIP_RR, VIP_SH, VIP_STICKY = "10.77.99.10", "10.77.99.11", "10.77.99.12"
CLIENT = "10.77.0.2"
EXTRA_CLIENTS = ("10.77.0.3", "10.77.0.4", "10.77.0.5")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    return None


pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
]

_libc = ctypes.CDLL(None, use_errno=True)


def poll(cond: Callable[[], bool], what: str, bound: float = BOUND) -> float:
    """Wait for cond() (polling); returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > bound:
            pytest.fail(f"not within {bound} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def sh(*argv: str, ns: str | None = None, check: bool = True) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30, cwd=REPO)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {done.stderr}")
    return done.stdout


def socket_in(ns: str) -> socket.socket:
    """A TCP socket that lives in network namespace `ns` (setns affects one thread only)."""
    made: list[socket.socket] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return made[0]


class Http:
    """One keep-alive HTTP/1.1 connection from the client ns."""

    def __init__(self, ns: str, vip: str, source: str | None = CLIENT) -> None:
        self.sock = socket_in(ns)
        self.sock.settimeout(3.0)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect((vip, 80))

    def get(self) -> dict[str, str]:
        self.sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: www\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += self.sock.recv(4096)
        return dict(kv.split("=", 1) for kv in body.decode().split())

    def close(self) -> None:
        self.sock.close()


def one_shot(ns: str, vip: str, source: str | None = CLIENT) -> dict[str, str]:
    conn = Http(ns, vip, source)
    try:
        return conn.get()
    finally:
        conn.close()


@dataclass
class Topo:
    prefix: str
    dir: Path
    config: Path
    status: str
    agent: subprocess.Popen[bytes] | None = None
    webs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def client(self) -> str:
        return f"{self.prefix}c"

    @property
    def lb(self) -> str:
        return f"{self.prefix}l"

    def web_ns(self, name: str) -> str:
        return f"{self.prefix}{name[-2:]}"  # web1 -> lbXXXXXXb1

    def start_web(self, name: str) -> None:
        self.webs[name] = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.web_ns(name),
                *NTM,
                "lab",
                "httpd",
                "--name",
                name,
                "--port",
                "80",
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop_web(self, name: str) -> None:
        proc = self.webs.pop(name)
        proc.kill()
        proc.wait(5)

    def start_agent(self) -> None:
        log = (self.dir / "agent.log").open("ab")
        self.agent = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.lb,
                *NTM,
                "lb",
                "--config",
                str(self.config),
                "--log-level",
                "debug",
            ],
            cwd=REPO,
            stdout=log,
            stderr=log,
        )
        poll(self._status_ok, "the agent answers on its status socket")

    def _status_ok(self) -> bool:
        assert self.agent is not None
        if self.agent.poll() is not None:
            pytest.fail(f"the agent exited: {(self.dir / 'agent.log').read_text()}")
        try:
            read_status(self.status, timeout=1.0)
            return True
        except StatusError:
            return False

    def state(self) -> dict[str, object]:
        return read_status(self.status, timeout=2.0)

    def real(self, service: str, address: str) -> dict[str, object]:
        svc = next(s for s in self.state()["services"] if s["name"] == service)  # type: ignore[attr-defined]
        return next(r for r in svc["reals"] if r["address"] == address)  # type: ignore[no-any-return,unused-ignore]

    def nft_json(self) -> list[dict[str, object]]:
        out = sh("nft", "-j", "-a", "list", "table", "inet", "ntm_lb", ns=self.lb)
        return json.loads(out)["nftables"]  # type: ignore[no-any-return]

    def teardown(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(10)
            except subprocess.TimeoutExpired:
                self.agent.kill()
        for name in list(self.webs):
            self.stop_web(name)
        for ns in [self.client, self.lb, *(self.web_ns(f"web{i}") for i in (1, 2, 3))]:
            for pid in sh("ip", "netns", "pids", ns, check=False).split():
                kill_quietly(int(pid))
            sh("ip", "netns", "del", ns, check=False)


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


CONFIG = """\
[agent]
name = "{name}"
status_socket = "{status}"
backend = "auto"

[[service]]
name = "rr"
address = "{vip_rr}"
port = 80
scheduler = "rr"
{reals}
  [service.health]
  kind = "http"
  path = "/whoami"
  expect = "server=web"
  interval = 0.2
  timeout = 0.2
  rise = 2
  fall = 2

[[service]]
name = "sh"
address = "{vip_sh}"
port = 80
scheduler = "sh"
{reals}
  [service.health]
  kind = "tcp"
  interval = 0.2
  timeout = 0.2

[[service]]
name = "sticky"
address = "{vip_sticky}"
port = 80
scheduler = "rr"
persistence = 60
{sticky_reals}
  [service.health]
  kind = "http"
  path = "/whoami"
  interval = 0.2
  timeout = 0.2
  on_failure = "weight0"
"""


CLAIMS = """
[claims]
listen = "10.77.0.1"
port = 4434
ca = "{pki}/ca.pem"
cert = "{pki}/lb1.pem"
key = "{pki}/lb1.key"
vip_networks = ["100.64.0.0/10"]
next_hop_networks = ["10.77.0.0/24"]
interface = "{iface}"
"""

CLAIM = """
import asyncio, sys
from lb_integration import claims
from ntm_io.control import connect_control
pki, who, vip, hop, t = sys.argv[1:]

async def main():
    async def no_requests(conn, payload):
        return b""
    conn = await connect_control("10.77.0.1", 4434, server_name="lb1.ntm.example.com",
                                 ca=f"{pki}/ca.pem", cert=f"{pki}/{who}.pem",
                                 key=f"{pki}/{who}.key", handler=no_requests)
    raw = await conn.request(claims.encode(claims.RouteClaim(vip, hop, int(t), 30)), 5.0)
    await conn.close()
    print(claims.decode(raw).code.value)

asyncio.run(main())
"""


def write_config(topo: Topo, web3_weight: int = 1) -> None:
    reals = "".join(f'  [[service.real]]\n  address = "10.77.1{i}.2"\n' for i in (1, 2, 3))
    sticky = reals.replace(
        'address = "10.77.13.2"\n', f'address = "10.77.13.2"\n  weight = {web3_weight}\n'
    )
    topo.config.write_text(
        CONFIG.format(
            name=topo.prefix,
            status=topo.status,
            vip_rr=VIP_RR,
            vip_sh=VIP_SH,
            vip_sticky=VIP_STICKY,
            reals=reals,
            sticky_reals=sticky,
        )
        + CLAIMS.format(pki=topo.dir / "pki", iface=f"{topo.prefix}b")
    )


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topo]:
    prefix = "lb" + secrets.token_hex(3)
    t = Topo(prefix, tmp_path, tmp_path / "lb.toml", str(tmp_path / "lb.sock"))
    try:
        for ns in [t.client, t.lb, *(t.web_ns(f"web{i}") for i in (1, 2, 3))]:
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        # client <-> lb
        sh(
            "ip",
            "link",
            "add",
            f"{prefix}a",
            "netns",
            t.client,
            "type",
            "veth",
            "peer",
            f"{prefix}b",
            "netns",
            t.lb,
        )
        sh("ip", "addr", "add", f"{CLIENT}/24", "dev", f"{prefix}a", ns=t.client)
        for extra in EXTRA_CLIENTS:
            sh("ip", "addr", "add", f"{extra}/24", "dev", f"{prefix}a", ns=t.client)
        sh("ip", "link", "set", f"{prefix}a", "up", ns=t.client)
        sh("ip", "route", "add", "default", "via", "10.77.0.1", ns=t.client)
        sh("ip", "addr", "add", "10.77.0.1/24", "dev", f"{prefix}b", ns=t.lb)
        sh("ip", "link", "set", f"{prefix}b", "up", ns=t.lb)
        # lb <-> web_i: replies return via the LB (default route), so no SNAT is needed
        for i in (1, 2, 3):
            web = t.web_ns(f"web{i}")
            sh(
                "ip",
                "link",
                "add",
                f"{prefix}s{i}",
                "netns",
                t.lb,
                "type",
                "veth",
                "peer",
                f"{prefix}r{i}",
                "netns",
                web,
            )
            sh("ip", "addr", "add", f"10.77.1{i}.1/24", "dev", f"{prefix}s{i}", ns=t.lb)
            sh("ip", "link", "set", f"{prefix}s{i}", "up", ns=t.lb)
            sh("ip", "addr", "add", f"10.77.1{i}.2/24", "dev", f"{prefix}r{i}", ns=web)
            sh("ip", "link", "set", f"{prefix}r{i}", "up", ns=web)
            sh("ip", "route", "add", "default", "via", f"10.77.1{i}.1", ns=web)
            t.start_web(f"web{i}")
        pki = tmp_path / "pki"
        ca.init_ca(pki)
        # the agent's certificate needs an NTM role; ntm_pki has no "lb" role yet
        ca.issue(pki, "lb1", "lb", ["lb1.ntm.example.com"], ["10.77.0.1"])
        ca.issue(pki, "ntma1", "adaptor", ["ntma1.ntm.example.com"])
        ca.issue(pki, "mn1", "node", ["mn1.ntm.example.com"])
        write_config(t)
        yield t
    finally:
        t.teardown()


def spread(topo: Topo, vip: str, n: int, source: str = CLIENT) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        answer = one_shot(topo.client, vip, source)
        assert answer["client"] == source  # the real server sees the client's own address
        seen[answer["server"]] += 1
    return seen


def web_up(topo: Topo, name: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            one_shot(topo.lb, f"10.77.1{name[-1]}.2", source=None)
            return True
        except OSError:
            return False

    return check


def rule_handles(topo: Topo) -> dict[str, list[int]]:
    out: dict[str, list[int]] = collections.defaultdict(list)
    for item in topo.nft_json():
        if "rule" in item:
            rule = item["rule"]
            out[rule["chain"]].append(rule["handle"])  # type: ignore[index]
    return dict(out)


def test_nft_load_balancer(topo: Topo) -> None:
    for i in (1, 2, 3):
        poll(web_up(topo, f"web{i}"), f"web{i} listens")
    topo.start_agent()
    log = (topo.dir / "agent.log").read_text()
    assert "IPVS not available in this kernel" in log and "using nftables" in log
    assert topo.state()["backend"] == "nftables"
    assert sh("sysctl", "-n", "net.ipv4.ip_forward", ns=topo.lb).strip() == "1"
    ruleset = sh("nft", "list", "ruleset", ns=topo.lb)
    assert "snat" not in ruleset and "masquerade" not in ruleset

    # return routes: an NTMA's claim installs a /32 in the lb ns; a node's is refused
    pki = str(topo.dir / "pki")
    claim = (sys.executable, "-c", CLAIM, pki)
    assert sh(*claim, "mn1", "100.64.0.7", "10.77.0.3", "1", ns=topo.client).strip() == (
        "not_adaptor"
    )
    assert sh(*claim, "ntma1", "100.64.0.7", "10.77.0.2", "5", ns=topo.client).strip() == "ok"
    assert "100.64.0.7 via 10.77.0.2" in sh("ip", "route", ns=topo.lb)
    assert sh(*claim, "ntma1", "10.1.2.3", "10.77.0.2", "5", ns=topo.client).strip() == (
        "vip_outside"
    )
    counters = topo.state()["claims"]["counters"]  # type: ignore[index]
    assert counters == {"accepted": 1, "refused_not_adaptor": 1, "refused_vip_outside": 1}

    # rr: 30 new connections spread 10/10/10; every server sees the real client address
    assert spread(topo, VIP_RR, 30) == {"web1": 10, "web2": 10, "web3": 10}

    # sh and persistence: one client stays on one server across 20 new connections
    for vip in (VIP_SH, VIP_STICKY):
        assert len(spread(topo, vip, 20)) == 1, vip
    sh_servers = {src: set(spread(topo, VIP_SH, 5, src)) for src in EXTRA_CLIENTS}
    assert all(len(s) == 1 for s in sh_servers.values())  # each client consistent

    # hold established connections on web1 and web3 while web2 fails
    held: dict[str, Http] = {}
    while len(held) < 2:
        conn = Http(topo.client, VIP_RR)
        server = conn.get()["server"]
        if server in ("web1", "web3") and server not in held:
            held[server] = conn
        else:
            conn.close()
    sticky_server = one_shot(topo.client, VIP_STICKY)["server"]

    detection = topo.state()["services"][0]["health"]["detection_s"]  # type: ignore[index]
    topo.stop_web("web2")
    took = poll(
        lambda: topo.real("rr", "10.77.12.2")["in_service"] is False,
        "the agent takes web2 out of service",
        bound=float(detection) * 3 + 2,  # type: ignore[arg-type,unused-ignore]
    )
    print(f"web2 out of service after {took:.2f} s (configured bound {detection} s)")
    assert topo.real("rr", "10.77.12.2")["health"] == "down"
    poll(
        lambda: topo.real("sticky", "10.77.12.2")["effective_weight"] == 0,
        "web2 at weight 0 in the weight0 service",
    )
    after = spread(topo, VIP_RR, 30)
    assert set(after) == {"web1", "web3"} and sum(after.values()) == 30
    for name, conn in held.items():  # established flows were not disturbed
        assert conn.get()["server"] == name
    moved = set(spread(topo, VIP_STICKY, 5))
    assert "web2" not in moved
    if sticky_server != "web2":  # persistence kept for clients of healthy servers
        assert moved == {sticky_server}

    # bring web2 back: it returns to the rotation
    topo.start_web("web2")
    poll(
        lambda: all(topo.real(svc, "10.77.12.2")["in_service"] for svc in ("rr", "sh", "sticky")),
        "web2 comes back in every service",
    )
    assert spread(topo, VIP_RR, 30) == {"web1": 10, "web2": 10, "web3": 10}
    for name, conn in held.items():
        assert conn.get()["server"] == name

    # reload with the same file: nothing in the kernel changes
    before = rule_handles(topo)
    assert topo.agent is not None
    topo.agent.send_signal(signal.SIGHUP)
    poll(lambda: topo.state()["counters"]["reloads"] == 1, "the reload happens")  # type: ignore[index]
    assert topo.state()["last_reload"] == {"ok": True, "error": None, "ops": 0}
    assert rule_handles(topo) == before

    # reload changing one real (web3 weight 0 in "sticky"): only its chains are rewritten
    write_config(topo, web3_weight=0)
    topo.agent.send_signal(signal.SIGHUP)
    poll(lambda: topo.state()["counters"]["reloads"] == 2, "the second reload happens")  # type: ignore[index]
    assert topo.state()["last_reload"] == {"ok": True, "error": None, "ops": 1}
    now = rule_handles(topo)
    changed = {c for c in set(now) | set(before) if now.get(c) != before.get(c)}
    assert len(changed) == 2 and all(c.startswith(("svc-", "ep-")) for c in changed)
    assert sum(1 for c in changed if c.startswith("ep-")) == 1  # web3's endpoint only
    assert "web3" not in spread(topo, VIP_STICKY, 5, EXTRA_CLIENTS[0])
    for name, conn in held.items():
        assert conn.get()["server"] == name
        conn.close()

    # a bad file on reload: logged, the running state kept
    topo.config.write_text(topo.config.read_text().replace('scheduler = "sh"', 'scheduler = "x"'))
    topo.agent.send_signal(signal.SIGHUP)
    poll(lambda: topo.state()["counters"]["reloads"] == 3, "the third reload happens")  # type: ignore[index]
    assert "scheduler = 'x' is unknown" in str(topo.state()["last_error"])
    assert rule_handles(topo) == now


@pytest.fixture
def bare_ns() -> Iterator[str]:
    ns = "lb" + secrets.token_hex(3)
    sh("ip", "netns", "add", ns)
    try:
        yield ns
    finally:
        sh("ip", "netns", "del", ns, check=False)


def test_backend_round_trip_repair_and_return_routes(bare_ns: str) -> None:
    """NftBackend against the kernel: v4+v6, read() verifies, a tampered service is rebuilt;
    NetlinkRoutes: replace moves a /32, ours() finds what a previous run left."""
    from lb_integration.model import (
        LbState,
        Protocol,
        RealServer,
        Scheduler,
        ServiceKey,
        VirtualService,
    )
    from lb_integration.nft_backend import NftBackend, ep_chain
    from lb_integration.reconcile import canonical
    from lb_integration.routes import NetlinkRoutes

    backend = NftBackend(argv=("ip", "netns", "exec", bare_ns, "nft"))
    v4 = VirtualService(
        ServiceKey("10.99.0.10", 80, Protocol.TCP),
        Scheduler.MH,
        300,
        "255.255.255.0",
        (RealServer("10.0.1.11", 80, 2), RealServer("10.0.1.12", 8080, 0)),
    )
    v6 = VirtualService(
        ServiceKey("2001:db8::10", 53, Protocol.UDP),
        Scheduler.WRR,
        reals=(RealServer("2001:db8:1::1", 53, 3), RealServer("2001:db8:1::2", 53, 1)),
    )
    desired = LbState((v4, v6))
    backend.apply(desired)
    assert backend.read() == canonical(desired)
    backend.apply(desired)
    assert backend.last_ops == [] and backend.applies == 1  # idempotent: nothing sent

    # someone flushes one endpoint chain: read() no longer vouches for that service...
    chain = ep_chain(v4.key, v4.reals[0])
    sh("nft", "flush", "chain", "inet", "ntm_lb", chain, ns=bare_ns)
    assert [s.key for s in backend.read().services] == [v6.key]
    # ...and the next apply rebuilds it, leaving the other service alone
    backend.apply(desired)
    assert backend.read() == canonical(desired) and backend.applies == 2
    assert "2001:db8" not in backend.last_script

    backend.apply(LbState())
    assert backend.read() == LbState()
    listing = sh("nft", "list", "table", "inet", "ntm_lb", ns=bare_ns)
    assert "svc-" not in listing and "ep-" not in listing and "aff-" not in listing
    backend.remove_table()
    assert "ntm_lb" not in sh("nft", "list", "tables", ns=bare_ns)

    sh("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1", ns=bare_ns)
    sh("ip", "link", "set", "v0", "up", ns=bare_ns)
    sh("ip", "addr", "add", "192.0.2.1/24", "dev", "v0", ns=bare_ns)
    routes = NetlinkRoutes("v0", netns=bare_ns)
    try:
        routes.replace("100.64.0.7", "192.0.2.5")
        routes.replace("100.64.0.7", "192.0.2.6")  # a newer claim moves it in one step
        assert routes.ours() == [("100.64.0.7", "192.0.2.6")]
        assert "100.64.0.7 via 192.0.2.6 dev v0 proto 78" in sh("ip", "route", ns=bare_ns)
        routes.remove("100.64.0.7")
        routes.remove("100.64.0.7")  # already gone is fine
        assert routes.ours() == []
    finally:
        routes.close()


FORGET = """
from pyroute2 import NFCTSocket
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple as T
from lb_integration.model import Protocol, RealServer, ServiceKey
from lb_integration.nft_backend import forget_conntrack
ct = NFCTSocket()
for sport, real in ((4000, "10.0.1.11"), (4001, "10.0.1.12")):
    ct.entry("add", timeout=60,
             tuple_orig=T(saddr="10.77.0.2", daddr="10.99.0.10", proto=17, sport=sport, dport=53),
             tuple_reply=T(saddr=real, daddr="10.77.0.2", proto=17, sport=53, dport=sport))
n = forget_conntrack(ServiceKey("10.99.0.10", 53, Protocol.UDP), RealServer("10.0.1.11", 53))
left = [T.from_netlink(2, e.get_attr("CTA_TUPLE_REPLY")).saddr for e in ct.dump()]
print(n, left)
"""


def test_removed_udp_real_loses_its_conntrack_entries(bare_ns: str) -> None:
    """Like IPVS's expire_nodest_conn=1: UDP clients of a removed real are not black-holed."""
    out = sh(sys.executable, "-c", FORGET, ns=bare_ns)
    assert out.strip() == "1 ['10.0.1.12']"
