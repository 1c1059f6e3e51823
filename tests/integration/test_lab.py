"""The netns lab itself: topology, NAT, DNS, move, kill/start, and clean teardown.

Most tests share one trimmed lab (compose.yaml without the NTM daemons, plus a stand-in for
dc1 that serves ntm.example.com with NSD, and plain clients). Waits poll a condition.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from lab import names
from tests.integration.conftest import (
    COMPOSE,
    REPO,
    Lab,
    compose_subset,
    lab_unavailable_reason,
    poll,
    running_lab,
    unique_name,
)

pytestmark = pytest.mark.lab

PLAIN_V4 = "198.51.100.40"
PLAIN_V6 = "2001:db8:100::40"
RESOLVER_V4 = "198.51.100.11"
RESOLVER_V6 = "2001:db8:100::11"

FAKE_DC_ZONE = """\
$ORIGIN ntm.example.com.
$TTL 30
@    IN SOA dc1.ntm.example.com. hostmaster.example.com. 1 3600 600 86400 30
@    IN NS   dc1.ntm.example.com.
dc1  IN A    198.51.100.20
dc1  IN AAAA 2001:db8:100::20
cn2  IN A    100.64.0.2
"""

INTERNET_ROUTES = yaml.safe_load(COMPOSE.read_text())["x-internet-env"]["NTM_LAB_ROUTES"]

ROAM = {
    "access-a": {"ipv4_address": "10.10.1.101", "routes": "default via 10.10.1.1"},
    "access-b": {"ipv6_address": "2001:db8:b::101", "routes": "-6 default via 2001:db8:b::1"},
}


def client(address: str, **more: object) -> dict[str, object]:
    """A do-nothing host on access-a that uses the lab resolver."""
    return {
        "command": ["sleep", "infinity"],
        "environment": {"NTM_LAB_ROUTES": "default via 10.10.1.1"},
        "dns": [RESOLVER_V4],
        "networks": {"access-a": {"ipv4_address": address}},
        **more,
    }


def fake_dc1(zonefile: Path) -> dict[str, object]:
    """NSD serving ntm.example.com at dc1's address, so the delegation can be followed."""
    return {
        "command": [
            "ntm",
            "lab",
            "render",
            "lab/templates/nsd.conf",
            "${NTM_LAB_STATE}/fakedc/nsd.conf",
            "--",
            "nsd",
            "-d",
            "-c",
            "${NTM_LAB_STATE}/fakedc/nsd.conf",
        ],
        "environment": {
            # the routes of every host on `internet` (to access-b, isp1, isp2)
            "NTM_LAB_ROUTES": INTERNET_ROUTES,
            "NTM_NSD_DIR": "${NTM_LAB_STATE}/fakedc",
            "NTM_NSD_ZONE": "ntm.example.com",
            "NTM_NSD_ZONEFILE": str(zonefile),
            # the template serves two zones; the stand-in's second one is never asked
            "NTM_NSD_ZONE2": "example.net",
            "NTM_NSD_ZONEFILE2": "lab/dns/example.net.zone",
        },
        "networks": {
            "internet": {"ipv4_address": "198.51.100.20", "ipv6_address": "2001:db8:100::20"}
        },
        "healthcheck": {
            "test": [
                "CMD",
                "ntm",
                "lab",
                "dnsprobe",
                "--expect",
                "100.64.0.2",
                "cn2.ntm.example.com",
            ],
            "interval": "1s",
            "retries": 20,
        },
    }


def ntma2_stand_in() -> dict[str, object]:
    """ntma2 exactly as compose.yaml sets up its network (uplinks, routes, rules, sysctls),
    serving HTTP instead of running the adaptor."""
    spec: dict[str, object] = dict(yaml.safe_load(COMPOSE.read_text())["services"]["ntma2"])
    spec["command"] = ["ntm", "lab", "httpd", "--name", "ntma2", "--port", "80"]
    spec["healthcheck"] = {"test": ["CMD", "curl", "-fsS", "http://127.0.0.1/"], "retries": 30}
    return spec


