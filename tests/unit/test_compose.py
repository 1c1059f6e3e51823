"""compose.yaml keeps the lab contract, and the lab's parsers do what they say (no root)."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path

import pytest
import yaml
from dnslib import RR
from hypothesis import given
from hypothesis import strategies as st

from lab import names
from lab.compose import (
    Project,
    interpolate,
    load_project,
    parse_duration,
    parse_healthcheck,
    parse_project,
)
from lab.errors import LabError
from lab.httpd import DualStackServer, client_ip, make_handler
from lab.render import render_text
from lab.run_all import exit_status
from lab.service_init import (
    Step,
    nft_masquerade_ruleset,
    parse_masquerade,
    parse_routes,
    plan,
    route_batch_lines,
    route_steps,
)

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose.yaml"
STATE = "/srv/labstate"

# docs/internals.md, "The lab address plan"
PLAN = {
    "nat-a": {"internet": ["198.51.100.2/24", "2001:db8:100::2/64"], "access-a": ["10.10.1.1/24"]},
    "rtr-b": {
        "internet": ["198.51.100.3/24", "2001:db8:100::3/64"],
        "access-b": ["2001:db8:b::1/64"],
    },
    "dns": {"internet": ["198.51.100.10/24", "2001:db8:100::10/64"]},
    "resolver": {"internet": ["198.51.100.11/24", "2001:db8:100::11/64"]},
    "dc1": {"internet": ["198.51.100.20/24", "2001:db8:100::20/64"]},
    "cn2": {"internet": ["198.51.100.30/24", "2001:db8:100::30/64"]},
    "plainweb": {"internet": ["198.51.100.40/24", "2001:db8:100::40/64"]},
    "mn1": {"access-a": ["10.10.1.100/24"]},
    "mn2": {"access-a": ["10.10.1.101/24"]},  # the swarm (`ntm swarm`)
    "mn3": {"access-a": ["10.10.1.103/24"], "access-b": ["2001:db8:b::103/64"]},  # two uplinks
    "nat-b": {"internet": ["198.51.100.4/24", "2001:db8:100::4/64"], "site-b": ["10.20.2.1/24"]},
    "cn1": {"site-b": ["10.20.2.10/24"]},
    "dc2": {"internet": ["198.51.100.21/24", "2001:db8:100::21/64"]},
    "cn3": {"internet": ["198.51.100.33/24", "2001:db8:100::33/64"]},
    "rs1": {"internet": ["198.51.100.50/24", "2001:db8:100::50/64"]},
    "rs2": {"internet": ["198.51.100.51/24", "2001:db8:100::51/64"]},
    "ntma1": {"internet": ["198.51.100.60/24", "2001:db8:100::60/64"], "dmz": ["10.30.0.2/24"]},
    "rtr-isp1": {
        "internet": ["198.51.100.71/24", "2001:db8:100::71/64"],
        "isp1": ["192.0.2.1/24", "2001:db8:201::1/64"],
    },
    "rtr-isp2": {
        "internet": ["198.51.100.72/24", "2001:db8:100::72/64"],
        "isp2": ["203.0.113.1/24", "2001:db8:202::1/64"],
    },
    "ntma2": {
        "isp1": ["192.0.2.10/24", "2001:db8:201::10/64"],
        "isp2": ["203.0.113.10/24", "2001:db8:202::10/64"],
        "dmz": ["10.30.0.3/24"],
    },
    "lb": {"dmz": ["10.30.0.10/24"], "backend": ["10.40.0.1/24"]},
    "web1": {"backend": ["10.40.0.11/24"]},
    "web2": {"backend": ["10.40.0.12/24"]},
    "web3": {"backend": ["10.40.0.13/24"]},
    "pki": {},
}
SUBNETS = {
    "internet": ["198.51.100.0/24", "2001:db8:100::/64"],
    "access-a": ["10.10.1.0/24"],
    "site-b": ["10.20.2.0/24"],
    "access-b": ["2001:db8:b::/64"],
    "isp1": ["192.0.2.0/24", "2001:db8:201::/64"],
    "isp2": ["203.0.113.0/24", "2001:db8:202::/64"],
    "dmz": ["10.30.0.0/24"],
    "backend": ["10.40.0.0/24"],
}


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(COMPOSE, {"NTM_LAB_STATE": STATE})


def env_of(project: Project, service: str) -> dict[str, str]:
    return dict(project.services[service].environment)


# --- the contract -------------------------------------------------------------------------


def test_networks_follow_the_address_plan(project: Project) -> None:
    assert {n: [str(s) for s in net.subnets] for n, net in project.networks.items()} == SUBNETS


def test_services_have_the_planned_addresses(project: Project) -> None:
    got = {
        name: {a.network: list(a.addresses) for a in svc.networks}
        for name, svc in project.services.items()
    }
    assert got == PLAN


def test_state_paths_use_the_lab_state_dir_and_default_to_the_docker_volume() -> None:
    docker = load_project(COMPOSE, {})
    assert "/state/pki" in docker.services["pki"].command
    netns = load_project(COMPOSE, {"NTM_LAB_STATE": STATE})
    assert f"{STATE}/pki" in netns.services["pki"].command
    assert netns.services["dc1"].healthcheck is not None
    assert f"{STATE}/run/dc1.sock" in netns.services["dc1"].healthcheck.argv


def test_routers_forward_and_nat_a_masquerades_access_a(project: Project) -> None:
    assert project.services["nat-a"].sysctls == {"net.ipv4.ip_forward": "1"}
    assert project.services["rtr-b"].sysctls == {"net.ipv6.conf.all.forwarding": "1"}
    assert parse_masquerade(env_of(project, "nat-a")["NTM_LAB_MASQUERADE"]) == [
        ipaddress.ip_network("10.10.1.0/24")
    ]


# Routed (not masqueraded) networks behind a router on `internet`: (router, prefixes).
ROUTED: dict[str, list[tuple[tuple[str, ...], str, str]]] = {
    "rtr-b": [(("-6",), "2001:db8:b::/64", "2001:db8:100::3")],
    "rtr-isp1": [
        ((), "192.0.2.0/24", "198.51.100.71"),
        (("-6",), "2001:db8:201::/64", "2001:db8:100::71"),
    ],
    "rtr-isp2": [
        ((), "203.0.113.0/24", "198.51.100.72"),
        (("-6",), "2001:db8:202::/64", "2001:db8:100::72"),
    ],
}


def test_internet_hosts_route_access_b_and_the_isps_through_their_routers(
    project: Project,
) -> None:
    """Every host on `internet` reaches access-b, isp1 and isp2 (the routers: the others)."""
    on_internet = [
        n for n, s in project.services.items() if any(a.network == "internet" for a in s.networks)
    ]
    assert len(on_internet) > 10
    for name in on_internet:
        routes = parse_routes(env_of(project, name).get("NTM_LAB_ROUTES", ""))
        for router, prefixes in ROUTED.items():
            if router == name:
                continue
            for opts, prefix, via in prefixes:
                assert (opts, (prefix, "via", via)) in routes, (name, prefix)


def test_ntma2_has_split_access_and_a_weighted_multipath_default(project: Project) -> None:
    env = env_of(project, "ntma2")
    routes = parse_routes(env["NTM_LAB_ROUTES"])
    multipath = "default nexthop via 192.0.2.1 weight 2 nexthop via 203.0.113.1 weight 1"
    assert ((), tuple(multipath.split())) in routes
    assert ((), ("default", "via", "192.0.2.1", "table", "101")) in routes
    assert ((), ("default", "via", "203.0.113.1", "table", "102")) in routes
    assert (("-6",), ("default", "via", "2001:db8:201::1", "table", "101")) in routes
    assert (("-6",), ("default", "via", "2001:db8:202::1", "table", "102")) in routes
    # a pulled cable leaves its table unreachable: no reply leaks out by the other uplink;
    # the fallback sits behind the real default of its family (IPv6 routes default to 1024)
    for opts in ((), ("-6",)):
        for table in ("101", "102"):
            [metric] = [
                int(r[3]) for o, r in routes if o == opts and r[:3] == ("unreachable", "default",
                "metric") and r[4:] == ("table", table)
            ]  # fmt: skip
            assert metric > 1024, (opts, table, metric)
    assert parse_routes(env["NTM_LAB_RULES"], "NTM_LAB_RULES") == [
        ((), ("from", "192.0.2.10", "lookup", "101")),
        (("-6",), ("from", "2001:db8:201::10", "lookup", "101")),
        ((), ("from", "203.0.113.10", "lookup", "102")),
        (("-6",), ("from", "2001:db8:202::10", "lookup", "102")),
    ]
    sysctls = project.services["ntma2"].sysctls
    assert sysctls["net.ipv4.conf.all.ignore_routes_with_linkdown"] == "1"
    for router in ("rtr-isp1", "rtr-isp2"):
        assert project.services[router].sysctls == {
            "net.ipv4.ip_forward": "1",
            "net.ipv6.conf.all.forwarding": "1",
        }


def test_both_ntma_configs_load_as_gateways_of_one_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adaptor import config as adaptor_config

    (tmp_path / "pki").mkdir()
    for f in ("ca.pem", "ntma1.pem", "ntma1.key", "ntma2.pem", "ntma2.key"):
        (tmp_path / "pki" / f).touch()
    monkeypatch.setenv("NTM_LAB_STATE", str(tmp_path))
    one = adaptor_config.load(REPO / "lab" / "config" / "ntma1.toml")
    two = adaptor_config.load(REPO / "lab" / "config" / "ntma2.toml")
    assert one.node.fqdn == two.node.fqdn == "www.ntm.example.com"
    assert (one.gateway, two.gateway) == ("ntma1.ntm.example.com", "ntma2.ntm.example.com")
    assert one.weight > two.weight > 0
    assert two.node.tunnel_addresses == (
        "192.0.2.10",
        "2001:db8:201::10",
        "203.0.113.10",
        "2001:db8:202::10",
    )
    assert two.public_addresses == ()


def test_both_ntmas_claim_within_the_lbs_next_hop_networks(project: Project) -> None:
    lb = tomllib.loads((REPO / "lab" / "config" / "lb.toml").read_text())
    nets = [ipaddress.ip_network(n) for n in lb["claims"]["next_hop_networks"]]
    for ntma in ("ntma1", "ntma2"):
        conf = tomllib.loads((REPO / "lab" / "config" / f"{ntma}.toml").read_text())
        hop = conf["adaptor"]["next_hop"]
        assert any(ipaddress.ip_address(hop) in n for n in nets), ntma
        dmz = [a for a in project.services[ntma].networks if a.network == "dmz"]
        assert dmz[0].addresses == (f"{hop}/24",), ntma
        assert conf["node"]["fqdn"] == "www.ntm.example.com"


def test_mn1_starts_behind_nat_a_and_can_roam_to_access_b(project: Project) -> None:
    mn1 = project.services["mn1"]
    assert parse_routes(env_of(project, "mn1")["NTM_LAB_ROUTES"]) == [
        ((), ("default", "via", "10.10.1.1"))
    ]
    assert mn1.dns == ("127.0.0.1",)
    assert mn1.roam["access-b"].addresses == ("2001:db8:b::100/64",)
    assert parse_routes(mn1.roam["access-b"].routes) == [
        (("-6",), ("default", "via", "2001:db8:b::1"))
    ]
    assert mn1.roam["access-a"].addresses == ("10.10.1.100/24",)


def test_mn3_has_a_routing_table_per_uplink_chosen_by_source_address(project: Project) -> None:
    env = env_of(project, "mn3")
    routes = parse_routes(env["NTM_LAB_ROUTES"])
    assert ((), ("default", "via", "10.10.1.1")) in routes
    assert (("-6",), ("default", "via", "2001:db8:b::1")) in routes
    assert ((), ("default", "via", "10.10.1.1", "table", "201")) in routes
    assert (("-6",), ("default", "via", "2001:db8:b::1", "table", "202")) in routes
    assert ((), ("unreachable", "default", "metric", "4000", "table", "201")) in routes
    assert (("-6",), ("unreachable", "default", "metric", "4000", "table", "202")) in routes
    assert parse_routes(env["NTM_LAB_RULES"], "NTM_LAB_RULES") == [
        ((), ("from", "10.10.1.103", "lookup", "201")),
        (("-6",), ("from", "2001:db8:b::103", "lookup", "202")),
    ]
    conf = tomllib.loads((REPO / "lab" / "config" / "mn3.toml").read_text())
    assert conf["node"]["tunnel_addresses"] == ["10.10.1.103", "2001:db8:b::103"]
    assert conf["node"]["make_before_break"] is True


def test_load_balanced_service_routes_without_snat(project: Project) -> None:
    """ntma1 forwards (no masquerade); the LB's replies go back through ntma1; web1..3
    route via the LB. Nothing on the NTMA -> LB -> web path masquerades the MN's vIP."""
    for router in ("ntma1", "ntma2", "lb"):
        assert project.services[router].sysctls["net.ipv4.ip_forward"] == "1"
        assert "NTM_LAB_MASQUERADE" not in env_of(project, router)
    lb_routes = parse_routes(env_of(project, "lb")["NTM_LAB_ROUTES"])
    assert ((), ("default", "via", "10.30.0.2")) in lb_routes
    assert ((), ("100.64.0.0/10", "via", "10.30.0.2")) in lb_routes
    assert ((), ("local", "10.30.0.100", "dev", "dmz")) in lb_routes
    for web in ("web1", "web2", "web3"):
        assert parse_routes(env_of(project, web)["NTM_LAB_ROUTES"]) == [
            ((), ("default", "via", "10.40.0.1"))
        ]
    order = project.start_order()
    assert order.index("web1") < order.index("lb") < order.index("ntma1")
    assert order.index("lb") < order.index("ntma2")
    assert order.index("rtr-isp1") < order.index("ntma2")


