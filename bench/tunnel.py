"""Tunnel throughput, round trips and CPU per gigabit: plain vs our tunnel vs OpenVPN.

For each pair of namespaces (MN behind nat-a <-> CN, and a node beside the CN <-> CN) the
three paths are measured back to back in one run, same direction, same duration, the
same iperf3 options, so only the path differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import openvpn, procstat
from .iperf import IperfError, parse_iperf3
from .labctl import CN, CN_ADDRESS, REPO, BenchLab, LabFailure
from .nsproc import Processes, listening, run_in, wait_for
from .stats import parse_ping, summary

PATHS = ("plain", "ntm", "openvpn")
IPERF_PORT = 5201
MARKED_NAME = "global.example.com"  # CNAME to cn2.ntm.example.com: a marked name
PLAIN_NAME = "plain.example.com"
OVPN_READY = 20.0  # seconds for OpenVPN's TLS handshake and interface set-up


@dataclass(frozen=True)
class Settings:
    seconds: int  # each iperf3 test
    rounds: int  # each path measured this often, interleaved; the median run is reported
    pings: int  # each latency test
    ping_interval: float
    udp_len: int  # datagram payload: fits the TUN MTU without fragmenting


@dataclass
class Pair:
    key: str  # "nat" or "direct"
    client: str  # lab service sending the traffic (iperf3 client, ping)
    through_nat: bool
    note: str
    targets: dict[str, str] = field(default_factory=dict)  # path -> destination address
    tunnel_pids: dict[str, list[int]] = field(default_factory=dict)  # whose CPU is counted


def probe_env() -> dict[str, str]:
    """The environment for our helper modules inside namespaces (importable from the repo)."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


def tunnel_to(lab: BenchLab, client: str, name: str, peer: str) -> str:
    """Resolve a marked name through the client's stub: the tunnel to `peer` exists after."""
    argv = [sys.executable, "-m", "ntm_cli.main", "lab", "dnsprobe", name]
    done = run_in(lab.ns(client), argv, timeout=30, env=probe_env())
    vip = lab.status(peer)["vip"]
    if done.returncode != 0 or f" A {vip}" not in done.stdout:
        raise LabFailure(
            f"{client} did not get {peer}'s vIP {vip} for {name}: "
            f"{(done.stdout + done.stderr).strip()}"
        )
    return str(vip)


def tunnel_to_cn(lab: BenchLab, client: str) -> str:
    return tunnel_to(lab, client, MARKED_NAME, CN)


GSO_KEYS = ("tx_gso_sends", "tx_gso_datagrams", "tx_gso_disabled")


def gso_counters(lab: BenchLab, node: str) -> dict[str, int]:
    """The node engine's UDP GSO counters (ntm_io.udp_batch), from its status."""
    engine = (lab.status(node).get("counters") or {}).get("engine") or {}
    return {k: int(engine.get(k, 0)) for k in GSO_KEYS}


def gso_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """GSO use over the tests: sends, datagrams they carried, per send; disabled ever."""
    out: dict[str, Any] = {k: after.get(k, 0) - before.get(k, 0) for k in GSO_KEYS}
    sends = out["tx_gso_sends"]
    out["datagrams_per_send"] = round(out["tx_gso_datagrams"] / sends, 1) if sends else None
    out["disabled_ever"] = after.get("tx_gso_disabled", 0) > 0
    return out


def path_summary(lab: BenchLab, client: str) -> list[dict[str, Any]]:
    """The client node's paths as its status shows them: which outer address carries them."""
    keys = ("path_id", "peer_fqdn", "kind", "role", "state", "peer_address")
    return [{k: p.get(k) for k in keys} for p in lab.status(client).get("paths", [])]


def start_iperf_server(
    lab: BenchLab, procs: Processes, work: Path, service: str = CN
) -> subprocess.Popen[bytes]:
    argv = ["iperf3", "-s", "-p", str(IPERF_PORT)]
    proc = procs.spawn(lab.ns(service), argv, work / "logs" / f"iperf3-server-{service}.log")
    if not wait_for(lambda: listening(proc.pid, IPERF_PORT), 10.0):
        raise LabFailure(f"iperf3 server in {lab.ns(service)} is not listening on {IPERF_PORT}")
    return proc


@dataclass
class OvpnLink:
    pair: openvpn.OvpnPair
    server: subprocess.Popen[bytes]
    client: subprocess.Popen[bytes]
    server_log: Path
    client_log: Path
    argv: dict[str, list[str]]  # openvpn command lines, and the `ip` commands run after


