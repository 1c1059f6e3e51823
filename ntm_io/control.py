"""The control channel: QUIC (ALPN ``ntm/1``) with mandatory mutual TLS, on aioquic.

Wire shape: one request per bidirectional stream. The opener writes one message and FIN;
the other side runs its handler and answers with one message and FIN. Either side may open
streams, so a server pushes requests to a client over the client's own connection.
A message is at most ``max_message`` bytes (64 KiB): a bigger request or reply resets the
stream (code ``E_TOO_BIG``) and is counted; a failing handler resets its stream
(``E_HANDLER``). Neither ever closes the connection.

Mutual TLS, and why it is done this way: aioquic 1.x has no public switch for client
certificates. Its TLS server sends a CertificateRequest only when the private flag
``tls.Context._request_client_certificate`` is set, and even then it only checks the
client's CertificateVerify signature (possession of the key); it neither requires a
certificate (an empty Certificate message is accepted) nor verifies the chain. So:

1. the server connection class sets that flag when aioquic creates the TLS context
   (:class:`_ClientAuthQuicConnection`), so every handshake requests a client certificate;
2. on ``HandshakeCompleted`` the server reads the peer certificate aioquic parsed
   (``tls._peer_certificate`` and chain), and verifies it itself with ``cryptography``'s
   X.509 client verifier against the CA (chain, validity, key usage) and requires an NTM
   role. No certificate -> close with CRYPTO_ERROR+certificate_required, a bad one ->
   CRYPTO_ERROR+bad_certificate. This runs in the same event batch as the handshake,
   before any stream event is handed on and before anything is sent, so a refused client
   never gets a byte of application data nor a HANDSHAKE_DONE;
3. session tickets are never issued, so there is no PSK resumption that would skip the
   certificate exchange.

The client side uses aioquic's own verification (chain against the CA, validity and
``server_name``), re-checked with ``cryptography``'s server verifier for the same policy.
Because a TLS 1.3 client finishes its handshake before the server has seen the client
certificate, :func:`connect_control` returns only after the server acknowledged a PING,
which it does only once it accepted the certificate; a refusal raises
:class:`ControlRefused`.

Cost per request (what a busy DC pays): sends are batched, not made per stream. A request
or answer is queued and the connection transmits once at the end of the event-loop pass,
so everything queued in that pass (and, after reading datagrams, everything they caused)
shares packets; a pending ACK rides on the next packet with data, and an ACK with nothing
to ride on waits up to ``ACK_DELAY`` (aioquic would send it alone after 1 ms). A message
is never held for an ACK: an answer leaves in the pass its handler wrote it, and what a
handler writes on another connection leaves before the receiving connection's own
ACK-only transmit (which costs aioquic ~0.15 ms even when it sends nothing). This uses
aioquic internals (``_transmit_soon``, the 1-RTT packet space's ``ack_at``, ``_ack_delay``);
``tests/unit/test_control.py`` checks that they still work.

Roles: the subject OU of a certificate (see ``ntm_pki.ca``; read here directly because
``ntm_io`` does not import ``ntm_pki``). ``peer_names`` are the DNS SANs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import ipaddress
import itertools
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from aioquic import tls
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode, QuicFrameType
from aioquic.tls import Context as TlsContext
from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from ntm_io.config import ConfigError

__all__ = [
    "ALPN",
    "MAX_MESSAGE",
    "ControlClosed",
    "ControlConnection",
    "ControlError",
    "ControlRefused",
    "ControlReset",
    "ControlServer",
    "ControlTimeout",
    "Handler",
    "connect_control",
    "serve_control",
]

log = logging.getLogger("ntm.control")

ALPN = "ntm/1"
MAX_MESSAGE = 64 * 1024
IDLE_TIMEOUT = 60.0  # a silent peer is declared dead after this
KEEPALIVE_INTERVAL = 15.0  # well under common NAT UDP binding lifetimes (30 s+)
CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 1.0  # bound on waiting for QUIC's closing period in close()
# How long an ACK may wait for a packet to ride on (aioquic's default is 1 ms, which makes
# nearly every ACK a datagram of its own). Below the 25 ms max_ack_delay aioquic announces,
# so the peer's loss detection already allows for it; set once the handshake is done.
ACK_DELAY = 0.010
ROLES = frozenset({"dc", "node", "relay", "adaptor", "lb"})

# Application error codes on RESET_STREAM / STOP_SENDING.
E_TOO_BIG = 0x1
E_HANDLER = 0x2
E_CANCELLED = 0x3
E_PROTOCOL = 0x4
_RESET_TEXT = {
    E_TOO_BIG: f"message larger than the limit ({MAX_MESSAGE} bytes by default)",
    E_HANDLER: "the peer's handler failed",
    E_CANCELLED: "the request was cancelled",
    E_PROTOCOL: "protocol violation",
}

# Connection close codes: QUIC CRYPTO_ERROR carrying a TLS alert (RFC 9001 section 4.8).
CLOSE_CERT_REQUIRED = QuicErrorCode.CRYPTO_ERROR + 116
CLOSE_BAD_CERT = QuicErrorCode.CRYPTO_ERROR + 42

Address = tuple[str, int]
PathArg = str | os.PathLike[str]
Handler = Callable[["ControlConnection", bytes], Awaitable[bytes]]
# Sync or async callbacks are both accepted; an async one runs as a tracked task.
ConnectionCallback = Callable[["ControlConnection"], object]
AddressCallback = Callable[["ControlConnection", Address, Address], object]


class ControlError(Exception):
    """Base class of control-channel failures."""


class ControlTimeout(ControlError, TimeoutError):
    """No answer (or no handshake) within the timeout."""


class ControlClosed(ControlError):
    """The connection is closed, or closed while a request was outstanding."""


class ControlRefused(ControlClosed):
    """The handshake failed: TLS/certificate refused by either side, or unreachable peer."""


class ControlReset(ControlError):
    """The peer reset the request's stream (see ``code``: E_TOO_BIG, E_HANDLER, ...)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- TLS / identity


