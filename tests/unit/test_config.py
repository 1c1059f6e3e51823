"""A user's wrong configuration gets one line saying what is wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dc import config as dc_config
from ntm_cli.main import main
from ntm_io.config import ConfigError
from ntm_node import config as node_config

LAB = Path(__file__).resolve().parents[2] / "lab" / "config"


@pytest.fixture()
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pki = tmp_path / "pki"
    pki.mkdir()
    for name in ("ca.pem", "dc1.pem", "dc1.key", "mn1.pem", "mn1.key"):
        (pki / name).write_text("placeholder")
    monkeypatch.setenv("NTM_LAB_STATE", str(tmp_path))
    return tmp_path


def edited(src: str, tmp: Path, old: str, new: str) -> Path:
    text = (LAB / src).read_text()
    assert old in text, old
    out = tmp / src
    out.write_text(text.replace(old, new))
    return out


def test_lab_configs_load(state: Path) -> None:
    dc = dc_config.load(LAB / "dc1.toml")
    assert dc.zone == "ntm.example.com" and str(dc.vip_pool) == "100.64.0.0/16"
    assert dc.tls.ca == f"{state}/pki/ca.pem"  # ${NTM_LAB_STATE} expanded
    node = node_config.load(LAB / "mn1.toml")
    assert node.fqdn == "mn1.ntm.example.com" and node.dns.listen == ("127.0.0.1", 53)
    assert node.nat_timeout == 30 and node.keepalive_interval == 14  # derived, not set


@pytest.mark.parametrize(
    "old,new,expect",
    [
        ('vip_pool = "100.64.0.0/16"', 'vip_pool = "10.0.0.0/8"', "not inside vip_route"),
        ('vip_pool = "100.64.0.0/16"', 'vip_pool = "100.64.0.1/16"', "host bits zero"),
        ("quic_port = 4433", "quic_port = 99999", "out of range"),
        ("quic_port = 4433", 'quic_port = "4433"', "is not an integer"),
        ('zone = "ntm.example.com"', 'zone = "ntm..example.com"', "not a valid name"),
        ("registration_lifetime = 300", "registration_lifetme = 300", "unknown key(s)"),
        ('cert = "${NTM_LAB_STATE}/pki/dc1.pem"', 'cert = "/nonexistent.pem"', "ntm pki"),
    ],
)
def test_dc_config_errors(state: Path, old: str, new: str, expect: str) -> None:
    with pytest.raises(ConfigError) as exc:
        dc_config.load(edited("dc1.toml", state, old, new))
    assert expect in str(exc.value)


@pytest.mark.parametrize(
    "old,new,expect",
    [
        ('fqdn = "mn1.ntm.example.com"', 'fqdn = "MN1"', "not a valid name"),
        ('tun_name = "ntm0"', 'tun_name = "a-very-long-interface-name"', "1..15 characters"),
        ('listen = "127.0.0.1:53"', 'listen = "127.0.0.1:0"', "bad port"),
        (
            'upstreams = ["198.51.100.11", "2001:db8:100::11"]',
            "upstreams = []",
            "upstreams is empty",
        ),
        ('addresses = ["198.51.100.20", "2001:db8:100::20"]', 'addresses = ["dc1"]', "not an IP"),
        ('listen = "127.0.0.1:53"', 'listen = "198.51.100.99:53"', "redirect = true needs"),
        ("nat_timeout = 30", "nat_timeout = 1", "must be at least 2"),
    ],
)
def test_node_config_errors(state: Path, old: str, new: str, expect: str) -> None:
    with pytest.raises(ConfigError) as exc:
        node_config.load(edited("mn1.toml", state, old, new))
    assert expect in str(exc.value)


def test_cli_prints_one_line_and_exits_2(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = edited("dc1.toml", state, "[tls]", "[tsl]")
    assert main(["dc", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ntm: error: ") and "Traceback" not in err
    assert main(["dc", "--config", str(state / "missing.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
