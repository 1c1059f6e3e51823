"""The node's side of the control plane: register with the DC, ask for directions,
take Route Directions the DC pushes, and re-register when the node's addresses change."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable

from ntm_io.control import ControlConnection, ControlError, connect_control
from ntm_io.netwatch import AddressSet
from ntm_proto.errors import DecodeError
from ntm_proto.messages import (
    DirectionRequest,
    ErrorCode,
    ErrorMessage,
    GatewayReport,
    GatewayReportAck,
    Message,
    RegistrationRequest,
    RegistrationResponse,
    RouteDirection,
    decode,
    encode,
)

from .config import NodeConfig

log = logging.getLogger("ntm.dc_client")

REQUEST_TIMEOUT = 5.0
RETRY_MIN, RETRY_MAX = 0.2, 5.0
CLOSE_BOUND = 1.0

PushHandler = Callable[[RouteDirection], Awaitable[Message]]


class DirectionError(Exception):
    """The DC could not give directions; `code` says why (ErrorCode or None if unreachable)."""

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class DcClient:
    def __init__(
        self,
        config: NodeConfig,
        static_public: bytes,
        addresses: Callable[[], AddressSet],
        on_push: PushHandler,
        on_registered: Callable[[RegistrationResponse], None],
    ) -> None:
        self.config = config
        self.static_public = static_public
        self._addresses = addresses
        self._on_push = on_push
        self._on_registered = on_registered
        self.conn: ControlConnection | None = None
        self.registration: RegistrationResponse | None = None
        self.registered = asyncio.Event()
        self._wake = asyncio.Event()
        self.counters: dict[str, int] = {}
        self.last_error: str | None = None
        # A gateway of a multi-gateway service (the adaptor sets these): its own name and
        # its share of new MNs, sent in every registration. "" = a plain node.
        self.gateway = ""
        self.weight = 100
        self.ordinary_clients = True  # False: keep this node out of the DC's DNS answers
        # Shared by a swarm's identities: hundreds of TLS handshakes started at once (after
        # a move) all outlast the timeout and start over; a few at a time all complete.
        self.connect_slots: asyncio.Semaphore | None = None

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    async def run(self) -> None:
        """Stay registered: connect, register, refresh, reconnect after failures or moves."""
        delay = RETRY_MIN
        while True:
            try:
                await self._connect_and_register()
                delay = RETRY_MIN
                await self._stay_registered()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever went wrong, the node stays up and retries
                self.last_error = str(exc) or type(exc).__name__
                self._count("dc_errors")
                if not isinstance(exc, (ControlError, OSError, DecodeError, TimeoutError)):
                    log.exception("unexpected error talking to the DC")
                log.warning(
                    "DC %s: %s; retrying in %.1fs",
                    self.config.dc_server_name,
                    self.last_error,
                    delay,
                )
            await self._drop_connection()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            delay = min(delay * 2, RETRY_MAX)

    def addresses_changed(self) -> None:
        """Our addresses changed: register again (on a fresh connection if ours is stale)."""
        log.debug("addresses changed: waking the DC client")
        self._wake.set()

    async def _connect_and_register(self) -> None:
        addrs = self._addresses()
        if self.conn is None or self.conn.closed.is_set():
            self.conn = await self._connect(addrs)
        endpoints = tuple((a, self.config.tunnel_port) for a in (*addrs.ipv4, *addrs.ipv6))[:16]
        req = RegistrationRequest(
            fqdn=self.config.fqdn,
            static_key=self.static_public,
            tunnel_port=self.config.tunnel_port,
            endpoints=endpoints,
            gateway=self.gateway,
            weight=self.weight,
            ordinary_clients=self.ordinary_clients,
        )
        answer = decode(await self.conn.request(encode(req), REQUEST_TIMEOUT))
        if isinstance(answer, ErrorMessage):
            self.last_error = f"registration refused: {answer.reason}"
            log.error("%s: %s", self.config.fqdn, self.last_error)
            raise ControlError(self.last_error)
        if not isinstance(answer, RegistrationResponse):
            raise ControlError(f"unexpected answer to registration: {type(answer).__name__}")
        self.registration = answer
        self.last_error = None
        self._count("registrations")
        log.info(
            "registered %s vip=%s (DC sees %s:%d%s)",
            self.config.fqdn,
            answer.vip,
            *answer.seen,
            ", behind NAT" if answer.behind_nat else "",
        )
        self._on_registered(answer)
        self.registered.set()

    async def _connect(self, addrs: AddressSet) -> ControlConnection:
        have = {4: bool(addrs.ipv4), 6: bool(addrs.ipv6)}
        candidates = [a for a in self.config.dc_addresses if have[ipaddress.ip_address(a).version]]
        if not candidates:
            raise ControlError("no local address of a family the DC has; waiting for one")
        errors = []
        for host in candidates:
            try:
                async with self.connect_slots or contextlib.nullcontext():
                    return await asyncio.wait_for(
                        connect_control(
                            host,
                            self.config.dc_port,
                            server_name=self.config.dc_server_name,
                            ca=self.config.ca,
                            cert=self.config.cert,
                            key=self.config.key,
                            handler=self._handle_push,
                        ),
                        REQUEST_TIMEOUT,
                    )
            except (TimeoutError, ControlError, OSError) as exc:
                errors.append(f"{host}: {str(exc) or type(exc).__name__}")
        raise ControlError("cannot reach the DC (" + "; ".join(errors) + ")")

    async def _stay_registered(self) -> None:
        """Refresh the registration before it lapses; re-register at once after a move."""
        while True:
            assert self.conn is not None and self.registration is not None
            refresh = max(self.registration.lifetime / 2, 5.0)
            closed = asyncio.ensure_future(self.conn.closed.wait())
            wake = asyncio.ensure_future(self._wake.wait())
            try:
                done, _ = await asyncio.wait(
                    {closed, wake}, timeout=refresh, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                closed.cancel()
                wake.cancel()
            if closed in done:
                raise ControlError("the DC closed the control connection")
            log.debug("stay_registered woke: closed=%s wake=%s", closed in done, wake in done)
            if wake in done:
                # A move: the old connection's source address may be gone; start afresh
                # so the DC sees where we are now. No polite close: it would wait out
                # QUIC's closing period toward an address we may no longer have.
                self._wake.clear()
                self._abandon_connection()
            await self._connect_and_register()

    def _abandon_connection(self) -> None:
        self.registered.clear()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()  # the DC replaces it when we register again

    async def _drop_connection(self) -> None:
        self.registered.clear()
        conn, self.conn = self.conn, None
        if conn is not None:
            # After a move the old path may be dead: never let a polite close hold us up.
            try:
                await asyncio.wait_for(conn.close(), CLOSE_BOUND)
            except Exception as exc:
                log.debug("closing the old control connection: %r", exc)
                conn.abort()

    async def _handle_push(self, conn: ControlConnection, payload: bytes) -> bytes:
        try:
            msg = decode(payload)
        except DecodeError as exc:
            self._count("bad_push")
            return encode(ErrorMessage(ErrorCode.BAD_MESSAGE, exc.detail[:500]))
        if not isinstance(msg, RouteDirection):
            return encode(ErrorMessage(ErrorCode.UNEXPECTED, f"{type(msg).__name__} not expected"))
        self._count("route_directions_pushed")
        return encode(await self._on_push(msg))

    async def request_direction(self, target: str, gateway: str = "") -> RouteDirection:
        """Ask for a path to `target`; `gateway` asks for one through that gateway of a
        multi-gateway service ("" lets the DC choose)."""
        request = DirectionRequest(source=self.config.fqdn, target=target, gateway=gateway)
        answer = await self._request(request, "direction")
        if not isinstance(answer, RouteDirection):
            raise DirectionError(f"unexpected answer {type(answer).__name__}")
        self._count("directions")
        return answer

    async def report(self, msg: GatewayReport) -> None:
        """Send a gateway's report to the DC; DirectionError if it is refused or unanswered."""
        answer = await self._request(msg, "report")
        if not (isinstance(answer, GatewayReportAck) and answer.gateway == msg.gateway):
            raise DirectionError(f"unexpected answer {type(answer).__name__} to a gateway report")
        self._count("reports")

    async def _request(self, msg: Message, what: str) -> Message:
        """One request on the registered connection; errors become DirectionError."""
        if not self.registered.is_set() or self.conn is None:
            raise DirectionError(f"not registered with the DC ({self.last_error or 'connecting'})")
        try:
            answer = decode(await self.conn.request(encode(msg), REQUEST_TIMEOUT))
        except (TimeoutError, ControlError, DecodeError) as exc:
            self._count(f"{what}_errors")
            raise DirectionError(f"DC did not answer: {exc or type(exc).__name__}") from exc
        if isinstance(answer, ErrorMessage):
            self._count(f"{what}_refused")
            raise DirectionError(answer.reason, answer.code)
        return answer
