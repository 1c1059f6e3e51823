"""The short table on stdout and the goal checks, from the result document alone.

Pure functions of the JSON the run writes, so a saved result can be re-rendered and the
formatting is unit-tested without a lab.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PAIR_LABEL = {"nat": "MN->CN via NAT", "direct": "MN->CN direct"}
MB = 1_000_000


def num(value: Any, digits: int = 1) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:,.{digits}f}"


def times(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.2f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell: the first left-aligned, the rest right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [cells[0].ljust(widths[0])]
        parts += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _get(doc: Mapping[str, Any], *keys: str) -> Any:
    node: Any = doc
    for key in keys:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _check(goal: str, target: str, measured: str, met: bool | None) -> dict[str, Any]:
    return {"goal": goal, "target": target, "measured": measured, "met": met}


def _best_quic_level(doc: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """The QUIC load level where the DC did the most Direction Requests per CPU-second.

    Requests per second of the DC's own CPU time is its one-core capacity, and unlike
    requests per wall second it does not drop when other work on the machine steals the core.
    """
    levels = [
        (level, found)
        for level in (_get(doc, "dc", "quic", "loads") or {})
        if isinstance(found := _get(doc, "dc", "quic", level, "directions"), Mapping)
        and isinstance(found.get("per_server_cpu_s"), int | float)
    ]
    return max(levels, key=lambda item: item[1]["per_server_cpu_s"]) if levels else None


def goals(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issues 3, 5 and 7's goals against this run; `met` is None when the figure is missing."""
    out: list[dict[str, Any]] = []
    for key, kind in (_get(doc, "setup", "kinds") or {}).items():
        target = _get(kind, "goal", "target_ms")
        if target is None:
            continue  # no goal for this kind (reverse), or no round trip measured
        added = kind.get("added_ms_p50")
        out.append(
            _check(
                f"tunnel set-up over a plain lookup, p50 ({key})",
                f"<= {num(target, 2)} ms ({_get(kind, 'goal', 'goal')})",
                f"{num(added, 2)} ms",
                _get(kind, "goal", "met"),
            )
        )
    for key in ("nat", "direct"):
        r = _get(doc, "tunnel", key, "tcp", "ratios", "ntm/openvpn")
        if _get(doc, "tunnel", key) is not None:
            out.append(
                _check(
                    f"TCP throughput vs OpenVPN ({key})",
                    ">= 1.50x",
                    times(r),
                    None if r is None else r >= 1.5,
                )
            )
        ours, theirs = (_get(doc, "latency", key, p, "p50") for p in ("ntm", "openvpn"))
        if _get(doc, "latency", key) is not None:
            met = None if ours is None or theirs is None else ours <= theirs
            out.append(
                _check(
                    f"RTT p50 no worse than OpenVPN ({key})",
                    f"<= {num(theirs, 3)} ms",
                    f"{num(ours, 3)} ms",
                    met,
                )
            )
    best = _best_quic_level(doc)
    if best is not None:
        level, quic = best
        rate = quic.get("per_server_cpu_s")
        out.append(
            _check(
                f"DC Direction Requests per DC CPU-second (QUIC, {level} load)",
                ">= 5,000/s",
                f"{num(rate, 0)}/s",
                None if rate is None else rate >= 5000,
            )
        )
        p99 = _get(quic, "latency_ms", "p99")
        out.append(
            _check(
                f"DC Direction Request p99 (QUIC, {level})",
                "<= 20 ms",
                f"{num(p99, 2)} ms",
                None if p99 is None else p99 <= 20,
            )
        )
    mem = _get(doc, "dc", "coordinator", "memory", "rss_delta_mib")
    nodes = _get(doc, "dc", "coordinator", "nodes")
    if mem is not None:
        out.append(
            _check(
                f"DC memory with {num(nodes, 0)} nodes",
                "<= 1,024 MiB",
                f"{num(mem)} MiB",
                mem <= 1024 if nodes and nodes >= 100_000 else None,
            )
        )
    out += _failover_goals(doc)
    rest = _get(doc, "node_rss", "at_rest")
    if isinstance(rest, Mapping) and rest:
        worst = max(rest.values())
        out.append(
            _check("node RSS at rest (largest node)", "<= 60 MB", f"{num(worst)} MB", worst <= 60)
        )
    return out