def test_start_order_respects_dependencies(project: Project) -> None:
    order = project.start_order()
    before = [
        ("pki", "dc1"),
        ("dns", "resolver"),
        ("resolver", "dc1"),
        ("dc1", "cn2"),
        ("cn2", "mn1"),
        ("nat-a", "mn1"),
        ("rtr-b", "mn1"),
    ]
    for first, then in before:
        assert order.index(first) < order.index(then), (first, then)
    conditions = {d.service: d.condition for d in project.services["dc1"].depends_on}
    assert conditions["pki"] == "service_completed_successfully"


def test_every_long_running_service_has_a_healthcheck(project: Project) -> None:
    missing = [n for n, s in project.services.items() if s.healthcheck is None and n != "pki"]
    assert missing == []


def test_lab_object_names_fit_and_do_not_clash(project: Project) -> None:
    pairs = {
        (name, net)
        for name, svc in project.services.items()
        for net in [a.network for a in svc.networks] + list(svc.roam)
    }
    ports = [names.hub_port_name(name, net) for name, net in pairs]
    assert len(set(ports)) == len(ports)
    ifnames = [names.bridge_name(n) for n in project.networks]
    assert all(len(n) <= names.IFNAME_MAX for n in ports + ifnames)
    assert ifnames == [
        "internet",
        "access-a",
        "site-b",
        "access-b",
        "isp1",
        "isp2",
        "dmz",
        "backend",
    ]
    groups = [names.network_group(n) for n in project.networks]
    assert len(set(groups)) == len(groups) and 0 not in groups


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_accepts_the_file() -> None:
    done = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_dockerfile_entrypoint_applies_the_service_setup() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["ntm", "lab", "service-init", "--"]' in text


