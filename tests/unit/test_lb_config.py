"""`ntm lb` config: every bad input names the file, the LINE and what to do."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lb_integration import config
from lb_integration.model import Protocol, Scheduler
from ntm_io.config import ConfigError

GOOD = textwrap.dedent(
    """\
    [agent]
    name = "lb1"
    backend = "nftables"

    [[service]]
    name = "www"
    address = "10.99.0.10"
    port = 80
    scheduler = "rr"

      [[service.real]]
      address = "10.0.1.11"
      [[service.real]]
      address = "10.0.1.12"
      weight = 3

      [service.health]
      kind = "http"
      interval = 0.5
      timeout = 0.25
      path = "/whoami"
      expect = "server="

    [[service]]
    name = "dns6"
    address = "2001:db8::53"
    port = 53
    protocol = "udp"
    scheduler = "sh"
    persistence = 60
    persistence_netmask = "/64"

      [[service.real]]
      address = "2001:db8:1::1"

      [service.health]
      kind = "udp"
      payload = "ping"
      expect = "pong"
      on_failure = "weight0"
    """
)


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the nth occurrence of `needle`."""
    hits = [i for i, ln in enumerate(text.splitlines(), 1) if needle in ln]
    return hits[nth - 1]


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(text, "lb.toml")
    return str(info.value)


def test_good_config_parses_into_the_model() -> None:
    cfg = config.parse(GOOD, "lb.toml")
    assert cfg.name == "lb1" and cfg.backend == "nftables"
    assert cfg.status_socket == "/run/ntm/lb-lb1.sock"
    www, dns = cfg.services
    assert www.service.key.protocol is Protocol.TCP
    assert [r.weight for r in www.service.reals] == [1, 3]
    assert www.service.reals[0].port == 80  # defaults to the service port
    assert www.health.kind == "http" and www.health.detection_s == 0.5 * 2 + 0.25
    assert www.line == line_of(GOOD, "[[service]]", 1)
    assert dns.service.scheduler is Scheduler.SH
    assert dns.service.persistence == 60 and dns.service.persistence_netmask == "/64"
    assert dns.health.on_failure == "weight0" and dns.health.expect == "pong"
    assert cfg.desired().services == (www.service, dns.service)


def test_persistence_netmask_normalised() -> None:
    text = GOOD.replace('scheduler = "rr"', 'scheduler = "rr"\npersistence = 300')
    assert config.parse(text).services[0].service.persistence_netmask == "255.255.255.255"
    text2 = text.replace("persistence = 300", 'persistence = 300\npersistence_netmask = "/24"')
    assert config.parse(text2).services[0].service.persistence_netmask == "255.255.255.0"


def test_unknown_scheduler_names_its_line() -> None:
    bad = GOOD.replace('scheduler = "sh"', 'scheduler = "fastest"')
    msg = error(bad)
    assert msg.startswith(f"lb.toml:{line_of(bad, 'fastest')}: ")
    assert "'dns6'" in msg and "use one of rr, wrr, lc, wlc, sh, mh" in msg


def test_real_of_the_other_family_names_its_line() -> None:
    bad = GOOD.replace('address = "10.0.1.12"', 'address = "2001:db8::12"')
    msg = error(bad)
    assert msg.startswith(f"lb.toml:{line_of(bad, '2001:db8::12')}: ")
    assert "IPv6" in msg and "IPv4" in msg and "real #2" in msg


def test_duplicate_service_names_both_lines() -> None:
    second = GOOD.split("[[service]]")[1]
    bad = GOOD + "\n[[service]]" + second.replace('name = "www"', 'name = "www2"')
    msg = error(bad)
    first, third = line_of(bad, "[[service]]", 1), line_of(bad, "[[service]]", 3)
    assert msg.startswith(f"lb.toml:{third}: ")
    assert f"already defined at line {first}" in msg and "tcp 10.99.0.10:80" in msg