class _ClientAuthQuicConnection(QuicConnection):
    """A server QuicConnection whose TLS context requests a client certificate.

    aioquic creates ``self.tls`` in ``_initialize`` when the first Initial arrives, and the
    ServerHello flight (with or without CertificateRequest) is built in the same call, so
    this is the one place the flag can be set in time.
    """

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self.tls._request_client_certificate = True


def _check_aioquic_client_auth() -> None:
    """Fail loudly (never silently serve without mTLS) if aioquic changed underneath."""
    if not hasattr(QuicConnectionProtocol, "_transmit_soon"):
        raise RuntimeError("aioquic's protocol has no _transmit_soon; unsupported version")
    probe = TlsContext(is_client=False)
    for attr in ("_request_client_certificate", "_peer_certificate", "_peer_certificate_chain"):
        if not hasattr(probe, attr):
            raise RuntimeError(
                f"aioquic's TLS context has no {attr}; this aioquic version is not supported "
                "by ntm_io.control (mutual TLS could not be enforced)"
            )


@dataclass(frozen=True, slots=True)
class _Trust:
    """CA material shared by aioquic (cadata) and our own verifier (store)."""

    cadata: bytes
    store: verification.Store

    @classmethod
    def load(cls, ca: PathArg) -> _Trust:
        try:
            data = Path(ca).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"CA certificate {ca}: {exc.strerror}; run `ntm pki init --dir DIR` and pass "
                "DIR/ca.pem"
            ) from None
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise ConfigError(f"CA certificate {ca} is not a PEM certificate") from None
        return cls(cadata=data, store=verification.Store(certs))

    def verify(
        self, leaf: x509.Certificate, chain: list[x509.Certificate], server_name: str | None
    ) -> None:
        builder = verification.PolicyBuilder().store(self.store).time(dt.datetime.now(dt.UTC))
        if server_name is None:
            builder.build_client_verifier().verify(leaf, chain)
        else:
            builder.build_server_verifier(_subject(server_name)).verify(leaf, chain)


def _subject(server_name: str) -> verification.Subject:
    try:
        return x509.IPAddress(ipaddress.ip_address(server_name))
    except ValueError:
        return x509.DNSName(server_name)


def _role(cert: x509.Certificate) -> str | None:
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(ous) != 1 or ous[0].value not in ROLES:
        return None
    return str(ous[0].value)


def _dns_names(cert: x509.Certificate) -> frozenset[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(d.lower() for d in san.get_values_for_type(x509.DNSName))


def _configuration(
    *, is_client: bool, trust: _Trust, cert: PathArg, key: PathArg, idle_timeout: float
) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        verify_mode=ssl.CERT_REQUIRED,  # aioquic honours it on the client only (see above)
    )
    config.load_verify_locations(cadata=trust.cadata)
    try:
        config.load_cert_chain(os.fspath(cert), os.fspath(key))
    except OSError as exc:
        raise ConfigError(
            f"cannot read certificate/key {exc.filename}: {exc.strerror}; issue them with "
            "`ntm pki issue`"
        ) from None
    except (ValueError, TypeError, IndexError) as exc:
        raise ConfigError(f"certificate {cert} / key {key} are not usable PEM ({exc})") from None
    return config


