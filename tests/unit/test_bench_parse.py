"""The benchmark's parsers: iperf3 JSON, ping output, percentiles, py-spy stacks."""

from __future__ import annotations

from typing import Any

import pytest

from bench.iperf import IperfError, parse_iperf3
from bench.openvpn import (
    OvpnPair,
    client_argv,
    interface_argvs,
    negotiated_cipher,
    server_argv,
)
from bench.profile import fold, top_frames
from bench.report import render
from bench.stats import parse_ping, percentile, summary


def iperf_doc(protocol: str, reverse: int = 0) -> dict[str, Any]:
    """The parts of `iperf3 -J` (3.12) the parser reads, with real-looking numbers."""
    udp = protocol == "UDP"
    sent: dict[str, Any] = {"seconds": 3.0, "bytes": 402_000_000, "bits_per_second": 1.072e9}
    received: dict[str, Any] = {"seconds": 3.04, "bytes": 47_500_000, "bits_per_second": 1.25e8}
    if udp:
        received |= {"jitter_ms": 0.0336, "lost_packets": 264250, "lost_percent": 89.76}
    else:
        sent["retransmits"] = 520
    return {
        "start": {"test_start": {"protocol": protocol, "duration": 3, "reverse": reverse}},
        "intervals": [],
        "end": {
            "sum_sent": sent,
            "sum_received": received,
            "cpu_utilization_percent": {"host_total": 72.3, "remote_total": 22.2},
        },
    }


def test_iperf_tcp_reports_what_arrived() -> None:
    r = parse_iperf3(iperf_doc("TCP"))
    assert r.protocol == "tcp"
    assert r.mbps_received == pytest.approx(125.0)
    assert r.mbps_sent == pytest.approx(1072.0)
    assert r.retransmits == 520 and r.lost_percent is None and r.jitter_ms is None
    assert r.gigabits_received == pytest.approx(0.38)
    assert r.sender_cpu_percent == 72.3 and r.receiver_cpu_percent == 22.2
    assert r.as_dict()["mbps_received"] == 125.0


def test_iperf_udp_has_loss_and_jitter_and_reverse_swaps_cpu() -> None:
    r = parse_iperf3(iperf_doc("UDP", reverse=1))
    assert r.protocol == "udp" and r.retransmits is None
    assert r.lost_percent == pytest.approx(89.76) and r.jitter_ms == pytest.approx(0.0336)
    assert r.sender_cpu_percent == 22.2 and r.receiver_cpu_percent == 72.3


def test_iperf_error_and_truncated_output_are_errors() -> None:
    with pytest.raises(IperfError, match="unable to connect"):
        parse_iperf3({"start": {}, "end": {}, "error": "unable to connect to server"})
    with pytest.raises(IperfError, match="start/end"):
        parse_iperf3({"start": {}})
    with pytest.raises(IperfError, match="sum_received"):
        parse_iperf3({"start": {}, "end": {"sum_sent": {}}})


