"""Bad input and failures in the lab: garbage on the tunnel port, the DC gone."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest

from tests.integration.test_core import curl, status, wait_for

pytestmark = pytest.mark.lab

GARBAGE = r"""
import os, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
target = (sys.argv[1], 7400)
for i in range(300):
    s.sendto(os.urandom(i % 90), target)                       # random bytes
    s.sendto(bytes([3, 0, 0, 0]) + os.urandom(8) + struct.pack('!Q', i) + os.urandom(40), target)
"""


def test_garbage_on_the_tunnel_port_is_dropped_and_counted(lab: Any) -> None:
    wait_for(lambda: status(lab, "mn1")["registered"], what="mn1 registered")
    assert "server=cn2" in curl(lab, "http://global.example.com/").stdout
    before = status(lab, "cn2")["counters"]["tunnel"]
    lab.exec("plainweb", sys.executable, "-c", GARBAGE, "198.51.100.30")
    after = status(lab, "cn2")
    dropped = sum(after["counters"]["tunnel"].values()) - sum(before.values())
    assert dropped >= 600, after["counters"]["tunnel"]
    # the daemon lives and the established tunnel is undisturbed
    assert "server=cn2" in curl(lab, "http://global.example.com/").stdout


def test_dc_unreachable_falls_back_to_the_plain_answer(lab: Any) -> None:
    wait_for(lambda: status(lab, "mn1")["registered"], what="mn1 registered")
    curl(lab, "http://global.example.com/")  # warms the resolver's cache of cn2's A record
    lab.kill("dc1")
    try:
        lab.kill("mn1")
        lab.start("mn1")  # a fresh node: no tunnel yet, and no DC to ask
        started = time.monotonic()
        page = wait_for(
            lambda: curl(lab, "http://global.example.com/", check=False).stdout,
            what="plain answer",
        )
        assert "server=cn2" in page
        assert "client=198.51.100.2" in page  # reached without a tunnel, through nat-a
        assert time.monotonic() - started < 15
        counters = status(lab, "mn1")["counters"]["dns"]
        assert counters.get("fallbacks", 0) >= 1, json.dumps(counters)
    finally:
        lab.start("dc1")
    wait_for(lambda: status(lab, "mn1")["registered"], timeout=30, what="mn1 back with its DC")
    vip = status(lab, "mn1")["vip"]
    page = wait_for(
        lambda: curl(lab, "http://global.example.com/", check=False).stdout, what="tunnel"
    )
    assert f"client={vip}" in page


def test_upstream_dns_down_gives_servfail_in_bounded_time(lab: Any) -> None:
    wait_for(lambda: status(lab, "mn1")["registered"], what="mn1 registered")
    lab.kill("resolver")
    try:
        started = time.monotonic()
        probe = lab.exec(
            "mn1",
            "ntm",
            "lab",
            "dnsprobe",
            "--server",
            "127.0.0.1",
            "--timeout",
            "10",
            "nothing-cached.example.com",
            check=False,
        )
        elapsed = time.monotonic() - started
        assert probe.returncode != 0
        assert "SERVFAIL" in probe.stderr, probe.stderr
        assert elapsed < 2.0 + 3.0  # upstream_timeout in mn1.toml, plus process start-up
        assert status(lab, "mn1")["counters"]["dns"].get("servfail", 0) >= 1
    finally:
        lab.start("resolver")
    assert "server=plainweb" in curl(lab, "http://plain.example.com/").stdout
