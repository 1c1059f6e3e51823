"""Processes the benchmark starts inside namespaces, and their sure end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def run_in(
    ns: str, argv: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        in_ns(ns, argv), capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


class Processes:
    """Long-running helpers (iperf3 servers, OpenVPN); `close` stops every one left."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, ns: str, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            # Own session: a Ctrl-C reaches us, and we stop these in order in `close`.
            proc = subprocess.Popen(
                in_ns(ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        for proc in list(reversed(self._procs)):
            self.stop(proc)


def wait_for(condition: Callable[[], bool], bound: float, poll: float = 0.05) -> bool:
    """Poll `condition` until it is true or `bound` seconds passed."""
    deadline = time.monotonic() + bound
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def listening(pid: int, port: int, udp: bool = False) -> bool:
    """Whether the namespace of `pid` has a socket listening on `port` (via /proc/PID/net)."""
    hex_port = f":{port:04X}"
    want_state = "07" if udp else "0A"  # UDP "close" (bound) / TCP LISTEN
    for table in ("udp", "udp6") if udp else ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[1].endswith(hex_port) and fields[3] == want_state:
                return True
    return False
