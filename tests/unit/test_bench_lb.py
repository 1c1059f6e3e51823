"""The LB benchmark's pieces without a lab: the HTTP load loop, its figures, the health-check
timeline and the watcher's reading of `ntm lb` status."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from bench.hcwatch import real_state, serving
from bench.httpload import Tally, parse_response, report, run
from bench.lb import health_cycle, load_ratios, load_targets, median_by_rate

WHOAMI = b"HTTP/1.1 200 OK\r\nContent-Length: 31\r\n\r\nserver=web2 client=100.64.0.7\n"


def test_response_parsing_finds_status_server_and_client() -> None:
    assert parse_response(WHOAMI) == (200, "web2", "100.64.0.7")
    assert parse_response(b"HTTP/1.0 503 Busy\r\n\r\n") == (503, None, None)
    assert parse_response(b"garbage") == (None, None, None)


def test_tally_counts_only_good_answers_as_completed() -> None:
    tally = Tally()
    tally.response(WHOAMI, 2.0)
    tally.response(WHOAMI.replace(b"web2", b"web1"), 4.0)
    tally.response(b"HTTP/1.1 502 Bad Gateway\r\n\r\n", 1.0)
    tally.errors["ConnectionResetError"] += 1
    out = report(tally, 2.0, concurrency=4)
    assert out["completed"] == 2 and out["requests_per_s"] == 1.0
    assert out["latency_ms"]["p50"] == 3.0
    assert out["errors"] == {"status 502": 1, "ConnectionResetError": 1}
    assert out["error_count"] == 2
    assert out["servers"] == {"web1": 1, "web2": 1}
    assert out["clients_seen"] == {"100.64.0.7": 2}
    assert report(Tally(), 0.0, 1)["requests_per_s"] is None


async def _whoami_server(
    refuse_every: int = 0,
) -> tuple[asyncio.Server, int, list[int]]:
    served = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        served[0] += 1
        if refuse_every and served[0] % refuse_every == 0:
            writer.write(b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\n")
        else:
            writer.write(WHOAMI)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], served


def test_load_loop_runs_for_its_window_and_reports_what_the_server_said() -> None:
    async def main() -> dict[str, Any]:
        server, port, served = await _whoami_server(refuse_every=5)
        async with server:
            out: dict[str, Any] = await run(f"http://127.0.0.1:{port}/whoami", 3, 0.3, 0.05, 2.0)
        out["served"] = served[0]
        return out

    out = asyncio.run(main())
    assert out["completed"] > 0 and out["servers"] == {"web2": out["completed"]}
    assert out["errors"].get("status 500", 0) > 0
    # warm-up requests are served but not counted
    assert out["served"] >= out["completed"] + out["error_count"]
    assert out["latency_ms"]["n"] == out["completed"]


def test_load_loop_counts_refused_connections_as_errors() -> None:
    async def main() -> dict[str, Any]:
        server, port, _ = await _whoami_server()
        server.close()
        await server.wait_closed()  # nothing listens on `port` now
        return await run(f"http://127.0.0.1:{port}/", 2, 0.2, 0.0, 1.0)  # type: ignore[no-any-return]

    out = asyncio.run(main())
    assert out["completed"] == 0 and out["errors"].get("ConnectionRefusedError", 0) > 0


def test_median_round_is_a_real_round_and_errors_are_kept() -> None:
    runs: list[dict[str, Any]] = [
        {"requests_per_s": 300.0, "latency_ms": {"p99": 9.0}},
        {"error": "httpload wrote no JSON"},
        {"requests_per_s": 200.0, "latency_ms": {"p99": 12.0}},
        {"requests_per_s": 400.0, "latency_ms": {"p99": 7.0}},
    ]
    chosen = median_by_rate(runs)
    assert chosen["requests_per_s"] == 300.0 and chosen["latency_ms"]["p99"] == 9.0
    assert chosen["rounds_requests_per_s"] == [300.0, None, 200.0, 400.0]
    assert chosen["failed_rounds"] == ["httpload wrote no JSON"]
    assert median_by_rate([{"error": "x"}]) == {"error": "x"}


def test_load_ratios_compare_the_tunnel_with_the_plain_paths() -> None:
    rows = {
        "tunnel": {"requests_per_s": 150.0, "latency_ms": {"p99": 30.0}},
        "public": {"requests_per_s": 300.0, "latency_ms": {"p99": 10.0}},
        "direct": {"requests_per_s": 200.0, "latency_ms": {"p99": 20.0}},
    }
    assert load_ratios(rows) == {
        "rps tunnel/direct": 0.75,
        "rps tunnel/public": 0.5,
        "p99 tunnel/direct": 1.5,
    }
    assert load_ratios({"tunnel": {"error": "x"}})["rps tunnel/direct"] is None


def test_load_targets_send_the_same_request_three_ways() -> None:
    targets = {t.key: t for t in load_targets("100.64.3.4")}
    assert targets["tunnel"].url == "http://100.64.3.4/whoami"
    assert targets["tunnel"].client == targets["public"].client == "mn1"
    assert targets["direct"].url == "http://10.30.0.100/whoami"
    assert targets["direct"].client == "dmzc"
    # only the tunnel's own processes are charged with its CPU
    assert targets["tunnel"].tunnel_procs == (("mn1", "node"), ("ntma1", "adaptor"))


def event(t: float, serving: bool, in_service: bool, flip: float | None = None) -> dict[str, Any]:
    return {"t": t, "serving": serving, "in_service": in_service, "last_change": flip}


def test_health_cycle_times_detection_and_recovery_from_the_watchers_events() -> None:
    events = [
        event(99.0, True, True),
        event(100.05, False, True),  # killed at 100.0, first refused look
        event(101.02, False, False, flip=100.95),  # the agent removed it
        event(103.40, True, False, flip=100.95),  # started at 103.0, answers again
        event(104.30, True, True, flip=104.25),
    ]
    out = health_cycle(events, t_kill=100.0, t_start=103.0)
    assert out == {
        "detection_s": 0.97,
        "detection_verdict_s": 0.9,
        "recovery_s": 0.9,
        "recovery_verdict_s": 0.85,
    }


def test_health_cycle_ignores_an_earlier_cycle_and_says_what_never_happened() -> None:
    earlier = [event(10.0, False, True), event(11.0, False, False), event(13.0, True, True)]
    stuck = [*earlier, event(100.1, False, True)]
    out = health_cycle(stuck, t_kill=100.0, t_start=103.0)
    assert "detection_s" not in out and "never took web2 out" in out["error"]
    no_return = [*earlier, event(100.1, False, True), event(101.0, False, False)]
    out = health_cycle(no_return, t_kill=100.0, t_start=103.0)
    assert out["detection_s"] == 0.9 and "never brought web2 back" in out["error"]


LB_STATUS = {
    "services": [
        {"name": "echo", "reals": [{"address": "10.40.0.12", "port": 9000, "in_service": True}]},
        {
            "name": "www",
            "reals": [
                {"address": "10.40.0.11", "port": 80, "in_service": True, "health": "up"},
                {
                    "address": "10.40.0.12",
                    "port": 80,
                    "in_service": False,
                    "health": "down",
                    "last_change": 1234.5,
                },
            ],
        },
    ]
}


def test_watcher_reads_one_real_server_of_one_service() -> None:
    state = real_state(LB_STATUS, "www", "10.40.0.12", 80)
    assert state == {"in_service": False, "health": "down", "last_change": 1234.5}
    assert real_state(LB_STATUS, "echo", "10.40.0.12", 9000)["in_service"] is True
    assert real_state(LB_STATUS, "www", "10.40.0.99", 80)["in_service"] is None


def test_watcher_probe_wants_an_http_200() -> None:
    async def main() -> tuple[bool, bool]:
        server, port, _ = await _whoami_server(refuse_every=2)
        async with server:
            loop = asyncio.get_running_loop()
            first = await loop.run_in_executor(None, serving, "127.0.0.1", port, "/", 2.0)
            second = await loop.run_in_executor(None, serving, "127.0.0.1", port, "/", 2.0)
        return first, second

    assert asyncio.run(main()) == (True, False)  # the second answer is a 500
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # bound, never listening: connections are refused
        assert serving("127.0.0.1", closed, "/", 0.5) is False