def _norm_address(addr: Any) -> Address:
    """(host, port) with IPv4-mapped IPv6 turned back into IPv4, as a registry wants it."""
    host, port = str(addr[0]), int(addr[1])
    with contextlib.suppress(ValueError):
        mapped = ipaddress.IPv6Address(host.split("%")[0]).ipv4_mapped
        if mapped is not None:
            host = str(mapped)
    return host, port


# ---------------------------------------------------------------- one connection


@dataclass(slots=True)
class _Outgoing:
    future: asyncio.Future[bytes]
    buffer: bytearray = field(default_factory=bytearray)


class ControlConnection:
    """One verified control connection (either side). Create via connect/serve_control."""

    def __init__(
        self,
        protocol: _ControlProtocol,
        peer_certificate: x509.Certificate,
        peer_role: str,
        *,
        handler: Handler,
        max_message: int,
        keepalive: float,
        parent_counters: dict[str, int] | None = None,
        on_address_change: AddressCallback | None = None,
    ) -> None:
        self._protocol = protocol
        self._quic = protocol._quic
        self._loop = asyncio.get_running_loop()
        self._handler = handler
        self._max_message = max_message
        self._parent_counters = parent_counters
        self.peer_certificate = peer_certificate
        self.peer_role = peer_role
        self.peer_names: frozenset[str] = _dns_names(peer_certificate)
        self._raw_peer: Any = self._quic.get_peer_address()
        self.peer_address: Address = _norm_address(self._raw_peer)
        self.is_client = self._quic.configuration.is_client
        self.on_address_change = on_address_change
        self.closed = asyncio.Event()
        self.close_reason = ""
        self.counters: dict[str, int] = dict.fromkeys(_CONNECTION_COUNTERS, 0)
        self._outgoing: dict[int, _Outgoing] = {}
        self._incoming: dict[int, bytearray] = {}
        self._serving: dict[int, asyncio.Task[None]] = {}
        self._discarded: set[int] = set()  # peer streams we reset; drop their leftovers
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_close: list[Callable[[ControlConnection], None]] = []
        self._keepalive_interval = keepalive
        self._keepalive: asyncio.TimerHandle | None = None
        self._ping_ids = itertools.count(1 << 32)  # clear of ids aioquic users pick
        self._arm_keepalive()

    def __repr__(self) -> str:
        names = ",".join(sorted(self.peer_names)) or "-"
        return f"<ControlConnection {self.peer_role} {names} @ {self.peer_address}>"

    # -- public API

    async def request(self, payload: bytes, timeout: float) -> bytes:
        """Send one request on a new stream and return the peer's answer."""
        if self.closed.is_set():
            raise ControlClosed(f"connection to {self!r} is closed: {self.close_reason}")
        if len(payload) > self._max_message:
            self._count("oversize", "errors")
            raise ControlError(
                f"request of {len(payload)} bytes exceeds the {self._max_message}-byte limit"
            )
        stream_id = self._quic.get_next_available_stream_id()
        pending = _Outgoing(self._loop.create_future())
        self._outgoing[stream_id] = pending
        self._quic.send_stream_data(stream_id, bytes(payload), end_stream=True)
        self._protocol.send_soon()
        self._count("streams_out")
        try:
            async with asyncio.timeout(timeout):
                return await pending.future
        except TimeoutError:
            self._count("timeouts")
            self._abort_outgoing(stream_id)
            raise ControlTimeout(
                f"no answer from {self!r} within {timeout:g} s (stream {stream_id})"
            ) from None
        except asyncio.CancelledError:
            self._abort_outgoing(stream_id)
            raise
        finally:
            self._outgoing.pop(stream_id, None)

    async def close(self) -> None:
        """Close the connection (CONNECTION_CLOSE) and wait for its tasks to finish."""
        self.abort(QuicErrorCode.NO_ERROR, "closed by application")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._protocol.wait_closed()  # QUIC closing period (3 PTO)
        await self.wait_closed()
        self._protocol._release(force=True)

    async def wait_closed(self) -> None:
        """Wait until closed and every task of this connection (handlers, callbacks) ended."""
        await self.closed.wait()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def abort(self, error_code: int = QuicErrorCode.NO_ERROR, reason: str = "aborted") -> None:
        """Close now without waiting (sync; used by ControlServer.close)."""
        if not self.closed.is_set():
            self._protocol.close(error_code=error_code, reason_phrase=reason)
            self._finish(reason)

    # -- events from the protocol

    def _on_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            self._on_stream_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            self._count("resets_in")
            self._on_stream_gone(event.stream_id, event.error_code, "reset")
        elif isinstance(event, events.StopSendingReceived):
            self._on_stream_gone(event.stream_id, event.error_code, "stopped")

    def _on_stream_data(self, stream_id: int, data: bytes, end: bool) -> None:
        if stream_id in self._outgoing:
            self._on_reply_data(stream_id, data, end)
        elif self._is_local(stream_id):
            pass  # late answer to a request we gave up on
        elif stream_id in self._discarded:
            if end:
                self._discarded.discard(stream_id)
        elif stream_id & 0x2:
            self._count("errors")
            self._refuse_request(stream_id, E_PROTOCOL, "unidirectional streams are not used")
        else:
            self._on_request_data(stream_id, data, end)

    def _on_reply_data(self, stream_id: int, data: bytes, end: bool) -> None:
        pending = self._outgoing[stream_id]
        pending.buffer += data
        if len(pending.buffer) > self._max_message:
            self._count("oversize", "errors")
            del self._outgoing[stream_id]  # the rest of it is dropped as a late answer
            self._abort_outgoing(stream_id)
            self._fail(pending, ControlError(f"answer exceeds the {self._max_message}-byte limit"))
        elif end:
            self._count("replies_in")
            if not pending.future.done():
                pending.future.set_result(bytes(pending.buffer))
            del self._outgoing[stream_id]

    def _on_request_data(self, stream_id: int, data: bytes, end: bool) -> None:
        buffer = self._incoming.get(stream_id)
        if buffer is None:
            buffer = self._incoming[stream_id] = bytearray()
            self._count("streams_in")
        buffer += data
        if len(buffer) > self._max_message:
            del self._incoming[stream_id]
            self._count("oversize", "errors")
            self._refuse_request(stream_id, E_TOO_BIG, f"request over {self._max_message} bytes")
        elif end:
            del self._incoming[stream_id]
            task = self._spawn(self._serve(stream_id, bytes(buffer)))
            self._serving[stream_id] = task
            task.add_done_callback(lambda _t: self._serving.pop(stream_id, None))

    def _on_stream_gone(self, stream_id: int, code: int, how: str) -> None:
        self._discarded.discard(stream_id)
        self._incoming.pop(stream_id, None)
        pending = self._outgoing.pop(stream_id, None)
        if pending is not None:
            text = _RESET_TEXT.get(code, "unknown reason")
            self._fail(pending, ControlReset(f"peer {how} stream {stream_id}: {text}", code))
        task = self._serving.pop(stream_id, None)
        if task is not None:
            task.cancel()  # the requester gave up; stop working for it

    # -- serving the peer's requests

    async def _serve(self, stream_id: int, request: bytes) -> None:
        try:
            reply = await self._handler(self, request)
            if not isinstance(reply, bytes | bytearray | memoryview):
                raise TypeError(f"handler returned {type(reply).__name__}, not bytes")
        except Exception:
            log.exception("control handler failed on stream %d from %r", stream_id, self)
            self._count("handler_errors", "errors")
            self._reset_answer(stream_id, E_HANDLER, "handler failed")
            return
        if len(reply) > self._max_message:
            self._count("oversize", "errors")
            self._reset_answer(stream_id, E_TOO_BIG, f"answer of {len(reply)} bytes too big")
        elif not self.closed.is_set():
            try:
                self._quic.send_stream_data(stream_id, bytes(reply), end_stream=True)
            except (ValueError, RuntimeError):
                log.debug("control stream %d from %r went away before the answer", stream_id, self)
                return
            self._protocol.send_soon()
            self._count("replies_out")

    def _refuse_request(self, stream_id: int, code: int, why: str) -> None:
        """Stop a peer's request mid-way (both directions); keep the connection."""
        self._discarded.add(stream_id)  # until its end or reset arrives
        if not self.closed.is_set():
            with contextlib.suppress(ValueError):
                self._quic.stop_stream(stream_id, code)
        self._reset_answer(stream_id, code, why)

    def _reset_answer(self, stream_id: int, code: int, why: str) -> None:
        """Answer a peer's stream with RESET_STREAM instead of a message."""
        log.warning("control stream %d from %r reset: %s", stream_id, self, why)
        self._count("resets_out")
        if self.closed.is_set():
            return
        with contextlib.suppress(ValueError):
            self._quic.reset_stream(stream_id, code)
        self._protocol.transmit()

    def _abort_outgoing(self, stream_id: int) -> None:
        """We no longer want the answer: STOP_SENDING so the peer stops working on it."""
        if self.closed.is_set():
            return
        with contextlib.suppress(ValueError):
            self._quic.stop_stream(stream_id, E_CANCELLED)
            self._protocol.transmit()

    # -- lifecycle

    def _finish(self, reason: str) -> None:
        """Idempotent end: fail outstanding requests, stop tasks, notify."""
        if self.closed.is_set():
            return
        self.close_reason = reason
        if self._keepalive is not None:
            self._keepalive.cancel()
        for pending in self._outgoing.values():
            self._fail(pending, ControlClosed(f"connection to {self!r} closed: {reason}"))
        self._outgoing.clear()
        self._incoming.clear()
        for task in list(self._tasks):
            task.cancel()
        self.closed.set()
        for callback in self._on_close:
            callback(self)

    @staticmethod
    def _fail(pending: _Outgoing, exc: ControlError) -> None:
        if not pending.future.done():
            pending.future.set_exception(exc)

    def _arm_keepalive(self) -> None:
        if self._keepalive_interval > 0 and not self.closed.is_set():
            self._keepalive = self._loop.call_later(self._keepalive_interval, self._send_keepalive)

    def _send_keepalive(self) -> None:
        # PINGs keep NAT bindings open; an unanswered peer still hits the idle timeout.
        self._quic.send_ping(next(self._ping_ids))
        self._protocol.transmit()
        self._arm_keepalive()

    def _refresh_address(self) -> None:
        addr = self._quic.get_peer_address()
        if addr is None or addr == self._raw_peer:
            return  # every datagram asks; normalising each time cost ~2 % of a busy DC
        self._raw_peer = addr
        new = _norm_address(addr)
        if new != self.peer_address:
            old, self.peer_address = self.peer_address, new
            self._count("migrations")
            log.info("control peer %s moved %s -> %s", self.peer_role, old, new)
            if self.on_address_change is not None:
                self._call_user(self.on_address_change, self, old, new)

    def _call_user(self, callback: Callable[..., object], *args: Any) -> None:
        """Run a user callback; a coroutine result becomes a tracked task; errors are logged."""
        try:
            result = callback(*args)
        except Exception:
            log.exception("control callback %r failed", callback)
            return
        if inspect.isawaitable(result):
            self._spawn(_logged(result, callback))

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _is_local(self, stream_id: int) -> bool:
        return (stream_id & 0x1) == (0 if self.is_client else 1)

    def _count(self, *keys: str) -> None:
        for key in keys:
            self.counters[key] = self.counters.get(key, 0) + 1
            if self._parent_counters is not None:
                self._parent_counters[key] = self._parent_counters.get(key, 0) + 1


