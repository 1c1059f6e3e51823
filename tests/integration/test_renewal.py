"""Path renewal in the lab: a relayed flow outlives two path lifetimes.

dc1 runs with `path_lifetime = 20` (lab/config/dc1-short.toml) and rs1 as its only relay;
mn1 (behind nat-a) pings cn1 (behind nat-b) through rs1 for 2.5 lifetimes. mn1 renews the
path before each lifetime ends, both ends switch to the new path, and rs1 drops the old
bindings when their lifetime is over.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import pytest

from tests.integration.conftest import Lab, compose_subset
from tests.integration.test_core import curl, status, wait_for

pytestmark = pytest.mark.lab

LIFETIME = 20  # s, as in lab/config/dc1-short.toml
INTERVAL = 0.1  # s between pings
SERVICES = ["pki", "dns", "resolver", "nat-a", "nat-b", "rs1", "dc1", "cn1", "mn1"]
CN1 = "cn1.ntm.example.com"


def short_lived_lab() -> str:
    text = compose_subset(SERVICES)
    return text.replace("lab/config/dc1.toml", "lab/config/dc1-short.toml")


def relay_path_to_cn1(lab: Lab) -> dict[str, Any]:
    paths = [p for p in status(lab, "mn1")["paths"] if p["peer_fqdn"] == CN1]
    return paths[-1] if paths else {}


def test_a_relayed_flow_outlives_two_path_lifetimes(make_lab: Callable[[str], Lab]) -> None:
    lab = make_lab(short_lived_lab())
    wait_for(lambda: status(lab, "mn1")["registered"], 30, "mn1 registered")
    wait_for(lambda: status(lab, "cn1")["registered"], 30, "cn1 registered")
    wait_for(lambda: status(lab, "dc1")["relays"][0]["healthy"], 30, "rs1 healthy at dc1")
    vip = status(lab, "mn1")["vip"]
    assert f"server=cn1 client={vip}" in curl(lab, "http://peer.example.com/").stdout
    first = relay_path_to_cn1(lab)
    assert first["kind"] == "relay" and first["relay"]["bound"] is True
    cn1_vip = status(lab, "cn1")["vip"]

    count = int(2.5 * LIFETIME / INTERVAL)
    flow = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            f"{lab.name}-mn1",
            "ping",
            "-n",
            "-i",
            str(INTERVAL),
            "-c",
            str(count),
            "-W",
            "1",
            cn1_vip,
        ],
        capture_output=True,
        text=True,
        timeout=2.5 * LIFETIME + 30,
        check=False,
    )
    seqs = sorted({int(s) for s in re.findall(r"icmp_seq=(\d+)", flow.stdout)})
    assert seqs, flow.stdout[-500:] + flow.stderr[-500:]
    # a gap: pings lost in a row (and the flow's start and end count too)
    edges = [0, *seqs, count + 1]
    longest = max(b - a - 1 for a, b in pairwise(edges)) * INTERVAL
    lost = count - len(seqs)
    renewal = status(lab, "mn1")["renewal"]
    print(
        f"{count} pings at {INTERVAL * 1000:.0f} ms over {count * INTERVAL:.0f} s "
        f"(path lifetime {LIFETIME} s): {lost} lost, longest gap {longest:.1f} s; "
        f"renewals {renewal['counters']}"
    )
    assert longest < 1.0, flow.stdout[-800:]  # never a stall a user would notice

    # mn1 renewed twice; the newest path carries the flow through rs1, bound there
    assert renewal["counters"]["renewals"] >= 2
    now = relay_path_to_cn1(lab)
    assert now["path_id"] != first["path_id"]
    assert now["kind"] == "relay" and now["relay"]["bound"] is True
    assert now["peer_address"] == ["198.51.100.50", 7500]
    mn1_ids = {p["path_id"] for p in status(lab, "mn1")["paths"] if p["peer_fqdn"] == CN1}
    cn1_ids = {p["path_id"] for p in status(lab, "cn1")["paths"] if p["peer_vip"] == vip}
    for ids in (mn1_ids, cn1_ids):  # both ends dropped the first path for the new one
        assert now["path_id"] in ids and first["path_id"] not in ids
    # rs1 forgot the first binding when its lifetime ended, and forwards the new one
    rs1 = status(lab, "rs1")
    assert rs1["counters"]["paths_expired_lifetime"] >= 1
    listed = {p["path_id"]: p for p in rs1["paths"]}
    assert first["path_id"] not in listed
    assert listed[now["path_id"]]["initiator"]["tx_packets"] > 0
    assert status(lab, "dc1")["counters"]["relayed_paths"] >= 3
    assert f"server=cn1 client={vip}" in curl(lab, "http://peer.example.com/").stdout