def test_pki_spec_names_every_identity_of_the_lab() -> None:
    spec = tomllib.loads((REPO / "lab" / "pki.toml").read_text())
    got = {i["name"]: (i["role"], i["dns"]) for i in spec["identity"]}
    assert got == {
        "dc1": ("dc", ["dc1.ntm.example.com"]),
        "cn2": ("node", ["cn2.ntm.example.com"]),
        "mn1": ("node", ["mn1.ntm.example.com"]),
        "mn3": ("node", ["mn3.ntm.example.com"]),
        "cn1": ("node", ["cn1.ntm.example.com"]),
        "dc2": ("dc", ["dc2.ntm.example.net"]),
        "cn3": ("node", ["cn3.ntm.example.net"]),
        "rs1": ("relay", ["rs1.relay.example.com"]),
        "rs2": ("relay", ["rs2.relay.example.com"]),
        "ntma1": ("adaptor", ["www.ntm.example.com", "ntma1.ntm.example.com"]),
        "ntma2": ("adaptor", ["www.ntm.example.com", "ntma2.ntm.example.com"]),
        "lb": ("lb", ["lb.dmz.example.com"]),
        "swarm": ("node", ["s{0..255}.swarm.ntm.example.com"]),
    }


def test_zone_file_has_the_lab_records() -> None:
    records = {
        (str(rr.rname), rr.rtype, str(rr.rdata))
        for rr in RR.fromZone((REPO / "lab" / "dns" / "example.com.zone").read_text())
    }
    assert ("plain.example.com.", 1, "198.51.100.40") in records
    assert ("plain.example.com.", 28, "2001:db8:100::40") in records
    assert ("global.example.com.", 5, "cn2.ntm.example.com.") in records
    assert ("www.example.com.", 5, "www.ntm.example.com.") in records
    assert ("ntm.example.com.", 2, "dc1.ntm.example.com.") in records
    assert ("dc1.ntm.example.com.", 1, "198.51.100.20") in records
    assert ("dc1.ntm.example.com.", 28, "2001:db8:100::20") in records