def trimmed_compose(tmp: Path) -> str:
    zonefile = tmp / "ntm.example.com.zone"
    zonefile.write_text(FAKE_DC_ZONE)
    return compose_subset(
        ["dns", "resolver", "nat-a", "rtr-b", "plainweb", "rtr-isp1", "rtr-isp2"],
        {
            "dc1": fake_dc1(zonefile),
            "client-a": client("10.10.1.100"),
            "roamer": client("10.10.1.101", **{"x-ntm-roam": ROAM}),
            "ntma2": ntma2_stand_in(),
        },
    )


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    where = tmp_path_factory.mktemp("trimmed")
    with running_lab(trimmed_compose(where), where) as lab:
        yield lab


def curl(lab: Lab, service: str, url: str, check: bool = True) -> str:
    done = lab.exec(service, "curl", "-sS", "--max-time", "5", url, check=check)
    return done.stdout


def reachable(lab: Lab, service: str, url: str, expect: str) -> Callable[[], bool]:
    return lambda: expect in curl(lab, service, url, check=False)


# --- reachability and NAT -----------------------------------------------------------------


def test_plainweb_answers_internet_hosts_over_ipv4_and_ipv6(trimmed: Lab) -> None:
    assert curl(trimmed, "dns", f"http://{PLAIN_V4}/") == ("server=plainweb client=198.51.100.10\n")
    assert curl(trimmed, "resolver", f"http://[{PLAIN_V6}]/whoami") == (
        "server=plainweb client=2001:db8:100::11\n"
    )


def test_access_a_host_reaches_plainweb_masqueraded_by_nat_a(trimmed: Lab) -> None:
    assert curl(trimmed, "client-a", f"http://{PLAIN_V4}/") == (
        "server=plainweb client=198.51.100.2\n"
    )


