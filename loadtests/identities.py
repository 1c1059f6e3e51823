"""The identities a load process can use: from a swarm's identities file, or this host's node.

An identities file is JSON: a list of objects, or an object whose `identities` key holds that
list (the file `ntm swarm` writes: it adds `dns`, the swarm's resolver, which answers each
query according to its source vIP). Each object needs `vip` (IPv4; null while not registered:
skipped) and `fqdn`; an optional `resolver` ("ADDR", "ADDR:PORT") overrides `dns` for it.
Other keys are ignored.

Without a file, the identity is the one NTM node of this host: `ntm status --all` lists the
lab's daemons, and ours is the node whose vIP is an address of this network namespace.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ntm_io.config import ConfigError

DNS_PORT = 53


@dataclass(frozen=True)
class Identity:
    fqdn: str
    vip: str
    resolver: tuple[str, int] | None = None  # None: this host's resolv.conf


def parse_resolver(text: str) -> tuple[str, int]:
    """`ADDR`, `ADDR:PORT` or `[V6]:PORT`."""
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and ("." in host or host.endswith("]")):
        return host.strip("[]"), int(port)
    return text.strip("[]"), DNS_PORT


def parse_identities(doc: Any, source: str) -> list[Identity]:
    """Identities with a vIP (a swarm lists not-yet-registered ones with `vip: null`)."""
    items = doc.get("identities") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise ConfigError(f"{source}: expected a JSON list of identities, or {{identities: [...]}}")
    shared = doc.get("dns") if isinstance(doc, dict) else None  # `ntm swarm`: one resolver
    default = parse_resolver(str(shared)) if shared else None
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "fqdn" not in item or "vip" not in item:
            raise ConfigError(f"{source}: identity #{i} needs `vip` and `fqdn`")
        if not item["vip"]:
            continue
        try:
            vip = str(ipaddress.IPv4Address(str(item["vip"])))
        except ValueError:
            raise ConfigError(f"{source}: identity #{i}: vip {item['vip']!r} is not IPv4") from None
        own = item.get("resolver")
        out.append(Identity(str(item["fqdn"]), vip, parse_resolver(str(own)) if own else default))
    if not out:
        raise ConfigError(f"{source}: no identity with a vIP (is the swarm registered yet?)")
    return out


def load_identities(path: Path) -> list[Identity]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read identities file {path}: {exc}") from exc
    return parse_identities(doc, str(path))


def take_slice(identities: list[Identity], spec: str | None) -> list[Identity]:
    """`K/N`: every N-th identity starting at K (workers sharing one host's identities)."""
    if not spec:
        return identities
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ConfigError(f"identity slice {spec!r}: write K/N, e.g. 0/2") from None
    if not 0 <= k < n:
        raise ConfigError(f"identity slice {spec!r}: need 0 <= K < N")
    part = identities[k::n]
    if not part:
        raise ConfigError(f"identity slice {spec} of {len(identities)} identities is empty")
    return part


def is_local(address: str) -> bool:
    """Whether this network namespace owns the address (binding to it succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def node_identities(status: dict[str, Any]) -> list[Identity]:
    """The nodes in an `ntm status --all` document whose vIP lives in this namespace."""
    found = []
    for doc in status.values():
        if isinstance(doc, dict) and doc.get("vip") and doc.get("fqdn") and is_local(doc["vip"]):
            found.append(Identity(str(doc["fqdn"]), str(doc["vip"])))
    return found


def discover_node_identity() -> list[Identity]:
    done = subprocess.run(
        [sys.executable, "-m", "ntm_cli.main", "status", "--all"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    try:
        status = json.loads(done.stdout or "{}")
    except ValueError:
        status = {}
    found = node_identities(status)
    if not found:
        raise ConfigError(
            "no identities file given and no NTM node of this host has a vIP here "
            f"(`ntm status --all` said: {done.stderr.strip() or 'nothing'}); run inside an MN "
            "host (`ntm lab exec mn1 -- ...`) or pass an identities file"
        )
    return found


def resolv_conf_nameserver(text: str) -> tuple[str, int]:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            return parts[1], DNS_PORT
    raise ConfigError("no `nameserver` line in /etc/resolv.conf: which resolver should we ask?")


def system_resolver(path: Path = Path("/etc/resolv.conf")) -> tuple[str, int]:
    try:
        return resolv_conf_nameserver(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
