"""The node's stub resolver: asyncio glue around :mod:`ntm_node.dns_intercept`.

Serves DNS over UDP and TCP on ``listen`` (e.g. 127.0.0.1:53). Each client query is forwarded
as-is (same bytes, same id) to an upstream resolver over a fresh connected socket, so the kernel
picks a random source port and filters datagrams from anyone but the upstream; a response that
does not match the query (id and question) is dropped, counted, and the wait goes on until the
attempt's deadline. TC=1 over UDP is retried over TCP. An upstream that times out or refuses is
replaced by the next one; when all fail the client gets SERVFAIL, always within
``upstream_timeout`` seconds in total.

An answer that reaches an NTMobile-marked FQDN for an A (or AAAA) question triggers one
``directions(fqdn)`` call (shared by concurrent questions for the same FQDN) bounded by
``direction_timeout``; success gives the synthesized vIP answer, failure gives the resolver's
ordinary answer byte for byte plus a log line naming the FQDN and the reason.

Counters (``counters`` dict, shared with the caller): every received message counts in
``queries``; each ends as exactly one of ``malformed``, ``passed_through``, ``intercepted``,
``fallbacks``, ``servfail`` or ``dropped_overload``; ``mismatched_responses`` counts upstream
responses ignored because they did not match; ``direction_calls`` counts calls made and
``direction_shared`` the questions that joined a call already under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dnslib import QTYPE, DNSRecord

from ntm_node.dns_intercept import (
    DEFAULT_SYNTH_TTL,
    DnsParseError,
    Matched,
    Rejected,
    formerr_for,
    match_response,
    parse_query,
    plan_interception,
    servfail_for,
    synthesize_answer,
    udp_payload_limit,
)
from ntm_proto.marker import MarkerRule

__all__ = [
    "COUNTER_KEYS",
    "Address",
    "Directions",
    "StubResolver",
    "UpstreamAnswer",
    "exchange",
    "tcp_exchange",
    "udp_exchange",
]

log = logging.getLogger("ntm.node.dns")

Address = tuple[str, int]
Directions = Callable[[str], Awaitable[str]]
OnReject = Callable[[Rejected], None]

COUNTER_KEYS = (
    "queries",
    "passed_through",
    "intercepted",
    "fallbacks",
    "servfail",
    "mismatched_responses",
    "malformed",
    "dropped_overload",
    "direction_calls",
    "direction_shared",
)

_MAX_TCP_PIPELINE = 64  # queries in flight per TCP connection before we stop reading


# Set by the node when it catches port 53 with nftables: its own upstream queries carry this
# firewall mark so the redirect rule lets them pass instead of looping them back to us.
UPSTREAM_MARK: int | None = None


def _marked_socket(server: Address, kind: socket.SocketKind) -> socket.socket | None:
    if UPSTREAM_MARK is None:
        return None
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, UPSTREAM_MARK)
    sock.setblocking(False)
    return sock


async def udp_exchange(
    data: bytes,
    query: DNSRecord,
    server: Address,
    timeout: float,
    on_reject: OnReject | None = None,
) -> tuple[bytes, Matched]:
    """Send ``data`` over a fresh connected UDP socket; return the first matching response.

    Raises TimeoutError when nothing matching came within ``timeout``, OSError when the
    upstream refused (ICMP) or the socket failed.

    A plain non-blocking socket with one reader callback and one future, not an asyncio
    transport: the query leaves at once and the answer is matched in the callback that
    reads it, so the stub pays no extra event-loop passes on every lookup.
    """
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    done: asyncio.Future[tuple[bytes, Matched]] = loop.create_future()

    def readable() -> None:
        while not done.done():
            try:
                wire = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP port unreachable on a connected socket
                done.set_exception(exc)
                return
            verdict = match_response(query, wire)
            if isinstance(verdict, Matched):
                done.set_result((wire, verdict))
            elif on_reject is not None:
                on_reject(verdict)

    try:
        sock.setblocking(False)
        if UPSTREAM_MARK is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, UPSTREAM_MARK)
        sock.connect(server)  # UDP: no packet, only the kernel's filter on the source
        loop.add_reader(sock.fileno(), readable)
        try:
            sock.send(data)
            async with asyncio.timeout(timeout):
                return await done
        finally:
            loop.remove_reader(sock.fileno())
    finally:
        sock.close()
        if done.done() and not done.cancelled():
            done.exception()  # retrieved: no "never retrieved" warning


async def tcp_exchange(
    data: bytes,
    query: DNSRecord,
    server: Address,
    timeout: float,
    on_reject: OnReject | None = None,
) -> tuple[bytes, Matched]:
    """Send ``data`` with 2-byte length framing over a fresh TCP connection; first match wins."""
    async with asyncio.timeout(timeout):
        sock = _marked_socket(server, socket.SOCK_STREAM)
        if sock is not None:
            try:
                await asyncio.get_running_loop().sock_connect(sock, server)
            except BaseException:
                sock.close()
                raise
            reader, writer = await asyncio.open_connection(sock=sock)
        else:
            reader, writer = await asyncio.open_connection(server[0], server[1])
        try:
            writer.write(len(data).to_bytes(2, "big") + data)
            await writer.drain()
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                wire = await reader.readexactly(size)
                verdict = match_response(query, wire)
                if isinstance(verdict, Matched):
                    return wire, verdict
                if on_reject is not None:
                    on_reject(verdict)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    """What an upstream said: ``wire`` goes to the client as-is, ``record`` is the full answer.

    They differ only when the full (TCP) answer would not fit the client's UDP limit: then
    ``wire`` is the upstream's truncated UDP reply (TC=1; the client retries over TCP).
    """

    wire: bytes
    record: DNSRecord
    server: Address
    complete: bool = True  # False: only header+question parsed; pass through, never intercept


async def exchange(
    data: bytes,
    query: DNSRecord,
    upstreams: Sequence[Address],
    timeout: float,
    *,
    client_tcp: bool,
    udp_limit: int = 512,
    on_reject: OnReject | None = None,
) -> UpstreamAnswer | None:
    """Ask the upstreams in order within ``timeout`` seconds in total; None if all failed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for i, server in enumerate(upstreams):
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        per_try = remaining / (len(upstreams) - i)  # leave the later upstreams their share
        try:
            if client_tcp:
                wire, m = await tcp_exchange(data, query, server, per_try, on_reject)
                return UpstreamAnswer(wire, m.response, server, m.complete)
            wire, m = await udp_exchange(data, query, server, per_try, on_reject)
            if not m.response.header.tc:
                return UpstreamAnswer(wire, m.response, server, m.complete)
            try:
                full, fm = await tcp_exchange(
                    data, query, server, max(0.0, deadline - loop.time()), on_reject
                )
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                log.debug("TCP retry to %s:%d failed (%r); passing TC on", *server, exc)
                return UpstreamAnswer(wire, m.response, server, m.complete)
            # The full answer decides interception; the client gets it only if it fits.
            return UpstreamAnswer(
                full if len(full) <= udp_limit else wire, fm.response, server, fm.complete
            )
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            log.debug("upstream %s:%d failed: %r", server[0], server[1], exc)
    return None


