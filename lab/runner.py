"""The lab's verbs: up, down, status, move, kill, start (link and impair: lab.faults)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lab import names, netns, procs
from lab.compose import Project, Service, load_project
from lab.errors import LabError
from lab.service_init import plan, route_batch_lines, run_steps, sysctl_steps
from lab.state import (
    LabState,
    ServiceState,
    forget_state,
    load_state,
    prepare_state_dir,
    require_state,
)


def interpolation_env(state_dir: Path) -> dict[str, str]:
    """What ${VAR} in the compose file sees: the caller's environment plus NTM_LAB_STATE."""
    return {**os.environ, "NTM_LAB_STATE": str(state_dir)}


def load_lab_project(state: LabState) -> Project:
    return load_project(Path(state.compose_file), interpolation_env(state.root))


def up(compose_file: Path, name: str, state_dir: Path, keep_on_failure: bool = False) -> LabState:
    netns.require_root()
    names.check_lab_name(name)
    leftovers = netns.lab_namespaces(name)
    if leftovers:
        raise LabError(
            f"lab {name} is already up or was left behind ({', '.join(leftovers)}); "
            f"run `ntm lab down --name {name}` first, or pick another --name"
        )
    root = prepare_state_dir(state_dir)
    project = load_project(compose_file.resolve(), interpolation_env(root))
    state = LabState(
        name=name,
        state_dir=str(root),
        compose_file=str(compose_file.resolve()),
        project_dir=os.getcwd(),
        hub=names.hub_namespace(name),
    )
    try:
        _build_topology(project, state)
        _start_all(project, state)
    except BaseException:
        if not keep_on_failure:
            print(
                f"ntm lab: removing the half-built lab {name} (logs stay in {root}/logs)",
                file=sys.stderr,
            )
            down(name, root)
        raise
    return state


def _build_topology(project: Project, state: LabState) -> None:
    netns.create_hub(state.hub, list(project.networks))
    for svc in project.services.values():
        ns = names.namespace(state.name, svc.name)
        state.services[svc.name] = ServiceState(
            namespace=ns,
            command=list(svc.command),
            env=procs.service_env(state.state_dir, state.name, svc.name, svc.environment),
            networks=[a.network for a in svc.networks],
        )
        state.save()  # from here on `down` can find everything through the state too
        netns.add_namespace(ns)
        for att in svc.networks:
            netns.attach(state.hub, ns, svc.name, att)
        netns.write_resolv_conf(ns, svc.dns)
        prefix = procs.in_namespace(ns, [])
        run_steps(sysctl_steps(svc.sysctls), prefix)
        run_steps(plan(state.services[svc.name].env), prefix)


def _start_all(project: Project, state: LabState) -> None:
    pending_health = []
    satisfied: set[tuple[str, str]] = set()
    for name in project.start_order():
        svc = project.services[name]
        for dep in svc.depends_on:
            _wait_for(project, state, dep.service, dep.condition, satisfied)
        _launch(state, name)
        if svc.healthcheck is not None:
            pending_health.append(name)
    # Like `docker compose up --wait`: return only when everything with a check is healthy.
    for name in pending_health:
        _wait_for(project, state, name, "service_healthy", satisfied)


def _wait_for(
    project: Project, state: LabState, name: str, condition: str, satisfied: set[tuple[str, str]]
) -> None:
    if (name, condition) in satisfied or condition == "service_started":
        return
    svc, ss = project.services[name], state.services[name]
    log = state.log_path(name)
    assert ss.pid is not None  # started before its dependents (start_order)
    if condition == "service_completed_successfully":
        procs.wait_completed(name, ss.pid, log)
    elif svc.healthcheck is None:
        raise LabError(
            f"a service waits for {name} to be healthy, but {name} has no healthcheck; add "
            "one or use condition: service_started"
        )
    else:
        procs.wait_healthy(
            name, ss.namespace, svc.healthcheck, ss.env, state.project_dir, ss.pid, log
        )
    satisfied.add((name, condition))


def _launch(state: LabState, name: str) -> None:
    ss = state.services[name]
    ss.pid = procs.start(ss.namespace, ss.command, ss.env, state.project_dir, state.log_path(name))
    state.save()


def down(name: str, state_dir: Path) -> list[str]:
    """Remove every object of the lab; safe to repeat and after a crashed `up`."""
    netns.require_root()
    names.check_lab_name(name)
    removed: list[str] = []
    namespaces = netns.lab_namespaces(name)
    # Found by name prefix, so a lost or stale state file does not matter; pids come from the
    # namespaces themselves (a pid in an old state file may belong to someone else by now).
    pids: set[int] = set()
    for ns in namespaces:
        pids.update(netns.namespace_pids(ns))
    pids.discard(os.getpid())
    if pids:
        procs.stop_pids(sorted(pids))
        removed.append(f"{len(pids)} process(es)")
    for ns in namespaces:
        netns.delete_namespace(ns)
        removed.append(f"namespace {ns}")
    for leftover in netns.leftover_etc_dirs(name):
        netns.delete_namespace(leftover.name)  # only the /etc/netns dir was left
        removed.append(str(leftover))
    state = _readable_state(state_dir, name)
    if state is None or state.name == name:
        forget_state(state_dir)
    return removed


