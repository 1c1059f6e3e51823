"""The lab's state directory: what `up` created, so later verbs find it.

Layout of `<state>` (exported to services as NTM_LAB_STATE):
  lab.json          this file's data (namespaces, pids, attached networks, env of each service)
  logs/<svc>.log    stdout+stderr of each service
  run/              unix sockets of the daemons (`ntm status --socket ...`)
  <anything else>   written by services (pki/, dns/, resolver/, ...)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lab.errors import LabError

STATE_FILE = "lab.json"


@dataclass
class ServiceState:
    namespace: str
    command: list[str]
    env: dict[str, str]
    networks: list[str]  # attached now (changes with `move`)
    pid: int | None = None


@dataclass
class LabState:
    name: str
    state_dir: str
    compose_file: str
    project_dir: str
    hub: str
    services: dict[str, ServiceState] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return Path(self.state_dir)

    def log_path(self, service: str) -> Path:
        return self.root / "logs" / f"{service}.log"

    def service(self, name: str) -> ServiceState:
        try:
            return self.services[name]
        except KeyError:
            known = ", ".join(sorted(self.services)) or "none"
            raise LabError(f"no service {name!r} in lab {self.name} (services: {known})") from None

    def save(self) -> None:
        path = self.root / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, path)  # readers never see half a file


def default_state_dir(name: str) -> Path:
    return Path.cwd() / ".lab" / name


def prepare_state_dir(path: Path) -> Path:
    root = path.resolve()
    for sub in ("logs", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def load_state(path: Path, name: str) -> LabState | None:
    try:
        data = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        raise LabError(
            f"{path / STATE_FILE} is damaged; run `ntm lab down --name {name}`"
        ) from None
    services = {k: ServiceState(**v) for k, v in data.pop("services").items()}
    return LabState(services=services, **data)


def require_state(path: Path, name: str) -> LabState:
    state = load_state(path, name)
    if state is None:
        raise LabError(
            f"lab {name} is not up (no {path / STATE_FILE}); start it with "
            f"`ntm lab up --name {name}` or pass the --state it was started with"
        )
    if state.name != name:
        raise LabError(f"{path} belongs to lab {state.name}, not {name}; pass --name {state.name}")
    return state


def forget_state(path: Path) -> None:
    (path / STATE_FILE).unlink(missing_ok=True)
