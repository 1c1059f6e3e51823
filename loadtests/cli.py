"""`ntm loadtest`: run a Locust load test in the lab with handovers, judge it, plot it.

    ntm loadtest run --lab NAME --service mn1 --users 20 --duration 60 \\
        --event 20:move:mn1:access-b --event 40:move:mn1:access-a
    ntm loadtest verdict results/loadtest-.../      # judge saved records again
    ntm loadtest bridge --listen ... --connect ...  # master/worker link (see README)

Exit status: 0 when every check passed, 1 when one failed, 2 on a usage/config error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ntm_io.config import ConfigError

from . import verdict as vd


def _thresholds(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("verdict")
    g.add_argument(
        "--max-failed-ratio",
        type=float,
        default=None,
        metavar="R",
        help=f"failed / all requests allowed (default {vd.DEFAULT_MAX_FAILED_RATIO})",
    )
    g.add_argument("--max-failed", type=int, default=None, metavar="N", help="failed requests")
    g.add_argument(
        "--alpha",
        type=float,
        default=None,
        help=f"significance of the sh/mh balance test (default {vd.DEFAULT_ALPHA})",
    )
    g.add_argument(
        "--max-interruption",
        type=float,
        default=None,
        metavar="S",
        help="fail when a stream's gap around an event is longer (default: report only)",
    )
    g.add_argument(
        "--event-window",
        type=float,
        default=None,
        metavar="S",
        help=f"s after an event whose gaps count for it (default {vd.DEFAULT_EVENT_WINDOW:g})",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="loadtest_command", metavar="VERB", required=True)

    p = sub.add_parser("run", help="run Locust in the lab with a handover schedule, then judge")
    p.add_argument("--lab", default="ntmlab", help="lab name (default %(default)s)")
    p.add_argument("--state", type=Path, default=None, help="lab state dir (default .lab/NAME)")
    p.add_argument(
        "--service",
        action="append",
        default=None,
        metavar="SERVICE",
        help="MN host to run Locust in (repeat for workers on several hosts; default mn1)",
    )
    p.add_argument("--users", "-u", type=int, default=10)
    p.add_argument("--spawn-rate", "-r", type=float, default=10.0, help="users started per s")
    p.add_argument("--duration", "-t", type=float, default=60.0, help="seconds")
    p.add_argument(
        "--event",
        action="append",
        default=[],
        metavar="OFFSET:ACTION:ARGS",
        help="e.g. 30:move:mn2:access-b, 60:kill:ntma1, 75:start:ntma1, "
        "90:link:ntma2:isp1:down, 95:impair:access-a:5, 99:lab:VERB:ARG...",
    )
    p.add_argument("--out", type=Path, default=None, help="default results/loadtest-<time>/")
    p.add_argument("--workers", type=int, default=0, help="Locust workers (0: one process)")
    p.add_argument("--master-port", type=int, default=5557)
    p.add_argument(
        "--identities",
        action="append",
        default=[],
        metavar="[SERVICE=]FILE",
        help="identities JSON (a swarm's); default: the host's own node from `ntm status`",
    )
    g = p.add_argument_group("traffic")
    g.add_argument("--name", default="www.example.com", help="service name to resolve")
    g.add_argument("--http-port", type=int, default=8080, help="0: no HTTP (default 8080)")
    g.add_argument("--udp-port", type=int, default=9000, help="0: no UDP echo (default 9000)")
    g.add_argument("--interval", type=float, default=1.0, help="s between a stream's requests")
    g.add_argument(
        "--session-requests", type=int, default=0, help="HTTP requests per session (0: all)"
    )
    g.add_argument("--udp-session", type=int, default=0, help="datagrams per UDP session")
    g.add_argument("--timeout", type=float, default=2.0, help="an answer later than this fails")
    g.add_argument("--abandon", type=float, default=30.0, help="s before a session is given up")
    g.add_argument("--dns-timeout", type=float, default=10.0, help="s per DNS try (2 tries)")
    g.add_argument(
        "--persistence",
        choices=("auto", "on", "off"),
        default="auto",
        help="client-level persistence checks (auto: as the LB config says)",
    )
    g.add_argument("--lb-config", type=Path, default=Path("lab/config/lb.toml"))
    g.add_argument("--compose", type=Path, default=Path("compose.yaml"))
    _thresholds(p)
    p.add_argument("--quiet", action="store_true", help="no progress lines")

    p = sub.add_parser("verdict", help="judge the records of an earlier run again")
    p.add_argument("results", type=Path, help="the run's output directory")
    p.add_argument("--no-plots", action="store_true", help="only the verdict and summary.json")
    _thresholds(p)

    from . import demo

    p = sub.add_parser(
        "demo", help="lab up with a swarm, the default handover scenario, verdict, lab down"
    )
    demo.add_arguments(p)

    p = sub.add_parser("bridge", help="pipe a TCP port to a unix socket (master/worker link)")
    p.add_argument("--listen", required=True, help="tcp:HOST:PORT or unix:PATH")
    p.add_argument("--connect", required=True, help="tcp:HOST:PORT or unix:PATH")


def thresholds(args: argparse.Namespace, base: vd.Thresholds | None = None) -> vd.Thresholds:
    b = base or vd.Thresholds()
    th = vd.Thresholds(
        b.max_failed_ratio if args.max_failed_ratio is None else args.max_failed_ratio,
        b.max_failed if args.max_failed is None else args.max_failed,
        b.alpha if args.alpha is None else args.alpha,
        b.max_interruption if args.max_interruption is None else args.max_interruption,
        b.event_window if args.event_window is None else args.event_window,
        getattr(args, "interval", None) or b.request_interval,
    )
    if not 0 <= th.max_failed_ratio <= 1:
        raise ConfigError("--max-failed-ratio is a fraction between 0 and 1 (e.g. 0.01)")
    if not 0 < th.alpha < 1:
        raise ConfigError("--alpha is a significance level between 0 and 1 (e.g. 0.001)")
    if th.event_window <= 0:
        raise ConfigError("--event-window must be > 0 seconds")
    return th


def identities_map(specs: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        svc, sep, path = spec.partition("=")
        key, file = (svc, path) if sep else ("", spec)
        if not Path(file).is_file():
            raise ConfigError(f"--identities {spec}: no such file {file}")
        out[key] = Path(file).absolute()
    return out


def locust_args(args: argparse.Namespace, http_sticky: bool, udp_sticky: bool) -> list[str]:
    out = [
        "--ntm-name",
        args.name,
        "--ntm-http-port",
        str(args.http_port),
        "--ntm-udp-port",
        str(args.udp_port),
        "--ntm-interval",
        f"{args.interval:g}",
        "--ntm-session-requests",
        str(args.session_requests),
        "--ntm-udp-session",
        str(args.udp_session),
        "--ntm-timeout",
        f"{args.timeout:g}",
        "--ntm-abandon",
        f"{args.abandon:g}",
        "--ntm-dns-timeout",
        f"{args.dns_timeout:g}",
    ]
    if http_sticky:
        out.append("--ntm-http-persistence")
    if udp_sticky:
        out.append("--ntm-udp-persistence")
    return out


def _run(args: argparse.Namespace) -> int:
    from .driver import parse_schedule
    from .runner import RunOptions, default_out, expectations_for, run

    if args.users < 1 or args.spawn_rate <= 0 or args.duration <= 0:
        raise ConfigError("--users, --spawn-rate and --duration must be positive")
    if args.http_port == 0 and args.udp_port == 0:
        raise ConfigError("both --http-port and --udp-port are 0: nothing to send")
    if args.interval <= 0 or args.timeout <= 0 or args.abandon < args.timeout:
        raise ConfigError("--interval and --timeout must be > 0 and --abandon >= --timeout")
    if args.workers < 0:
        raise ConfigError("--workers must be >= 0")
    events = parse_schedule(args.event, args.duration)
    exps = expectations_for(
        args.lb_config, args.compose, args.http_port, args.udp_port, args.persistence
    )
    sticky = {e.kind: e.client_sticky for e in exps}
    o = RunOptions(
        lab=args.lab,
        state=args.state.absolute() if args.state else None,
        services=args.service or ["mn1"],
        users=args.users,
        spawn_rate=args.spawn_rate,
        duration=args.duration,
        events=events,
        out=(args.out or default_out()).absolute(),
        workers=args.workers,
        identities=identities_map(args.identities),
        locust_args=locust_args(args, sticky.get("http", False), sticky.get("udp", False)),
        expectations=exps,
        thresholds=thresholds(args),
        master_port=args.master_port,
        quiet=args.quiet,
    )
    return run(o)


def _verdict(args: argparse.Namespace) -> int:
    from .expect import ServiceExpectation
    from .records import read_events
    from .report import verdict_lines
    from .runner import evaluate

    out: Path = args.results
    try:
        run_doc = json.loads((out / "run.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{out} is not a load run's output directory ({exc})") from exc
    exps = [ServiceExpectation.from_json(d) for d in run_doc.get("expectations", [])]
    th = thresholds(args, vd.Thresholds(**run_doc.get("thresholds", {})))
    extra = []
    if "locust_exit" in run_doc:
        rc = run_doc["locust_exit"]
        extra.append(vd.Check("load generator", rc == 0, f"Locust exited with {rc}"))
    events = read_events(out / "events.json")
    v = evaluate(
        out, events, exps, th, run_doc.get("started_at", 0.0), extra, plots=not args.no_plots
    )
    for line in verdict_lines(v):
        print(line)
    return v.exit_code


def run(args: argparse.Namespace) -> int:
    verb = args.loadtest_command
    if verb == "run":
        return _run(args)
    if verb == "verdict":
        return _verdict(args)
    if verb == "demo":
        from . import demo

        return demo.run(args)
    if verb == "bridge":
        from .bridge import parse_endpoint
        from .bridge import run as bridge_run

        parse_endpoint(args.listen), parse_endpoint(args.connect)  # errors before serving
        return bridge_run(args.listen, args.connect)
    raise ConfigError(f"unknown verb {verb}")