@pytest.mark.skipif(shutil.which("nsd-checkzone") is None, reason="nsd not installed")
def test_nsd_accepts_the_zone_file() -> None:
    zone = REPO / "lab" / "dns" / "example.com.zone"
    done = subprocess.run(
        ["nsd-checkzone", "example.com", str(zone)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- NTM_LAB_ROUTES / NTM_LAB_MASQUERADE --------------------------------------------------


def test_routes_become_idempotent_ip_route_replace_commands() -> None:
    steps = route_steps("default via 10.10.1.1; -6 default via 2001:db8:b::1;;")
    assert steps == [
        Step(("ip", "route", "replace", "default", "via", "10.10.1.1")),
        Step(("ip", "-6", "route", "replace", "default", "via", "2001:db8:b::1")),
    ]


def test_roaming_routes_become_batch_lines_with_the_family_in_the_prefix() -> None:
    # `ip -batch` lines take no options: -6 default must still mean the IPv6 default.
    lines = route_batch_lines(
        "default via 10.10.1.1; -6 default via 2001:db8:b::1; -4 10.0.0.0/8 dev x"
    )
    assert lines == [
        "route replace default via 10.10.1.1",
        "route replace ::/0 via 2001:db8:b::1",
        "route replace 10.0.0.0/8 dev x",
    ]


def test_roaming_route_with_another_option_is_refused_with_the_fix() -> None:
    with pytest.raises(LabError, match=r"option -s .* only -4 and -6"):
        route_batch_lines("-s default via 10.10.1.1")


def test_route_with_options_only_is_rejected() -> None:
    with pytest.raises(LabError, match="no route"):
        parse_routes("-6")


_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789:./", min_size=1, max_size=12)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([(), ("-4",), ("-6",)]), st.lists(_TOKEN, min_size=1, max_size=5)
        ),
        max_size=5,
    )
)
def test_routes_round_trip(entries: list[tuple[tuple[str, ...], list[str]]]) -> None:
    text = "; ".join(" ".join([*opts, *args]) for opts, args in entries)
    assert parse_routes(text) == [(opts, tuple(args)) for opts, args in entries]