def start_openvpn(
    lab: BenchLab, procs: Processes, work: Path, pki: Path, client: str, index: int, mtu: int
) -> OvpnLink:
    pair = openvpn.OvpnPair.numbered(index, CN_ADDRESS)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    slog, clog = logs / f"openvpn-server-{index}.log", logs / f"openvpn-client-{index}.log"
    s_argv = openvpn.server_argv(pki, pair, mtu, slog)
    c_argv = openvpn.client_argv(pki, pair, mtu, clog)
    server = procs.spawn(lab.ns(CN), s_argv, logs / f"openvpn-server-{index}.out")
    cli = procs.spawn(lab.ns(client), c_argv, logs / f"openvpn-client-{index}.out")
    link = OvpnLink(pair, server, cli, slog, clog, {"server": s_argv, "client": c_argv})

    def ready() -> bool:
        texts = [p.read_text(errors="replace") if p.exists() else "" for p in (slog, clog)]
        return all(openvpn.data_channel_ready(t) for t in texts)

    if not wait_for(ready, OVPN_READY, poll=0.1):
        tail = clog.read_text(errors="replace")[-1500:] if clog.exists() else "(no log)"
        raise LabFailure(f"OpenVPN did not come up within {OVPN_READY:g} s; client log:\n{tail}")
    for service, is_server in ((CN, True), (client, False)):
        for argv in openvpn.interface_argvs(pair, mtu, is_server):
            done = run_in(lab.ns(service), argv, timeout=10)
            if done.returncode != 0:
                raise LabFailure(f"{' '.join(argv)} in {service}: {done.stderr.strip()}")
            link.argv.setdefault("ip_server" if is_server else "ip_client", []).append(
                " ".join(argv)
            )
    return link


def iperf_once(lab: BenchLab, pair: Pair, path: str, udp: bool, s: Settings) -> dict[str, Any]:
    argv = ["iperf3", "-c", pair.targets[path], "-p", str(IPERF_PORT), "-t", str(s.seconds), "-J"]
    if udp:
        argv += ["-u", "-b", "0", "-l", str(s.udp_len)]  # unlimited offer: what gets through
    pids = pair.tunnel_pids[path]
    for attempt in range(3):
        cpu0, m0 = procstat.cpu_seconds_of(pids), procstat.MachineSample.now()
        done = run_in(lab.ns(pair.client), argv, timeout=s.seconds + 30)
        cpu1, m1 = procstat.cpu_seconds_of(pids), procstat.MachineSample.now()
        try:
            doc = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise IperfError(f"iperf3 wrote no JSON: {done.stderr.strip()[-500:]}") from None
        # The server may still be closing the previous test: it says "busy"; try again.
        if "busy" in str(doc.get("error", "")) and attempt < 2:
            time.sleep(1.0)
            continue
        break
    result = parse_iperf3(doc)
    out = result.as_dict()
    cpu = cpu1 - cpu0
    out["tunnel_cpu_s"] = round(cpu, 3) if pids else None
    gbit = result.gigabits_received
    out["cpu_s_per_gbit"] = round(cpu / gbit, 3) if pids and gbit > 0 else None
    out["machine_busy_percent"] = round(m1.busy_percent_since(m0), 1)
    return out


def ping_once(lab: BenchLab, pair: Pair, path: str, s: Settings) -> dict[str, Any]:
    argv = ["ping", "-n", "-i", str(s.ping_interval), "-c", str(s.pings), "-W", "1"]
    argv.append(pair.targets[path])
    done = run_in(lab.ns(pair.client), argv, timeout=s.pings * s.ping_interval + 30)
    result = parse_ping(done.stdout)
    out: dict[str, Any] = summary(result.rtts_ms)
    out["loss_percent"] = round(result.loss_percent, 2)
    if not result.rtts_ms:
        out["error"] = f"no ping replies from {pair.targets[path]}: {done.stderr.strip()[-300:]}"
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput (a real run, so its CPU and loss belong to it)."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["mbps_received"])
    if not ok:
        return dict(runs[0]) if runs else {"error": "not run"}
    chosen = dict(ok[(len(ok) - 1) // 2])
    chosen["rounds_mbps_received"] = [r.get("mbps_received") for r in runs]
    failed = [r["error"] for r in runs if "error" in r]
    if failed:
        chosen["failed_rounds"] = failed
    return chosen


def throughput(lab: BenchLab, pair: Pair, s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for proto in ("tcp", "udp"):
        runs: dict[str, list[dict[str, Any]]] = {path: [] for path in PATHS}
        # Interleaved rounds: a burst of load from elsewhere hits every path alike.
        for _ in range(s.rounds):
            for path in PATHS:
                try:
                    runs[path].append(iperf_once(lab, pair, path, proto == "udp", s))
                except (IperfError, subprocess.TimeoutExpired, OSError) as exc:
                    runs[path].append({"error": str(exc)})
        rows: dict[str, Any] = {path: median_run(runs[path]) for path in PATHS}
        ntm = rows["ntm"].get("mbps_received")
        rows["ratios"] = {
            "ntm/openvpn": ratio(ntm, rows["openvpn"].get("mbps_received")),
            "ntm/plain": ratio(ntm, rows["plain"].get("mbps_received")),
        }
        out[proto] = rows
    tcp = out["tcp"]
    out["cpu_s_per_gbit"] = {
        "ntm": tcp["ntm"].get("cpu_s_per_gbit"),
        "openvpn": tcp["openvpn"].get("cpu_s_per_gbit"),
        "ratio_ntm/openvpn": ratio(
            tcp["ntm"].get("cpu_s_per_gbit"), tcp["openvpn"].get("cpu_s_per_gbit")
        ),
    }
    return out


def latency(lab: BenchLab, pair: Pair, s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in PATHS:
        try:
            out[path] = ping_once(lab, pair, path, s)
        except (subprocess.TimeoutExpired, OSError) as exc:
            out[path] = {"error": str(exc)}
    out["ratios_p50"] = {
        "ntm/openvpn": ratio(out["ntm"].get("p50"), out["openvpn"].get("p50")),
        "ntm/plain": ratio(out["ntm"].get("p50"), out["plain"].get("p50")),
    }
    return out
