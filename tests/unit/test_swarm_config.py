"""`ntm swarm` configuration, the swarm certificate's name ranges, and the policy-rule filter."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ntm_io.config import ConfigError
from ntm_node import swarm_config
from ntm_node.swarm_routing import PolicyRoute, stale_rules
from ntm_pki import ca

TEMPLATE = "s{i}.swarm.ntm.example.com"


def write_pki(d: Path, dns: list[str]) -> Path:
    ca.init_ca(d, "Test CA")
    ca.issue(d, "swarm", "node", ca.expand_ranges(dns, "test"), [], 30)
    return d


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pki(tmp_path_factory.mktemp("pki"), ["s{0..63}.swarm.ntm.example.com"])


def write_config(tmp: Path, pki: Path, swarm: str = "", dns: str = "") -> Path:
    path = tmp / "swarm.toml"
    path.write_text(
        f"""
[swarm]
name = "mn2"
fqdn = "{TEMPLATE}"
count = 8
key_dir = "{tmp}/keys"
status_socket = "{tmp}/mn2.sock"
identities_file = "{tmp}/ids.json"
{swarm}
[dc]
addresses = ["198.51.100.20"]
server_name = "dc1.ntm.example.com"
[dns]
upstreams = ["198.51.100.11"]
{dns}
[tls]
ca = "{pki}/ca.pem"
cert = "{pki}/swarm.pem"
key = "{pki}/swarm.key"
"""
    )
    return path


def test_each_identity_gets_its_own_name_port_tun_and_key(tmp_path: Path, pki: Path) -> None:
    cfg = swarm_config.load(write_config(tmp_path, pki, "first = 10\ntunnel_port = 7400"))
    assert cfg.count == 8 and list(cfg.indices()) == list(range(10, 18))
    ids = [cfg.identity(k) for k in range(cfg.count)]
    assert [i.fqdn for i in ids] == [f"s{n}.swarm.ntm.example.com" for n in range(10, 18)]
    assert [i.tunnel_port for i in ids] == list(range(7400, 7408))
    assert [i.tun_name for i in ids] == [f"ntms{n}" for n in range(10, 18)]
    assert len({i.key_file for i in ids}) == 8
    assert ids[0].key_file == f"{tmp_path}/keys/s10.swarm.ntm.example.com.x25519"
    # Shared: the DC, the certificate; identities run no resolver of their own.
    assert {i.cert for i in ids} == {f"{pki}/swarm.pem"}
    assert not any(i.dns.enabled or i.dns.redirect for i in ids)
    assert cfg.dns.listen == ("127.0.0.53", 53)
    with pytest.raises(IndexError):
        cfg.identity(8)


def test_command_line_overrides(tmp_path: Path, pki: Path) -> None:
    cfg = swarm_config.load(
        write_config(tmp_path, pki), count=64, first=0, identities_file="/tmp/x.json"
    )
    assert cfg.count == 64 and cfg.identities_file == "/tmp/x.json"


@pytest.mark.parametrize(
    ("swarm", "dns", "message"),
    [
        ('fqdn = "swarm.ntm.example.com"', "", "exactly once"),
        ('fqdn = "S{i}.swarm.ntm.example.com"', "", "valid names"),
        ("tunnel_port = 65530", "", "past 65535"),
        ('tun_prefix = "averyverylongpre"', "", "longer than 15"),
        ("route_table = 254", "", "out of range"),
        ("count = 65", "", "not named in"),
        ("first = 60", "", "4 of 8 identities are not named"),
        ("colour = 1", "", "unknown key"),
        ("", 'listen = "127.0.0.53:x"', "bad port"),
        ("allowed_outage = 0.3", "", r"\[swarm\] allowed_outage A = 0.3 s leaves detection"),
        ("probe_idle_paths = 2", "", "probe_idle_paths"),
    ],
)
def test_mistakes_are_config_errors(
    tmp_path: Path, pki: Path, swarm: str, dns: str, message: str
) -> None:
    text = write_config(tmp_path, pki, swarm, dns).read_text()
    if swarm.startswith("fqdn"):  # replace, not repeat, the key
        text = text.replace(f'fqdn = "{TEMPLATE}"\n', "")
    if swarm.startswith("count"):
        text = text.replace("count = 8\n", "")
    (tmp_path / "swarm.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        swarm_config.load(tmp_path / "swarm.toml")


def test_failover_settings_and_no_idle_probing_by_default(tmp_path: Path, pki: Path) -> None:
    node = swarm_config.load(write_config(tmp_path, pki)).node
    assert node.probe_idle_paths is False  # hundreds of quiet paths: probe only those in use
    assert (node.allowed_outage, node.failback_hold_down, node.dead_after_losses) == (1.0, 60, 8)
    text = "allowed_outage = 1.5\nfailback_hold_down = 10\nprobe_idle_paths = true"
    node = swarm_config.load(write_config(tmp_path, pki, text)).node
    assert node.probe_idle_paths is True
    assert node.liveness_timers().allowed_outage == 1.5 and node.failback_hold_down == 10


def test_missing_certificate_is_a_config_error(tmp_path: Path, pki: Path) -> None:
    path = write_config(tmp_path, pki)
    path.write_text(path.read_text().replace("swarm.pem", "nope.pem"))
    with pytest.raises(ConfigError, match="does not exist"):
        swarm_config.load(path)


def test_pki_ranges_expand_to_one_name_per_number() -> None:
    assert ca.expand_ranges(["a.example.com", "s{3..5}.x.example.com"], "i") == [
        "a.example.com",
        "s3.x.example.com",
        "s4.x.example.com",
        "s5.x.example.com",
    ]
    for bad in ["s{5..3}.x", "s{0..1}{0..1}.x", "s{0..5000}.x"]:
        with pytest.raises(ConfigError, match="one range"):
            ca.expand_ranges([bad], "i")


def test_pki_batch_issues_a_certificate_with_the_whole_range(tmp_path: Path) -> None:
    spec = tmp_path / "pki.toml"
    spec.write_text(
        '[[identity]]\nname = "swarm"\nrole = "node"\ndns = ["s{0..255}.swarm.ntm.example.com"]\n'
    )
    result = ca.batch(tmp_path / "pki", spec)
    assert result.issued == ("swarm",)
    cert = (tmp_path / "pki" / "swarm.pem").read_bytes()
    names = ca.load_identity(cert).dns_names
    assert len(names) == 256 and "s255.swarm.ntm.example.com" in names
    assert ca.batch(tmp_path / "pki", spec).kept == ("swarm",)  # idempotent with ranges too


def test_stale_rules_are_ours_only() -> None:
    ours = PolicyRoute(1003, 1000, "100.64.0.5", "100.64.0.0/10", "ntms3").rule()
    dump = [
        {"family": socket.AF_INET, "table": 252, "FRA_TABLE": 1003, "FRA_PRIORITY": 1000,
         "FRA_SRC": "100.64.0.5", "src_len": 32},
        {"family": socket.AF_INET, "table": 252, "FRA_TABLE": 5000, "FRA_PRIORITY": 1000,
         "FRA_SRC": "100.64.0.6", "src_len": 32},  # another table range
        {"family": socket.AF_INET, "table": 252, "FRA_TABLE": 1004, "FRA_PRIORITY": 900,
         "FRA_SRC": "100.64.0.7", "src_len": 32},  # another priority
        {"family": socket.AF_INET, "table": 254, "FRA_PRIORITY": 32766, "src_len": 0},
        {"family": socket.AF_INET6, "table": 252, "FRA_TABLE": 1003, "FRA_PRIORITY": 1000,
         "FRA_SRC": "2001:db8::1", "src_len": 128},
    ]  # fmt: skip
    assert stale_rules(dump, 1000, range(1000, 1200)) == [ours]
