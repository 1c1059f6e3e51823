"""asyncio glue for the Relay Server: UDP sockets, the QUIC control server, status.

Every decision lives in `relay.core.RelayCore`; this module moves bytes. One UDP socket per
`[relay] listen` address (IPv6 ones are V6ONLY, so every address is seen in its own family
and an IPv4 end and an IPv6 end meet through two sockets of the same RS). Each wake-up
drains the readable socket until EAGAIN (at most MAX_BATCH datagrams, so one busy socket
cannot starve the others or the control plane), and the sockets get large buffers: a
userspace relay is bound by syscalls and the interpreter. Python has no recvmmsg or
sendmmsg; the sockets use UDP GRO instead, so a burst from one end arrives in one read, and
its datagrams for the same destination leave in one GSO send (`ntm_io.udp_batch`), in
order and as soon as the read is handled (no waiting for more).

Control: QUIC with mutual TLS (`ntm_io.control`), one RelayDirection per stream, answered
with a RelayDirectionAck or an ErrorMessage. Only a peer whose certificate role is `dc`
may direct the relay; any other role is answered NOT_AUTHORIZED and counted
(`control_refused_role`). The DC connects as the client, verifies the relay's certificate
for the relay's DNS name, and should check `conn.peer_role == "relay"`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from typing import Any

from ntm_io.config import ConfigError
from ntm_io.control import ControlConnection, ControlServer, serve_control
from ntm_io.daemon import serve_until_signalled
from ntm_io.sockets import big_buffers
from ntm_io.status import serve_status
from ntm_io.udp_batch import BatchSender, enable_gro, recv_segments, split_segments
from ntm_proto.errors import DecodeError
from ntm_proto.messages import (
    Endpoint,
    ErrorCode,
    ErrorMessage,
    RelayDirection,
    decode,
    encode,
)

from .config import RelayConfig
from .core import Binding, RelayCore

log = logging.getLogger("ntm.relay")

MAX_BATCH = 256  # datagrams per wake-up before yielding to other sockets and timers
MAX_DATAGRAM = 65535


class RelayServer:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.core = RelayCore(config.settings, self.started)
        self.counters: dict[str, int] = dict.fromkeys(
            ("udp_errors", "tx_errors", "tx_dropped_full", "control_refused_role"), 0
        )
        self._socks: list[socket.socket] = []  # index = the core's `via`
        self._sender = BatchSender(self.counters)
        self._control: list[ControlServer] = []
        self._status: asyncio.Server | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self._loop = loop = asyncio.get_running_loop()
        try:
            for host in cfg.listen:
                sock = _open_udp(host, cfg.port)
                via = len(self._socks)
                self._socks.append(sock)
                loop.add_reader(sock.fileno(), self._on_readable, via)
            for host in cfg.control_listen:
                self._control.append(
                    await serve_control(
                        host,
                        cfg.control_port,
                        ca=cfg.tls.ca,
                        cert=cfg.tls.cert,
                        key=cfg.tls.key,
                        handler=self.handle_control,
                    )
                )
            if cfg.status_socket:
                self._status = await serve_status(
                    cfg.status_socket, self.status, started=self.started
                )
        except BaseException:
            await self.close()
            raise
        log.info(
            "relay %s forwarding on %s, control on %s",
            cfg.name,
            ", ".join(_fmt(a) for a in self.addresses),
            ", ".join(_fmt(a) for a in self.control_addresses),
        )

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sock in self._socks:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            self._sender.forget(sock)
            sock.close()
        self._socks.clear()
        for server in self._control:
            server.close()
        for server in self._control:
            await server.wait_closed()
        self._control.clear()
        if self._status is not None:
            self._status.close()
            await self._status.wait_closed()
            self._status = None

    @property
    def addresses(self) -> list[Endpoint]:
        """The bound (address, port) of every tunnel socket, in `via` order."""
        return [_endpoint(s.getsockname()) for s in self._socks]

    @property
    def control_addresses(self) -> list[Endpoint]:
        return [s.address for s in self._control]

    # --- data plane ----------------------------------------------------------------------

    def _on_readable(self, via: int) -> None:
        sock = self._socks[via]
        now = time.monotonic()
        receive = self.core.receive_datagram
        budget = MAX_BATCH
        while budget > 0:
            try:
                buf, segment, addr = recv_segments(sock)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. an ICMP error surfaced on the socket
                self.counters["udp_errors"] += 1
                log.debug("udp receive error on %s: %s", _fmt(self.addresses[via]), exc)
                budget -= 1
                continue
            src: Endpoint = (addr[0], addr[1])
            datagrams = split_segments(buf, segment) if segment else (buf,)
            budget -= len(datagrams)
            # A coalesced read is a run from one source, mostly of one path: forward the
            # datagrams that go to the same place together (one GSO send), in order.
            run: list[bytes] = []
            run_to: Binding | None = None
            for data in datagrams:
                dst = receive(data, src, now, via)
                if dst is not None:
                    if run and dst is not run_to:
                        self._forward(run, run_to)
                        run = []
                    run.append(data)
                    run_to = dst
                    continue
                if run:
                    self._forward(run, run_to)
                    run = []
                # a BIND (ACK, released queue) or a drop; forwards keep their order
                for out, to, out_via in self.core.datagrams_to_send():
                    self._send(out, to, out_via)
            if run:
                self._forward(run, run_to)
        self._arm_timer()

    def _forward(self, datagrams: list[bytes], dst: Binding | None) -> None:
        if dst is None or dst.address is None:
            return
        try:
            sock = self._socks[dst.via]
        except IndexError:
            self.counters["tx_errors"] += 1
            return
        self._sender.send(sock, datagrams, dst.address)

    def _send(self, data: bytes, addr: Endpoint | None, via: int) -> None:
        if addr is None:
            return
        try:
            self._socks[via].sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.counters["tx_dropped_full"] += 1
        except (OSError, IndexError) as exc:
            self.counters["tx_errors"] += 1
            log.debug("send to %s failed: %s", _fmt(addr), exc)

    # --- timers --------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        when = self.core.get_timer()
        if when is None or when >= self._timer_at or self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_later(max(0.0, when - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        before = self.core.active_paths
        self.core.handle_timer(time.monotonic())
        if self.core.active_paths != before:
            log.debug("expired %d path(s)", before - self.core.active_paths)
        self._arm_timer()

    # --- control plane -------------------------------------------------------------------

    async def handle_control(self, conn: ControlConnection, payload: bytes) -> bytes:
        """One request from a control peer: a RelayDirection from a DC, or a refusal."""
        if conn.peer_role != "dc":
            self.counters["control_refused_role"] += 1
            log.warning(
                "refused a request from %r: certificate role %s, only dc may direct a relay",
                conn,
                conn.peer_role,
            )
            return encode(
                ErrorMessage(
                    ErrorCode.NOT_AUTHORIZED,
                    "only a DC (certificate role dc) may send Relay Directions",
                )
            )
        try:
            msg = decode(payload)
        except DecodeError as exc:
            self._count(f"control_bad_{exc.reason}")
            return encode(ErrorMessage(ErrorCode.BAD_MESSAGE, exc.detail[:500]))
        if not isinstance(msg, RelayDirection):
            self._count("control_unexpected")
            return encode(
                ErrorMessage(ErrorCode.UNEXPECTED, f"{type(msg).__name__} is not for a relay")
            )
        owner = ",".join(sorted(conn.peer_names)) or "dc"
        answer = self.core.handle_direction(msg, owner, time.monotonic())
        if isinstance(answer, ErrorMessage):
            log.warning(
                "path %s: direction from %s refused: %s", msg.path_id.hex(), owner, answer.reason
            )
        else:
            log.info(
                "path %s: direction from %s, lifetime %d s (%d paths, load %d‰)",
                msg.path_id.hex(),
                owner,
                msg.lifetime,
                answer.active_paths,
                answer.load,
            )
        self._arm_timer()
        return encode(answer)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    # --- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        doc = self.core.status(now)
        doc["counters"] = {**doc["counters"], **self.counters}
        for server in self._control:
            for key, n in server.counters.items():
                doc["counters"][f"control_{key}"] = doc["counters"].get(f"control_{key}", 0) + n
        return {
            "role": "relay",
            "name": self.config.name,
            "listen": [list(a) for a in self.addresses],
            "control": [list(a) for a in self.control_addresses],
            **doc,
        }


def _open_udp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        big_buffers(sock)
        enable_gro(sock)
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on [{host}]:{port}/udp: {exc.strerror}; check [relay] listen and "
            "port (is another relay running, or the address not on this host?)"
        ) from None
    return sock


def _endpoint(addr: Any) -> Endpoint:
    return (str(addr[0]), int(addr[1]))


def _fmt(addr: Endpoint) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run(config: RelayConfig) -> None:
    await serve_until_signalled(RelayServer(config))


__all__ = ["RelayServer", "run"]
