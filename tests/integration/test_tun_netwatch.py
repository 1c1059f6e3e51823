"""TunDevice and AddressWatcher against a real kernel, each in a throwaway netns.

(The address selection rules are also checked offline at the end, without root.)

The code under test runs in a child (`ip netns exec NS python -c …`) so the pytest
process never changes namespace; the child prints one JSON line of observations and
asserts the things only it can see. Deleting the namespace removes every interface
made in it, so cleanup holds even when a child dies half-way.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from ntm_io import netwatch


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


_REASON = _skip_reason()
needs_root = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

PYTHON = sys.executable


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"nt-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(
            ["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def run_in(ns: str, script: str, *prefix: str, timeout: float = 60) -> dict[str, Any]:
    """Run `script` with our interpreter inside `ns`; return its last stdout line as JSON."""
    cmd = ["ip", "netns", "exec", ns, *prefix, PYTHON, "-c", script]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"child printed nothing; stderr:\n{proc.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


TUN_SCRIPT = r"""
import json, os, select, socket, struct, subprocess, time
from pathlib import Path
from ntm_io.tun import TunDevice

def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

def ipv4(src, dst, proto, payload, ttl=64):
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0x1234, 0x4000, ttl,
                      proto, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload

def udp(src, sport, dst, dport, data):
    length = 8 + len(data)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, length)
    c = csum(pseudo + struct.pack("!HHHH", sport, dport, length, 0) + data) or 0xFFFF
    return ipv4(src, dst, 17, struct.pack("!HHHH", sport, dport, length, c) + data)

def read_until(tun, pred, want, timeout=5.0, max_packets=64):
    got, sizes = [], []
    deadline = time.monotonic() + timeout
    while len(got) < want:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} of {want} packets from the TUN"
        if not select.select([tun], [], [], left)[0]:
            continue
        batch = tun.read_batch(max_packets)
        sizes.append(len(batch))
        got += [p for p in batch if pred(p)]
    return got, sizes