def test_exec_passes_output_and_exit_code_through(trimmed: Lab) -> None:
    done = trimmed.exec("client-a", "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert (done.returncode, done.stdout, done.stderr) == (7, "out\n", "err\n")


def test_status_reports_services_pids_and_addresses(trimmed: Lab) -> None:
    status = trimmed.status()
    plainweb = status["services"]["plainweb"]
    assert plainweb["alive"] is True
    assert plainweb["addresses"] == {"internet": [f"{PLAIN_V4}/24", f"{PLAIN_V6}/64"]}
    assert status["services"]["nat-a"]["addresses"]["access-a"] == ["10.10.1.1/24"]


# --- DNS ----------------------------------------------------------------------------------


def test_resolver_answers_plain_example_com(trimmed: Lab) -> None:
    assert trimmed.exec("client-a", "cat", "/etc/resolv.conf").stdout == (
        f"nameserver {RESOLVER_V4}\n"
    )
    out = trimmed.exec(
        "client-a", "ntm", "lab", "dnsprobe", "--server", RESOLVER_V4, "plain.example.com"
    ).stdout
    assert f"plain.example.com. A {PLAIN_V4}" in out
    out = trimmed.exec(
        "dns",
        "ntm",
        "lab",
        "dnsprobe",
        "--server",
        RESOLVER_V6,
        "--type",
        "AAAA",
        "plain.example.com",
    ).stdout
    assert f"plain.example.com. AAAA {PLAIN_V6}" in out


def test_resolver_follows_the_cname_and_the_ntm_delegation(trimmed: Lab) -> None:
    out = trimmed.exec(
        "client-a", "ntm", "lab", "dnsprobe", "--server", RESOLVER_V4, "global.example.com"
    ).stdout
    assert "global.example.com. CNAME cn2.ntm.example.com." in out
    assert "cn2.ntm.example.com. A 100.64.0.2" in out  # answered by "dc1" via NS delegation


def test_names_outside_the_lab_fail_fast_without_leaving_it(trimmed: Lab) -> None:
    done = trimmed.exec(
        "client-a", "ntm", "lab", "dnsprobe", "--server", RESOLVER_V4, "www.debian.org", check=False
    )
    assert done.returncode != 0


# --- kill / start / move ------------------------------------------------------------------


def test_kill_stops_a_service_and_start_brings_it_back(trimmed: Lab) -> None:
    trimmed.ntm_lab("kill", "plainweb")
    assert trimmed.status()["services"]["plainweb"]["alive"] is False
    assert curl(trimmed, "dns", f"http://{PLAIN_V4}/", check=False) == ""
    trimmed.ntm_lab("start", "plainweb")  # returns once the healthcheck passes
    assert "server=plainweb" in curl(trimmed, "dns", f"http://{PLAIN_V4}/")


def test_move_to_access_b_swaps_ipv4_for_ipv6(trimmed: Lab) -> None:
    trimmed.ntm_lab("move", "roamer", "--to", "access-b")
    addrs = trimmed.exec("roamer", "ip", "-br", "addr").stdout
    assert "10.10.1.101" not in addrs
    assert "2001:db8:b::101/64" in addrs
    poll(
        reachable(trimmed, "roamer", f"http://[{PLAIN_V6}]/", "client=2001:db8:b::101"),
        10,
        "roamer on access-b reaches plainweb over IPv6 through rtr-b",
    )
    assert trimmed.status()["services"]["roamer"]["networks"] == ["access-b"]

    trimmed.ntm_lab("move", "roamer", "--to", "access-a")
    assert "2001:db8:b::101" not in trimmed.exec("roamer", "ip", "-br", "addr").stdout
    poll(
        reachable(trimmed, "roamer", f"http://{PLAIN_V4}/", "client=198.51.100.2"),
        10,
        "roamer back on access-a reaches plainweb through nat-a",
    )


def test_move_to_an_undeclared_network_says_what_to_do(trimmed: Lab) -> None:
    done = trimmed.ntm_lab("move", "client-a", "--to", "access-b", check=False)
    assert done.returncode == 2
    assert "x-ntm-roam" in done.stderr


# --- link / impair -------------------------------------------------------------------------


def pings(lab: Lab, service: str, address: str, count: int) -> int:
    """How many of `count` quick pings (10 ms apart) were answered."""
    out = lab.exec(
        service, "ping", "-n", "-q", "-c", str(count), "-i", "0.01", "-W", "1", address, check=False
    ).stdout
    match = re.search(r"(\d+) received", out)
    assert match, out
    return int(match.group(1))


def answers(lab: Lab, service: str, address: str) -> Callable[[], bool]:
    return lambda: pings(lab, service, address, 1) == 1


def test_link_down_cuts_both_ways_and_keeps_the_address(trimmed: Lab) -> None:
    poll(answers(trimmed, "client-a", "10.10.1.1"), 10, "client-a answers before the cut")
    try:
        trimmed.link("client-a", "access-a", up=False)
        assert trimmed.status()["services"]["client-a"]["links"] == {"access-a": "down"}
        assert pings(trimmed, "client-a", "10.10.1.1", 3) == 0
        assert pings(trimmed, "nat-a", "10.10.1.100", 3) == 0
        assert "10.10.1.100/24" in trimmed.exec("client-a", "ip", "-br", "addr").stdout
    finally:
        trimmed.link("client-a", "access-a", up=True)
    assert trimmed.status()["services"]["client-a"]["links"] == {"access-a": "up"}
    poll(answers(trimmed, "client-a", "10.10.1.1"), 10, "client-a answers after the link is up")
    poll(answers(trimmed, "nat-a", "10.10.1.100"), 10, "nat-a reaches client-a again")


def test_link_down_on_internet_cuts_both_families(trimmed: Lab) -> None:
    try:
        trimmed.link("plainweb", "internet", up=False)
        assert curl(trimmed, "dns", f"http://{PLAIN_V4}/", check=False) == ""
        assert curl(trimmed, "dns", f"http://[{PLAIN_V6}]/", check=False) == ""
    finally:
        trimmed.link("plainweb", "internet", up=True)
    poll(reachable(trimmed, "dns", f"http://{PLAIN_V4}/", "server=plainweb"), 10, "v4 back")
    poll(reachable(trimmed, "dns", f"http://[{PLAIN_V6}]/", "server=plainweb"), 10, "v6 back")


def test_link_on_a_network_the_service_is_not_on_is_refused(trimmed: Lab) -> None:
    done = trimmed.ntm_lab("link", "client-a", "internet", "down", check=False)
    assert done.returncode == 2
    assert "client-a is not on internet (it is on access-a)" in done.stderr


def test_impair_30_percent_loses_about_that_many_frames_each_way(trimmed: Lab) -> None:
    poll(answers(trimmed, "client-a", "10.10.1.1"), 10, "client-a answers before the loss")
    try:
        trimmed.impair("access-a", 30)
        assert trimmed.status()["impairments"]["access-a"]["loss"] == 30.0
        got = pings(trimmed, "client-a", "10.10.1.1", 200)
        counters = trimmed.impairment("access-a")
    finally:
        trimmed.impair("access-a", 0)
    # Each ping is two frames, each lost with p = 0.3: a round trip is lost with 1 - 0.7^2 =
    # 0.51. Bounds at about 5 standard deviations (binomial) on either side.
    assert 56 <= got <= 140, got
    assert counters["seen"] >= 300
    assert 0.2 <= counters["dropped"] / counters["seen"] <= 0.4, counters


def test_impair_100_percent_stops_everything_and_0_removes_it(trimmed: Lab) -> None:
    poll(answers(trimmed, "client-a", "10.10.1.1"), 10, "client-a answers before the loss")
    try:
        trimmed.impair("access-a", 100)
        assert pings(trimmed, "client-a", "10.10.1.1", 20) == 0
        counters = trimmed.impairment("access-a")
        assert counters["loss"] == 100.0
        assert counters["dropped"] == counters["seen"] >= 20
    finally:
        trimmed.impair("access-a", 0)
    assert trimmed.impairment("access-a") == {
        "network": "access-a",
        "loss": 0.0,
        "seen": 0,
        "dropped": 0,
    }
    assert "access-a" not in trimmed.status()["impairments"]
    poll(answers(trimmed, "client-a", "10.10.1.1"), 10, "client-a answers once the loss is gone")
    assert pings(trimmed, "client-a", "10.10.1.1", 50) == 50


# --- ntma2's two uplinks (the real network setup, a web server in place of the adaptor) ----

NTMA2 = {"isp1": ("192.0.2.10", "2001:db8:201::10"), "isp2": ("203.0.113.10", "2001:db8:202::10")}
# Hosts of different addresses on `internet`: the multipath hash spreads them over both links.
SOURCES = ["dns", "resolver", "plainweb", "dc1", "client-a"]


def test_ntma2_is_reached_on_both_uplinks_over_both_families(trimmed: Lab) -> None:
    for v4, v6 in NTMA2.values():
        assert curl(trimmed, "plainweb", f"http://{v4}/") == ("server=ntma2 client=198.51.100.40\n")
        assert curl(trimmed, "plainweb", f"http://[{v6}]/") == (
            "server=ntma2 client=2001:db8:100::40\n"
        )
    assert "client=198.51.100.2" in curl(trimmed, "client-a", f"http://{NTMA2['isp2'][0]}/")


@pytest.mark.parametrize(("dead", "alive"), [("isp1", "isp2"), ("isp2", "isp1")])
def test_ntma2_replies_leave_by_the_uplink_they_came_in_on(
    trimmed: Lab, dead: str, alive: str
) -> None:
    """With one uplink losing everything, every client still gets answers on the other:
    without the rules, replies would follow the multipath default (isp1 2 : isp2 1)."""
    v4, v6 = NTMA2[alive]
    via = {"isp1": ("192.0.2.1", "2001:db8:201::1"), "isp2": ("203.0.113.1", "2001:db8:202::1")}
    for dst in (PLAIN_V4, "198.51.100.11", "198.51.100.2"):
        route = trimmed.exec("ntma2", "ip", "route", "get", dst, "from", v4).stdout
        assert f"via {via[alive][0]} dev {alive}" in route, route
    route = trimmed.exec("ntma2", "ip", "-6", "route", "get", PLAIN_V6, "from", v6).stdout
    assert f"via {via[alive][1]} dev {alive}" in route, route
    try:
        trimmed.impair(dead, 100)
        for source in SOURCES:
            assert "server=ntma2" in curl(trimmed, source, f"http://{v4}/"), source
        for source in ("dns", "resolver", "plainweb", "dc1"):
            assert "server=ntma2" in curl(trimmed, source, f"http://[{v6}]/"), source
        assert curl(trimmed, "plainweb", f"http://{NTMA2[dead][0]}/", check=False) == ""
    finally:
        trimmed.impair(dead, 0)


def test_ntma2_own_traffic_takes_both_uplinks_and_avoids_a_pulled_cable(trimmed: Lab) -> None:
    def devices(family: str, targets: list[str]) -> set[str]:
        out = set()
        for dst in targets:
            route = trimmed.exec("ntma2", "ip", family, "route", "get", dst).stdout
            out.add(route.split(" dev ")[1].split()[0])
        return out

    v4_targets = [f"198.51.100.{i}" for i in range(1, 60)]
    v6_targets = [f"2001:db8:100::{i:x}" for i in range(1, 60)]
    assert devices("-4", v4_targets) == {"isp1", "isp2"}  # multipath
    assert devices("-6", v6_targets) == {"isp1", "isp2"}
    try:
        trimmed.link("ntma2", "isp1", up=False)
        poll(lambda: devices("-4", v4_targets) == {"isp2"}, 10, "v4 default avoids isp1")
        assert devices("-6", v6_targets) == {"isp2"}
        assert "server=plainweb" in curl(trimmed, "ntma2", f"http://{PLAIN_V4}/")
        assert "server=plainweb" in curl(trimmed, "ntma2", f"http://[{PLAIN_V6}]/")
    finally:
        trimmed.link("ntma2", "isp1", up=True)
    poll(lambda: devices("-4", v4_targets) == {"isp1", "isp2"}, 10, "multipath again")


# --- isolation and teardown ---------------------------------------------------------------

SMALL = {
    "web": {
        "command": ["ntm", "lab", "httpd", "--name", "web", "--port", "80"],
        "networks": {"internet": {"ipv4_address": PLAIN_V4, "ipv6_address": PLAIN_V6}},
        "healthcheck": {"test": ["CMD", "curl", "-fsS", "http://127.0.0.1/"]},
    },
    "peer": {
        "command": ["sleep", "infinity"],
        "networks": {"internet": {"ipv4_address": "198.51.100.99"}},
        "dns": [RESOLVER_V4],
    },
}


def lab_leftovers(lab: Lab, pids: list[int]) -> list[str]:
    found = [ns for ns in _netns_list() if ns.startswith(names.namespace_prefix(lab.name))]
    etc = Path("/etc/netns")
    if etc.is_dir():
        found += [str(p) for p in etc.iterdir() if p.name.startswith(lab.name + "-")]
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for service, network in (("web", "internet"), ("peer", "internet")):
        if names.hub_port_name(service, network) + "@" in root_links:
            found.append(f"veth of {service} in the root namespace")
    found += [f"process {pid}" for pid in pids if _alive(pid)]
    return found


def _netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_two_labs_with_the_same_addresses_do_not_collide(
    trimmed: Lab, make_lab: Callable[[str], Lab]
) -> None:
    other = make_lab(compose_subset([], SMALL))
    assert curl(other, "peer", f"http://{PLAIN_V4}/") == "server=web client=198.51.100.99\n"
    other.down()
    assert "server=plainweb" in curl(trimmed, "dns", f"http://{PLAIN_V4}/")


def test_down_removes_everything_and_twice_is_fine(make_lab: Callable[[str], Lab]) -> None:
    lab = make_lab(compose_subset([], SMALL))
    pids = [s["pid"] for s in lab.status()["services"].values()]
    lab.exec("peer", "true")
    assert (Path("/etc/netns") / f"{lab.name}-peer" / "resolv.conf").exists()
    lab.down()
    assert lab_leftovers(lab, pids) == []
    assert lab.down().returncode == 0


def test_down_cleans_up_after_up_was_killed(tmp_path: Path) -> None:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    stuck = dict(SMALL)
    stuck["never"] = {
        "command": ["sleep", "infinity"],
        "healthcheck": {"test": ["CMD", "false"], "interval": "1s", "retries": 120},
    }
    compose = tmp_path / "compose.yaml"
    compose.write_text(compose_subset([], stuck))
    lab = Lab(unique_name(), tmp_path / "state", compose)
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ntm_cli.main",
            "lab",
            "up",
            "--name",
            lab.name,
            "--state",
            str(lab.state),
            "--file",
            str(compose),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        poll(
            lambda: (
                f"{lab.name}-never" in _netns_list() and (lab.state / "logs" / "never.log").exists()
            ),
            30,
            "`up` got as far as starting the stuck service",
        )
        pids = [
            int(p)
            for ns in _netns_list()
            if ns.startswith(lab.name + "-")
            for p in subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True
            ).stdout.split()
        ]
        os.kill(up.pid, signal.SIGKILL)
        up.wait(10)
        (lab.state / "lab.json").unlink()  # a lost state file must not matter either
    finally:
        if up.poll() is None:
            up.kill()
        lab.down()
    assert pids
    assert lab_leftovers(lab, pids) == []