_CONNECTION_COUNTERS = (
    "streams_out",
    "streams_in",
    "replies_in",
    "replies_out",
    "timeouts",
    "oversize",
    "handler_errors",
    "errors",
    "resets_in",
    "resets_out",
    "migrations",
)


async def _logged(awaitable: Awaitable[Any], what: object) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("control callback %r failed", what)


# ---------------------------------------------------------------- the aioquic protocol


class _ControlProtocol(QuicConnectionProtocol):
    """Moves aioquic events to a ControlConnection once the peer is verified."""

    def __init__(
        self,
        quic: QuicConnection,
        *,
        side: _Side,
    ) -> None:
        super().__init__(quic)
        self._side = side
        self.connection: ControlConnection | None = None
        self.terminated: events.ConnectionTerminated | None = None
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._ready_ping: int | None = None
        self._link: asyncio.DatagramTransport | None = None  # client socket we own
        self._piggyback = False  # stream data queued: the next transmit carries any ACK
        self._after_receive: asyncio.Handle | None = None  # see datagram_received

    def send_soon(self) -> None:
        """Send queued stream data at the end of this loop pass, not now: the answers
        and requests queued meanwhile share datagrams, and a pending ACK rides along."""
        self._piggyback = True
        if self._after_receive is None:
            self._transmit_soon()
        # else `_received_pass_over`, later in this pass, sends it

    def _received_pass_over(self) -> None:
        """The pass after datagrams arrived: the handlers they started have run."""
        self._after_receive = None
        if self._piggyback:
            self.transmit()  # an answer written in this pass: out now, with the ACK
        else:
            # Usually only a delayed ACK to consider (and ~0.15 ms of aioquic even when it
            # sends nothing): after what handlers wrote on other connections in this
            # pass (a DC's push to a responder, its answer to a requester).
            self._transmit_soon()

    def transmit(self) -> None:
        if self._piggyback:
            self._piggyback = False
            space = self._quic._spaces.get(tls.Epoch.ONE_RTT)
            if space is not None and space.ack_at is not None:
                space.ack_at = self._loop.time()  # due now: written into this packet
        super().transmit()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        # aioquic transmits after every datagram; we do it once, on the next loop pass,
        # instead: the answers of handlers that finish at once, the ACKs of all datagrams
        # read in this pass and anything else due leave in the same packets.
        self._quic.receive_datagram(cast(bytes, data), addr, now=self._loop.time())
        self._process_events()
        if self._after_receive is None and self._transmit_task is None:
            self._after_receive = self._loop.call_soon(self._received_pass_over)
        if self.connection is not None:
            self.connection._refresh_address()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self._on_handshake()
        elif isinstance(event, events.PingAcknowledged):
            if event.uid == self._ready_ping and not self._ready.done():
                self._ready.set_result(None)
        elif isinstance(event, events.ConnectionTerminated):
            self._on_terminated(event)
        elif self.connection is not None:
            self.connection._on_event(event)
        # Stream events before verification are dropped: on a server they cannot
        # exist (1-RTT keys come with the client's Finished), and refused peers get none.

    def confirm(self) -> None:
        """Client: PING now; its ACK proves the server accepted our certificate."""
        self._ready_ping = id(self._ready)
        self._quic.send_ping(self._ready_ping)
        self.transmit()

    def _on_handshake(self) -> None:
        leaf = self._quic.tls._peer_certificate
        chain = list(self._quic.tls._peer_certificate_chain)
        side = self._side
        if leaf is None:
            self._refuse(CLOSE_CERT_REQUIRED, "no client certificate (mutual TLS is required)")
            return
        try:
            side.trust.verify(leaf, chain, side.server_name)
        except verification.VerificationError as exc:
            self._refuse(CLOSE_BAD_CERT, f"certificate rejected: {exc}")
            return
        role = _role(leaf)
        if role is None:
            self._refuse(CLOSE_BAD_CERT, "certificate carries no NTM role (subject OU)")
            return
        self._quic._ack_delay = ACK_DELAY
        self.connection = ControlConnection(
            self,
            leaf,
            role,
            handler=side.handler,
            max_message=side.max_message,
            keepalive=side.keepalive,
            parent_counters=side.counters,
            on_address_change=side.on_address_change,
        )
        side.accepted(self.connection)

    def _refuse(self, code: int, why: str) -> None:
        peer = self._quic.get_peer_address()
        log.warning("control handshake with %s refused: %s", peer and _norm_address(peer), why)
        self._side.refused()
        self._quic.close(error_code=code, frame_type=QuicFrameType.CRYPTO, reason_phrase=why)
        # sent by the transmit datagram_received schedules, after this event batch

    def _on_terminated(self, event: events.ConnectionTerminated) -> None:
        self.terminated = event
        reason = event.reason_phrase or f"QUIC error 0x{event.error_code:x}"
        if not self._ready.done():
            self._ready.set_exception(ControlRefused(reason))
            self._ready.exception()  # retrieved: nobody may be waiting any more
        if self.connection is not None:
            self.connection._finish(reason)
        self._release()

    def _release(self, force: bool = False) -> None:
        """Drop the client's socket once QUIC has nothing more to send (or now, if forced)."""
        if self._link is not None and (force or self.terminated is not None):
            self._link.close()
            self._link = None
            # QUIC timers may still fire (closing period); let their sends go nowhere.
            self.connection_made(_Discard())


