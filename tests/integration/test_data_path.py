"""The tunnel data path against a real kernel: two TunnelEngines on real TUNs in two
namespaces joined by a veth (no DC: each end gets a hand-made Route Direction).

What it proves: bytes cross the tunnel intact in bulk, both ways, while the fast paths are
in use (UDP GSO on send, GRO on receive, TCP segments and UDP datagrams merged into GSO
writes to the TUN), and small UDP datagrams of every size still arrive one for one. Each
engine runs in a child (`ip netns exec NS python -c …`); deleting the namespaces removes
everything they made.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ntm_proto.crypto import StaticKey

pytestmark = pytest.mark.lab
PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[2]
OUT_A, OUT_B = "10.203.0.1", "10.203.0.2"
VIP_A, VIP_B = "100.126.0.1", "100.126.0.2"
PORT = 41641
BOUND = 30.0

ENGINE = r"""
import asyncio, json, signal, sys
from pathlib import Path
from ntm_io.tun import TunDevice
from ntm_node.engine import TunnelEngine
from ntm_proto.crypto import StaticKey
from ntm_proto.messages import PathRole, RouteDirection, RouteKind

cfg = json.loads(sys.argv[1])

async def main():
    engine = TunnelEngine(StaticKey.from_private_bytes(bytes.fromhex(cfg["key"])), cfg["port"])
    engine.open()
    tun = TunDevice("ntmd0", 1400)
    tun.configure(cfg["vip"], 32, mtu=1400, routes=[cfg["peer_vip"] + "/32"])
    engine.attach_tun(tun, cfg["vip"])
    role = PathRole[cfg["role"]]
    eps = tuple((h, p) for h, p in cfg["endpoints"])
    engine.add_path(RouteDirection(bytes.fromhex(cfg["path_id"]), RouteKind.DIRECT, role,
        "peer.example.com", cfg["peer_vip"], bytes.fromhex(cfg["peer_key"]), eps, None, 600,
        bytes(32)))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    counters = {**engine.counters, "coalesced_writes": tun.coalesced_writes,
                "vnet_hdr": tun.vnet_hdr, "write_drops": tun.write_drops}
    Path(cfg["out"]).write_text(json.dumps(counters))
    engine.close()
    tun.close()

asyncio.run(main())
"""

# Sends `n` deterministic bytes to host:port over TCP and reads back what the other side
# returns for them (its byte count and digest), or receives and answers; prints JSON.
TCP = r"""
import hashlib, json, random, socket, sys
mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "serve":
    srv = socket.create_server((host, port))
    srv.settimeout(60)
    print("listening", flush=True)
    conn, _ = srv.accept()
    conn.settimeout(60)
    h, total = hashlib.sha256(), 0
    while total < n:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        h.update(chunk)
        total += len(chunk)
    # and the same amount back, so the other direction carries bulk data too
    data = random.Random(2).randbytes(n)
    conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
    print(json.dumps({"received": total, "sha256": h.hexdigest()}), flush=True)
else:
    data = random.Random(1).randbytes(n)
    c = socket.create_connection((host, port), timeout=60)
    c.sendall(data)
    h, total = hashlib.sha256(), 0
    while total < n:
        chunk = c.recv(1 << 16)
        if not chunk:
            break
        h.update(chunk)
        total += len(chunk)
    c.close()
    print(json.dumps({"sent": hashlib.sha256(data).hexdigest(), "received": total,
                      "back": h.hexdigest(),
                      "expect_back": hashlib.sha256(random.Random(2).randbytes(n)).hexdigest()}))
"""

# Bursts of equal-size datagrams (the receiving node merges them into GSO_UDP_L4 writes);
# after each burst a sync, answered with how many intact datagrams arrived so far.
UDP_BULK = r"""
import json, socket, struct, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
BURSTS, PER, SIZE = 10, 40, 1200
def body(i):
    return struct.pack("!I", i) + bytes([i % 251]) * (SIZE - 4)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if mode == "serve":
    s.bind((host, port))
    print("listening", flush=True)
    good, bad = 0, 0
    while True:
        data, addr = s.recvfrom(65535)
        if data.startswith(b"sync"):
            s.sendto(json.dumps([good, bad]).encode(), addr)
            if data == b"sync-last":
                break
            continue
        if data == body(struct.unpack("!I", data[:4])[0]):
            good += 1
        else:
            bad += 1
    print(json.dumps({"good": good, "bad": bad}), flush=True)
else:
    s.settimeout(2)
    counts = None
    for b in range(BURSTS):
        for i in range(PER):
            s.sendto(body(b * PER + i), (host, port))
        for _ in range(5):
            s.sendto(b"sync-last" if b == BURSTS - 1 else b"sync", (host, port))
            try:
                counts = json.loads(s.recv(100))
                break
            except TimeoutError:
                continue
    print(json.dumps({"sent": BURSTS * PER, "counts": counts}))
