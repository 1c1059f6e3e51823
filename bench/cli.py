"""`ntm bench`: tunnel vs OpenVPN vs plain, relayed vs direct, the LB service through the
NTMA vs straight to its VIP, health-check timings, name-to-tunnel set-up, DC capacity.

Numbers are reported, never asserted: the exit status is 0 unless a benchmark itself broke
(1) or was interrupted (130). Everything created (lab, namespaces, processes) goes away on
every exit path, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from ntm_io.config import ConfigError

from . import lb, openvpn, procstat, profile, report, tunnel
from .dc_capacity import run_dc
from .failover import BACKUP, EVENT_GROUPS, MBB_CLIENT, parse_events, run_failover
from .iperf import IperfError, parse_iperf3
from .labctl import CN, CN_ADDRESS, DIRECT_ADDRESS, DIRECT_NODE, REPO, BenchLab, LabFailure
from .nsproc import Processes, in_ns
from .options import pick
from .relay_tput import run_relay
from .setup_time import FRESH_MODES, KINDS, probe_argv, run_setup
from .swarm_load import run_load

SECTIONS = ("tunnel", "latency", "relay", "lb", "health", "setup", "failover", "dc", "load")
LAB_SECTIONS = frozenset(SECTIONS) - {"dc", "load"}  # load: a lab of its own (swarm_load.py)
NAT_CLIENT = "mn1"
TUN_MTU_DEFAULT = 1400


@dataclass(frozen=True)
class Plan:
    """How long and how often; --quick is for a look, the full run for the figures."""

    quick: bool
    iperf_seconds: int
    iperf_rounds: int
    pings: int
    ping_interval: float
    setup_runs: int  # per path kind; before each the client's node forgets its paths
    dc_nodes: int
    dc_plans: int
    dc_seconds: float
    profile_seconds: int
    lb_seconds: float  # each HTTP load run
    lb_rounds: int
    lb_concurrency: int
    health_cycles: int
    failover_runs: int  # per event kind (issue 5 asks for 20)
    setup_fresh: str = "forget"  # how a set-up run starts without a path (FRESH_MODES)
    failover_events: tuple[str, ...] = EVENT_GROUPS  # --failover-events

    @classmethod
    def make(
        cls,
        quick: bool,
        setup_runs: int | None = None,
        setup_fresh: str = "forget",
        failover_runs: int | None = None,
        failover_events: tuple[str, ...] = EVENT_GROUPS,
    ) -> Plan:
        if quick:
            plan = cls(True, 3, 1, 200, 0.01, 20, 100_000, 5_000, 3.0, 5, 3.0, 1, 6, 2, 5)
        else:
            # Counts and section times: bench/README.md. iperf3 3 s x 3 interleaved rounds
            # (a sub-ms RTT path is past slow start in milliseconds); 300 pings give a p99
            # from the 3 slowest; 4 s of HTTP load ~1,500 requests per round; the failover
            # events keep issue 5's 20 runs (the gateway runs wait for mn1's fail-back
            # hold-down, 10 s each: about 4 minutes).
            plan = cls(False, 3, 3, 300, 0.01, 100, 100_000, 20_000, 6.0, 10, 4.0, 3, 6, 5, 20)
        if setup_runs is not None:
            plan = dataclasses.replace(plan, setup_runs=setup_runs)
        if failover_runs is not None:
            plan = dataclasses.replace(plan, failover_runs=failover_runs)
        return dataclasses.replace(plan, setup_fresh=setup_fresh, failover_events=failover_events)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="shorter tests, fewer runs")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON result file (default results/bench-<timestamp>.json)",
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, from {','.join(SECTIONS)} (default all)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also sample both tunnel nodes with py-spy under a TCP load (top frames in the "
        "JSON, raw stacks beside it)",
    )
    parser.add_argument(
        "--setup-runs",
        type=int,
        default=None,
        metavar="N",
        help="set-up runs per path kind (default 100, 20 with --quick)",
    )
    parser.add_argument(
        "--failover-runs",
        type=int,
        default=None,
        metavar="N",
        help="runs per failover event (default 20, 5 with --quick)",
    )
    parser.add_argument(
        "--failover-events",
        default=",".join(EVENT_GROUPS),
        metavar="LIST",
        help=f"comma-separated failover events to run, from {','.join(EVENT_GROUPS)} "
        "(gateway: the gateway failure, uplink cut and fail-back; default all)",
    )
    parser.add_argument(
        "--setup-fresh",
        choices=FRESH_MODES,
        default="forget",
        help="how each set-up run starts without a path: `forget` asks the node to drop its "
        "paths (admin request, default), `restart` restarts the node (slow)",
    )
    parser.add_argument(
        "--keep-work",
        action="store_true",
        help="keep the temporary work directory (logs, PKI, compose file) even on success",
    )


def parse_only(text: str) -> list[str]:
    return list(pick("--only", text, SECTIONS, "section"))


def _check_machine(sections: list[str]) -> None:
    if not LAB_SECTIONS & set(sections):
        return
    if os.geteuid() != 0:
        raise ConfigError(
            "the tunnel, latency and setup benchmarks build network namespaces and need "
            "root; run as root, or pass --only dc"
        )
    needed = {"ip": "iproute2", "ping": "iputils-ping"}
    if {"tunnel", "latency"} & set(sections):
        needed |= {"iperf3": "iperf3", "openvpn": "openvpn"}
    if "relay" in sections:
        needed |= {"iperf3": "iperf3"}
    missing = sorted({pkg for tool, pkg in needed.items() if shutil.which(tool) is None})
    if missing:
        raise ConfigError(
            f"missing tools: install them with `apt-get install {' '.join(missing)}` "
            "(`make bench` does this)"
        )


def _progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM/SIGHUP take the same way out as Ctrl-C: through every `finally`.
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    sections = parse_only(args.only)
    _check_machine(sections)
    if args.setup_runs is not None and args.setup_runs < 1:
        raise ConfigError(f"--setup-runs {args.setup_runs}: give at least 1")
    if args.failover_runs is not None and args.failover_runs < 1:
        raise ConfigError(f"--failover-runs {args.failover_runs}: give at least 1")
    events = parse_events(args.failover_events)
    plan = Plan.make(args.quick, args.setup_runs, args.setup_fresh, args.failover_runs, events)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("results") / f"bench-{stamp}.json"
    doc: dict[str, Any] = {
        "schema": "ntm-bench/1",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "options": {**asdict(plan), "sections": sections, "profile": args.profile},
        "machine": procstat.machine_info(),
        "source": procstat.source_info(REPO),
        "errors": [],
    }
    work = Path(tempfile.mkdtemp(prefix="ntmb-"))
    # SIGINT too: a shell may start us with it ignored, and Ctrl-C must still clean up.
    catch = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, _interrupt) for s in catch}
    started = time.monotonic()
    interrupted = False
    try:
        if LAB_SECTIONS & set(sections):
            _lab_sections(doc, work, plan, sections, args.profile, out)
        if "dc" in sections:
            with _timed(doc, "dc"):
                _dc_section(doc, work, plan)
        if "load" in sections:
            with _timed(doc, "load"):
                try:
                    doc["load"] = run_load(work, plan.quick, _progress)
                except (LabFailure, OSError, subprocess.TimeoutExpired) as exc:
                    _error(doc, "load", exc)
    except KeyboardInterrupt:
        interrupted = True
        doc["interrupted"] = True
        _progress("interrupted: cleaning up")
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    doc["duration_s"] = round(time.monotonic() - started, 1)
    doc["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    doc["goals"] = report.goals(doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(report.render(doc))
    print(f"\nJSON: {out}  ({doc['duration_s']} s)")
    broke = interrupted or bool(doc["errors"])
    if broke or args.keep_work:
        print(f"work files (logs, PKI, compose): {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    if interrupted:
        return 130
    return 1 if doc["errors"] else 0


@contextmanager
def _timed(doc: dict[str, Any], section: str) -> Iterator[None]:
    """Wall time and load average (1 min, before and after) of one section, in the JSON."""
    load_before = round(os.getloadavg()[0], 2)
    started = time.monotonic()
    try:
        yield
    finally:
        doc.setdefault("section_times", {})[section] = {
            "wall_s": round(time.monotonic() - started, 1),
            "loadavg_1min": [load_before, round(os.getloadavg()[0], 2)],
        }


def _error(doc: dict[str, Any], section: str, exc: BaseException) -> None:
    doc["errors"].append({"section": section, "error": f"{type(exc).__name__}: {exc}"})
    _progress(f"{section} failed: {exc}")


def _nested_errors(doc: dict[str, Any], section: str, result: Any) -> None:
    """A single failed measurement inside a section (one iperf3 run) counts as an error."""
    if isinstance(result, dict):
        failures = [result["error"]] if isinstance(result.get("error"), str) else []
        failures += [str(e) for e in result.get("failed_rounds", [])]
        failures += [str(e) for e in result.get("failed_cycles", [])]
        for failure in failures:
            doc["errors"].append({"section": section, "error": failure})
            _progress(f"{section} failed: {failure}")
        for key, value in result.items():
            _nested_errors(doc, f"{section}/{key}", value)


def _dc_section(doc: dict[str, Any], work: Path, plan: Plan) -> None:
    _progress(f"dc: {plan.dc_nodes:,} nodes in the Coordinator, then QUIC load")
    try:
        doc["dc"] = run_dc(work, plan.dc_nodes, plan.dc_plans, plan.dc_seconds)
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
        _error(doc, "dc", exc)


def _rss_mb(lab: BenchLab, services: list[str]) -> dict[str, float]:
    return {s: round(procstat.rss_bytes(lab.node_pid(s)) / 1e6, 1) for s in services}


def _lab_sections(
    doc: dict[str, Any], work: Path, plan: Plan, sections: list[str], prof: bool, out: Path
) -> None:
    want_tunnel = bool({"tunnel", "latency"} & set(sections)) or prof
    reach = bool({"relay", "setup"} & set(sections))
    with_lb = bool({"lb", "health"} & set(sections))
    with_failover = "failover" in sections
    try:
        lab = BenchLab(
            work, with_direct=want_tunnel, reach=reach, lb=with_lb, failover=with_failover
        )
    except LabFailure as exc:
        _error(doc, "lab", exc)
        return
    try:
        _lab_sections_in(doc, lab, work, plan, sections, prof, out, want_tunnel)
    finally:
        with _timed(doc, "lab_down"):
            _progress(f"lab {lab.name} down")
            try:
                lab.down()
            except LabFailure as exc:
                _error(doc, "lab down", exc)


def _lab_sections_in(
    doc: dict[str, Any],
    lab: BenchLab,
    work: Path,
    plan: Plan,
    sections: list[str],
    prof: bool,
    out: Path,
    want_tunnel: bool,
) -> None:
    """Every lab section on the one lab (built once, brought down by the caller)."""
    reach = bool({"relay", "setup"} & set(sections))
    with_lb = bool({"lb", "health"} & set(sections))
    with_failover = "failover" in sections
    procs = Processes()
    clients = [NAT_CLIENT, DIRECT_NODE] if want_tunnel else [NAT_CLIENT]
    others = (["cn1"] if reach else []) + ([lb.NTMA] if with_lb or with_failover else [])
    others += [BACKUP, MBB_CLIENT] if with_failover else []
    try:
        _progress(f"lab {lab.name} up (state {lab.state})")
        try:
            with _timed(doc, "lab_up"):
                lab.up()
                for svc in (CN, *clients, *others):
                    lab.wait_registered(svc)
        except LabFailure as exc:
            _error(doc, "lab", exc)
            return
        time.sleep(1.0)  # let start-up allocations settle before reading RSS "at rest"
        doc["node_rss"] = {
            "unit": "MB (10^6 bytes), VmRSS",
            "at_rest": _rss_mb(lab, [CN, *clients]),
        }
        doc["lab"] = {
            "name": lab.name,
            "compose": "a subset of compose.yaml plus the benchmark's own hosts: node mnd on "
            "`internet`, dmzc on dmz, nat-c and access-c for the failover section "
            "(bench/labctl.py)",
            "pairs": {
                "nat": {
                    "client": NAT_CLIENT,
                    "server": CN,
                    "through_nat": True,
                    "note": "mn1 10.10.1.100 behind nat-a (masquerade) -> cn2 198.51.100.30",
                },
                "direct": {
                    "client": DIRECT_NODE,
                    "server": CN,
                    "through_nat": False,
                    "note": f"{DIRECT_NODE} {DIRECT_ADDRESS} and cn2 on one bridge, no router",
                },
            },
        }
        if want_tunnel:
            with _timed(doc, "tunnel+latency" + ("+profile" if prof else "")):
                _tunnel_sections(doc, lab, procs, work, plan, sections, prof, out, clients)
            doc["node_rss"]["after_load"] = _rss_mb(lab, [CN, *clients])
        if "relay" in sections:
            settings = tunnel.Settings(
                plan.iperf_seconds, plan.iperf_rounds, plan.pings, plan.ping_interval, 0
            )
            with _timed(doc, "relay"):
                try:
                    doc["relay"] = run_relay(lab, procs, work, settings, want_tunnel, _progress)
                    _nested_errors(doc, "relay", doc["relay"])
                except (LabFailure, IperfError, OSError, subprocess.TimeoutExpired) as exc:
                    _error(doc, "relay", exc)
        if "lb" in sections:
            with _timed(doc, "lb"):
                try:
                    doc["lb"] = lb.run_lb_load(
                        lab, plan.lb_concurrency, plan.lb_seconds, plan.lb_rounds, _progress
                    )
                    _nested_errors(doc, "lb", doc["lb"])
                    cmd = lb.httpload_argv("URL", plan.lb_concurrency, plan.lb_seconds)
                    doc.setdefault("commands", {})["lb_load"] = (
                        "ip netns exec <client> " + shlex.join(cmd)
                    )
                except (LabFailure, OSError, subprocess.TimeoutExpired) as exc:
                    _error(doc, "lb", exc)
        if "health" in sections:
            _progress(f"health: {plan.health_cycles} x kill/start {lb.DOWN[0]}")
            with _timed(doc, "health"):
                try:
                    doc["health"] = lb.run_health(lab, plan.health_cycles, _progress)
                    _nested_errors(doc, "health", doc["health"])
                except (LabFailure, OSError, subprocess.TimeoutExpired) as exc:
                    _error(doc, "health", exc)
        if "setup" in sections:
            clients_text = ", ".join(dict.fromkeys(k.client for k in KINDS))
            fresh = plan.setup_fresh
            how = "restarting" if fresh == "restart" else "forget-paths on"
            _progress(f"setup: {plan.setup_runs} runs per kind, each {how} {clients_text}")
            with _timed(doc, "setup"):
                try:
                    doc["setup"] = run_setup(
                        lab, plan.setup_runs, min(plan.pings, 200), _progress, fresh=fresh
                    )
                    doc.setdefault("commands", {})["setup_probe"] = shlex.join(
                        probe_argv([k.name for k in KINDS if k.client == NAT_CLIENT])
                    )
                except (LabFailure, OSError, subprocess.TimeoutExpired) as exc:
                    _error(doc, "setup", exc)
        if with_failover:
            _progress(f"failover: 1 kHz UDP probe, {plan.failover_runs} runs per event")
            with _timed(doc, "failover"):
                try:
                    doc["failover"] = run_failover(
                        lab, plan.failover_runs, _progress, plan.failover_events
                    )
                    _nested_errors(doc, "failover", doc["failover"])
                except (LabFailure, OSError, subprocess.TimeoutExpired) as exc:
                    _error(doc, "failover", exc)
    finally:
        procs.close()


def _tunnel_sections(
    doc: dict[str, Any],
    lab: BenchLab,
    procs: Processes,
    work: Path,
    plan: Plan,
    sections: list[str],
    prof: bool,
    out: Path,
    clients: list[str],
) -> None:
    try:
        pki = openvpn.make_pki(work / "ovpn-pki")
        tunnel.start_iperf_server(lab, procs, work)
    except (LabFailure, OSError, ConfigError) as exc:
        _error(doc, "tunnel", exc)
        return
    mtu = lab.mtu(NAT_CLIENT, "ntm0") or TUN_MTU_DEFAULT
    settings = tunnel.Settings(
        plan.iperf_seconds, plan.iperf_rounds, plan.pings, plan.ping_interval, mtu - 28
    )
    doc["mtu"] = {
        "ntm_tun": mtu,
        "openvpn_tun": mtu,
        "plain_veth": lab.mtu(NAT_CLIENT, "access-a"),
        "udp_payload": settings.udp_len,
        "note": "both tunnels carry the same inner MTU; TCP MSS follows it; plain is the veth "
        "path with the kernel's offloads (the limit)",
    }
    iperf_tcp = [
        "iperf3",
        "-c",
        "DEST",
        "-p",
        str(tunnel.IPERF_PORT),
        "-t",
        str(plan.iperf_seconds),
    ]
    commands: dict[str, Any] = doc.setdefault("commands", {})
    commands.update(
        {
            "iperf3_server": f"ip netns exec <lab>-{CN} iperf3 -s -p {tunnel.IPERF_PORT}",
            "iperf3_tcp": "ip netns exec <client> " + shlex.join([*iperf_tcp, "-J"]),
            "iperf3_udp": "ip netns exec <client> "
            + shlex.join([*iperf_tcp, "-J", "-u", "-b", "0", "-l", str(settings.udp_len)]),
            "ping": "ip netns exec <client> "
            + shlex.join(
                [
                    "ping",
                    "-n",
                    "-i",
                    str(plan.ping_interval),
                    "-c",
                    str(plan.pings),
                    "-W",
                    "1",
                    "DEST",
                ]
            ),
            "tunnel_setup": f"ip netns exec <client> ntm lab dnsprobe {tunnel.MARKED_NAME}",
            "openvpn": {},
        }
    )
    cn_pid = lab.node_pid(CN)
    for index, client in enumerate(clients):
        key = "nat" if client == NAT_CLIENT else "direct"
        pair = tunnel.Pair(key, client, key == "nat", doc["lab"]["pairs"][key]["note"])
        link: tunnel.OvpnLink | None = None
        try:
            _progress(f"{key}: OpenVPN {client} <-> {CN}, tunnel via {tunnel.MARKED_NAME}")
            # OpenVPN first: whatever it does to the namespaces is done before our path exists.
            link = tunnel.start_openvpn(lab, procs, work, pki, client, index, mtu)
            vip = tunnel.tunnel_to_cn(lab, client)
            commands["openvpn"][key] = {
                "server": f"ip netns exec <lab>-{CN} " + shlex.join(link.argv["server"]),
                "client": f"ip netns exec <lab>-{client} " + shlex.join(link.argv["client"]),
                "ip_server": link.argv.get("ip_server", []),
                "ip_client": link.argv.get("ip_client", []),
                "cipher": openvpn.negotiated_cipher(link.client_log.read_text(errors="replace")),
            }
            paths: dict[str, Any] = {"before": tunnel.path_summary(lab, client)}
            gso_before = {n: tunnel.gso_counters(lab, n) for n in (client, CN)}
            doc["lab"]["pairs"][key]["ntm_paths"] = paths
            pair.targets = {"plain": CN_ADDRESS, "ntm": vip, "openvpn": link.pair.server_ip}
            pair.tunnel_pids = {
                "plain": [],
                "ntm": [lab.node_pid(client), cn_pid],
                "openvpn": [link.client.pid, link.server.pid],
            }
            if "tunnel" in sections:
                _progress(
                    f"{key}: iperf3 TCP and UDP, {plan.iperf_rounds} x {plan.iperf_seconds} s "
                    "per path"
                )
                doc.setdefault("tunnel", {})[key] = tunnel.throughput(lab, pair, settings)
                _nested_errors(doc, f"tunnel/{key}", doc["tunnel"][key])
            if "latency" in sections:
                _progress(f"{key}: ping x {plan.pings} per path")
                doc.setdefault("latency", {})[key] = tunnel.latency(lab, pair, settings)
                _nested_errors(doc, f"latency/{key}", doc["latency"][key])
            # A path rebuilt mid-test (re-registration, address change) shows up here.
            paths["after"] = tunnel.path_summary(lab, client)
            # The data path measured is the current one: UDP GSO in use on both ends.
            doc["lab"]["pairs"][key]["gso"] = {
                n: tunnel.gso_delta(gso_before[n], tunnel.gso_counters(lab, n))
                for n in (client, CN)
            }
            if prof and key == "nat":
                _progress(f"profile: py-spy on both nodes, {plan.profile_seconds} s of TCP")
                doc["profile"] = _profile(lab, pair, plan.profile_seconds, out)
                _nested_errors(doc, "profile", doc["profile"])
        except (LabFailure, IperfError, OSError, subprocess.TimeoutExpired) as exc:
            _error(doc, f"tunnel/{key}", exc)
        finally:
            if link is not None:
                procs.stop(link.client)
                procs.stop(link.server)


def _profile(lab: BenchLab, pair: tunnel.Pair, seconds: int, out: Path) -> dict[str, Any]:
    """py-spy on both tunnel ends while iperf3 pushes TCP through the tunnel."""
    argv = ["iperf3", "-c", pair.targets["ntm"], "-p", str(tunnel.IPERF_PORT)]
    argv += ["-t", str(seconds + 2), "-J"]
    load = subprocess.Popen(
        in_ns(lab.ns(pair.client), argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    result: dict[str, Any] = {"tool": "py-spy record --nonblocking --format raw --rate 250"}
    try:
        time.sleep(1.0)  # past TCP slow start
        files = {
            name: out.with_name(f"{out.stem}-profile-{name}.txt") for name in (pair.client, CN)
        }
        files[pair.client].parent.mkdir(parents=True, exist_ok=True)
        spies = {
            name: profile.record(lab.node_pid(name), seconds, path) for name, path in files.items()
        }
        for name, spy in spies.items():
            _, err = spy.communicate(timeout=seconds + 60)
            text = files[name].read_text() if files[name].exists() else ""
            result[name] = {"raw": str(files[name]), **profile.top_frames(text)}
            if not text:
                result[name]["error"] = err.decode(errors="replace")[-500:]
        stdout, _ = load.communicate(timeout=seconds + 30)
        result["iperf3_tcp_mbps_while_sampled"] = round(
            parse_iperf3(json.loads(stdout)).mbps_received, 1
        )
    except (OSError, ValueError, IperfError, subprocess.TimeoutExpired) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    return result