def test_percentiles_interpolate_like_numpy() -> None:
    data = [float(x) for x in range(1, 101)]  # 1..100
    assert percentile(data, 50) == pytest.approx(50.5)
    assert percentile(data, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)
    s = summary([1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4 and s["p50"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert summary([]) == {"n": 0}


PING = """PING 10.99.0.1 (10.99.0.1) 56(84) bytes of data.
64 bytes from 10.99.0.1: icmp_seq=1 ttl=64 time=0.327 ms
64 bytes from 10.99.0.1: icmp_seq=2 ttl=64 time=0.410 ms
64 bytes from 10.99.0.1: icmp_seq=4 ttl=64 time=1.54 ms

--- 10.99.0.1 ping statistics ---
4 packets transmitted, 3 received, 25% packet loss, time 31ms
rtt min/avg/max/mdev = 0.327/0.759/1.540/0.553 ms
"""


def test_ping_output_gives_each_round_trip_and_loss() -> None:
    r = parse_ping(PING)
    assert r.rtts_ms == (0.327, 0.410, 1.54)
    assert (r.transmitted, r.received) == (4, 3)
    assert r.loss_percent == pytest.approx(25.0)
    cut = parse_ping("\n".join(PING.splitlines()[:3]))  # interrupted: no totals line
    assert cut.transmitted == cut.received == 2


RAW = """<module> (ntm:6);run (runners.py:190);_on_tun (engine.py:246);_send (engine.py:291) 60
<module> (ntm:6);run (runners.py:190);_on_tun (engine.py:249);seal (crypto.py:183) 25
<module> (ntm:6);run (runners.py:190);_on_udp (engine.py:282) 15
"""


def test_py_spy_stacks_fold_into_self_and_inclusive_shares() -> None:
    total, own, inclusive = fold(RAW)
    assert total == 100
    assert own["_send (engine.py:291)"] == 60
    assert inclusive["run (runners.py:190)"] == 100
    top = top_frames(RAW, limit=2)
    assert [f["frame"] for f in top["self"]] == ["_send (engine.py:291)", "seal (crypto.py:183)"]
    # frames in every sample (the interpreter and loop scaffold) are left out of "inclusive"
    assert all("runners.py" not in f["frame"] for f in top["inclusive"])
    assert top_frames("")["samples"] == 0


def test_profile_busy_shares_leave_out_the_event_loop_wait() -> None:
    raw = (
        "main (m.py:1);select (selectors.py:468) 50\n"
        "main (m.py:1);seal (crypto.py:183) 30\n"
        "main (m.py:1);write (tun.py:299) 20\n"
    )
    top = top_frames(raw)
    assert top["waiting_percent"] == 50.0
    assert top["busy_self"] == [
        {"frame": "seal (crypto.py:183)", "percent": 60.0},
        {"frame": "write (tun.py:299)", "percent": 40.0},
    ]
    doc = {
        "machine": {},
        "profile": {
            "tool": "py-spy",
            "iperf3_tcp_mbps_while_sampled": 115.8,
            "mn1": {"raw": "/r/mn1.txt", **top},
        },
    }
    text = render(doc)
    assert "mn1: 100 samples, 50.0 % waiting; raw stacks /r/mn1.txt" in text
    assert " 60.0 %  seal (crypto.py:183)" in text


def test_openvpn_command_lines_use_gcm_tls_and_no_dco() -> None:
    from pathlib import Path

    pair = OvpnPair.numbered(1, "198.51.100.30")
    assert (pair.dev, pair.port, pair.server_ip) == ("ovpnb1", 1195, "10.99.1.1")
    s = server_argv(Path("/p"), pair, 1400, Path("/l"))
    c = client_argv(Path("/p"), pair, 1400, Path("/l"))
    for argv in (s, c):
        assert argv[argv.index("--data-ciphers") + 1] == "AES-256-GCM"
        assert "--disable-dco" in argv and argv[argv.index("--tun-mtu") + 1] == "1400"
        assert argv[argv.index("--proto") + 1] == "udp"
    assert "--tls-server" in s and "--tls-client" in c
    # we configure the interface ourselves: link scope keeps it out of the nodes' address set
    assert "--ifconfig-noexec" in s and "--ifconfig-noexec" in c
    up, addr = interface_argvs(pair, 1400, server=False)
    assert up == ["ip", "link", "set", "dev", "ovpnb1", "mtu", "1400", "up"]
    assert addr[3:6] == ["10.99.1.2", "peer", "10.99.1.1"] and addr[-2:] == ["scope", "link"]
    assert c[c.index("--remote") + 1 : c.index("--remote") + 3] == ["198.51.100.30", "1195"]
    log = "... Data Channel: cipher 'AES-256-GCM', peer-id: 0\n"
    assert negotiated_cipher(log) == "AES-256-GCM"
    assert negotiated_cipher("nothing yet") is None


def test_gso_use_is_counted_over_the_tests_and_shown_under_the_throughput() -> None:
    from bench.tunnel import gso_delta

    before = {"tx_gso_sends": 10, "tx_gso_datagrams": 200, "tx_gso_disabled": 0}
    after = {"tx_gso_sends": 110, "tx_gso_datagrams": 3_200, "tx_gso_disabled": 0}
    mn1 = gso_delta(before, after)
    assert mn1 == {
        "tx_gso_sends": 100,
        "tx_gso_datagrams": 3_000,
        "tx_gso_disabled": 0,
        "datagrams_per_send": 30.0,
        "disabled_ever": False,
    }
    cn2 = gso_delta(before, {**before, "tx_gso_disabled": 1})
    assert cn2["datagrams_per_send"] is None and cn2["disabled_ever"] is True
    doc = {
        "machine": {},
        "tunnel": {"nat": {}},
        "lab": {"pairs": {"nat": {"gso": {"mn1": mn1, "cn2": cn2}}}},
    }
    text = render(doc)
    assert "mn1 3,000 datagrams in 100 GSO sends (30.0/send)" in text
    assert "cn2 0 datagrams in 0 GSO sends (-/send, GSO switched off)" in text