@dataclass(slots=True)
class _Side:
    """What a protocol needs from its owner (client call or server)."""

    trust: _Trust
    handler: Handler
    max_message: int
    keepalive: float
    server_name: str | None  # set on the client: verify the server for this name
    counters: dict[str, int] | None = None
    on_address_change: AddressCallback | None = None
    on_accept: Callable[[ControlConnection], None] | None = None

    def accepted(self, conn: ControlConnection) -> None:
        self._bump("connections")
        if self.on_accept is not None:
            self.on_accept(conn)

    def refused(self) -> None:
        self._bump("refused")

    def _bump(self, key: str) -> None:
        if self.counters is not None:
            self.counters[key] = self.counters.get(key, 0) + 1


class _Discard(asyncio.DatagramTransport):
    """Stands in for a released client socket."""

    def sendto(self, data: Any, addr: Any = None) -> None:
        pass


class _UdpLink(asyncio.DatagramProtocol):
    """The client's UDP socket; separate from the QUIC protocol so it can be rebound."""

    def __init__(self, target: _ControlProtocol) -> None:
        self.target = target

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.target.datagram_received(data, addr)


# ---------------------------------------------------------------- client


async def connect_control(
    host: str,
    port: int,
    *,
    server_name: str,
    ca: PathArg,
    cert: PathArg,
    key: PathArg,
    handler: Handler,
    local_addr: Address | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
    keepalive: float = KEEPALIVE_INTERVAL,
    connect_timeout: float = CONNECT_TIMEOUT,
    max_message: int = MAX_MESSAGE,
    on_address_change: AddressCallback | None = None,
) -> ControlConnection:
    """Connect, authenticate both ends, and return the verified connection.

    Raises ControlRefused (TLS or certificate refused, either side), ControlTimeout
    (no handshake within ``connect_timeout``), ConfigError (unreadable files).
    """
    _check_aioquic_client_auth()  # we read the peer certificate from aioquic's TLS context
    trust = _Trust.load(ca)
    config = _configuration(
        is_client=True, trust=trust, cert=cert, key=key, idle_timeout=idle_timeout
    )
    config.server_name = server_name
    side = _Side(trust, handler, max_message, keepalive, server_name, None, on_address_change)
    peer, family = await _resolve(host, port, local_addr)
    protocol = _ControlProtocol(QuicConnection(configuration=config), side=side)
    await _bind(protocol, family, local_addr)
    protocol.connect(peer)
    protocol.confirm()
    try:
        async with asyncio.timeout(connect_timeout):
            await protocol._ready
        conn = protocol.connection
        if conn is None:  # cannot happen: the PING is acked only after the handshake
            raise ControlRefused("handshake did not complete")
    except TimeoutError:
        _abandon(protocol, "handshake timeout")
        raise ControlTimeout(
            f"no control handshake with {host}:{port} within {connect_timeout:g} s"
        ) from None
    except ControlRefused as exc:
        _abandon(protocol, str(exc))
        raise ControlRefused(f"control connection to {host}:{port} refused: {exc}") from None
    except BaseException:  # cancelled by the caller: leave no socket or timer behind
        _abandon(protocol, "connect cancelled")
        raise
    return conn


