"""Fixtures for tests in the netns lab.

- `lab` (session): the whole compose.yaml under a unique name and state dir; always torn down.
- `make_lab` (function): build a lab from custom compose text; every lab it built is torn down.
- `running_lab(...)`: the same as a context manager, for fixtures of other scopes.
- `compose_subset(...)`: compose.yaml reduced to some services (plus extra ones), as text.

Tests marked `@pytest.mark.lab` are skipped, with the reason, only when the machine cannot run
the lab (not root, or `ip netns` unavailable).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose.yaml"
UP_TIMEOUT = 240.0
DOWN_TIMEOUT = 120.0


def lab_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root: the netns lab needs root for network namespaces"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.decode().strip()}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = lab_unavailable_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("lab"):
            item.add_marker(pytest.mark.skip(reason=reason))


def unique_name() -> str:
    return "t" + secrets.token_hex(3)


def poll(condition: Callable[[], bool], bound: float, what: str) -> None:
    """Wait for a condition by polling it, failing with `what` after `bound` seconds."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {bound} s: {what}")
        time.sleep(0.1)


@dataclass
class Lab:
    name: str
    state: Path
    compose: Path
    history: list[str] = field(default_factory=list)

    def ntm_lab(
        self, verb: str, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        argv = [
            sys.executable,
            "-m",
            "ntm_cli.main",
            "lab",
            verb,
            "--name",
            self.name,
            "--state",
            str(self.state),
            *args,
        ]
        done = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
        )
        self.history.append(f"$ ntm lab {verb} {' '.join(args)} -> {done.returncode}")
        if check and done.returncode != 0:
            raise AssertionError(
                f"ntm lab {verb} {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}"
            )
        return done

    def exec(
        self, service: str, *cmd: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return self.ntm_lab("exec", service, "--", *cmd, check=check, timeout=timeout)

    def move(self, service: str, network: str) -> None:
        self.ntm_lab("move", service, "--to", network)

    def kill(self, service: str) -> None:
        self.ntm_lab("kill", service)

    def link(self, service: str, network: str, up: bool) -> None:
        """Plug (up) or pull (down) a service's cable on a network (`ntm lab link`)."""
        self.ntm_lab("link", service, network, "up" if up else "down")

    def impair(self, network: str, loss: float) -> None:
        """Random loss in percent on a network, both directions; 0 removes it."""
        self.ntm_lab("impair", network, "--loss", f"{loss:g}")

    def impairment(self, network: str) -> dict[str, Any]:
        """{"network", "loss" (percent), "seen", "dropped" (frames since the last impair)}."""
        result: dict[str, Any] = json.loads(self.ntm_lab("impair", network).stdout)
        return result

    def start(self, service: str) -> None:
        """Start a stopped service; returns once its healthcheck (if any) passes."""
        self.ntm_lab("start", service, timeout=UP_TIMEOUT)

    def up(self) -> None:
        self.ntm_lab("up", "--file", str(self.compose), timeout=UP_TIMEOUT)

    def down(self) -> subprocess.CompletedProcess[str]:
        return self.ntm_lab("down", timeout=DOWN_TIMEOUT)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.ntm_lab("status").stdout)
        return result

    def log(self, service: str) -> str:
        path = self.state / "logs" / f"{service}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def running_lab(compose_text: str | None, where: Path) -> Iterator[Lab]:
    """A lab from compose text (or compose.yaml when None), always taken down afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    compose = COMPOSE
    if compose_text is not None:
        compose = where / "compose.yaml"
        compose.write_text(compose_text)
    lab = Lab(unique_name(), where / "state", compose)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def compose_subset(keep: list[str], extra: dict[str, Any] | None = None) -> str:
    """compose.yaml with only `keep` (and `extra`) services; dependencies on others dropped."""
    data = yaml.safe_load(COMPOSE.read_text())
    services = {k: v for k, v in data["services"].items() if k in keep}
    services.update(extra or {})
    for spec in services.values():
        deps = spec.get("depends_on")
        if isinstance(deps, dict):
            spec["depends_on"] = {k: v for k, v in deps.items() if k in services}
        elif isinstance(deps, list):
            spec["depends_on"] = [d for d in deps if d in services]
    data["services"] = services
    return yaml.safe_dump(data, sort_keys=False)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with running_lab(None, tmp_path_factory.mktemp("lab")) as running:
        yield running


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[Callable[[str], Lab]]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    built: list[Lab] = []

    def make(compose_text: str) -> Lab:
        where = tmp_path / f"lab{len(built)}"
        where.mkdir()
        compose = where / "compose.yaml"
        compose.write_text(compose_text)
        new = Lab(unique_name(), where / "state", compose)
        built.append(new)  # before `up`, so a failed `up` is still taken down
        new.up()
        return new

    yield make
    for made in built:
        made.down()
