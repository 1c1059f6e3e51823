"""Issue 3 in the lab: relayed paths (both behind NAT, across IP families) and relay failover."""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

import pytest

from tests.integration.test_core import curl, status, wait_for

pytestmark = pytest.mark.lab


def paths_to(lab: Any, service: str, fqdn: str) -> list[dict[str, Any]]:
    return [p for p in status(lab, service)["paths"] if p["peer_fqdn"] == fqdn]


def test_both_behind_nat_goes_through_a_relay(lab: Any) -> None:
    wait_for(lambda: status(lab, "mn1")["registered"], what="mn1 registered")
    wait_for(lambda: status(lab, "cn1")["registered"], what="cn1 registered")
    vip = status(lab, "mn1")["vip"]
    page = curl(lab, "http://peer.example.com/").stdout
    assert f"server=cn1 client={vip}" in page  # cn1 sees mn1's vIP through the relay
    path = paths_to(lab, "mn1", "cn1.ntm.example.com")[-1]
    assert path["kind"] == "relay" and path["relay"]["bound"] is True
    assert path["peer_address"][1] == 7500  # the tunnel's outer peer is the relay
    relays = {r["name"]: r for r in status(lab, "dc1")["relays"]}
    assert relays["rs1"]["healthy"] and relays["rs2"]["healthy"]


def test_relay_bridges_ipv6_only_and_ipv4_only(lab: Any) -> None:
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
        page = wait_for(
            lambda: curl(lab, "http://peer.example.com/", check=False).stdout, what="curl"
        )
        assert f"server=cn1 client={vip}" in page
        path = paths_to(lab, "mn1", "cn1.ntm.example.com")[-1]
        assert path["kind"] == "relay" and ":" in path["peer_address"][0]  # IPv6 to the relay
        cn1_path = [p for p in status(lab, "cn1")["paths"] if p["peer_vip"] == vip][-1]
        assert "." in cn1_path["relay"]["endpoint"][0]  # cn1 reaches the relay over IPv4
    finally:
        lab.move("mn1", "access-a")
    wait_for(
        lambda: (s := status(lab, "mn1"))["registered"] and s["seen_by_dc"][0] == "198.51.100.2",
        what="mn1 back on access-a",
    )


def test_killing_the_relay_moves_the_path_and_the_flow_resumes(lab: Any) -> None:
    vip = status(lab, "mn1")["vip"]
    assert f"client={vip}" in curl(lab, "http://peer.example.com/").stdout
    used = paths_to(lab, "mn1", "cn1.ntm.example.com")[-1]["peer_address"]
    dead = "rs1" if used[0] in ("198.51.100.50", "2001:db8:100::50") else "rs2"
    cn1_vip = status(lab, "cn1")["vip"]
    # A 20 Hz ping flow through the relayed path while the relay it uses is killed.
    flow = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            f"{lab.name}-mn1",
            "ping",
            "-n",
            "-i",
            "0.05",
            "-c",
            "200",
            "-W",
            "1",
            cn1_vip,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert flow.stdout is not None
        head = [flow.stdout.readline() for _ in range(10)]  # the flow runs before the kill
        lab.kill(dead)
        killed_at = time.monotonic()
        out, _ = flow.communicate(timeout=60)
    finally:
        if flow.poll() is None:
            flow.kill()
        lab.start(dead)
    seqs = [int(m) for m in re.findall(r"icmp_seq=(\d+)", "".join(head) + out)]
    assert seqs and max(seqs) >= 190, out[-500:]  # the flow resumed and ran to the end
    lost = 200 - len(set(seqs))
    print(
        f"relay {dead} killed: {lost} of 200 pings at 50 ms lost, stall ~{lost * 50} ms "
        f"(measured {time.monotonic() - killed_at:.1f}s after the kill)"
    )
    counters = status(lab, "dc1")["counters"]
    assert counters.get("relay_failovers", 0) >= 1
    now_used = paths_to(lab, "mn1", "cn1.ntm.example.com")[-1]["peer_address"]
    assert now_used != used
