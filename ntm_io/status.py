"""Daemon status over a unix socket: connect, read one JSON document, done.

No request is read, so `socat - UNIX-CONNECT:PATH` or `ntm status` both work and a
health check is just "did a JSON document arrive".
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

from ntm_io.config import ConfigError

log = logging.getLogger(__name__)

RUN_DIR = "/run/ntm"
SOCKET_MODE = 0o660
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL

StatusProvider = Callable[[], dict[str, Any]]


class StatusError(Exception):
    """No usable status from PATH; the message says why and what to try."""


def default_socket_path(role: str, name: str) -> str:
    """The documented default: /run/ntm/<role>-<name>.sock."""
    return os.path.join(RUN_DIR, f"{role}-{name}.sock")


def _check_path_len(path: str) -> None:
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ConfigError(
            f"status socket path {path} is longer than {_SUN_PATH_MAX} bytes; choose a shorter path"
        )


def _clear_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse to replace a live daemon's."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.debug("removed stale status socket %s", path)
        return
    except OSError:
        pass  # e.g. a full backlog: somebody is there
    finally:
        probe.close()
    raise ConfigError(
        f"another daemon already answers on {path}; stop it, or give this daemon "
        "another name or status socket"
    )


def _unlink_if_ours(path: str, ino: int) -> None:
    # Only remove the file we bound: a restarted daemon may own the path by now.
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == ino:
            os.unlink(path)


def _render(provider: StatusProvider, started: float) -> bytes:
    try:
        doc = dict(provider())
    except Exception as exc:  # a broken provider must not kill the status socket
        log.exception("status provider failed")
        doc = {"error": f"status provider failed: {exc}"}
    doc["pid"] = os.getpid()
    doc["uptime_s"] = round(time.monotonic() - started, 3)
    # default=str: addresses, paths, enums render readably rather than failing
    return json.dumps(doc, sort_keys=True, default=str).encode() + b"\n"


async def serve_status(
    path: str, provider: StatusProvider, *, started: float | None = None
) -> asyncio.Server:
    """Answer every connection on unix socket `path` with provider() + pid + uptime_s.

    `started` is the daemon's start (time.monotonic()); default: now. The socket file
    is removed at interpreter exit if it is still ours.
    """
    _check_path_len(path)
    t0 = time.monotonic() if started is None else started
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    _clear_stale(path)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(_render(provider, t0))
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client left early; nothing to do
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    server = await asyncio.start_unix_server(handle, path=path)
    os.chmod(path, SOCKET_MODE)
    atexit.register(_unlink_if_ours, path, os.lstat(path).st_ino)
    log.debug("status socket on %s", path)
    return server


def read_status(path: str, timeout: float = 2.0) -> dict[str, Any]:
    """Fetch one daemon's status (blocking client)."""
    hint = f"no daemon answers on {path}: is it running? (ntm status --socket {path})"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise StatusError(hint) from None
        except PermissionError:
            raise StatusError(
                f"permission denied on {path}: run as root or as a member of the socket's group"
            ) from None
        except OSError as exc:
            raise StatusError(f"{hint} ({exc.strerror or exc})") from None
        deadline = time.monotonic() + timeout
        chunks: list[bytes] = []
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise StatusError(
                    f"the daemon on {path} did not answer within {timeout:g} s"
                ) from None
            except OSError as exc:
                raise StatusError(f"{hint} ({exc.strerror or exc})") from None
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    data = b"".join(chunks)
    if not data:
        raise StatusError(f"{hint} (it closed the connection without a status)")
    try:
        doc = json.loads(data)
    except ValueError:
        raise StatusError(f"{path} answered with something that is not JSON") from None
    if not isinstance(doc, dict):
        raise StatusError(f"{path} answered with JSON that is not an object")
    return doc
