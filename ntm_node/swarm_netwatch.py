"""The swarm's address watcher: the host's addresses without dumping every swarm TUN.

`ntm_io.netwatch.AddressWatcher` dumps all links, addresses and routes on each change. With
hundreds of swarm TUNs the link dump alone costs ~0.5 s of the event loop (pyroute2 decodes
every link's attributes), and a move takes two or three dumps: seconds before any identity
hears of the move, with every tunnel stalled meanwhile. This watcher dumps the addresses
(cheap), leaves out those a swarm TUN carries (IPv4 addresses are labelled with their
interface; the TUNs have IPv6 disabled), and asks only for the few links left.
"""

from __future__ import annotations

import errno
from typing import Any

from ntm_io.netwatch import AddressSet, AddressWatcher, build_address_set


def links_to_look_up(addrs: list[Any], ignore: frozenset[str]) -> list[int]:
    """Interface indexes with an address not known to be on an ignored interface (pure)."""
    return sorted({int(m["index"]) for m in addrs if m.get("IFA_LABEL") not in ignore})


class SwarmAddressWatcher(AddressWatcher):
    async def _dump(self) -> AddressSet:
        from pyroute2.netlink.exceptions import NetlinkError

        ipr = self._ipr
        addrs = [m async for m in await ipr.addr("dump")]
        links: list[Any] = []
        for index in links_to_look_up(addrs, frozenset(self.ignore_ifaces)):
            try:
                found = await ipr.link("get", index=index)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise
                continue  # gone since the address dump; its addresses are gone too
            if hasattr(found, "__aiter__"):
                links += [m async for m in found]
            else:
                links += list(found)
        routes = [m async for m in await ipr.route("dump")]
        return build_address_set(links, addrs, routes, self.ignore_ifaces)