class StubResolver:
    """The node's stub resolver on UDP and TCP ``listen``; see the module docstring."""

    def __init__(
        self,
        listen: Address,
        upstreams: Sequence[Address],
        marker: MarkerRule,
        directions: Directions,
        direction_timeout: float = 2.0,
        upstream_timeout: float = 3.0,
        counters: dict[str, int] | None = None,
        *,
        synth_ttl: int = DEFAULT_SYNTH_TTL,
        tcp_idle_timeout: float = 10.0,
        max_inflight: int = 1024,
    ) -> None:
        if not upstreams:
            raise ValueError("at least one upstream resolver is needed")
        self.listen = listen
        self.upstreams = list(upstreams)
        self.marker = marker
        self._directions = directions
        self.direction_timeout = direction_timeout
        self.upstream_timeout = upstream_timeout
        self.counters: dict[str, int] = counters if counters is not None else {}
        for key in COUNTER_KEYS:
            self.counters.setdefault(key, 0)
        self.synth_ttl = synth_ttl
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_inflight = max_inflight
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._direction_calls: dict[str, asyncio.Task[str]] = {}
        self.address: Address | None = None  # bound address (UDP and TCP share the port)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.listen
        # With port 0 (tests) let UDP pick, then put TCP on the same port; retry on a clash.
        for _attempt in range(10):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpServerProtocol(self), local_addr=(host, port)
            )
            bound = transport.get_extra_info("sockname")
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound[1])
            except OSError:
                transport.close()
                if port != 0:
                    raise
                continue
            self._udp = transport
            self.address = (bound[0], bound[1])
            log.info(
                "stub resolver listening on %s:%d (udp+tcp), upstreams %s",
                bound[0],
                bound[1],
                ", ".join(f"{h}:{p}" for h, p in self.upstreams),
            )
            return
        raise OSError(f"could not bind UDP and TCP on the same port at {host}")

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._tasks):
            task.cancel()
        for call in list(self._direction_calls.values()):
            call.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()

    async def __aenter__(self) -> StubResolver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro: Awaitable[None]) -> bool:
        if len(self._tasks) >= self.max_inflight:
            self._count("queries")
            self._count("dropped_overload")
            if asyncio.iscoroutine(coro):
                coro.close()  # never started: avoid "was never awaited"
            return False
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    # ---- one query -------------------------------------------------------------------

    async def handle(self, data: bytes, *, tcp: bool) -> bytes | None:
        """The reply for one client message (None: send nothing). Never raises."""
        self._count("queries")
        try:
            query = parse_query(data)
        except DnsParseError as exc:
            self._count("malformed")
            log.debug("malformed query (%d bytes): %s", len(data), exc.detail)
            return formerr_for(data)
        try:
            return await self._resolve(data, query, tcp)
        except Exception:  # a bug here must cost one answer, not the resolver
            log.exception("internal error answering %s", query.questions[0].qname)
            self._count("servfail")
            return servfail_for(query)

    async def _resolve(self, data: bytes, query: DNSRecord, tcp: bool) -> bytes:
        limit = None if tcp else udp_payload_limit(query)
        answer = await exchange(
            data,
            query,
            self.upstreams,
            self.upstream_timeout,
            client_tcp=tcp,
            udp_limit=limit or 65535,
            on_reject=self._on_reject,
        )
        qname = str(query.questions[0].qname)
        if answer is None:
            self._count("servfail")
            log.warning(
                "no upstream answered %s within %.1f s (%s); SERVFAIL",
                qname,
                self.upstream_timeout,
                ", ".join(f"{h}:{p}" for h, p in self.upstreams),
            )
            return servfail_for(query)
        plan = plan_interception(query, answer.record, self.marker) if answer.complete else None
        if plan is None:
            self._count("passed_through")
            return answer.wire
        try:
            vip = await self._directions_for(plan.target)
            reply = synthesize_answer(
                query, answer.record, plan.target, vip, self.synth_ttl, max_size=limit
            )
        except Exception as exc:  # any failure means: answer without mobility
            self._count("fallbacks")
            log.warning(
                "directions for %s failed (%s); answering %s %s with the resolver's "
                "ordinary answer (no mobility)",
                plan.target,
                self._why(exc),
                qname,
                QTYPE.get(plan.qtype),
            )
            return answer.wire
        self._count("intercepted")
        log.info("intercepted %s %s -> %s vIP %s", qname, QTYPE.get(plan.qtype), plan.target, vip)
        return reply

    def _why(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"no directions within {self.direction_timeout:g} s"
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    def _on_reject(self, verdict: Rejected) -> None:
        self._count("mismatched_responses")
        log.debug("ignored upstream response: %s (%s)", verdict.reason.value, verdict.detail)

    async def _directions_for(self, fqdn: str) -> str:
        # One call per marked FQDN at a time: A and AAAA from getaddrinfo, and many apps
        # resolving the same name together, all wait on the same Direction Request.
        call = self._direction_calls.get(fqdn)
        if call is not None:
            self._count("direction_shared")
        else:
            self._count("direction_calls")
            call = asyncio.ensure_future(self._bounded_directions(fqdn))
            self._direction_calls[fqdn] = call
            call.add_done_callback(lambda t: self._direction_done(fqdn, t))
        # shield: one client giving up must not cancel the call the others wait on.
        return await asyncio.shield(call)

    async def _bounded_directions(self, fqdn: str) -> str:
        # One task, not wait_for's two: each task hop is an event-loop pass on the way
        # to the answer.
        async with asyncio.timeout(self.direction_timeout):
            return await self._directions(fqdn)

    def _direction_done(self, fqdn: str, task: asyncio.Task[str]) -> None:
        if self._direction_calls.get(fqdn) is task:
            del self._direction_calls[fqdn]
        if not task.cancelled():
            task.exception()  # retrieved here even if every waiter went away

    # ---- transports ------------------------------------------------------------------

    async def _answer_udp(self, data: bytes, addr: Any) -> None:
        reply = await self.handle(data, tcp=False)
        if reply is not None and self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(reply, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._tasks.add(me)  # so close() cancels idle connections too
        pending: set[asyncio.Task[None]] = set()
        lock = asyncio.Lock()

        async def answer(data: bytes) -> None:
            reply = await self.handle(data, tcp=True)
            if reply is None:
                return
            async with lock:  # pipelined answers may finish out of order (RFC 7766)
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()

        try:
            while True:
                if len(pending) >= _MAX_TCP_PIPELINE:
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                try:
                    async with asyncio.timeout(self.tcp_idle_timeout):
                        size = int.from_bytes(await reader.readexactly(2), "big")
                        data = await reader.readexactly(size)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    break
                task = asyncio.ensure_future(answer(data))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(pending)  # each is bounded by the upstream+direction timeouts
        except asyncio.CancelledError:
            for task in pending:
                task.cancel()
            raise
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
            if me is not None:
                self._tasks.discard(me)


class _UdpServerProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: StubResolver) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner._spawn(self.owner._answer_udp(data, addr))

    def error_received(self, exc: Exception) -> None:
        log.debug("stub resolver UDP socket error: %r", exc)
