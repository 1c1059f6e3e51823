"""`ntm lab run-all -- "CMD1 ..." "CMD2 ..."`: several processes as one compose service.

Compose runs one command per service, but cn2 needs an NTM node and an HTTP server. This
starts each command, forwards SIGTERM/SIGINT/SIGHUP to all of them, and exits as soon as any
one exits (stopping the rest), so a dead half never hides behind a live one. The exit code is
non-zero when any command failed on its own.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from lab.errors import LabError

GRACE = 5.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def exit_status(code: int) -> int:
    """A shell-style status: 128+N for a child killed by signal N."""
    return 128 - code if code < 0 else code


def run_all(commands: Sequence[str]) -> int:
    if not commands:
        raise LabError('give the commands to run, e.g. run-all -- "cmd one" "cmd two"')
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    for command in commands:
        try:
            children.append(subprocess.Popen(shlex.split(command)))
        except OSError as exc:
            print(f"run-all: cannot start {command!r}: {exc}", file=sys.stderr)
            _stop(children)
            return 127

    failed = 0
    pid, status = os.wait()  # blocks until the first child exits (signals are forwarded meanwhile)
    first = next(c for c in children if c.pid == pid)
    first.returncode = os.waitstatus_to_exitcode(status)
    print(f"run-all: {first.args!r} exited with {first.returncode}", file=sys.stderr, flush=True)
    if first.returncode != 0 and not stopping:
        failed = exit_status(first.returncode)
    for child in children:
        if child.poll() is not None and child.returncode != 0 and not stopping and not failed:
            failed = exit_status(child.returncode)  # died on its own at the same moment
    _stop(children)
    return failed


def _stop(children: Sequence[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + GRACE
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