def test_masquerade_accepts_separators_and_rejects_host_bits() -> None:
    assert [str(n) for n in parse_masquerade(" 10.10.1.0/24, 10.20.0.0/16;fd00::/64 ")] == [
        "10.10.1.0/24",
        "10.20.0.0/16",
        "fd00::/64",
    ]
    with pytest.raises(LabError, match="host bits"):
        parse_masquerade("10.10.1.1/24")


def test_masquerade_ruleset_replaces_itself_and_keeps_the_subnet_local() -> None:
    rules = nft_masquerade_ruleset(parse_masquerade("10.10.1.0/24 fd00::/64"))
    assert rules.index("delete table inet ntm_lab_nat") < rules.index("chain postrouting")
    assert "ip saddr 10.10.1.0/24 ip daddr != 10.10.1.0/24 masquerade" in rules
    assert "ip6 saddr fd00::/64 ip6 daddr != fd00::/64 masquerade" in rules


def test_plan_of_nat_a(project: Project) -> None:
    steps = plan(env_of(project, "nat-a"))
    assert steps[0].argv[:4] == ("ip", "-6", "route", "replace")
    assert steps[-1].argv == ("nft", "-f", "-")


# --- compose details ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${NTM_LAB_STATE:-/state}/pki", {}, "/state/pki"),
        ("${NTM_LAB_STATE:-/state}/pki", {"NTM_LAB_STATE": "/x"}, "/x/pki"),
        ("${V:-d}", {"V": ""}, "d"),
        ("${V-d}", {"V": ""}, ""),
        ("$V and $$V", {"V": "1"}, "1 and $V"),
        ("$(no)", {}, "$(no)"),
    ],
)
def test_interpolation(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


def test_required_variable_says_what_to_set() -> None:
    with pytest.raises(LabError, match="V is required"):
        interpolate("${V:?set V}", {})


@pytest.mark.parametrize(
    ("text", "seconds"), [("1s", 1.0), ("500ms", 0.5), ("1m30s", 90.0), (2, 2.0)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "x") == seconds


def test_bad_duration_is_explained() -> None:
    with pytest.raises(LabError, match="like 1s"):
        parse_duration("soon", "services.a.healthcheck.interval")


def test_healthcheck_forms() -> None:
    assert parse_healthcheck({"test": ["CMD", "true"]}, "h").argv == ("true",)  # type: ignore[union-attr]
    shell = parse_healthcheck({"test": ["CMD-SHELL", "exit 0"]}, "h")
    assert shell is not None and shell.argv == ("sh", "-c", "exit 0")
    assert parse_healthcheck({"test": ["NONE"]}, "h") is None


def _project(text: str) -> Project:
    return parse_project(yaml.safe_load(text), Path("c.yaml"), {})


NETS = """
networks:
  n: {ipam: {config: [{subnet: 10.0.0.0/24}]}}
"""


def test_address_outside_the_subnet_is_named() -> None:
    with pytest.raises(LabError, match=r"services.a.networks.n: 10.1.0.5 is outside"):
        _project("services: {a: {command: x, networks: {n: {ipv4_address: 10.1.0.5}}}}" + NETS)


def test_undeclared_network_and_cycles_are_rejected() -> None:
    with pytest.raises(LabError, match="not declared"):
        _project("services: {a: {command: x, networks: {m: {ipv4_address: 10.0.0.5}}}}" + NETS)
    with pytest.raises(LabError, match="cycle"):
        _project("services: {a: {command: x, depends_on: [b]}, b: {command: x, depends_on: [a]}}")


def test_roaming_service_must_list_its_starting_network() -> None:
    text = (
        "services: {a: {command: x, networks: {n: {ipv4_address: 10.0.0.5}},"
        " x-ntm-roam: {o: {ipv4_address: 10.9.0.5}}}}"
        + NETS
        + "  o: {ipam: {config: [{subnet: 10.9.0.0/24}]}}\n"
    )
    with pytest.raises(LabError, match="starting network"):
        _project(text)


def test_lab_names_cannot_overlap_by_prefix() -> None:
    assert names.check_lab_name("t1a2b3c") == "t1a2b3c"
    for bad in ("ntm-lab", "", "Lab", "1lab"):
        with pytest.raises(LabError):
            names.check_lab_name(bad)


# --- helpers ------------------------------------------------------------------------------


def test_render_fills_variables_and_names_missing_ones() -> None:
    assert render_text("pid ${D}/x.pid $$", {"D": "/s"}) == "pid /s/x.pid $"
    with pytest.raises(LabError, match=r"\$\{NTM_NSD_DIR\}"):
        render_text("${NTM_NSD_DIR}", {})


def test_client_ip_strips_the_ipv4_mapped_prefix() -> None:
    assert client_ip("::ffff:198.51.100.2") == "198.51.100.2"
    assert client_ip("2001:db8:b::100") == "2001:db8:b::100"


@pytest.fixture
def httpd() -> Iterator[int]:
    server = DualStackServer(("::", 0), make_handler("unit"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_httpd_reports_the_client_on_a_kept_alive_connection(httpd: int) -> None:
    conn = HTTPConnection("127.0.0.1", httpd, timeout=5)
    for path in ("/", "/whoami"):
        conn.request("GET", path)
        reply = conn.getresponse()
        assert (reply.status, reply.getheader("Content-Type")) == (200, "text/plain")
        assert reply.read() == b"server=unit client=127.0.0.1\n"
    conn.close()


def run_all(*commands: str) -> int:
    argv = [sys.executable, "-m", "ntm_cli.main", "lab", "run-all", "--", *commands]
    return subprocess.run(argv, cwd=REPO, timeout=30, check=False).returncode


def test_run_all_exits_with_the_first_failure_and_stops_the_rest() -> None:
    assert run_all("sleep 20", "sh -c 'exit 3'") == 3
    assert run_all("true", "sleep 20") == 0
    assert exit_status(-15) == 143
