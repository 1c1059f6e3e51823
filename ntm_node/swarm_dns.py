"""The swarm's one stub resolver: the source address of a query picks the identity.

A Locust user (or anything else) that speaks as identity k sends its DNS query from k's
vIP; a marked answer then asks identity k for directions, so the tunnel is built from k
and the synthesized vIP is reached through k's TUN. A query from any other address gets
the resolver's ordinary answer (counted in ``not_from_identity``).

Built on :class:`~ntm_node.dns_server.StubResolver`, which knows nothing of clients: the
client address travels in a context variable, and the per-FQDN sharing of direction calls
becomes per (client, FQDN), because identities asking for the same peer each need their
own tunnel.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ntm_proto.marker import MarkerRule

from .dns_server import Address, StubResolver

Directions = Callable[[str], Awaitable[str]]
# client address -> that identity's directions, or None when it is not an identity
IdentityFor = Callable[[str], Directions | None]

_client: contextvars.ContextVar[str] = contextvars.ContextVar("ntm_swarm_dns_client", default="")


class NotAnIdentity(LookupError):
    """The query did not come from a swarm identity's vIP."""


class SwarmResolver(StubResolver):
    def __init__(
        self,
        listen: Address,
        upstreams: Sequence[Address],
        marker: MarkerRule,
        identity_for: IdentityFor,
        **kwargs: Any,
    ) -> None:
        super().__init__(listen, upstreams, marker, self._directions_of_client, **kwargs)
        self._identity_for = identity_for
        self.counters.setdefault("not_from_identity", 0)

    async def _answer_udp(self, data: bytes, addr: Any) -> None:
        _client.set(addr[0])  # this query's task has its own context
        await super()._answer_udp(data, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        _client.set(peer[0] if peer else "")  # copied into the tasks answering its queries
        await super()._serve_tcp(reader, writer)

    async def _directions_for(self, fqdn: str) -> str:
        # The base class shares one call per key; the client's address in the key makes
        # that one call per identity and peer. An address has no space, so the split is safe.
        return await super()._directions_for(f"{_client.get()} {fqdn}")

    async def _directions_of_client(self, key: str) -> str:
        client, _, fqdn = key.partition(" ")
        directions = self._identity_for(client)
        if directions is None:
            self._count("not_from_identity")
            raise NotAnIdentity(
                f"the query came from {client or 'an unknown address'}, not from a swarm "
                "identity's vIP; send it from the vIP of the identity that should connect"
            )
        return await directions(fqdn)
