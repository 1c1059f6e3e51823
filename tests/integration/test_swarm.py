"""`ntm swarm` in the netns lab: mn2 plays many mobile nodes in front of the LB service.

A small lab (DC, resolver, NAT, ntma1 -> lb -> web1..3, mn2) with COUNT identities: each
registers with its own vIP, policy routing sends each vIP's packets into its own TUN, the
swarm's resolver answers an identity's query (sent from its vIP) with a tunnel built by that
identity, the web servers see that identity's vIP, and a move of the host re-registers every
identity from the new network with the same vIP. Every wait polls a condition with a bound.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import (
    COMPOSE,
    Lab,
    compose_subset,
    lab_unavailable_reason,
    running_lab,
)
from tests.integration.test_core import status, wait_for

pytestmark = pytest.mark.lab

PY = sys.executable
COUNT = 24
SERVICES = [
    "pki", "dns", "resolver", "nat-a", "rtr-b", "dc1", "lb", "web1", "web2", "web3", "ntma1", "mn2",
]  # fmt: skip
START_BOUND = 180.0  # s; two shared CPUs may be busy with other labs
VIP_POOL = ipaddress.ip_network("100.64.0.0/16")  # dc1's

# Runs in mn2 as identity <vip>: resolve through the swarm's resolver from the vIP, then one
# HTTP request from the vIP. Prints the resolved address and the body as JSON.
AS_IDENTITY = r"""
import json, subprocess, sys
from ntm_node.swarm_client import resolve
vip, server = sys.argv[1], (sys.argv[2], 53)
addr = resolve("www.example.com", vip, server)[0]
out = subprocess.run(
    ["curl", "-sS", "--max-time", "10", "--interface", vip,
     "--resolve", f"www.example.com:80:{addr}", "http://www.example.com/whoami"],
    capture_output=True, text=True)