def _abandon(protocol: _ControlProtocol, reason: str) -> None:
    protocol.close(reason_phrase=reason)
    if protocol.connection is not None:
        protocol.connection._finish(reason)
    protocol._release(force=True)


async def _resolve(host: str, port: int, local_addr: Address | None) -> tuple[Any, int]:
    loop = asyncio.get_running_loop()
    family = 0
    if local_addr is not None:
        family = socket.AF_INET6 if ":" in local_addr[0] else socket.AF_INET
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise ControlRefused(f"cannot resolve {host}: {exc.strerror}") from None
    return infos[0][4], infos[0][0]


async def _bind(protocol: _ControlProtocol, family: int, local_addr: Address | None) -> None:
    loop = asyncio.get_running_loop()
    wildcard = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UdpLink(protocol), local_addr=local_addr or wildcard, family=family
    )
    old, protocol._link = protocol._link, transport
    protocol.connection_made(transport)
    if old is not None:
        old.close()


async def rebind(conn: ControlConnection, local_addr: Address | None = None) -> None:
    """Client only: move to a new local socket (e.g. after a handover); QUIC migrates.

    The next datagram comes from the new address; the server validates the path and
    follows it, so requests in both directions keep working.
    """
    protocol = conn._protocol
    if not conn.is_client or protocol._link is None:
        raise ControlError("rebind() is for open client connections")
    family = protocol._link.get_extra_info("socket").family
    await _bind(protocol, family, local_addr)
    with contextlib.suppress(Exception):
        protocol.change_connection_id()  # unlinkable across the move (RFC 9000 9.5)
    conn._quic.send_ping(next(conn._ping_ids))  # let the server see the new path now
    protocol.transmit()


