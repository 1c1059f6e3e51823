"""`ntm loadtest run`: Locust inside MN hosts of a lab, the handover driver from the host,
then the verdict, the JSON summary and the plots.

Locust runs headless INSIDE an MN host's namespace (`ntm lab exec SERVICE -- ...`), so its
sockets bind to that host's vIPs. With `--workers N` a master runs in the first service's
namespace and N workers run round-robin in the given services' namespaces, joined by unix
socket bridges (loadtests/bridge.py) instead of lab networks. The driver runs here, on the
host, and starts counting when Locust reports that the test started.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ntm_io.config import ConfigError

from . import report
from .driver import Driver, Event, event_argv
from .expect import ServiceExpectation, load_expectations, with_persistence
from .model import EventRecord
from .records import read_records, write_events
from .verdict import Check, Thresholds, Verdict, judge

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
START_TIMEOUT = 120.0  # s for Locust (and its workers) to start the test
END_MARGIN = 60.0  # s beyond --duration before the run is declared stuck
STOP_GRACE = 10.0
NTM = [sys.executable, "-m", "ntm_cli.main"]  # this very install, in any namespace


@dataclass
class RunOptions:
    lab: str
    state: Path | None
    services: list[str]
    users: int
    spawn_rate: float
    duration: float
    events: list[Event]
    out: Path
    workers: int = 0
    identities: dict[str, Path] = field(default_factory=dict)  # service ("" = any) -> file
    locust_args: list[str] = field(default_factory=list)  # the --ntm-* options
    expectations: list[ServiceExpectation] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    master_port: int = 5557
    quiet: bool = False


def lab_prefix(o: RunOptions) -> list[str]:
    return [*NTM, "lab"]


def lab_where(o: RunOptions) -> list[str]:
    return ["--name", o.lab] + (["--state", str(o.state)] if o.state else [])


def check_lab(o: RunOptions) -> dict[str, Any]:
    """The lab's status; a ConfigError when it is down or lacks a service we need."""
    done = subprocess.run(
        [*lab_prefix(o), "status", *lab_where(o)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        status: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        status = {}
    if done.returncode != 0 or not status.get("up"):
        raise ConfigError(
            f"lab {o.lab} is not up ({done.stderr.strip() or 'no state'}); bring it up with "
            f"`ntm lab up --name {o.lab}` or name the right one with --lab/--state"
        )
    for svc in o.services:
        info = status.get("services", {}).get(svc)
        if info is None:
            known = ", ".join(sorted(status.get("services", {})))
            raise ConfigError(f"lab {o.lab} has no service {svc!r} (it has: {known})")
        if not info.get("alive"):
            raise ConfigError(f"{svc} is not running in lab {o.lab}; `ntm lab start {svc}` it")
    return status


def _exec(o: RunOptions, service: str, env: dict[str, str], argv: list[str]) -> list[str]:
    pairs = [f"{k}={v}" for k, v in sorted(env.items())]
    return [*lab_prefix(o), "exec", *lab_where(o), service, "--", "env", *pairs, *argv]


def _identities_for(o: RunOptions, service: str) -> dict[str, str]:
    path = o.identities.get(service) or o.identities.get("")
    return {"NTM_LOADTEST_IDENTITIES": str(path.absolute())} if path else {}


def locust_base(o: RunOptions) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--exit-code-on-error",
        "0",
        *o.locust_args,
    ]


def reports_args(o: RunOptions) -> list[str]:
    return [
        "-u",
        str(o.users),
        "-r",
        f"{o.spawn_rate:g}",
        "--ntm-run-time",
        f"{o.duration:g}",
        "-t",  # only a safety net: --ntm-run-time ends the run
        f"{int(o.duration + END_MARGIN / 2)}s",
        "--html",
        str(o.out / "locust.html"),
        "--csv",
        str(o.out / "locust"),
    ]


@dataclass
class Launch:
    name: str
    argv: list[str]
    main: bool = False  # the standalone process or the master: the run ends when it does


def plan(o: RunOptions) -> list[Launch]:
    """Every process to start, in order (bridges, then master or standalone, then workers)."""
    records = str((o.out / "records").absolute())
    progress = str((o.out / "progress.json").absolute())
    if o.workers <= 0:
        svc = o.services[0]
        env = {
            "NTM_LOADTEST_RECORDS": records,
            "NTM_LOADTEST_PROGRESS": progress,
            "NTM_LOADTEST_TAG": svc,
            **_identities_for(o, svc),
        }
        return [Launch(f"locust-{svc}", _exec(o, svc, env, locust_base(o) + reports_args(o)), True)]
    master_svc = o.services[0]
    sock = str((o.out / "locust-master.sock").absolute())
    port = str(o.master_port)
    launches: list[Launch] = []
    placed = [o.services[i % len(o.services)] for i in range(o.workers)]
    bridged = sorted({s for s in placed if s != master_svc})
    if bridged:
        argv = [*NTM, "loadtest", "bridge", "--listen", f"unix:{sock}"]
        argv += ["--connect", f"tcp:127.0.0.1:{port}"]
        launches.append(Launch(f"bridge-{master_svc}", _exec(o, master_svc, {}, argv)))
        for svc in bridged:
            argv = [*NTM, "loadtest", "bridge", "--listen", f"tcp:127.0.0.1:{port}"]
            argv += ["--connect", f"unix:{sock}"]
            launches.append(Launch(f"bridge-{svc}", _exec(o, svc, {}, argv)))
    master = locust_base(o) + reports_args(o)
    master += ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", port]
    master += ["--expect-workers", str(o.workers), "--expect-workers-max-wait", "60"]
    env = {"NTM_LOADTEST_PROGRESS": progress}
    launches.append(Launch("locust-master", _exec(o, master_svc, env, master), True))
    for i, svc in enumerate(placed):
        same_host = [j for j, s in enumerate(placed) if s == svc]
        env = {
            "NTM_LOADTEST_RECORDS": records,
            "NTM_LOADTEST_TAG": f"{svc}-w{i}",
            "NTM_LOADTEST_SLICE": f"{same_host.index(i)}/{len(same_host)}",
            **_identities_for(o, svc),
        }
        worker = [*locust_base(o), "--worker", "--master-host", "127.0.0.1"]
        worker += ["--master-port", port]
        launches.append(Launch(f"worker{i}-{svc}", _exec(o, svc, env, worker)))
    return launches


class Processes:
    """What this run started; every one is stopped by its own process group on the way out."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []

    def start(self, launch: Launch) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{launch.name}.log").open("ab")
        log.write(f"$ {shlex.join(launch.argv)}\n".encode())
        log.flush()
        self._files.append(log)
        proc = subprocess.Popen(
            launch.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.running[launch.name] = proc
        return proc

    def stop(self, name: str, grace: float = STOP_GRACE) -> int | None:
        proc = self.running.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(grace)
        return proc.returncode

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)
        for f in self._files:
            f.close()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)  # the group we created with start_new_session, only ours


def read_progress(path: Path) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc


def progress_line(doc: dict[str, Any], o: RunOptions, events_done: int) -> str:
    elapsed = doc["now"] - doc["started_at"]
    return (
        f"  t={elapsed:5.0f}/{o.duration:g}s users={doc['users']} requests={doc['requests']} "
        f"rps={doc['rps']} failures={doc['failures']} violations={doc.get('violations', 0)} "
        f"max_gap={doc.get('max_gap_s', 0.0):.2f}s events={events_done}/{len(o.events)}"
    )


def _say(o: RunOptions, text: str) -> None:
    if not o.quiet:
        print(text, flush=True)


def execute(o: RunOptions) -> tuple[int | None, float, list[EventRecord]]:
    """Run Locust and the driver; (Locust's exit code, start time, the events as run)."""
    o.out.mkdir(parents=True, exist_ok=True)
    procs = Processes(o.out / "logs")
    progress_path = o.out / "progress.json"
    progress_path.unlink(missing_ok=True)
    driver = Driver(
        o.events,
        o.lab,
        str(o.state) if o.state else None,
        on_event=lambda e: _say(
            o, f"  event {e.label}: exit {e.rc} after {e.ended_at - e.started_at:.1f} s"
        ),
    )
    t0 = 0.0
    rc: int | None = None
    main_name = ""
    try:
        for launch in plan(o):
            procs.start(launch)
            if launch.main:
                main_name = launch.name
        main = procs.running[main_name]
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # until Locust says the test started
            doc = read_progress(progress_path)
            if doc and doc.get("started_at"):
                t0 = float(doc["started_at"])
                break
            if main.poll() is not None or time.monotonic() > deadline:
                raise ConfigError(
                    f"Locust did not start the test (see {o.out / 'logs'}/{main_name}.log)"
                )
            time.sleep(0.2)
        driver.start(t0)
        _say(o, f"loadtest: running {o.duration:g} s, {o.users} users, reports in {o.out}")
        end = time.monotonic() + o.duration + o.users / max(o.spawn_rate, 0.1) + END_MARGIN
        last_print = 0.0
        while main.poll() is None and time.monotonic() < end:
            time.sleep(0.5)
            doc = read_progress(progress_path)
            if doc and time.monotonic() - last_print >= (2.0 if sys.stdout.isatty() else 10.0):
                last_print = time.monotonic()
                _say(o, progress_line(doc, o, len(driver.records)))
        rc = main.poll()
        if rc is None:
            _say(o, "loadtest: Locust did not finish in time; stopping it")
    finally:
        driver.stop()
        driver.join(5.0)
        if main_name:
            stopped = procs.stop(main_name, grace=30.0)
            rc = rc if rc is not None else stopped
        procs.stop_all()
    return rc, t0, _with_missed(driver.records, o.events, o)


def _with_missed(
    done: list[EventRecord], events: Sequence[Event], o: RunOptions
) -> list[EventRecord]:
    """The executed events plus, with no exit code, those the run ended before."""
    out = list(done)
    where = str(o.state) if o.state else None
    for e in events[len(done) :]:
        out.append(EventRecord(e.offset, e.action, list(e.args), event_argv(e, o.lab, where)))
    return out


def evaluate(
    out: Path,
    events: list[EventRecord],
    expectations: Sequence[ServiceExpectation],
    th: Thresholds,
    t0: float,
    extra: Sequence[Check] = (),
    plots: bool = True,
) -> Verdict:
    data = read_records(out / "records")
    ran = [e for e in events if e.rc is not None]
    verdict = judge(data.sessions, events, expectations, th, data.users)
    missed = len(events) - len(ran)
    verdict.checks.extend(extra)
    if data.bad_lines:
        verdict.checks.append(
            Check("records", None, f"{data.bad_lines} unreadable record line(s) skipped")
        )
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    run["missed_events"] = missed
    report.write_summary(out / "summary.json", report.summary(verdict, events, expectations, run))
    if plots:
        report.write_plots(out, verdict, data.timeline, ran, t0 or _first(data))
    return verdict


def _first(data: Any) -> float:
    return float(min((s.start for s in data.sessions), default=0.0))


SWARM_READY_TIMEOUT = 180.0


def swarm_status(o: RunOptions, state: Path, svc: str) -> dict[str, Any] | None:
    """The service's daemon status if it is an `ntm swarm` (role swarm), else None."""
    sock = state / "run" / f"{svc}.sock"
    if not sock.exists():
        return None
    done = subprocess.run(
        [*NTM, "status", "--socket", str(sock)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    try:
        doc: dict[str, Any] = json.loads(done.stdout or "{}")
    except ValueError:
        return None
    return doc if doc.get("role") == "swarm" else None


def swarm_files(o: RunOptions, status: dict[str, Any]) -> None:
    """For a service without --identities that runs `ntm swarm`: wait (bounded) until the
    swarm says it is ready, then use the identities file it names."""
    state = Path(str(status.get("state") or ""))
    for svc in o.services:
        if svc in o.identities or "" in o.identities:
            continue
        deadline = time.monotonic() + SWARM_READY_TIMEOUT
        doc = swarm_status(o, state, svc)
        while doc is not None and not doc.get("ready") and time.monotonic() < deadline:
            time.sleep(1.0)
            doc = swarm_status(o, state, svc)
        if doc is None:
            continue  # a single node: the locustfile finds its vIP itself
        if not doc.get("ready"):
            _say(o, f"loadtest: swarm {svc} is not ready; going on with what it registered")
        if doc.get("identities_file"):
            o.identities[svc] = Path(str(doc["identities_file"]))
            _say(o, f"loadtest: identities of {svc} from {o.identities[svc]}")


def run(o: RunOptions) -> int:
    swarm_files(o, check_lab(o))
    o.out.mkdir(parents=True, exist_ok=True)
    run_doc = {
        "lab": o.lab,
        "services": o.services,
        "users": o.users,
        "spawn_rate": o.spawn_rate,
        "duration": o.duration,
        "workers": o.workers,
        "locust_args": o.locust_args,
        "events": [f"{e.offset:g}:{e.action}:{':'.join(e.args)}" for e in o.events],
        "expectations": [e.to_json() for e in o.expectations],
        "thresholds": o.thresholds.__dict__,
    }
    (o.out / "run.json").write_text(json.dumps(run_doc, indent=2) + "\n")
    rc, t0, events = execute(o)
    write_events(o.out / "events.json", events)
    run_doc["started_at"] = t0
    run_doc["locust_exit"] = rc
    (o.out / "run.json").write_text(json.dumps(run_doc, indent=2) + "\n")
    gen = Check("load generator", rc == 0, f"Locust exited with {rc}")
    verdict = evaluate(o.out, events, o.expectations, o.thresholds, t0, [gen])
    for line in report.verdict_lines(verdict):
        print(line)
    print(f"reports: {o.out}/summary.json, locust.html, locust_*.csv, " + ", ".join(report.PLOTS))
    return verdict.exit_code


def default_out() -> Path:
    return Path("results") / f"loadtest-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def expectations_for(
    lb_config: Path, compose: Path, http_port: int, udp_port: int, persistence: str
) -> list[ServiceExpectation]:
    found = load_expectations(lb_config, compose, http_port or None, udp_port or None)
    return [with_persistence(e, persistence) for e in found]