def mark(met: bool | None) -> str:
    return "?" if met is None else ("✓" if met else "✗")


def render(doc: Mapping[str, Any]) -> str:
    lines: list[str] = []
    m = doc.get("machine", {})
    lines.append(
        f"ntm bench {'(quick) ' if _get(doc, 'options', 'quick') else ''}"
        f"on {m.get('nproc', '?')} x {m.get('cpu_model', '?')}, kernel {m.get('kernel', '?')}"
    )
    src = doc.get("source")
    if isinstance(src, Mapping) and src.get("commit"):
        changed = src.get("uncommitted_changed_files")
        lines.append(
            f"code: {src['commit']}"
            + (f" + {changed} uncommitted changed files" if changed else "")
        )
    tunnel = doc.get("tunnel") or {}
    if tunnel:
        secs, rounds = (_get(doc, "options", k) for k in ("iperf_seconds", "iperf_rounds"))
        how = f"{secs} s" + (
            f", median of {rounds} interleaved runs" if rounds and rounds > 1 else ""
        )
        lines += ["", f"Throughput, Mbit/s received (iperf3, {how}, MN sends)"]
        rows = []
        for key, per in tunnel.items():
            for proto in ("tcp", "udp"):
                p = per.get(proto, {})
                rows.append(
                    [
                        f"{PAIR_LABEL.get(key, key)} {proto.upper()}",
                        *(num(_get(p, path, "mbps_received")) for path in ("plain", "ntm")),
                        num(_get(p, "openvpn", "mbps_received")),
                        times(_get(p, "ratios", "ntm/openvpn")),
                        times(_get(p, "ratios", "ntm/plain")),
                    ]
                )
        lines += table(["path", "plain", "ntm", "openvpn", "ntm/ovpn", "ntm/plain"], rows)
        lines += _gso_lines(doc)
        rows = [
            [
                PAIR_LABEL.get(key, key),
                num(_get(per, "cpu_s_per_gbit", "ntm"), 2),
                num(_get(per, "cpu_s_per_gbit", "openvpn"), 2),
                times(_get(per, "cpu_s_per_gbit", "ratio_ntm/openvpn")),
            ]
            for key, per in tunnel.items()
        ]
        lines += ["", "CPU seconds per Gbit (TCP test, both tunnel ends)"]
        lines += table(["path", "ntm", "openvpn", "ntm/ovpn"], rows)
    lat = doc.get("latency") or {}
    if lat:
        lines += ["", f"Round trip, ms (ping x {_get(doc, 'options', 'pings')}): p50 / p99"]
        rows = []
        for key, per in lat.items():
            cells = [
                f"{num(_get(per, p, 'p50'), 3)} / {num(_get(per, p, 'p99'), 3)}"
                for p in ("plain", "ntm", "openvpn")
            ]
            rows.append(
                [PAIR_LABEL.get(key, key), *cells, times(_get(per, "ratios_p50", "ntm/openvpn"))]
            )
        lines += table(["path", "plain", "ntm", "openvpn", "p50 ntm/ovpn"], rows)
    lines += _profile_lines(doc)
    lines += _relay_lines(doc)
    lines += _lb_lines(doc)
    lines += _health_lines(doc)
    lines += _setup_lines(doc)
    lines += _failover_lines(doc)
    setup = doc.get("setup")
    if isinstance(setup, Mapping) and "plain" in setup:  # results of the first schema
        lines += ["", f"Name to first byte, ms (N={setup.get('runs')}, {setup.get('client')})"]
        rows = []
        for kind, label in (
            ("marked_cold", "marked name, no tunnel yet"),
            ("marked_warm", "marked name, tunnel up"),
            ("plain", "plain name"),
        ):
            for key, what in (("dns_ms", "DNS answer"), ("first_byte_ms", "first byte")):
                s = _get(setup, kind, key) or {}
                rows.append([f"{label}: {what}", num(s.get("p50"), 2), num(s.get("p99"), 2)])
        lines += table(["", "p50", "p99"], rows)
        if setup.get("failures"):
            lines.append(f"  failed runs: {len(setup['failures'])}")
    dc = doc.get("dc")
    if isinstance(dc, Mapping) and dc:
        lines += ["", "DC capacity"]
        rows = []
        co = dc.get("coordinator", {})
        for key, label in (("register", "Coordinator.register"), ("plan", "Coordinator.plan")):
            s = co.get(key, {})
            lat_us = s.get("latency_us", {})
            rows.append(
                [
                    f"{label} (in-process)",
                    num(s.get("per_s"), 0),
                    f"{num(_get(lat_us, 'p50'), 1)} us",
                    f"{num(_get(lat_us, 'p99'), 1)} us",
                    "-",
                    "-",
                ]
            )
        quic = dc.get("quic", {})
        for level in quic.get("loads") or {}:
            load = _get(quic, "loads", level) or {}
            shape = f"{load.get('connections', '?')}x{load.get('in_flight_per_connection', '?')}"
            for key, label in (("registrations", "registrations"), ("directions", "Directions")):
                s = _get(quic, level, key) or {}
                rows.append(
                    [
                        f"{label} (QUIC, {level} {shape})",
                        num(s.get("per_s"), 0),
                        f"{num(_get(s, 'latency_ms', 'p50'), 2)} ms",
                        f"{num(_get(s, 'latency_ms', 'p99'), 2)} ms",
                        f"{num(s.get('server_cpu_percent'), 0)} %",
                        num(s.get("per_server_cpu_s"), 0),
                    ]
                )
        lines += table(["operation", "per s", "p50", "p99", "DC CPU", "per DC CPU-s"], rows)
        mem = co.get("memory", {})
        if mem:
            mib, per_node = num(mem.get("rss_delta_mib")), num(mem.get("bytes_per_node"), 0)
            nodes = num(co.get("nodes"), 0)
            lines.append(f"  {nodes} registered nodes: {mib} MiB RSS ({per_node} bytes/node)")
    rss = doc.get("node_rss") or {}
    if rss.get("at_rest"):
        parts = [f"{k} {num(v)}" for k, v in rss["at_rest"].items()]
        lines += ["", "Node RSS at rest, MB: " + ", ".join(parts)]
    checks = doc.get("goals") or []
    if checks:
        lines += ["", "Goals (issues 3, 5 and 7)"]
        rows = [[c["goal"], c["target"], c["measured"], mark(c["met"])] for c in checks]
        lines += table(["goal", "target", "measured", ""], rows)
    lines += _time_lines(doc)
    errors = doc.get("errors") or []
    if errors:
        lines += ["", "Errors (these sections did not complete):"]
        lines += [f"  {e['section']}: {e['error']}" for e in errors]
    return "\n".join(lines)


