"""`ntm lab`: bring the lab up and down, run commands in it, and the small lab helpers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lab import names
from lab.errors import LabError

VERBS_NEEDING_LAB = (
    "up",
    "down",
    "status",
    "exec",
    "move",
    "kill",
    "start",
    "logs",
    "link",
    "impair",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lab_command", metavar="VERB", required=True)
    lab = argparse.ArgumentParser(add_help=False)
    lab.add_argument(
        "--name",
        default=names.DEFAULT_LAB_NAME,
        help="lab name, prefix of all its namespaces (default %(default)s)",
    )
    lab.add_argument(
        "--state",
        type=Path,
        default=None,
        help="state directory (default .lab/NAME under the current directory)",
    )

    p = sub.add_parser("up", parents=[lab], help="create the namespaces and start the services")
    p.add_argument("--file", "-f", type=Path, default=Path("compose.yaml"), help="compose file")
    p.add_argument(
        "--keep-on-failure",
        action="store_true",
        help="leave a lab that failed to come up in place for inspection",
    )
    sub.add_parser("down", parents=[lab], help="stop everything and remove all namespaces")
    sub.add_parser("status", parents=[lab], help="services, pids and addresses as JSON")
    p = sub.add_parser("exec", parents=[lab], help="run a command in a service's namespace")
    p.add_argument("service")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    p = sub.add_parser("move", parents=[lab], help="move a service to another access network")
    p.add_argument("service")
    p.add_argument("--to", required=True, metavar="NETWORK")
    for verb, text in (
        ("kill", "stop a service (SIGTERM, then SIGKILL)"),
        ("start", "start a stopped service again"),
        ("logs", "print a service's log"),
    ):
        p = sub.add_parser(verb, parents=[lab], help=text)
        p.add_argument("service")
    p.add_argument("--tail", "-n", type=int, default=0, help="only the last N lines")
    p = sub.add_parser(
        "link", parents=[lab], help="pull (down) or plug (up) a service's cable on a network"
    )
    p.add_argument("service")
    p.add_argument("network")
    p.add_argument("updown", choices=("down", "up"), metavar="down|up")
    p = sub.add_parser(
        "impair", parents=[lab], help="random loss on a network (both directions, nftables)"
    )
    p.add_argument("network")
    p.add_argument(
        "--loss",
        type=float,
        metavar="PCT",
        help="drop each frame crossing the network with this probability (0 removes it); "
        "without it, print the loss and the frames seen/dropped as JSON",
    )

    p = sub.add_parser(
        "demo", parents=[lab], help="bring the lab up, run the narrated scenario, tear down"
    )
    p.add_argument("--file", "-f", type=Path, default=Path("compose.yaml"), help="compose file")

    p = sub.add_parser("service-init", help="apply NTM_LAB_ROUTES/_RULES/_MASQUERADE, exec CMD")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p = sub.add_parser("run-all", help="run several commands as one service")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help='-- "CMD1 ..." "CMD2 ..."')
    p = sub.add_parser(
        "httpd", help="HTTP server answering server=NAME client=IP (GET /bytes?n=N: N test bytes)"
    )
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--bind", default="::")
    p = sub.add_parser("udpecho", help="UDP echo answering NAME + the datagram")
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--bind", default="::")
    p = sub.add_parser("render", help="fill a config template from the environment, exec CMD")
    p.add_argument("template")
    p.add_argument("out")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p = sub.add_parser("dnsprobe", help="one DNS query; exit 0 if it answers (as expected)")
    p.add_argument("qname")
    p.add_argument("--type", default="A")
    p.add_argument("--server", default="127.0.0.1")
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--tcp", action="store_true")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--expect", help="succeed only if an answer record has this value")


def _strip_dashes(cmd: list[str]) -> list[str]:
    return cmd[1:] if cmd[:1] == ["--"] else cmd


def run(args: argparse.Namespace) -> int:
    try:
        return _dispatch(args)
    except LabError as exc:
        print(f"ntm lab: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    verb: str = args.lab_command
    if verb in VERBS_NEEDING_LAB:
        names.check_lab_name(args.name)
        state_dir = args.state or Path.cwd() / ".lab" / args.name
        return _lab_verb(verb, args, state_dir.absolute())
    if verb == "demo":
        from lab import demo

        names.check_lab_name(args.name)
        state_dir = (args.state or Path.cwd() / ".lab" / args.name).absolute()
        return demo.run(args.name, str(args.file), state_dir)
    if verb == "service-init":
        from lab import service_init

        return service_init.main(_strip_dashes(args.cmd))
    if verb == "run-all":
        from lab import run_all

        return run_all.run_all(_strip_dashes(args.cmd))
    if verb == "httpd":
        from lab import httpd

        httpd.serve(args.name, args.port, args.bind)
        return 0
    if verb == "udpecho":
        from lab import udpecho

        udpecho.serve(args.name, args.port, args.bind)
        return 0
    if verb == "render":
        from lab import render

        return render.main(args.template, args.out, _strip_dashes(args.cmd))
    if verb == "dnsprobe":
        return _dnsprobe(args)
    raise LabError(f"unknown verb {verb}")


def _lab_verb(verb: str, args: argparse.Namespace, state_dir: Path) -> int:
    from lab import runner

    if verb == "up":
        state = runner.up(args.file, args.name, state_dir, args.keep_on_failure)
        print(f"lab {state.name} is up: {len(state.services)} services, state in {state.state_dir}")
    elif verb == "down":
        removed = runner.down(args.name, state_dir)
        print(
            f"lab {args.name} is down" + (f" (removed {len(removed)} objects)" if removed else "")
        )
    elif verb == "status":
        print(json.dumps(runner.status(args.name, state_dir), indent=2))
    elif verb == "exec":
        argv, env, cwd = runner.exec_argv(
            args.name, state_dir, args.service, _strip_dashes(args.cmd)
        )
        os.chdir(cwd)
        sys.stdout.flush()
        os.execvpe(argv[0], argv, dict(env))  # stdio and exit code pass straight through
    elif verb == "move":
        left = runner.move(args.name, state_dir, args.service, args.to)
        print(f"{args.service} left {', '.join(left) or 'nothing'} and joined {args.to}")
    elif verb == "kill":
        was = runner.kill(args.name, state_dir, args.service)
        print(f"{args.service} stopped" if was else f"{args.service} was not running")
    elif verb == "start":
        pid = runner.start(args.name, state_dir, args.service)
        print(f"{args.service} started (pid {pid})")
    elif verb == "link":
        from lab import faults

        faults.link(args.name, state_dir, args.service, args.network, args.updown == "up")
        print(f"{args.service} {args.network}: link {args.updown}")
    elif verb == "impair":
        from lab import faults

        report = faults.impair(args.name, state_dir, args.network, args.loss)
        if args.loss is None:
            print(json.dumps(report, indent=2))
        else:
            loss = report["loss"]
            print(f"{args.network}: " + (f"{loss:g} % loss each way" if loss else "no loss"))
    elif verb == "logs":
        from lab.state import require_state

        log = require_state(state_dir, args.name).log_path(args.service)
        try:
            lines = log.read_text(errors="replace").splitlines(keepends=True)
        except FileNotFoundError:
            raise LabError(f"no log for {args.service} yet ({log})") from None
        sys.stdout.write("".join(lines[-args.tail :] if args.tail else lines))
    return 0


def _dnsprobe(args: argparse.Namespace) -> int:
    from lab import dnsprobe

    reply = dnsprobe.query(args.qname, args.type, args.server, args.port, args.timeout, args.tcp)
    for line in dnsprobe.answer_lines(reply):
        print(line)
    ok = dnsprobe.verdict(reply, args.expect)
    if not ok:
        from dnslib import RCODE

        print(
            f"dnsprobe: {args.qname} {args.type}: rcode {RCODE[reply.header.rcode]}, "
            f"{len(reply.rr)} answer(s)" + (f", none is {args.expect}" if args.expect else ""),
            file=sys.stderr,
        )
    return 0 if ok else 1