def test_a_failing_healthcheck_names_the_service_and_its_log(tmp_path: Path) -> None:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    broken = {
        "broken": {
            "command": ["sh", "-c", "echo starting broken; exec sleep infinity"],
            "healthcheck": {"test": ["CMD", "false"], "interval": "0.5s", "retries": 2},
        }
    }
    compose = tmp_path / "compose.yaml"
    compose.write_text(compose_subset([], broken))
    lab = Lab(unique_name(), tmp_path / "state", compose)
    try:
        done = lab.ntm_lab("up", "--file", str(compose), check=False, timeout=60)
    finally:
        lab.down()
    assert done.returncode == 2
    assert "service broken is not healthy" in done.stderr
    assert str(lab.state / "logs" / "broken.log") in done.stderr
    assert "starting broken" in done.stderr  # the log's tail is shown right away
    assert not [ns for ns in _netns_list() if ns.startswith(lab.name + "-")]


# --- the full lab, once every role's command exists -----------------------------------------

FULL_LAB_NEEDS = {
    "ntm_pki.cli": "ntm pki",
    "dc.cli": "ntm dc",
    "ntm_node.cli": "ntm node",
    "ntm_cli.status": "ntm status",
}


def _full_lab_missing() -> list[str]:
    missing = [cmd for mod, cmd in FULL_LAB_NEEDS.items() if importlib.util.find_spec(mod) is None]
    missing += [
        f"lab/config/{n}.toml"
        for n in ("dc1", "cn2", "mn1")
        if not (REPO / "lab" / "config" / f"{n}.toml").exists()
    ]
    return missing


@pytest.mark.skipif(
    bool(_full_lab_missing()),
    reason=f"full lab needs {', '.join(_full_lab_missing())} (not written yet)",
)
def test_full_compose_comes_up_healthy(lab: Lab) -> None:
    services = lab.status()["services"]
    assert set(services) == set(yaml.safe_load(COMPOSE.read_text())["services"])
    assert all(s["alive"] for name, s in services.items() if name != "pki")