def _p50_p99(s: Any, digits: int = 2) -> str:
    return f"{num(_get(s, 'p50'), digits)} / {num(_get(s, 'p99'), digits)}"


def _relay_lines(doc: Mapping[str, Any]) -> list[str]:
    relay = doc.get("relay")
    if not isinstance(relay, Mapping) or "direct" not in relay:
        return []
    secs, rounds = (_get(doc, "options", k) for k in ("iperf_seconds", "iperf_rounds"))
    through = _get(relay, "relay", "through") or "?"
    rows = [
        [
            "mn1 -> cn2, direct",
            num(_get(relay, "direct", "mbps_received")),
            num(_get(relay, "direct", "cpu_s_per_gbit"), 2),
            "",
        ],
        [
            f"mn1 -> cn1, relayed via {through}",
            num(_get(relay, "relay", "mbps_received")),
            num(_get(relay, "relay", "cpu_s_per_gbit"), 2),
            times(relay.get("ratio_relay/direct")),
        ],
    ]
    head = (
        f"Relayed vs direct TCP, Mbit/s (iperf3, {secs} s, median of {rounds}; CPU of every "
        "process carrying the path)"
    )
    return ["", head, *table(["path", "Mbit/s", "CPU s/Gbit", "relay/direct"], rows)]


LB_LABEL = {
    "tunnel": "mn1 -> tunnel -> ntma1 -> lb",
    "public": "mn1 -> ntma1 public address (no tunnel) -> lb",
    "direct": "dmzc (plain host on dmz) -> lb VIP",
}


