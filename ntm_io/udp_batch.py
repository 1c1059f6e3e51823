"""Many UDP datagrams per syscall: GSO on send (UDP_SEGMENT), GRO on receive (UDP_GRO).

Python has no sendmmsg/recvmmsg, and a syscall per datagram is what bounds a userspace
tunnel here (docs/performance.md). Linux offers the next best thing for datagrams to one
destination: one `sendmsg` carrying a run of datagrams with a UDP_SEGMENT cmsg giving
their size (every one but the last exactly that size, the last no larger); the kernel cuts
it into separate datagrams on the wire, or hands it whole to a receiver that opted into
UDP_GRO, which gets the run back in one `recvmsg` with the size in a cmsg. The wire format
does not change: a peer without GRO gets ordinary datagrams.

`gso_runs` and `split_segments` are the pure halves (unit-tested); `BatchSender` and
`recv_segments` do the syscalls. A kernel or route that refuses GSO (EIO: no checksum
offload on the way out, EINVAL: a segment larger than the path MTU allows, ENOPROTOOPT /
EOPNOTSUPP: no UDP GSO at all) turns it off for that socket, counted once as
`tx_gso_disabled`; the run then goes out one `sendto` per datagram, as before.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

SOL_UDP = 17  # linux/udp.h (IPPROTO_UDP)
UDP_SEGMENT = 103
UDP_GRO = 104
# 64 is the kernel's UDP_MAX_SEGMENTS before Linux 6.x raised it; one IPv4 UDP datagram
# (the super-datagram) carries at most 65535 - 20 - 8 bytes of payload.
MAX_SEGMENTS = 64
MAX_GSO_BYTES = 65507
RECV_SIZE = 65535
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)  # the segment size arrives as an int
_GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP})


def gso_runs(
    sizes: Sequence[int], max_segments: int = MAX_SEGMENTS, max_bytes: int = MAX_GSO_BYTES
) -> list[tuple[int, int]]:
    """Cut datagrams (by size, in send order) into [start, end) runs one GSO send carries.

    A run's segment size is its first datagram's; every later one has that size except a
    shorter last one, which ends the run. Order is kept; a run of one is a plain send.
    """
    runs: list[tuple[int, int]] = []
    i, n = 0, len(sizes)
    while i < n:
        seg = total = sizes[i]
        j = i + 1
        limit = min(n, i + max_segments)
        while j < limit:
            size = sizes[j]
            if size > seg or total + size > max_bytes:
                break
            total += size
            j += 1
            if size != seg:
                break  # a shorter datagram can only be the last of a run
        runs.append((i, j))
        i = j
    return runs


def split_segments(data: bytes, segment: int) -> list[bytes]:
    """The datagrams of a GRO buffer: `segment`-byte pieces, the last possibly shorter."""
    n = len(data)
    if segment <= 0 or segment >= n:
        return [data]
    return [data[i : i + segment] for i in range(0, n, segment)]


def enable_gro(sock: socket.socket) -> bool:
    """Ask for coalesced receives on `sock`; False where the kernel has no UDP GRO."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def recv_segments(sock: socket.socket) -> tuple[bytes, int, Any]:
    """One `recvmsg`: (buffer, segment size or 0 for a single datagram, source address).

    Raises what `recvmsg` raises (BlockingIOError when drained)."""
    data, ancdata, _flags, addr = sock.recvmsg(RECV_SIZE, _GRO_CMSG_SPACE)
    segment = 0
    for level, kind, value in ancdata:
        if level == SOL_UDP and kind == UDP_GRO:
            segment = int.from_bytes(value[:4], sys.byteorder)  # a native int
    return data, segment, addr


class BatchSender:
    """Sends runs of datagrams to one address with as few syscalls as the kernel allows.

    `counters` is the owner's dict: tx_gso_sends, tx_gso_datagrams, tx_gso_disabled,
    tx_dropped_full (datagrams lost to a full socket buffer) and tx_errors.
    """

    def __init__(self, counters: dict[str, int], gso: bool = True) -> None:
        self.counters = counters
        self.gso = gso
        self._refused: set[int] = set()  # fds whose GSO the kernel turned down

    def forget(self, sock: socket.socket) -> None:
        """`sock` is being closed (its fd number may be reused)."""
        self._refused.discard(sock.fileno())

    def send(self, sock: socket.socket, datagrams: Sequence[bytes], addr: Any) -> None:
        """Send `datagrams` to `addr` in order; failures are counted, never raised."""
        n = len(datagrams)
        if n == 1 or not self.gso or sock.fileno() in self._refused:
            self._send_each(sock, datagrams, addr)
            return
        for start, end in gso_runs([len(d) for d in datagrams]):
            if end - start == 1:
                self._send_each(sock, datagrams[start:end], addr)
            else:
                self._send_run(sock, datagrams[start:end], addr)

    def _send_run(self, sock: socket.socket, run: Sequence[bytes], addr: Any) -> None:
        counters = self.counters
        cmsg = [(SOL_UDP, UDP_SEGMENT, len(run[0]).to_bytes(2, sys.byteorder))]
        try:
            sock.sendmsg(run, cmsg, 0, addr)
        except (BlockingIOError, InterruptedError):
            counters["tx_dropped_full"] = counters.get("tx_dropped_full", 0) + len(run)
            return
        except OSError as exc:
            if exc.errno not in _GSO_REFUSED:
                counters["tx_errors"] = counters.get("tx_errors", 0) + 1
                log.debug("send to %s failed: %s", addr, exc)
                return
            self._refused.add(sock.fileno())
            counters["tx_gso_disabled"] = counters.get("tx_gso_disabled", 0) + 1
            log.info("UDP GSO refused on %s (%s): one send per datagram", sock.getsockname(), exc)
            self._send_each(sock, run, addr)
            return
        counters["tx_gso_sends"] = counters.get("tx_gso_sends", 0) + 1
        counters["tx_gso_datagrams"] = counters.get("tx_gso_datagrams", 0) + len(run)

    def _send_each(self, sock: socket.socket, datagrams: Sequence[bytes], addr: Any) -> None:
        sendto = sock.sendto
        for data in datagrams:
            try:
                sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                self.counters["tx_dropped_full"] = self.counters.get("tx_dropped_full", 0) + 1
            except OSError as exc:
                self.counters["tx_errors"] = self.counters.get("tx_errors", 0) + 1
                log.debug("send to %s failed: %s", addr, exc)


__all__ = [
    "MAX_GSO_BYTES",
    "MAX_SEGMENTS",
    "UDP_GRO",
    "UDP_SEGMENT",
    "BatchSender",
    "enable_gro",
    "gso_runs",
    "recv_segments",
    "split_segments",
]
