"""Policy routing for swarm identities: a packet from identity k's vIP leaves through its TUN.

Every identity's TUN routes the same vIP network, so the main table can point at only one of
them. An application that binds a socket to identity k's vIP gets
``ip rule from <vIP_k> lookup <table_k>``, and table k routes the vIP network into TUN k.
Rules outlive the process (tables empty with their TUN), so they are removed on exit and a
crashed run's leftovers (same priority, a table in our range) are purged at start.

One netlink socket for the whole swarm, used from the event loop: hundreds of identities
register within seconds, and a blocking socket (and thread) per change would stall the loop.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ntm.swarm.routing")


@dataclass(frozen=True)
class PolicyRoute:
    """What identity k needs: its vIP's rule and its table's one route."""

    table: int
    priority: int
    vip: str
    network: str  # the DC's vIP route, e.g. "100.64.0.0/10"
    tun: str

    def rule(self) -> dict[str, Any]:
        return {
            "family": socket.AF_INET,
            "table": self.table,
            "priority": self.priority,
            "src": self.vip,
            "src_len": 32,
        }


def stale_rules(dump: Iterable[Any], priority: int, tables: range) -> list[dict[str, Any]]:
    """Rules a crashed run left behind (pure: tested on fake dump messages)."""
    out = []
    for msg in dump:
        table = msg.get("FRA_TABLE") or msg["table"]
        if (
            msg["family"] == socket.AF_INET
            and msg.get("FRA_PRIORITY") == priority
            and table in tables
            and msg.get("FRA_SRC")
        ):
            out.append(
                {
                    "family": socket.AF_INET,
                    "table": table,
                    "priority": priority,
                    "src": msg.get("FRA_SRC"),
                    "src_len": msg["src_len"],
                }
            )
    return out


class PolicyRouting:
    """The swarm's rules and tables, through one rtnetlink socket (open() inside the loop)."""

    def __init__(self) -> None:
        self._ipr: Any = None

    async def open(self) -> None:
        from pyroute2 import AsyncIPRoute  # deferred: importing pyroute2 costs ~100 ms

        self._ipr = AsyncIPRoute()

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    async def install(self, route: PolicyRoute) -> None:
        """Add (or refresh) the table route and the rule."""
        from pyroute2.netlink.exceptions import NetlinkError

        ipr = self._ipr
        found = await ipr.link_lookup(ifname=route.tun)
        if not found:
            raise OSError(errno.ENODEV, f"TUN {route.tun} is gone")
        await ipr.route(
            "replace", dst=route.network, table=route.table, oif=found[0], prefsrc=route.vip
        )
        try:
            await ipr.rule("add", **route.rule())
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        log.debug("from %s lookup %d: %s dev %s", route.vip, route.table, route.network, route.tun)

    async def remove(self, routes: Iterable[PolicyRoute]) -> int:
        """Delete the rules (the table routes go with their TUN); returns how many were there."""
        return await self._delete([r.rule() for r in routes])

    async def purge(self, priority: int, tables: range) -> int:
        """Remove leftover rules of an earlier run; returns how many."""
        dump = [m async for m in await self._ipr.rule("dump")]
        n = await self._delete(stale_rules(dump, priority, tables))
        if n:
            log.info("removed %d policy rule(s) left by an earlier run", n)
        return n

    async def _delete(self, rules: list[dict[str, Any]]) -> int:
        from pyroute2.netlink.exceptions import NetlinkError

        removed = 0
        for rule in rules:
            try:
                await self._ipr.rule("del", **rule)
                removed += 1
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.ESRCH):
                    raise
        return removed
