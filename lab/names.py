"""Names of the lab's namespaces and links.

Every object of a lab carries the lab name as a prefix, so `down` can find what a crashed
`up` left behind and two labs with different names never touch each other's objects.
"""

from __future__ import annotations

import hashlib
import re

from lab.errors import LabError

DEFAULT_LAB_NAME = "ntmlab"
HUB = "hub"
IFNAME_MAX = 15  # IFNAMSIZ - 1

_LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,19}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def check_lab_name(name: str) -> str:
    # No dash: namespaces are found by the prefix "<name>-", and a dash in a lab name would
    # let lab "a" claim the namespaces of lab "a-b".
    if not _LAB_NAME.match(name):
        raise LabError(
            f"lab name {name!r} is not allowed; use 1-20 lowercase letters and digits, "
            "starting with a letter (e.g. ntmlab, t3f9a1c)"
        )
    return name


def namespace(lab: str, service: str) -> str:
    return f"{lab}-{service}"


def hub_namespace(lab: str) -> str:
    return f"{lab}-{HUB}"


def namespace_prefix(lab: str) -> str:
    return f"{lab}-"


def bridge_name(network: str) -> str:
    """The bridge of a network inside the hub: the network's own name when it fits."""
    if _IFNAME.match(network) and network not in ("lo", "all", "default"):
        return network
    return "br" + _short_hash(network)


def service_ifname(network: str) -> str:
    """The interface a service sees for a network (named after the network when it fits)."""
    return bridge_name(network)


def hub_port_name(service: str, network: str) -> str:
    """The hub-side end of a service's veth: short, unique per (service, network) in a hub."""
    return "v" + _short_hash(f"{service}/{network}")


def network_group(network: str) -> int:
    """The link group of a network's hub ports: what nftables matches a network by.

    The kernel here lacks `meta ibrname`, so per-network rules in the hub's bridge family
    match `iifgroup`; every port joins its network's group when it is created, so ports added
    later (by `move`) are covered without touching the rules. Never 0 (the default group).
    """
    return 1 + int(_short_hash(network)[:7], 16)


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]