"""

UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
"""

UDP_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
ok = []
for size in list(range(1, 1373, 37)) + [1372]:
    data = bytes([size % 251]) * size
    for _ in range(3):  # a datagram may be lost; the echo is checked, not the loss
        s.sendto(data, (sys.argv[1], int(sys.argv[2])))
        try:
            back = s.recv(65535)
        except TimeoutError:
            continue
        ok.append(back == data)
        break
    else:
        ok.append(False)
print(json.dumps(ok))
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def two_namespaces() -> Iterator[tuple[str, str]]:
    tag = secrets.token_hex(3)
    a, b = f"dpa{tag}", f"dpb{tag}"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", f"dpa{tag}", "netns", a, "type", "veth", "peer", "name",
           f"dpb{tag}", "netns", b)  # fmt: skip
        for ns, dev, addr in ((a, f"dpa{tag}", OUT_A), (b, f"dpb{tag}", OUT_B)):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", addr + "/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


class Children:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, ns: str, script: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PYTHON, "-c", script, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)


def run_in(ns: str, script: str, *args: str) -> Any:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, PYTHON, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_line(proc: subprocess.Popen[str], want: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the child prints it once bound (or dies: EOF)
    assert want in line, f"child said {line!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"


def poll(cond: Any, what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not cond():
        assert time.monotonic() < deadline, f"not within {BOUND} s: {what}"
        time.sleep(0.1)


def test_bulk_tcp_and_udp_cross_the_tunnel_intact_on_the_fast_paths(
    two_namespaces: tuple[str, str], tmp_path: Path
) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    ns_a, ns_b = two_namespaces
    ka, kb = StaticKey.generate(), StaticKey.generate()
    pid = secrets.token_bytes(8).hex()
    kids = Children()
    try:
        engines = []
        for ns, key, peer, vip, peer_vip, role, eps in (
            (ns_b, kb, ka, VIP_B, VIP_A, "RESPONDER", []),
            (ns_a, ka, kb, VIP_A, VIP_B, "INITIATOR", [[OUT_B, PORT]]),
        ):
            cfg = {
                "key": key.private_bytes().hex(), "peer_key": peer.public_bytes().hex(),
                "vip": vip, "peer_vip": peer_vip, "role": role, "endpoints": eps,
                "path_id": pid, "port": PORT, "out": str(tmp_path / f"{role}.json"),
            }  # fmt: skip
            engines.append(kids.start(ns, ENGINE, json.dumps(cfg)))

        def tunnel_up() -> bool:
            ping = ["ip", "netns", "exec", ns_a, "ping", "-c1", "-W1", VIP_B]
            return subprocess.run(ping, capture_output=True, check=False).returncode == 0

        poll(tunnel_up, "a ping through the tunnel")

        n = 24 * 1024 * 1024
        server = kids.start(ns_b, TCP, "serve", VIP_B, "5001", str(n))
        wait_line(server, "listening")
        client = run_in(ns_a, TCP, "send", VIP_B, "5001", str(n))
        assert server.stdout is not None
        got = json.loads(server.stdout.readline())
        assert got["received"] == n and got["sha256"] == client["sent"]  # A -> B intact
        assert client["received"] == n and client["back"] == client["expect_back"]  # B -> A

        echo = kids.start(ns_b, UDP_ECHO, VIP_B, "5002")
        wait_line(echo, "listening")
        assert all(run_in(ns_a, UDP_CLIENT, VIP_B, "5002"))

        bulk = kids.start(ns_b, UDP_BULK, "serve", VIP_B, "5003")
        wait_line(bulk, "listening")
        sent = run_in(ns_a, UDP_BULK, "send", VIP_B, "5003")
        assert bulk.stdout is not None
        got = json.loads(bulk.stdout.readline())
        # Every datagram that arrived is intact; a burst of 40 fits every queue on the
        # way, so (almost) all arrive: a lost merged write would lose dozens at once.
        assert got["bad"] == 0 and got["good"] >= 0.95 * sent["sent"], (got, sent)

        for proc in engines:
            proc.send_signal(signal.SIGTERM)
        for proc in engines:
            proc.wait(15)
        resp = json.loads((tmp_path / "RESPONDER.json").read_text())
        init = json.loads((tmp_path / "INITIATOR.json").read_text())
    finally:
        kids.close()
    # The fast paths were in use (this kernel has UDP GSO/GRO and IFF_VNET_HDR) ...
    for side in (init, resp):
        assert side["tx_gso_sends"] > 0 and "tx_gso_disabled" not in side
        assert side["vnet_hdr"] and side["coalesced_writes"] > 0
        assert side["write_drops"] == 0
    # ... and nothing went astray on the way.
    for side in (init, resp):
        assert not {k for k in side if k.startswith(("tx_errors", "rx_dropped", "udp_errors"))}