def _lb_lines(doc: Mapping[str, Any]) -> list[str]:
    lb = doc.get("lb")
    if not isinstance(lb, Mapping) or "direct" not in lb:
        return []
    conc = _get(lb, "direct", "concurrency")
    secs, rounds = (_get(doc, "options", k) for k in ("lb_seconds", "lb_rounds"))
    rows = []
    for key in ("tunnel", "public", "direct"):
        r = lb.get(key) or {}
        rps = r.get("requests_per_s")
        rows.append(
            [
                LB_LABEL[key],
                num(rps),
                num(_get(r, "latency_ms", "p50"), 2),
                num(_get(r, "latency_ms", "p99"), 2),
                num(r.get("error_count"), 0),
                times(ratio_of(rps, _get(lb, "direct", "requests_per_s"))),
            ]
        )
    head = (
        f"LB service GET /whoami ({conc} connections, a new one per request, {secs} s, "
        f"median of {rounds})"
    )
    seen = "yes" if lb.get("tunnel_client_seen_is_vip") else "NO"
    note = (
        f"  p99 tunnel/direct {times(_get(lb, 'ratios', 'p99 tunnel/direct'))}; the web "
        f"servers saw mn1's vIP {lb.get('client_vip')} as the client: {seen}"
    )
    headers = ["path", "req/s", "p50 ms", "p99 ms", "errors", "req/s vs direct"]
    return ["", head, *table(headers, rows), note]


