"""Locust users that are NTMobile identities using the load-balanced service.

Run it with `ntm loadtest run` (which starts Locust inside an MN host's namespace), or by hand:

    ntm lab exec mn1 -- env NTM_LOADTEST_RECORDS=/tmp/rec \\
        python -m locust -f loadtests/locustfile.py --headless -u 5 -r 5 -t 30s

Each user binds to one identity (its vIP), resolves the service name by a DNS query sent from
that vIP to the node's resolver, then runs sessions: HTTP/1.1 keep-alive GET /whoami (one
connection per session) and, in a second greenlet, UDP echo exchanges (one socket per
session). Every answer names its backend. Besides the request events, Locust shows:

    VIOLATION  session backend change   a session answered by a second backend
    VIOLATION  client backend change    (with --ntm-*-persistence) a client moved backend
    VIOLATION  wrong client address     the server saw another address than the vIP
    GAP        http | udp               a stream's gap between two answers around failures

Per process, from the environment (not shared with workers by the master):
    NTM_LOADTEST_IDENTITIES  identities JSON file (default: this host's node, `ntm status`)
    NTM_LOADTEST_SLICE       K/N: take every N-th identity from K (workers on one host)
    NTM_LOADTEST_RECORDS     directory for this process's records (JSON lines)
    NTM_LOADTEST_TAG         name of this process in the records (default host-pid)
    NTM_LOADTEST_PROGRESS    progress file (master or standalone only)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path
from typing import IO, Any

import gevent
import gevent.lock
from locust import User, constant, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from loadtests.identities import (
    Identity,
    discover_node_identity,
    load_identities,
    system_resolver,
    take_slice,
)
from loadtests.model import (
    AnswerOutcome,
    ClientMemory,
    SessionRecord,
    Stream,
    Timeline,
    UserRecord,
)
from loadtests.probes import HttpSession, ProbeError, SessionBroken, UdpSession, resolve

PROGRESS_EVERY = 1.0


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ntm-name", default="www.example.com", help="service name to resolve")
    parser.add_argument("--ntm-path", default="/whoami", help="HTTP path")
    parser.add_argument("--ntm-http-port", type=int, default=8080, help="0: no HTTP")
    parser.add_argument("--ntm-udp-port", type=int, default=9000, help="0: no UDP echo")
    parser.add_argument("--ntm-interval", type=float, default=1.0, help="s between requests")
    parser.add_argument(
        "--ntm-session-requests", type=int, default=0, help="requests per HTTP session (0: all)"
    )
    parser.add_argument(
        "--ntm-udp-session", type=int, default=0, help="datagrams per UDP session (0: all)"
    )
    parser.add_argument("--ntm-timeout", type=float, default=2.0, help="later = failed")
    parser.add_argument(
        "--ntm-dns-timeout", type=float, default=10.0, help="s per DNS try (2 tries)"
    )
    parser.add_argument("--ntm-abandon", type=float, default=30.0, help="give a session up")
    parser.add_argument(
        "--ntm-run-time",
        type=float,
        default=0.0,
        help="s from the test's start to quit (by the wall clock; 0: Locust's -t alone)",
    )
    parser.add_argument("--ntm-http-persistence", action="store_true", help="client-level check")
    parser.add_argument("--ntm-udp-persistence", action="store_true", help="client-level check")


class _Process:
    """What the users of this process share: identities, records file, live counters."""

    def __init__(self) -> None:
        self.identities: list[Identity] = []
        self.resolver: tuple[str, int] | None = None
        self.users = 0
        self.tag = os.environ.get("NTM_LOADTEST_TAG") or f"{socket.gethostname()}-{os.getpid()}"
        self.memory = ClientMemory()
        self.timeline = Timeline()
        self._out: IO[str] | None = None
        self._timeline_written = False

    def load(self) -> None:
        path = os.environ.get("NTM_LOADTEST_IDENTITIES")
        found = load_identities(Path(path)) if path else discover_node_identity()
        self.identities = take_slice(found, os.environ.get("NTM_LOADTEST_SLICE"))

    def next_user(self) -> tuple[Identity, str]:
        if not self.identities:
            self.load()
        ident = self.identities[self.users % len(self.identities)]
        self.users += 1
        return ident, f"{self.tag}-{self.users}"

    def resolver_for(self, ident: Identity) -> tuple[str, int]:
        if ident.resolver:
            return ident.resolver
        if self.resolver is None:
            self.resolver = system_resolver()
        return self.resolver

    def write(self, doc: dict[str, Any]) -> None:
        folder = os.environ.get("NTM_LOADTEST_RECORDS")
        if not folder:
            return
        if self._out is None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self._out = open(Path(folder) / f"records-{self.tag}.jsonl", "a")  # noqa: SIM115
            meta = {"type": "meta", "tag": self.tag, "pid": os.getpid(), "started": time.time()}
            meta["identities"] = len(self.identities)
            self._out.write(json.dumps(meta) + "\n")
        self._out.write(json.dumps(doc) + "\n")
        self._out.flush()  # a crash keeps what was recorded

    def session_done(self, rec: SessionRecord) -> None:
        self.write(rec.to_json())

    def finish(self) -> None:
        if not self._timeline_written:
            self._timeline_written = True
            self.write(self.timeline.to_json())


PROC = _Process()


def _fire(
    env: Environment,
    rtype: str,
    name: str,
    ms: float,
    exc: Exception | None = None,
    length: int = 0,
) -> None:
    hook: Any = env.events.request
    hook.fire(
        request_type=rtype,
        name=name,
        response_time=ms,
        response_length=length,
        exception=exc,
        context={},
    )


class MobileUser(User):
    """One identity: resolves the service through its node, then HTTP and UDP sessions."""

    wait_time = constant(0)  # sessions pace themselves (--ntm-interval)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.opt = o
        self.ident, self.uid = PROC.next_user()
        self.target: str | None = None
        self.http = (
            Stream(self.uid, self.ident.fqdn, self.ident.vip, "http", o.ntm_http_port)
            if o.ntm_http_port
            else None
        )
        self.udp = (
            Stream(self.uid, self.ident.fqdn, self.ident.vip, "udp", o.ntm_udp_port)
            if o.ntm_udp_port
            else None
        )
        self.record = UserRecord(self.uid, self.ident.fqdn, self.ident.vip)
        self._resolving = gevent.lock.Semaphore()  # the HTTP and UDP greenlets share a lookup
        self._udp_loop: gevent.Greenlet[Any, Any] | None = None
        if self.http is not None and self.udp is not None:
            self._udp_loop = gevent.spawn(self._udp_forever)

    def on_stop(self) -> None:
        if self._udp_loop is not None:
            self._udp_loop.kill(block=True)
        self.record.sessions = sum(len(s.records) for s in (self.http, self.udp) if s)
        PROC.write(self.record.to_json())

    @task
    def sessions(self) -> None:
        if self.http is not None:
            self._http_session(self.http)
        elif self.udp is not None:
            self._udp_session(self.udp)

    # -- name resolution ------------------------------------------------------------------

    def _resolve(self) -> str | None:
        with self._resolving:
            if self.target is not None:
                return self.target
            t0 = time.monotonic()
            name = self.opt.ntm_name
            try:
                self.target = resolve(
                    name, self.ident.vip, PROC.resolver_for(self.ident), self.opt.ntm_dns_timeout
                )
            except ProbeError as exc:
                self.record.dns_failed += 1
                _fire(self.environment, "DNS", f"{name} A", _ms(t0), exc)
                gevent.sleep(self.opt.ntm_interval)
                return None
            self.record.dns_ok += 1
            _fire(self.environment, "DNS", f"{name} A", _ms(t0))
            return self.target

    # -- reporting --------------------------------------------------------------------------

    def _answered(self, stream: Stream, server: str, client: str | None, ms: float) -> None:
        now = time.time()
        out: AnswerOutcome = stream.answer(now, server, client)
        PROC.timeline.answer(stream.kind, now, server)
        env = self.environment
        if out.session_violation is not None:
            why = ProbeError(f"{self.ident.vip}: {out.session_violation} -> {server}")
            _fire(env, "VIOLATION", "session backend change", 0, why)
        sticky = self.opt.ntm_http_persistence if stream.kind == "http" else None
        if stream.kind == "udp":
            sticky = self.opt.ntm_udp_persistence
        if sticky:
            before = PROC.memory.check(stream.vip, stream.kind, stream.port, server)
            if before is not None:
                why = ProbeError(f"{self.ident.vip}: {before} -> {server}")
                _fire(env, "VIOLATION", "client backend change", 0, why)
        if out.wrong_address:
            why = ProbeError(f"server saw {client}, not {self.ident.vip}")
            _fire(env, "VIOLATION", "wrong client address", 0, why)
        if out.gap is not None:
            _fire(env, "GAP", stream.kind, out.gap.length * 1000.0)

    def _failed(self, stream: Stream, name: str, ms: float, exc: Exception) -> None:
        now = time.time()
        stream.failure(now)
        PROC.timeline.failure(stream.kind, now)
        _fire(self.environment, stream.kind.upper(), name, ms, exc)

    # -- HTTP ---------------------------------------------------------------------------------

    def _http_session(self, stream: Stream) -> None:
        o = self.opt
        target = self._resolve()
        if target is None:
            return
        stream.open_session(time.time(), target)
        sess = HttpSession(
            target, stream.port, stream.vip, o.ntm_name, o.ntm_timeout, o.ntm_abandon
        )
        reason, n = "done", 0
        try:
            while o.ntm_session_requests == 0 or n < o.ntm_session_requests:
                n += 1
                t0 = time.monotonic()
                stalled: list[bool] = []

                def stall(t0: float = t0, stalled: list[bool] = stalled) -> None:
                    stalled.append(True)
                    err = ProbeError(f"no answer within {o.ntm_timeout:g} s")
                    self._failed(stream, o.ntm_path, _ms(t0), err)

                try:
                    ans = sess.request(o.ntm_path, stall)
                except SessionBroken as exc:
                    if not stalled:
                        self._failed(stream, o.ntm_path, _ms(t0), exc)
                    reason = f"broken: {exc}"
                    self.target = None  # an application would look the name up again
                    break
                except ProbeError as exc:
                    self._failed(stream, o.ntm_path, _ms(t0), exc)
                else:
                    ms = _ms(t0)
                    if not ans.late:
                        _fire(self.environment, "HTTP", o.ntm_path, ms)
                    self._answered(stream, ans.server, ans.client, ms)
                    if sess.closing:
                        break
                gevent.sleep(max(0.0, o.ntm_interval - (time.monotonic() - t0)))
        except BaseException:
            reason = "stopped"  # the user is being stopped (GreenletExit) at the run's end
            raise
        finally:
            sess.close()
            PROC.session_done(stream.close_session(time.time(), reason))

    # -- UDP ----------------------------------------------------------------------------------

    def _udp_forever(self) -> None:
        assert self.udp is not None
        while True:
            self._udp_session(self.udp)

    def _udp_session(self, stream: Stream) -> None:
        o = self.opt
        target = self._resolve()
        if target is None:
            return
        rec = stream.open_session(time.time(), target)
        try:
            sess = UdpSession(target, stream.port, stream.vip)
        except OSError as exc:
            self._failed(stream, "echo", 0, exc)
            PROC.session_done(stream.close_session(time.time(), f"broken: {exc}"))
            gevent.sleep(o.ntm_interval)
            return
        reason, seq = "done", 0
        last_ok = time.monotonic()
        try:
            while o.ntm_udp_session == 0 or seq < o.ntm_udp_session:
                seq += 1
                t0 = time.monotonic()
                payload = f"{self.uid} {rec.sid} {seq}".encode()
                try:
                    server = sess.exchange(payload, o.ntm_timeout)
                except ProbeError as exc:
                    self._failed(stream, "echo", _ms(t0), exc)
                    if time.monotonic() - last_ok > o.ntm_abandon:
                        reason = f"broken: no echo for {o.ntm_abandon:g} s"
                        self.target = None
                        break
                else:
                    last_ok = time.monotonic()
                    ms = _ms(t0)
                    _fire(self.environment, "UDP", "echo", ms, length=len(payload))
                    self._answered(stream, server, None, ms)
                gevent.sleep(max(0.0, o.ntm_interval - (time.monotonic() - t0)))
        except BaseException:
            reason = "stopped"
            raise
        finally:
            sess.close()
            PROC.session_done(stream.close_session(time.time(), reason))


def _ms(t0: float) -> float:
    return (time.monotonic() - t0) * 1000.0


# -- process-wide hooks --------------------------------------------------------------------


def _progress_doc(env: Environment, started: float, state: str) -> dict[str, Any]:
    total = env.stats.total
    doc: dict[str, Any] = {
        "started_at": started,
        "now": time.time(),
        "state": state,
        "users": env.runner.user_count if env.runner else 0,
        "requests": total.num_requests,
        "failures": total.num_failures,
        "rps": round(total.current_rps, 1),
    }
    for entry in env.stats.entries.values():
        if entry.method == "VIOLATION":
            doc[entry.name] = entry.num_failures
    doc["violations"] = sum(
        e.num_failures for e in env.stats.entries.values() if e.method == "VIOLATION"
    )
    doc["max_gap_s"] = max(
        (e.max_response_time / 1000.0 for e in env.stats.entries.values() if e.method == "GAP"),
        default=0.0,
    )
    return doc


def _write_progress(path: str, doc: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)  # the runner never reads half a file


class _Progress:
    """The progress file the runner prints from (master or standalone process only)."""

    path = os.environ.get("NTM_LOADTEST_PROGRESS")
    started = 0.0
    loop: gevent.Greenlet[Any, Any] | None = None


def _on_test_start(environment: Environment, **_: Any) -> None:
    PROC._timeline_written = False
    if isinstance(environment.runner, WorkerRunner):
        return
    _Progress.started = time.time()
    run_time = environment.parsed_options.ntm_run_time if environment.parsed_options else 0
    if run_time > 0:
        gevent.spawn(_quit_at, environment, _Progress.started + run_time)
    path = _Progress.path
    if not path:
        return

    def loop() -> None:
        while True:
            _write_progress(path, _progress_doc(environment, _Progress.started, "running"))
            gevent.sleep(PROGRESS_EVERY)

    _Progress.loop = gevent.spawn(loop)


def _quit_at(environment: Environment, deadline: float) -> None:
    """Quit at a wall-clock time. Locust's -t timer starts from gevent's cached loop time,
    which lags by the seconds spent importing, so runs came out that much short."""
    while time.time() < deadline:
        gevent.sleep(min(0.5, max(0.01, deadline - time.time())))
    if environment.runner is not None:
        environment.runner.quit()


def _on_test_stop(environment: Environment, **_: Any) -> None:
    if not isinstance(environment.runner, MasterRunner):
        PROC.finish()
    if _Progress.loop is not None and _Progress.path:
        _Progress.loop.kill(block=False)
        _Progress.loop = None
        _write_progress(_Progress.path, _progress_doc(environment, _Progress.started, "stopped"))


# Registered by calls, not decorators: Locust's hooks are untyped.
_hooks: Any = events
_hooks.init_command_line_parser.add_listener(_options)
_hooks.test_start.add_listener(_on_test_start)
_hooks.test_stop.add_listener(_on_test_stop)