print(json.dumps({"addr": addr, "body": out.stdout.strip(), "err": out.stderr.strip()}))
"""


@pytest.fixture(scope="module")
def swarm_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    mn2 = yaml.safe_load(COMPOSE.read_text())["services"]["mn2"]
    command = list(mn2["command"])
    command[command.index("--count") + 1] = str(COUNT)
    mn2["command"] = command
    with running_lab(
        compose_subset(SERVICES, extra={"mn2": mn2}), tmp_path_factory.mktemp("swarm")
    ) as lab:
        yield lab


@pytest.fixture(scope="module")
def ready(swarm_lab: Lab) -> dict[str, Any]:
    lab = swarm_lab
    wait_for(lambda: status(lab, "mn2")["ready"], START_BOUND, f"{COUNT} identities ready")
    wait_for(lambda: status(lab, "ntma1")["registered"], 30.0, "ntma1 registered")
    ids: dict[str, Any] = json.loads((lab.state / "mn2" / "identities.json").read_text())
    return ids


def as_identity(lab: Lab, vip: str) -> dict[str, str]:
    out = lab.exec("mn2", PY, "-c", AS_IDENTITY, vip, "127.0.0.53", timeout=60.0)
    result: dict[str, str] = json.loads(out.stdout)
    return result


def swarm_nodes_at_dc(lab: Lab) -> list[dict[str, Any]]:
    nodes = status(lab, "dc1")["nodes"]
    return [n for n in nodes if n["fqdn"].endswith(".swarm.ntm.example.com")]


def test_every_identity_registers_with_its_own_vip_and_route(
    swarm_lab: Lab, ready: dict[str, Any]
) -> None:
    lab, ids = swarm_lab, ready["identities"]
    assert ready["complete"] is True and ready["dns"] == "127.0.0.53:53"
    assert [i["fqdn"] for i in ids] == [f"s{n}.swarm.ntm.example.com" for n in range(COUNT)]
    vips = [i["vip"] for i in ids]
    assert len(set(vips)) == COUNT
    assert all(ipaddress.ip_address(v) in VIP_POOL for v in vips)
    assert len({i["tun"] for i in ids}) == COUNT
    assert {i["status"] for i in ids} == {"registered"}

    st = status(lab, "mn2")
    assert st["role"] == "swarm" and st["registered"] == COUNT
    assert {s["vip"] for s in st["identities"]} == set(vips)

    # The DC has each identity on its own connection, from its own tunnel port.
    at_dc = {n["fqdn"]: n for n in swarm_nodes_at_dc(lab)}
    assert {f: n["vip"] for f, n in at_dc.items()} == {i["fqdn"]: i["vip"] for i in ids}
    assert all(n["connected"] for n in at_dc.values())
    ports = {n["reported"][0][1] for n in at_dc.values()}
    assert ports == set(range(7400, 7400 + COUNT))

    # Each vIP's packets leave through its own TUN.
    for ident in (ids[0], ids[COUNT - 1]):
        route = lab.exec("mn2", "ip", "-4", "route", "get", "100.64.255.1", "from", ident["vip"])
        assert f"dev {ident['tun']} " in route.stdout, route.stdout
    rules = lab.exec("mn2", "ip", "-4", "rule").stdout
    assert all(f"from {v} lookup" in rules for v in vips), rules


def test_each_identity_reaches_the_service_with_its_own_vip(
    swarm_lab: Lab, ready: dict[str, Any]
) -> None:
    lab, ids = swarm_lab, ready["identities"]
    gateway_vip = status(lab, "ntma1")["vip"]
    for ident in (ids[0], ids[13]):
        got = as_identity(lab, ident["vip"])
        assert got["addr"] == gateway_vip, got  # intercepted: the NTMA's vIP
        assert re.fullmatch(rf"server=web[123] client={re.escape(ident['vip'])}", got["body"]), got

    # The tunnels were built by those two identities, and by no other.
    by_fqdn = {s["fqdn"]: s for s in status(lab, "mn2")["identities"]}
    assert by_fqdn[ids[0]["fqdn"]]["established"] == 1
    assert by_fqdn[ids[13]["fqdn"]]["established"] == 1
    assert sum(s["established"] for s in by_fqdn.values()) == 2

    # A query that comes from no identity's vIP gets the ordinary answer.
    plain = lab.exec(
        "mn2", PY, "-c",
        "from ntm_node.swarm_client import resolve; "
        "print(resolve('www.example.com', '127.0.0.1', ('127.0.0.53', 53))[0])",
    ).stdout.strip()  # fmt: skip
    assert ipaddress.ip_address(plain) not in ipaddress.ip_network("100.64.0.0/10"), plain
    assert status(lab, "mn2")["dns"]["counters"]["not_from_identity"] >= 1


def test_a_move_re_registers_every_identity_with_the_same_vip(
    swarm_lab: Lab, ready: dict[str, Any]
) -> None:
    lab, ids = swarm_lab, ready["identities"]
    # Quiet paths are not probed ([swarm] probe_idle_paths = false): the identities that
    # built tunnels above have sent a probe or two at most since (after a TCP exchange's
    # last ACK), where a watch on every quiet path would send about 10 a second.
    lines = {s["fqdn"]: s for s in status(lab, "mn2")["identities"]}
    for ident in (ids[0], ids[13]):
        brief = lines[ident["fqdn"]]["failover"]
        assert brief["gateways"] == {"www.ntm.example.com": "ntma1.ntm.example.com"}, brief
        assert brief["probes_sent"] <= 2, brief
    lab.move("mn2", "access-b")

    def all_from_access_b() -> bool:
        nodes = swarm_nodes_at_dc(lab)
        return len(nodes) == COUNT and all(
            n["connected"] and n["reported"] and n["reported"][0][0] == "2001:db8:b::101"
            for n in nodes
        )

    wait_for(all_from_access_b, 120.0, "every identity registered from access-b")
    at_dc = {n["fqdn"]: n["vip"] for n in swarm_nodes_at_dc(lab)}
    assert at_dc == {i["fqdn"]: i["vip"] for i in ids}  # same vIPs after the move

    for ident in (ids[0], ids[5]):  # a tunnel refreshed after the move, and a new one
        got = as_identity(lab, ident["vip"])
        assert got["body"].endswith(f"client={ident['vip']}"), got
    assert status(lab, "mn2")["addresses"]["ipv6"] == ["2001:db8:b::101"]
    # What the identities file says is still true.
    after = json.loads((Path(lab.state) / "mn2" / "identities.json").read_text())
    assert [i["vip"] for i in after["identities"]] == [i["vip"] for i in ids]
