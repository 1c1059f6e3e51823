"""ntm_proto.marker: which names are NTMobile names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntm_proto.marker import MarkerError, MarkerRule, normalize_fqdn

RULE = MarkerRule()


@pytest.mark.parametrize(
    ("name", "marked", "zone"),
    [
        ("cn2.ntm.example.com", True, "ntm.example.com"),
        ("CN2.NTM.Example.COM.", True, "ntm.example.com"),
        ("a.b.ntm.example.com", True, "ntm.example.com"),
        ("ntm.ntm.example.com", True, "ntm.example.com"),
        ("x.ntm.ntm.example.com", True, "ntm.ntm.example.com"),  # leftmost mark decides
        ("ntm.example.com", False, None),  # the zone apex is not a node name
        ("www.example.com", False, None),
        ("xntm.example.com", False, None),
        ("cn2.ntmx.example.com", False, None),
        ("ntm", False, None),
        ("node.ntm", True, "ntm"),
    ],
)
def test_is_marked_and_zone(name: str, marked: bool, zone: str | None) -> None:
    assert RULE.is_marked(name) is marked
    assert RULE.zone_of(name) == zone


def test_custom_mark() -> None:
    rule = MarkerRule("Mobile")
    assert rule.label == "mobile"
    assert rule.is_marked("cn2.mobile.example.com")
    assert not rule.is_marked("cn2.ntm.example.com")
    assert rule.zone_of("cn2.MOBILE.example.com.") == "mobile.example.com"


def test_zone_apex() -> None:
    assert RULE.is_zone_apex("ntm.example.com")
    assert not RULE.is_zone_apex("cn2.ntm.example.com")
    assert not RULE.is_zone_apex("ntm")


def test_normalize() -> None:
    assert normalize_fqdn("WWW.Example.COM.") == "www.example.com"
    assert normalize_fqdn("_sip._udp.example.com") == "_sip._udp.example.com"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "a..b",
        ".a.b",
        "a.b..",
        "a b.com",
        "a/b.com",
        "x" * 64 + ".com",
        ".".join(["a" * 63] * 4) + ".com",
        "é.example.com",
    ],
)
def test_normalize_rejects(bad: str) -> None:
    with pytest.raises(MarkerError):
        normalize_fqdn(bad)
    with pytest.raises(MarkerError):
        RULE.is_marked(bad)


def test_length_limits_are_inclusive() -> None:
    label63 = "a" * 63
    name = ".".join([label63] * 3 + ["b" * 61])  # 253 characters
    assert len(name) == 253
    assert normalize_fqdn(name + ".") == name


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "x" * 64])
def test_bad_mark_is_a_typed_error(bad: str) -> None:
    with pytest.raises(MarkerError):
        MarkerRule(bad)


def test_marker_error_is_a_value_error() -> None:
    assert issubclass(MarkerError, ValueError)


@given(st.text(max_size=300))
def test_any_text_gives_bool_or_marker_error(text: str) -> None:
    try:
        marked = RULE.is_marked(text)
    except MarkerError:
        return
    assert isinstance(marked, bool)
    zone = RULE.zone_of(text)
    assert (zone is not None) == marked
    if zone is not None:
        assert normalize_fqdn(text).endswith(zone)
        assert zone.split(".")[0] == "ntm"


_label = st.from_regex(r"[a-zA-Z0-9_-]{1,20}", fullmatch=True)


@given(st.lists(_label, min_size=1, max_size=6), st.lists(_label, min_size=0, max_size=4))
def test_constructed_names(prefix: list[str], suffix: list[str]) -> None:
    name = ".".join([*prefix, "NTM", *suffix])
    assert RULE.is_marked(name)
    zone = RULE.zone_of(name)
    assert zone is not None
    assert normalize_fqdn(name).endswith(zone)
    assert zone.startswith("ntm")