# ---------------------------------------------------------------- server


class ControlServer:
    """A listening control endpoint; ``connections`` lists the live, verified peers."""

    def __init__(
        self,
        side: _Side,
        on_connect: ConnectionCallback | None,
        on_close: ConnectionCallback | None,
    ) -> None:
        self._side = side
        self._on_connect = on_connect
        self._on_close = on_close
        self._live: dict[ControlConnection, None] = {}  # insertion-ordered set
        self._draining: set[ControlConnection] = set()  # closed, tasks still ending
        self._quic_server: QuicServer | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self.counters: dict[str, int] = side.counters if side.counters is not None else {}
        for key in ("connections", "refused", *_CONNECTION_COUNTERS):
            self.counters.setdefault(key, 0)
        side.on_accept = self._accepted

    @property
    def address(self) -> Address:
        assert self._transport is not None
        return _norm_address(self._transport.get_extra_info("sockname"))

    @property
    def connections(self) -> tuple[ControlConnection, ...]:
        return tuple(self._live)

    def connections_for(self, name: str) -> tuple[ControlConnection, ...]:
        """Live connections whose certificate names ``name`` (a DNS SAN)."""
        name = name.lower().removesuffix(".")
        return tuple(c for c in self._live if name in c.peer_names)

    def close(self) -> None:
        """Stop listening and close every connection now; await wait_closed() after."""
        for conn in list(self._live):
            conn.abort(QuicErrorCode.NO_ERROR, "server shutting down")
        if self._quic_server is not None:
            self._quic_server.close()  # also ends handshakes still in progress
            self._quic_server = None

    async def wait_closed(self) -> None:
        """After close(): wait for every connection's tasks to end."""
        for conn in list(self._draining) + list(self._live):
            await conn.wait_closed()
        self._draining.clear()

    async def __aenter__(self) -> ControlServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    def _make_protocol(self, quic: QuicConnection, stream_handler: Any = None) -> _ControlProtocol:
        # QuicServer builds plain QuicConnections; turn on the CertificateRequest before
        # the first datagram reaches it (see _ClientAuthQuicConnection).
        quic.__class__ = _ClientAuthQuicConnection
        return _ControlProtocol(quic, side=self._side)

    def _accepted(self, conn: ControlConnection) -> None:
        self._live[conn] = None
        conn._on_close.append(self._closed_one)
        log.info("control peer %r connected", conn)
        if self._on_connect is not None:
            conn._call_user(self._on_connect, conn)

    def _closed_one(self, conn: ControlConnection) -> None:
        self._live.pop(conn, None)
        log.info("control peer %r gone: %s", conn, conn.close_reason)
        if self._on_close is not None:
            conn._call_user(self._on_close, conn)
        # Remember only connections whose (cancelled) tasks have not ended yet.
        self._draining = {c for c in self._draining if c._tasks}
        if conn._tasks:
            self._draining.add(conn)


async def serve_control(
    host: str,
    port: int,
    *,
    ca: PathArg,
    cert: PathArg,
    key: PathArg,
    handler: Handler,
    on_connect: ConnectionCallback | None = None,
    on_close: ConnectionCallback | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
    keepalive: float = KEEPALIVE_INTERVAL,
    max_message: int = MAX_MESSAGE,
    on_address_change: AddressCallback | None = None,
) -> ControlServer:
    """Listen on host:port (UDP). Every client must present a certificate from ``ca``."""
    _check_aioquic_client_auth()
    trust = _Trust.load(ca)
    config = _configuration(
        is_client=False, trust=trust, cert=cert, key=key, idle_timeout=idle_timeout
    )
    side = _Side(trust, handler, max_message, keepalive, None, {}, on_address_change)
    server = ControlServer(side, on_connect, on_close)
    loop = asyncio.get_running_loop()
    # No session_ticket_handler: without tickets there is no PSK resumption, and so no
    # handshake that skips the client certificate.
    transport, quic_server = await loop.create_datagram_endpoint(
        lambda: QuicServer(configuration=config, create_protocol=server._make_protocol),
        local_addr=(host, port),
    )
    server._transport = transport
    server._quic_server = quic_server
    return server
