"""Issue 2 end to end in the netns lab: CNAME-triggered tunnels, pass-through, moves."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.lab

PY = sys.executable


def status(lab: Any, service: str) -> dict[str, Any]:
    out = lab.exec(service, "ntm", "status", "--socket", f"{lab.state}/run/{service}.sock")
    return json.loads(out.stdout)


def wait_for(predicate: Any, timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def curl(lab: Any, url: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return lab.exec("mn1", "curl", "-sS", "--max-time", "10", url, check=check)


DNS_QUERY = r"""
import socket, sys, dnslib
q = dnslib.DNSRecord.question(sys.argv[1], sys.argv[2])
q.header.id = 4242
out = {}
for server in sys.argv[3:]:
    s = socket.socket(socket.AF_INET6 if ':' in server else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(q.pack(), (server, 53))
    data, _ = s.recvfrom(4096)
    r = dnslib.DNSRecord.parse(data)
    out[server] = sorted((str(rr.rname), rr.rtype, str(rr.rdata)) for rr in r.rr)
print(__import__('json').dumps(out))
"""


def dns_answers(lab: Any, service: str, name: str, qtype: str, *servers: str) -> dict[str, Any]:
    out = lab.exec(service, PY, "-c", DNS_QUERY, name, qtype, *servers)
    return {k: [tuple(rr) for rr in v] for k, v in json.loads(out.stdout).items()}


@pytest.fixture(scope="module")
def ready(lab: Any) -> Iterator[Any]:
    wait_for(lambda: status(lab, "mn1")["registered"], what="mn1 registered")
    wait_for(lambda: status(lab, "cn2")["registered"], what="cn2 registered")
    yield lab


def test_global_name_goes_through_the_tunnel(ready: Any) -> None:
    lab = ready
    mn1 = status(lab, "mn1")
    page = curl(lab, "http://global.example.com/").stdout
    assert "server=cn2" in page
    assert f"client={mn1['vip']}" in page  # cn2 sees mn1's virtual IP, not its real address
    paths = status(lab, "mn1")["paths"]
    assert any(p["peer_fqdn"] == "cn2.ntm.example.com" and p["kind"] == "direct" for p in paths)
    cn2_paths = status(lab, "cn2")["paths"]
    assert any(p["peer_vip"] == mn1["vip"] and p["state"] == "established" for p in cn2_paths)


def test_application_gets_the_peer_vip(ready: Any) -> None:
    lab = ready
    cn2_vip = status(lab, "cn2")["vip"]
    got = dns_answers(lab, "mn1", "global.example.com", "A", "127.0.0.1")["127.0.0.1"]
    assert ("cn2.ntm.example.com.", 1, cn2_vip) in got
    assert ("global.example.com.", 5, "cn2.ntm.example.com.") in got
    # AAAA for a marked name: NODATA with the CNAME chain, so apps fall back to the IPv4 vIP
    got6 = dns_answers(lab, "mn1", "global.example.com", "AAAA", "127.0.0.1")["127.0.0.1"]
    assert all(rtype != 28 for _, rtype, _ in got6)


def test_plain_name_passes_through_untouched(ready: Any) -> None:
    lab = ready
    before_dc = status(lab, "dc1")["counters"].get("directions", 0)
    before_mn = status(lab, "mn1")["counters"]["dns"].get("intercepted", 0)
    assert "server=plainweb" in curl(lab, "http://plain.example.com/").stdout
    got = dns_answers(lab, "mn1", "plain.example.com", "A", "127.0.0.1", "198.51.100.11")
    assert got["127.0.0.1"] == got["198.51.100.11"] == [("plain.example.com.", 1, "198.51.100.40")]
    assert status(lab, "dc1")["counters"].get("directions", 0) == before_dc
    assert status(lab, "mn1")["counters"]["dns"].get("intercepted", 0) == before_mn


def test_port_53_is_caught_transparently(ready: Any) -> None:
    """An application that asks the resolver directly still gets the vIP (nftables redirect)."""
    lab = ready
    cn2_vip = status(lab, "cn2")["vip"]
    got = dns_answers(lab, "mn1", "global.example.com", "A", "198.51.100.11")["198.51.100.11"]
    assert ("cn2.ntm.example.com.", 1, cn2_vip) in got
    table = lab.exec("mn1", "nft", "list", "table", "ip", "ntm_dns_mn1").stdout
    assert "redirect to :53" in table


def test_internet_sees_only_tunnel_udp(ready: Any) -> None:
    lab = ready
    pcap = f"{lab.state}/cn2-internet.pcap"
    cap = subprocess.Popen(
        # --immediate-mode: hand every packet over at once, so nothing is lost at SIGTERM.
        # Port 4433 is the QUIC control plane, itself encrypted.
        [
            "ip",
            "netns",
            "exec",
            f"{lab.name}-cn2",
            "tcpdump",
            "-i",
            "internet",
            "-U",
            "-n",
            "--immediate-mode",
            "-w",
            pcap,
            "(tcp or udp) and not port 4433",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cap.stderr is not None
        line = cap.stderr.readline()  # "listening on internet ..." once the capture runs
        assert "listening" in line, line
        page = curl(lab, "http://global.example.com/").stdout
        assert "server=cn2" in page
    finally:
        cap.terminate()
        cap.wait(timeout=10)
    raw = Path(pcap).read_bytes()
    assert b"server=cn2" not in raw and b"GET /" not in raw  # no plaintext on the wire
    text = subprocess.run(
        ["tcpdump", "-n", "-r", pcap], capture_output=True, text=True, check=True
    ).stdout
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines, "the capture saw no tunnel packets"
    assert all(".7400 > " in ln and ": UDP" in ln for ln in lines), text


def test_move_and_back_keeps_vip(ready: Any) -> None:
    lab = ready
    vip = status(lab, "mn1")["vip"]
    lab.move("mn1", "access-b")
    try:
        wait_for(
            lambda: (
                (s := status(lab, "mn1"))["registered"]
                and s["seen_by_dc"][0].startswith("2001:db8:b:")
            ),
            what="mn1 re-registered from access-b",
        )
        assert status(lab, "mn1")["vip"] == vip
        page = wait_for(
            lambda: curl(lab, "http://global.example.com/", check=False).stdout, what="curl via v6"
        )
        assert f"client={vip}" in page
    finally:
        lab.move("mn1", "access-a")
    wait_for(
        lambda: (s := status(lab, "mn1"))["registered"] and s["seen_by_dc"][0] == "198.51.100.2",
        what="mn1 re-registered from access-a",
    )
    assert status(lab, "mn1")["vip"] == vip
    page = wait_for(
        lambda: curl(lab, "http://global.example.com/", check=False).stdout, what="curl via v4"
    )
    assert f"client={vip}" in page


def test_dns_check_explains_a_name(ready: Any) -> None:
    lab = ready
    out = lab.exec(
        "plainweb",
        "ntm",
        "dns",
        "check",
        "global.example.com",
        "--resolver",
        "198.51.100.11",
        "--json",
    ).stdout
    report = json.loads(out)
    assert report["ok"] is True, out
    text = lab.exec(
        "plainweb", "ntm", "dns", "check", "global.example.com", "--resolver", "198.51.100.11"
    ).stdout
    assert "cn2.ntm.example.com" in text and "dc1.ntm.example.com" in text
    plain = lab.exec(
        "plainweb", "ntm", "dns", "check", "plain.example.com", "--resolver", "198.51.100.11"
    ).stdout
    assert "pass" in plain.lower()


def test_reverse_path_when_only_the_responder_is_behind_nat(ready: Any) -> None:
    """cn2 (global) -> cn1 (behind nat-b): the DC directs cn1 to open the tunnel."""
    lab = ready
    wait_for(lambda: status(lab, "cn1")["registered"], what="cn1 registered")
    cn2_vip = status(lab, "cn2")["vip"]
    page = lab.exec("cn2", "curl", "-sS", "--max-time", "10", "http://peer.example.com/").stdout
    assert f"server=cn1 client={cn2_vip}" in page
    paths = [p for p in status(lab, "cn2")["paths"] if p["peer_fqdn"] == "cn1.ntm.example.com"]
    assert paths and paths[-1]["kind"] == "reverse" and paths[-1]["role"] == "responder"
    cn1_paths = status(lab, "cn1")["paths"]
    assert any(p["kind"] == "reverse" and p["role"] == "initiator" for p in cn1_paths)


def test_far_name_through_dc_federation(ready: Any) -> None:
    """cn3 is registered at dc2 (ntm.example.net); dc1 learns of it only by asking dc2."""
    lab = ready
    wait_for(lambda: status(lab, "cn3")["registered"], what="cn3 registered at dc2")
    vip = status(lab, "mn1")["vip"]
    page = curl(lab, "http://far.example.com/").stdout
    assert f"server=cn3 client={vip}" in page
    dc1 = status(lab, "dc1")
    assert "cn3.ntm.example.net" not in {n["fqdn"] for n in dc1["nodes"]}
    assert dc1["counters"].get("federation_answered", 0) >= 1
    assert status(lab, "dc2")["counters"].get("federation_requests", 0) >= 1
    paths = [p for p in status(lab, "mn1")["paths"] if p["peer_fqdn"] == "cn3.ntm.example.net"]
    assert paths and paths[-1]["state"] == "established"
