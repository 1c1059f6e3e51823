"""Namespaces, bridges and veths, through the `ip` command.

Shape of a lab: a hub namespace holds one bridge per compose network; each service namespace
gets one veth per attached network, created from inside the hub with its peer placed straight
into the service namespace. Nothing is created in, or connected to, the root namespace, and no
route toward a real network exists anywhere in the lab.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lab import names
from lab.compose import Attachment
from lab.errors import LabError

NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
PORT_READY_S = 5.0  # bound for a new bridge port to forward


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("not root: the lab needs root for network namespaces; run with sudo")
    if shutil.which("ip") is None:
        raise LabError("the `ip` command is missing; install iproute2 (apt-get install iproute2)")


def ip(*args: str, check: bool = True, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["ip", *args], input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if check and done.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {done.stderr.strip() or 'failed'}")
    return done.stdout


def list_namespaces() -> list[str]:
    out = ip("-j", "netns", "list", check=False).strip()
    return [entry["name"] for entry in json.loads(out or "[]")]


def lab_namespaces(lab: str) -> list[str]:
    prefix = names.namespace_prefix(lab)
    return [ns for ns in list_namespaces() if ns.startswith(prefix)]


def namespace_pids(ns: str) -> list[int]:
    return [int(p) for p in ip("netns", "pids", ns, check=False).split()]


def pid_in_namespace(pid: int | None, ns: str) -> bool:
    if pid is None:
        return False
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(NETNS_RUN / ns).st_ino
    except OSError:
        return False


def add_namespace(ns: str) -> None:
    ip("netns", "add", ns)
    ip("-n", ns, "link", "set", "lo", "up")


def delete_namespace(ns: str) -> None:
    ip("netns", "del", ns, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def sysctl_in(ns: str, key: str, value: str) -> None:
    ip("netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}")


def create_hub(hub: str, networks: list[str]) -> None:
    add_namespace(hub)
    # The hub only switches frames: no addresses, no IPv6 link-locals that could answer ND.
    sysctl_in(hub, "net.ipv6.conf.all.disable_ipv6", "1")
    sysctl_in(hub, "net.ipv6.conf.default.disable_ipv6", "1")
    for net in networks:
        br = names.bridge_name(net)
        # No multicast snooping: without an MLD querier it can starve IPv6 neighbour discovery.
        ip("-n", hub, "link", "add", br, "type", "bridge", "mcast_snooping", "0")
        ip("-n", hub, "link", "set", br, "up")


def attach(hub: str, ns: str, service: str, att: Attachment) -> None:
    ifname = plug(hub, ns, service, att)
    ip_batch(ns, address_lines(ifname, att))


def plug(hub: str, ns: str, service: str, att: Attachment) -> str:
    """Cable `att`'s network to the service: a veth whose hub end is in the network's bridge
    and up; the service's end (returned) comes up without addresses, so the service sees a
    new link but no new network yet."""
    port = names.hub_port_name(service, att.network)
    ifname = names.service_ifname(att.network)
    ip("-n", hub, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns)
    bridge = names.bridge_name(att.network)
    group = str(names.network_group(att.network))
    ip("-n", hub, "link", "set", port, "master", bridge, "group", group, "up")
    # Carrier first, addresses later (a radio associates before IP is configured): the
    # bridge enables its port asynchronously, and a first ARP request sent before that is
    # lost and retried only a second later.
    ip("-n", ns, "link", "set", ifname, "up")
    deadline = time.monotonic() + PORT_READY_S
    while (state := bridge_port_state(hub, port)) != "forwarding":
        if time.monotonic() > deadline:
            raise LabError(
                f"bridge port {port} in {hub} is {state or 'missing'}, not forwarding, after"
                f" {PORT_READY_S:g} s; `ip -n {hub} -d link show {port}` shows why"
            )
        time.sleep(0.002)
    return ifname


def bridge_port_state(hub: str, port: str) -> str | None:
    """The STP state of a bridge port ("forwarding", "disabled", ...), None if not found."""
    out = ip("-n", hub, "-j", "-d", "link", "show", "dev", port, check=False).strip()
    links: list[dict[str, Any]] = json.loads(out or "[]")
    if not links:
        return None
    state = links[0].get("linkinfo", {}).get("info_slave_data", {}).get("state")
    return str(state) if state is not None else None


def address_lines(ifname: str, att: Attachment) -> list[str]:
    """`ip -batch` lines that give the service's end of `att` its addresses and bring it up."""
    lines = []
    for addr in att.addresses:
        extra = " nodad" if ":" in addr else ""  # usable at once, no 1-2 s DAD wait
        lines.append(f"addr add {addr} dev {ifname}{extra}")
    lines.append(f"link set {ifname} up")
    return lines


def ip_batch(ns: str, lines: Sequence[str]) -> None:
    """Run `ip` commands in `ns` from one process (`ip -batch`): one fork and exec instead of
    one per command (about 3 ms each here), and no gap between them. The first failure
    stops the batch."""
    if not lines:
        return
    script = "".join(line + "\n" for line in lines)
    try:
        ip("-n", ns, "-batch", "-", stdin=script)
    except LabError as exc:
        raise LabError(f"{exc} (commands: {list(lines)})") from None


def link_names(ns: str) -> set[str]:
    out = ip("-n", ns, "-j", "link", "show", check=False).strip()
    links: list[dict[str, Any]] = json.loads(out or "[]")
    return {str(link["ifname"]) for link in links}


def set_link(hub: str, service: str, network: str, up: bool) -> None:
    """Pull or plug the cable: the hub end goes down (the service sees its carrier go) or up.

    The service keeps its interface, addresses and routes, like a host whose cable is pulled.
    """
    port = names.hub_port_name(service, network)
    ip("-n", hub, "link", "set", port, "up" if up else "down")


def hub_ports_up(hub: str) -> dict[str, bool]:
    """Every veth end in the hub (by name) and whether it is up (`ntm lab link` state)."""
    out = ip("-n", hub, "-j", "link", "show", "type", "veth", check=False).strip()
    links: list[dict[str, Any]] = json.loads(out or "[]")
    return {str(link["ifname"]): "UP" in link.get("flags", []) for link in links}


def write_resolv_conf(ns: str, servers: tuple[str, ...]) -> None:
    """`ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf."""
    if not servers:
        return
    directory = NETNS_ETC / ns
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "resolv.conf").write_text("".join(f"nameserver {s}\n" for s in servers))


def addresses(ns: str) -> dict[str, list[str]]:
    """Global addresses per interface of a namespace, e.g. {"internet": ["198.51.100.40/24"]}."""
    out = ip("-n", ns, "-j", "addr", "show", check=False).strip()
    result: dict[str, list[str]] = {}
    entries: list[dict[str, Any]] = json.loads(out or "[]")
    for link in entries:
        addrs = [
            f"{a['local']}/{a['prefixlen']}"
            for a in link.get("addr_info", [])
            if a.get("scope") == "global"
        ]
        if addrs:
            result[str(link["ifname"])] = addrs
    return result


def leftover_etc_dirs(lab: str) -> list[Path]:
    if not NETNS_ETC.is_dir():
        return []
    prefix = names.namespace_prefix(lab)
    return [p for p in NETNS_ETC.iterdir() if p.name.startswith(prefix)]
