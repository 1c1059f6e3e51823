"""Socket settings shared by the UDP data planes (node tunnel engine, relay)."""

from __future__ import annotations

import contextlib
import socket

SOCKET_BUFFER = 4 * 1024 * 1024  # bursts of a busy tunnel must not overflow the queues

SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32  # Linux: bypass rmem_max/wmem_max (needs root)


def big_buffers(sock: socket.socket, size: int = SOCKET_BUFFER) -> None:
    """Large send/receive buffers: forced as root, best effort otherwise."""
    for opt, force in ((socket.SO_RCVBUF, SO_RCVBUFFORCE), (socket.SO_SNDBUF, SO_SNDBUFFORCE)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