def test_unknown_key_names_the_key_line() -> None:
    bad = GOOD.replace("weight = 3", "wieght = 3")
    msg = error(bad)
    assert msg.startswith(f"lb.toml:{line_of(bad, 'wieght')}: ")
    assert "unknown key(s) wieght" in msg
    bad2 = GOOD.replace('backend = "nftables"', 'backend = "nftables"\ncolour = "red"')
    assert error(bad2).startswith(f"lb.toml:{line_of(bad2, 'colour')}: [agent]")
    bad3 = GOOD + "\n[extra]\nx = 1\n"
    assert "unknown key(s) extra" in error(bad3)


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ('address = "10.99.0.10"', 'address = "10.99.0.300"', "10.99.0.300"),
        ('address = "10.0.1.11"', 'address = "web1"', '"web1"'),
        ('address = "2001:db8::53"', 'address = "2001:db8::zz"', "2001:db8::zz"),
    ],
)
def test_bad_addresses_name_their_line(old: str, new: str, needle: str) -> None:
    bad = GOOD.replace(old, new)
    msg = error(bad)
    assert msg.startswith(f"lb.toml:{line_of(bad, needle)}: ")
    assert "is not an IP address" in msg


def test_other_mistakes_say_what_to_do() -> None:
    # (replace, with, hint in the message, the line the message must name)
    cases = [
        ('backend = "nftables"', 'backend = "lvs"', "use one of auto, ipvs, nftables", "lvs"),
        ('protocol = "udp"', 'protocol = "sctp"', "use tcp or udp", "sctp"),
        ("interval = 0.5", "interval = 0.1", "timeout = 0.25 is longer", "timeout = 0.25"),
        ('on_failure = "weight0"', 'on_failure = "drop"', "use remove or weight0", '"drop"'),
        ('persistence_netmask = "/64"', 'persistence_netmask = "1.0.0.0"', "like /64", "1.0.0.0"),
        ("port = 80", "port = 80000", "out of range", "80000"),
    ]
    for old, new, hint, needle in cases:
        bad = GOOD.replace(old, new)
        msg = error(bad)
        assert hint in msg, msg
        assert msg.startswith(f"lb.toml:{line_of(bad, needle)}: "), msg


def test_udp_service_without_a_reply_check_is_refused() -> None:
    bad = GOOD.replace('kind = "udp"', 'kind = "tcp"')
    assert "cannot check a UDP service" in error(bad)
    no_health = GOOD[: GOOD.index('  [service.health]\n  kind = "udp"')]
    msg = error(no_health)
    assert "a UDP check must get a reply" in msg
    assert msg.startswith(f"lb.toml:{line_of(no_health, '[[service]]', 2)}: ")


def test_service_without_reals_and_duplicate_reals() -> None:
    bad = GOOD.replace('  [[service.real]]\n  address = "2001:db8:1::1"\n', "")
    assert "has no real servers" in error(bad)
    dup = GOOD.replace('address = "10.0.1.12"', 'address = "10.0.1.11"')
    msg = error(dup)
    assert "listed twice" in msg and f"line {line_of(dup, '[[service.real]]', 1)}" in msg


def test_toml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    assert "not valid TOML" in error("[agent\nname=1")
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "nope.toml")


def test_claims_table(tmp_path: Path) -> None:
    for f in ("ca.pem", "lb.pem", "lb.key"):
        (tmp_path / f).write_text("x")
    claims = textwrap.dedent(
        f"""\
        [claims]
        port = 4434
        ca = "{tmp_path}/ca.pem"
        cert = "{tmp_path}/lb.pem"
        key = "{tmp_path}/lb.key"
        vip_networks = ["100.64.0.0/10"]
        next_hop_networks = ["192.0.2.0/24"]
        interface = "lo"
        """
    )
    cfg = config.parse(GOOD + claims)
    assert cfg.claims is not None and str(cfg.claims.vip_networks[0]) == "100.64.0.0/10"
    text = GOOD + claims.replace('"lo"', '"nosuch0"')
    msg = error(text)
    assert msg.startswith(f"lb.toml:{line_of(text, 'nosuch0')}: ")
    assert "does not exist on this host" in msg
    text = GOOD + claims.replace("100.64.0.0/10", "100.64.0.1/10")
    assert "is not a network" in error(text)
    text = GOOD + claims.replace("lb.key", "missing.key")
    assert "create it with `ntm pki`" in error(text)


def test_example_file_is_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    for f in ("ca.pem", "lb.pem", "lb.key"):
        (tmp_path / "pki" / f).write_text("x")
    monkeypatch.setenv("NTM_LAB_STATE", str(tmp_path))
    example = Path(config.__file__).with_name("example.toml")
    cfg = config.load(example, check_interfaces=False)
    assert [s.name for s in cfg.services] == ["www", "echo"]