def _readable_state(state_dir: Path, name: str) -> LabState | None:
    try:
        return load_state(state_dir, name)
    except LabError:
        return None  # damaged: forget it


def status(name: str, state_dir: Path) -> dict[str, Any]:
    from lab import faults  # it uses load_lab_project from here

    names.check_lab_name(name)
    state = load_state(state_dir, name)
    present = set(netns.lab_namespaces(name)) if os.geteuid() == 0 else set()
    report: dict[str, Any] = {"name": name, "state": str(state_dir), "up": state is not None}
    services: dict[str, Any] = {}
    hub_there = state is not None and state.hub in present
    links = faults.link_states(state) if state and hub_there else {}
    for svc_name, ss in (state.services if state else {}).items():
        services[svc_name] = {
            "namespace": ss.namespace,
            "pid": ss.pid,
            "alive": _running(ss),
            "networks": ss.networks,
            "links": links.get(svc_name, {}),
            "addresses": netns.addresses(ss.namespace) if ss.namespace in present else {},
            "log": str(state.log_path(svc_name)) if state else None,
        }
    report["services"] = services
    report["impairments"] = faults.impairments(state) if state and hub_there else {}
    tracked = {s.namespace for s in state.services.values()} | {state.hub} if state else set()
    report["untracked_namespaces"] = sorted(present - tracked)
    return report


def move(name: str, state_dir: Path, service: str, network: str) -> list[str]:
    """Leave the current roaming network(s), join `network` as x-ntm-roam declares it."""
    netns.require_root()
    state = require_state(state_dir, name)
    ss = state.service(service)
    svc = load_lab_project(state).services[service]
    if network not in svc.roam:
        roamable = ", ".join(svc.roam) or "none"
        raise LabError(
            f"{service} cannot move to {network}: add it under x-ntm-roam of the service in "
            f"{state.compose_file} (declared there now: {roamable})"
        )
    left = [n for n in ss.networks if n in svc.roam and n != network]
    att = svc.roam[network]
    joining = network not in ss.networks
    if joining:
        netns.plug(state.hub, ss.namespace, service, att)  # a link, no address: not a network yet
    # The switch itself is one `ip -batch` in the service's namespace, so the time it is
    # without a network is the kernel's, not that of a dozen `ip` processes: leave, then
    # address, up and routes of the new network.
    present = netns.link_names(ss.namespace)
    lines = [f"link del {ifname}" for n in left if (ifname := names.service_ifname(n)) in present]
    if joining:
        lines += netns.address_lines(names.service_ifname(network), att)
        lines += route_batch_lines(att.routes)
    netns.ip_batch(ss.namespace, lines)
    for old in left:
        ss.networks.remove(old)
    if joining:
        ss.networks.append(network)
    state.save()
    return left


def _running(ss: ServiceState) -> bool:
    # The namespace check guards against a recorded pid reused by an unrelated process.
    return procs.alive(ss.pid) and netns.pid_in_namespace(ss.pid, ss.namespace)


def kill(name: str, state_dir: Path, service: str) -> bool:
    netns.require_root()
    state = require_state(state_dir, name)
    ss = state.service(service)
    if not _running(ss) or ss.pid is None:
        return False
    procs.stop_pids([ss.pid])
    return True


def start(name: str, state_dir: Path, service: str) -> int:
    netns.require_root()
    state = require_state(state_dir, name)
    ss = state.service(service)
    if _running(ss):
        raise LabError(f"{service} is already running (pid {ss.pid}); `ntm lab kill` it first")
    svc: Service = load_lab_project(state).services[service]
    _launch(state, service)
    assert ss.pid is not None
    if svc.healthcheck is not None:
        procs.wait_healthy(
            service,
            ss.namespace,
            svc.healthcheck,
            ss.env,
            state.project_dir,
            ss.pid,
            state.log_path(service),
        )
    return ss.pid


def exec_argv(
    name: str, state_dir: Path, service: str, command: list[str]
) -> tuple[list[str], Mapping[str, str], str]:
    state = require_state(state_dir, name)
    ss = state.service(service)
    if not command:
        raise LabError("no command given; write `ntm lab exec SERVICE -- CMD ...`")
    return procs.in_namespace(ss.namespace, command), ss.env, state.project_dir