res = {}
tun = TunDevice("ntmt0")
try:
    tun.configure("100.64.0.1", 32, mtu=1400, routes=["100.65.0.0/16"])
    tun.configure("100.64.0.1", 32, mtu=1400, routes=["100.65.0.0/16"])  # idempotent
    res["name"] = tun.name
    show = lambda *a: subprocess.check_output(["ip", "-4", *a, "dev", "ntmt0"], text=True)
    res["addr"] = show("-o", "addr", "show")
    res["routes"] = show("route", "show")
    res["flags"] = Path("/sys/class/net/ntmt0/flags").read_text().strip()
    res["mtu"] = int(Path("/sys/class/net/ntmt0/mtu").read_text())

    # 1) ping into the routed CIDR: the echo request comes out of the TUN; answer it.
    ping = subprocess.Popen(["ping", "-n", "-c1", "-W5", "100.65.0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    is_echo = lambda p: p[0] >> 4 == 4 and p[9] == 1 and p[20] == 8
    (req,), _ = read_until(tun, is_echo, 1)
    res["echo_src"] = socket.inet_ntoa(req[12:16])
    res["echo_dst"] = socket.inet_ntoa(req[16:20])
    icmp = bytearray(req[20:])
    icmp[0] = 0  # echo reply
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", csum(bytes(icmp)))
    assert tun.write(ipv4("100.65.0.5", "100.64.0.1", 1, bytes(icmp)))
    out, _ = ping.communicate(timeout=10)
    res["ping_rc"] = ping.returncode
    res["ping_out"] = out

    # 2) packets written to the TUN reach a local socket bound to the TUN address
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("100.64.0.1", 0))
    rx.settimeout(5)
    port = rx.getsockname()[1]
    pkts = [udp("100.65.0.9", 40000 + i, "100.64.0.1", port, b"hello %d" % i) for i in range(3)]
    res["written"] = tun.write_batch(pkts)
    res["received"] = []
    for _ in range(3):
        data, peer = rx.recvfrom(2048)
        res["received"].append([data.decode(), peer[0], peer[1]])
    rx.close()

    # 3) several locally sent datagrams are drained in batches capped by max_packets
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(5):
        tx.sendto(b"out %d" % i, ("100.65.0.7", 9999))
    is_udp = lambda p: p[0] >> 4 == 4 and p[9] == 17
    got, sizes = read_until(tun, is_udp, 5, max_packets=2)
    tx.close()
    res["batch_sizes"] = sizes
    res["udp_src"] = sorted({socket.inet_ntoa(p[12:16]) for p in got})
    res["udp_payloads"] = sorted(p[28:].decode() for p in got)
    res["stats"] = [tun.packets_read, tun.packets_written, tun.write_drops]
finally:
    tun.close()
    tun.close()  # idempotent
res["exists_after_close"] = os.path.exists("/sys/class/net/ntmt0")
print(json.dumps(res))
"""


@pytest.mark.lab
@needs_root
def test_tun_configure_read_write(netns: str) -> None:
    res = run_in(netns, TUN_SCRIPT)
    assert res["name"] == "ntmt0"
    assert "inet 100.64.0.1/32" in res["addr"]
    assert "100.65.0.0/16" in res["routes"] and "src 100.64.0.1" in res["routes"]
    assert int(res["flags"], 16) & 0x1, "link is not up"
    assert res["mtu"] == 1400
    # ping's request came out of the TUN with the vIP as source, and our reply got back
    assert (res["echo_src"], res["echo_dst"]) == ("100.64.0.1", "100.65.0.5")
    assert res["ping_rc"] == 0, res["ping_out"]
    assert res["written"] == 3
    assert sorted(res["received"]) == [[f"hello {i}", "100.65.0.9", 40000 + i] for i in range(3)]
    assert res["udp_src"] == ["100.64.0.1"]
    assert res["udp_payloads"] == [f"out {i}" for i in range(5)]
    assert max(res["batch_sizes"]) <= 2
    read, written, drops = res["stats"]
    assert read >= 6 and written == 4 and drops == 0
    assert res["exists_after_close"] is False


NO_CAP_SCRIPT = r"""
import json
from ntm_io.tun import TunDevice, TunPermissionError
from ntm_io.config import ConfigError
try:
    TunDevice("ntmt1")
except TunPermissionError as exc:
    print(json.dumps({"error": str(exc), "config_error": isinstance(exc, ConfigError),
                      "permission_error": isinstance(exc, PermissionError)}))
else:
    print(json.dumps({"error": None}))
"""


@pytest.mark.lab
@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_tun_without_cap_net_admin_says_so(netns: str) -> None:
    # root minus CAP_NET_ADMIN: what a non-root user would hit
    drop = ("setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--")
    res = run_in(netns, NO_CAP_SCRIPT, *drop)
    assert res["error"] == "creating a TUN device needs root (CAP_NET_ADMIN)"
    assert res["config_error"] and res["permission_error"]


WATCH_SCRIPT = r"""
import asyncio, json, time
from ntm_io.netwatch import AddressSet, AddressWatcher, current_addresses

async def sh(*cmds, stdin=None):
    for cmd in cmds:
        p = await asyncio.create_subprocess_exec(*cmd.split(), stdin=asyncio.subprocess.PIPE)
        await p.communicate(stdin)
        assert p.returncode == 0, cmd

async def main():
    res = {"seen": []}
    await sh("ip link add w0 type veth peer name w0p", "ip link set w0p up", "ip link set w0 up",
             # stands in for our TUN: whatever it carries must never be reported
             "ip link add ntmt9 type veth peer name ntmt9p", "ip link set ntmt9p up",
             "ip link set ntmt9 up")
    q = asyncio.Queue()
    watcher = AddressWatcher(q.put_nowait, ignore_ifaces=["ntmt9"])
    res["baseline"] = (await watcher.start()).to_dict()

    async def until(pred, what, timeout=5.0):
        t0 = time.monotonic()
        n = 0
        while True:
            left = timeout - (time.monotonic() - t0)
            try:
                s = await asyncio.wait_for(q.get(), max(left, 0))
            except asyncio.TimeoutError:
                raise AssertionError(f"no report of {what} within {timeout} s; "
                                     f"last {watcher.current}") from None
            n += 1
            res["seen"].append(s.to_dict())
            if pred(s):
                return s, n

    try:
        await sh("ip addr add 100.64.0.1/32 dev ntmt9", "ip addr add 198.18.0.1/24 dev ntmt9")

        t0 = time.monotonic()
        await sh("ip addr add 192.0.2.10/24 dev w0")
        await until(lambda s: "192.0.2.10" in s.ipv4, "IPv4 add")
        res["v4_add_s"] = time.monotonic() - t0

        await sh("ip route add default via 192.0.2.1 dev w0")
        await until(lambda s: s.has_default_route_v4, "IPv4 default route")

        # IPv6 with DAD: tentative first (not usable), reported once DAD is done
        t0 = time.monotonic()
        await sh("ip addr add 2001:db8:1::10/64 dev w0")
        res["v6_sync_while_tentative"] = current_addresses(["ntmt9"]).ipv6
        await until(lambda s: "2001:db8:1::10" in s.ipv6, "IPv6 add after DAD")
        res["v6_add_s"] = time.monotonic() - t0
        await sh("ip -6 route add default via 2001:db8:1::1 dev w0")
        await until(lambda s: s.has_default_route_v6, "IPv6 default route")

        res["sync"] = current_addresses(["ntmt9"]).to_dict()
        res["sync_not_ignoring"] = current_addresses().to_dict()

        # a burst is coalesced: one command adding five addresses
        batch = "".join(f"address add 10.77.0.{i}/24 dev w0\n" for i in range(1, 6)).encode()
        await sh("ip -batch -", stdin=batch)
        _, res["burst_reports"] = await until(
            lambda s: all(f"10.77.0.{i}" in s.ipv4 for i in range(1, 6)), "address burst")

        t0 = time.monotonic()
        await sh("ip addr del 192.0.2.10/24 dev w0")
        # (the default route stays: w0 still has 10.77.0.x addresses)
        await until(lambda s: "192.0.2.10" not in s.ipv4, "IPv4 removal")
        res["v4_del_s"] = time.monotonic() - t0

        # carrier loss makes every address of the interface unusable
        t0 = time.monotonic()
        await sh("ip link set w0p down")
        await until(lambda s: s == AddressSet(), "carrier loss")
        res["carrier_loss_s"] = time.monotonic() - t0
        res["changes"] = watcher.changes
    finally:
        watcher.close()
    print(json.dumps(res))

asyncio.run(asyncio.wait_for(main(), 60))
"""


@pytest.mark.lab
@needs_root
def test_address_watcher_reports_changes(netns: str) -> None:
    res = run_in(netns, WATCH_SCRIPT, timeout=90)
    assert res["baseline"] == {
        "ipv4": [],
        "ipv6": [],
        "has_default_route_v4": False,
        "has_default_route_v6": False,
    }
    # handover latency: an added or removed address is reported well within a second
    # (the IPv6 one waits for DAD, about one second by default)
    assert res["v4_add_s"] < 1.0
    assert res["v4_del_s"] < 1.0
    assert res["carrier_loss_s"] < 1.0
    assert res["v6_sync_while_tentative"] == []
    assert res["v6_add_s"] < 5.0
    assert res["burst_reports"] <= 3
    assert res["sync"] == {
        "ipv4": ["192.0.2.10"],
        "ipv6": ["2001:db8:1::10"],
        "has_default_route_v4": True,
        "has_default_route_v6": True,
    }
    assert "198.18.0.1" in res["sync_not_ignoring"]["ipv4"]
    for s in res["seen"]:  # never the ignored TUN, loopback or link-local
        assert not {"100.64.0.1", "198.18.0.1", "127.0.0.1"} & set(s["ipv4"]), s
        assert not any(a == "::1" or a.startswith("fe80:") for a in s["ipv6"]), s
    assert res["changes"] == len(res["seen"])


# -- offline: the selection rules over netlink-shaped messages ----------------------


def _link(index: int, name: str, flags: int = 0x1 | 0x40) -> dict[str, Any]:
    return {"index": index, "flags": flags, "IFLA_IFNAME": name}


def _addr(index: int, ip: str, scope: int = 0, flags: int = 0x80) -> dict[str, Any]:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return {"family": family, "index": index, "scope": scope, "flags": flags, "IFA_ADDRESS": ip}


def _default(family: int, oif: int, table: int = 254, rtype: int = 1, flags: int = 0) -> Any:
    return {
        "family": family,
        "dst_len": 0,
        "table": table,
        "type": rtype,
        "flags": flags,
        "RTA_TABLE": table,
        "RTA_OIF": oif,
    }


def test_build_address_set_selection_rules() -> None:
    links = [
        _link(1, "lo", 0x1 | 0x8 | 0x40),
        _link(2, "eth0"),
        _link(3, "ntm0"),
        _link(4, "wlan0", 0x1),  # up but no carrier
        _link(5, "eth1", 0x40),  # administratively down
    ]
    addrs = [
        _addr(1, "127.0.0.1", scope=254),
        _addr(1, "::1", scope=254),
        _addr(2, "10.10.1.100"),
        _addr(2, "198.51.100.7"),
        _addr(2, "169.254.3.4", scope=253),
        _addr(2, "fe80::1", scope=253),
        _addr(2, "2001:db8:b::100"),
        _addr(2, "2001:db8:b::200", flags=0x40),  # tentative
        _addr(2, "2001:db8:b::300", flags=0x08),  # dadfailed
        _addr(2, "2001:db8:b::400", flags=0x20),  # deprecated
        _addr(2, "fd00::5"),  # ULA: private but usable
        _addr(3, "100.64.0.1"),  # our TUN
        _addr(4, "192.168.1.5"),
        _addr(5, "192.168.2.5"),
    ]
    routes = [
        _default(socket.AF_INET, 3),  # via the ignored TUN: not a way out
        _default(socket.AF_INET6, 2, table=100),  # policy table: unused without a rule
        _default(socket.AF_INET6, 2, rtype=7),  # unreachable
        _default(socket.AF_INET6, 2, flags=0x10),  # linkdown
    ]
    got = netwatch.build_address_set(links, addrs, routes, ["ntm0"])
    assert got == netwatch.AddressSet(
        ipv4=("10.10.1.100", "198.51.100.7"),
        ipv6=("2001:db8:b::100", "fd00::5"),
    )
    # IFA_LOCAL wins over IFA_ADDRESS (the peer on point-to-point links)
    ptp = dict(_addr(2, "203.0.113.1"), IFA_LOCAL="203.0.113.2")
    both = [_default(socket.AF_INET, 2), _default(socket.AF_INET6, 2)]
    got = netwatch.build_address_set(links, [ptp], both, ["ntm0"])
    assert got.ipv4 == ("203.0.113.2",)
    assert got.has_default_route_v4 and got.has_default_route_v6
    assert got.to_dict()["ipv4"] == ["203.0.113.2"]