def ratio_of(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return None
    return round(a / b, 3)


def _health_lines(doc: Mapping[str, Any]) -> list[str]:
    h = doc.get("health")
    if not isinstance(h, Mapping) or "config" not in h:
        return []
    c = h["config"]
    head = (
        f"Health checks ({c.get('service')}: {c.get('kind')} every "
        f"{num(c.get('interval_s'), 1)} s, "
        f"timeout {num(c.get('timeout_s'), 1)} s, fall {c.get('fall')}, rise {c.get('rise')}, "
        f"on failure {c.get('on_failure')}; {len(h.get('cycles') or [])} kill/start cycles of "
        f"{h.get('real')})"
    )
    rows = [
        [
            "detection: stops answering -> out of service",
            num(_get(h, "detection_s", "p50"), 3),
            num(_get(h, "detection_s", "max"), 3),
            num(c.get("detection_s"), 2),
        ],
        [
            "recovery: answers again -> in service",
            num(_get(h, "recovery_s", "p50"), 3),
            num(_get(h, "recovery_s", "max"), 3),
            num(c.get("recovery_s"), 2),
        ],
    ]
    return ["", head, *table(["seconds", "p50", "max", "configured worst case"], rows)]


SETUP_LABEL = {"direct": "direct", "relayed": "relayed", "reverse": "reverse"}


def _setup_lines(doc: Mapping[str, Any]) -> list[str]:
    setup = doc.get("setup")
    if not isinstance(setup, Mapping) or not setup.get("kinds"):
        return []
    rows = []
    for key, k in setup["kinds"].items():
        goal = _get(k, "goal", "target_ms")
        rows.append(
            [
                f"{SETUP_LABEL.get(key, key)} {k.get('client')} -> {k.get('peer')}",
                num(_get(k, "plain_lookup_ms", "p50"), 2),
                _p50_p99(k.get("cold_dns_ms")),
                _p50_p99(k.get("cold_first_byte_ms")),
                num(_get(k, "warm_first_byte_ms", "p50"), 2),
                num(k.get("added_ms_p50"), 2),
                "-" if goal is None else f"<= {num(goal, 2)}",
                "-" if goal is None else mark(_get(k, "goal", "met")),
            ]
        )
    n = ", ".join(
        f"{key} {_get(k, 'cold_first_byte_ms', 'n')}" for key, k in setup["kinds"].items()
    )
    lines = [
        "",
        f"Tunnel set-up, ms: name lookup to first byte through a new tunnel (runs: {n}); "
        "plain = the same name looked up straight at the resolver",
    ]
    lines += table(
        [
            "kind",
            "plain p50",
            "DNS p50 / p99",
            "first byte p50 / p99",
            "tunnel up p50",
            "added p50",
            "goal",
            "",
        ],
        rows,
    )
    rtt = ", ".join(
        f"{c} {num(_get(r, 'p50'), 3)}" for c, r in (setup.get("lab_rtt_ms") or {}).items()
    )
    lines.append(f"  lab round trip to dc1 p50, ms: {rtt}")
    stub = setup.get("plain_stub") or {}
    for client, per in stub.items():
        lines.append(
            f"  {setup.get('plain_name')} through {client}'s stub: DNS "
            f"{_p50_p99(per.get('dns_ms'))}, first byte {_p50_p99(per.get('first_byte_ms'))}"
        )
    for key, k in setup["kinds"].items():
        if k.get("failures"):
            lines.append(f"  {key}: {len(k['failures'])} failed runs, first: {k['failures'][0]}")
    return lines


FAILOVER_ROWS = (
    "handover_same_family",
    "handover_different_family",
    "handover_make_before_break",
    "gateway_failure",
    "uplink_cut",
    "failback",
)


NOT_BUILT = "not built yet"
GATEWAY_ROWS = ("gateway_failure", "uplink_cut")


def _failover_goals(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    fo = doc.get("failover")
    if not isinstance(fo, Mapping):
        return []
    out = []
    for key in FAILOVER_ROWS:
        label = _get(fo, "labels", key) or key
        r = fo.get(key)
        if not isinstance(r, Mapping):
            continue
        if r.get("built") is False:
            target = _get(fo, "goals", key) or "?"
            out.append(_check(f"{label} (issue 5)", target, NOT_BUILT, None))
            continue
        goal = r.get("goal")
        if not isinstance(goal, Mapping) or goal.get("text") in (None, "none set"):
            continue
        s = r.get("gap_ms") or {}
        measured = f"p50 {num(s.get('p50'), 1)} ms, p99 {num(s.get('p99'), 1)} ms"
        if goal.get("zero_loss"):
            measured += f", {num(r.get('lost_total'), 0)} lost"
        out.append(_check(f"{label} (issue 5)", str(goal["text"]), measured, goal.get("met")))
    return out


def _failover_lines(doc: Mapping[str, Any]) -> list[str]:
    fo = doc.get("failover")
    if not isinstance(fo, Mapping):
        return []
    pub = fo.get("published_s") or {}
    published = f"VRRP {num(pub.get('vrrp_s'), 1)} s, seed {num(pub.get('seed_paper_s'), 1)} s"
    rows = []
    for key in FAILOVER_ROWS:
        r = fo.get(key)
        label = str(_get(fo, "labels", key) or key)
        if not isinstance(r, Mapping):
            continue
        if r.get("built") is False:
            target = f"{_get(fo, 'goals', key)} (no figure)"
            rows.append([label, NOT_BUILT, "", "", "", "", "", target, ""])
            continue
        if "error" in r and "gap_ms" not in r:
            rows.append([label, "error", "", "", "", "", "", str(r["error"])[:60], ""])
            continue
        g = r.get("gap_ms") or {}
        goal = r.get("goal") or {}
        met = goal.get("met")
        text = str(goal.get("text") or "none set")
        rows.append(
            [
                label,
                num(r.get("runs"), 0),
                *(num(g.get(q), 1) for q in ("p50", "p90", "p99", "max")),
                f"{num(_get(r, 'lost', 'p50'), 0)} / {num(_get(r, 'lost', 'max'), 0)}",
                text if text == "none set" else f"{text} {mark(met)}",
                published if key in GATEWAY_ROWS else "",
            ]
        )
    lines = [
        "",
        "Failover: gap in a 1 kHz UDP stream mn1 -> www.example.com:9000 (through the tunnel), "
        "ms: the longest time without an echo around each event",
        *table(
            [
                "event",
                "runs",
                "p50",
                "p90",
                "p99",
                "max",
                "lost p50 / max",
                "goal (issue 5)",
                "published",
            ],
            rows,
        ),
        "  published: figures from the literature, not measured here (../shared/REFERENCES.md):"
        f" VRRP {num(pub.get('vrrp_s'), 1)} s, the seed paper's VPN failover "
        f"{num(pub.get('seed_paper_s'), 1)} s (5 s detection + 318 ms re-setup)",
    ]
    for key in ("gateway_failure", "uplink_cut"):
        r = fo.get(key)
        if isinstance(r, Mapping) and isinstance(r.get("node_detection_s"), Mapping):
            lines.append(
                f"  {key.replace('_', ' ')}, mn1's own account: detection p50 "
                f"{num(_get(r, 'node_detection_s', 'p50'), 3)} s, switch p50 "
                f"{num(_get(r, 'node_switch_s', 'p50'), 3)} s"
            )
    odd = []
    for key in FAILOVER_ROWS:
        r = fo.get(key)
        if not isinstance(r, Mapping) or "per_run" not in r:
            continue
        if r.get("server_changed_runs"):
            odd.append(f"{key}: the echoing server changed in {r['server_changed_runs']} runs")
        if r.get("censored_runs"):
            odd.append(f"{key}: {r['censored_runs']} runs not handled in time (gap censored)")
        if r.get("lost_scattered_total"):
            odd.append(
                f"{key}: {r['lost_scattered_total']} probes lost while echoes still came "
                "(outside every silence)"
            )
    lines += [f"  {text}" for text in odd]
    hold = fo.get("failback_hold_down_s")
    outage = num(fo.get("allowed_outage_s"), 1)
    lines.append(
        f"  mn1 (lab/config/mn1.toml): allowed outage {outage} s, fail-back hold-down "
        f"{num(hold, 0)} s"
    )
    return lines


def _time_lines(doc: Mapping[str, Any]) -> list[str]:
    times_ = doc.get("section_times")
    if not isinstance(times_, Mapping) or not times_:
        return []
    rows = []
    for name, t in times_.items():
        load = t.get("loadavg_1min") or ["?", "?"]
        rows.append([name, num(t.get("wall_s"), 1), f"{load[0]} -> {load[-1]}"])
    total = doc.get("duration_s")
    rows.append(["total", num(total, 1), ""])
    return ["", "Section times", *table(["section", "wall s", "load avg (1 min)"], rows)]


def _profile_lines(doc: Mapping[str, Any], top: int = 6) -> list[str]:
    """--profile: where each tunnel end spends its busy time (py-spy, self time)."""
    prof = doc.get("profile")
    if not isinstance(prof, Mapping):
        return []
    lines = [
        "",
        f"Profile ({prof.get('tool', 'py-spy')}, TCP through the tunnel at "
        f"{num(prof.get('iperf3_tcp_mbps_while_sampled'))} Mbit/s): self time, % of the "
        "samples where the node was not waiting in its event loop",
    ]
    if prof.get("error"):
        lines.append(f"  error: {prof['error']}")
    for name, node in prof.items():
        if not isinstance(node, Mapping) or "samples" not in node:
            continue
        lines.append(
            f"  {name}: {node['samples']} samples, {num(node.get('waiting_percent'))} % waiting; "
            f"raw stacks {node.get('raw', '?')}"
        )
        if node.get("error"):
            lines.append(f"    error: {str(node['error'])[:200]}")
        for frame in (node.get("busy_self") or [])[:top]:
            lines.append(f"    {num(frame.get('percent')):>5} %  {frame.get('frame')}")
    return lines


def _gso_lines(doc: Mapping[str, Any]) -> list[str]:
    """Evidence that the current data path ran: UDP GSO sends on both tunnel ends."""
    out = []
    for key, pair in (_get(doc, "lab", "pairs") or {}).items():
        gso = pair.get("gso") if isinstance(pair, Mapping) else None
        if not isinstance(gso, Mapping):
            continue
        parts = []
        for node, g in gso.items():
            per = g.get("datagrams_per_send")
            off = ", GSO switched off" if g.get("disabled_ever") else ""
            parts.append(
                f"{node} {num(g.get('tx_gso_datagrams'), 0)} datagrams in "
                f"{num(g.get('tx_gso_sends'), 0)} GSO sends ({num(per)}/send{off})"
            )
        out.append(f"  {PAIR_LABEL.get(key, key)}, our tunnel's UDP GSO: " + "; ".join(parts))
    return out
