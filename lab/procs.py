"""Service processes: start in a namespace, check, stop, and wait for health.

Each service runs as `ip netns exec <ns> CMD` in its own session (so `kill` reaches the whole
process group, e.g. both children of `ntm lab run-all`) with stdout+stderr in its log file.
Waiting is always polling a condition with a bound, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from lab.compose import Healthcheck
from lab.errors import LabError

POLL = 0.1  # seconds between checks of a condition
STOP_GRACE = 5.0  # SIGTERM, then SIGKILL after this long
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def service_env(state_dir: str, lab: str, service: str, extra: Mapping[str, str]) -> dict[str, str]:
    """A clean environment, like a container's: no proxy or other host settings leak in."""
    venv_bin = str(Path(sys.prefix) / "bin")  # `ntm` of this very install comes first
    env = {
        "PATH": f"{venv_bin}:{BASE_PATH}",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",  # logs appear as they are written
        "NTM_LAB_NAME": lab,
        "NTM_LAB_SERVICE": service,
    }
    env.update(extra)
    env["NTM_LAB_STATE"] = state_dir
    return env


def in_namespace(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def start(ns: str, argv: Sequence[str], env: Mapping[str, str], cwd: str, log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"=== {time.strftime('%F %T')} start: {shlex.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            in_namespace(ns, argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _children[proc.pid] = proc
    return proc.pid


# Processes started by this very process: polling them reaps them (no zombies during `up`).
_children: dict[int, subprocess.Popen[bytes]] = {}


def exit_code(pid: int) -> int | None:
    """The exit code of a child of ours that has exited, else None."""
    proc = _children.get(pid)
    return None if proc is None else proc.poll()


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    proc = _children.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has already exited


def wait_until(condition: Callable[[], bool], bound: float) -> bool:
    deadline = time.monotonic() + bound
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)


def stop_pids(pids: Sequence[int], grace: float = STOP_GRACE) -> None:
    """SIGTERM each process group (or process), then SIGKILL what is left after `grace`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            _signal(pid, sig)
        if wait_until(lambda: not any(alive(p) for p in pids), grace):
            return


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # our services lead their own session: reach all children
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "(no log yet)"
    return "\n".join("    " + line for line in text)


def wait_healthy(
    service: str, ns: str, check: Healthcheck, env: Mapping[str, str], cwd: str, pid: int, log: Path
) -> None:
    def healthy() -> bool:
        if not alive(pid):
            code = exit_code(pid)
            raise LabError(
                f"service {service} exited (code {code}) before its healthcheck passed; "
                f"see {log}:\n{log_tail(log)}"
            )
        try:
            done = subprocess.run(
                in_namespace(ns, check.argv),
                cwd=cwd,
                env=dict(env),
                capture_output=True,
                timeout=check.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    if not wait_until(healthy, check.budget):
        raise LabError(
            f"service {service} is not healthy after {check.budget:.0f} s (healthcheck "
            f"{shlex.join(check.argv)}); see {log}:\n{log_tail(log)}"
        )


def wait_completed(service: str, pid: int, log: Path, bound: float = 300.0) -> None:
    if not wait_until(lambda: not alive(pid), bound):
        raise LabError(f"oneshot service {service} still runs after {bound:.0f} s; see {log}")
    code = exit_code(pid)
    if code != 0:
        raise LabError(
            f"oneshot service {service} failed (exit {code}); see {log}:\n{log_tail(log)}"
        )
