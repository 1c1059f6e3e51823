"""Daemon status over a unix socket: connect, read one JSON document, done.

No request is read, so `socat - UNIX-CONNECT:PATH` or `ntm status` both work and a
health check is just "did a JSON document arrive".

Admin requests (e.g. `ntm status --socket S --forget-paths FQDN`) go to a second socket
beside it, `admin_socket_path(S)`: the status socket answers before the client could say
anything, so a request there could not be told from a plain read without delaying every
status read. The admin socket is mode 0600 and also checks the peer's uid (root or the
daemon's own): one JSON line in, one JSON line out.
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
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

from ntm_io.config import ConfigError

log = logging.getLogger(__name__)

RUN_DIR = "/run/ntm"
SOCKET_MODE = 0o660
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL

StatusProvider = Callable[[], dict[str, Any]]
# An admin command: the request object in, a JSON-able result out; AdminError refuses it.
AdminHandler = Callable[[dict[str, Any]], dict[str, Any]]

ADMIN_SOCKET_MODE = 0o600
ADMIN_MAX_REQUEST = 64 * 1024
ADMIN_READ_TIMEOUT = 5.0  # s for the request line; the client sends it right away


class StatusError(Exception):
    """No usable status from PATH; the message says why and what to try."""


class AdminError(Exception):
    """An admin request was refused or failed; the message says why."""


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


# --- admin requests ----------------------------------------------------------------------


def admin_socket_path(status_path: str) -> str:
    """The admin socket beside a status socket: `x.sock` -> `x.admin` (not `*.sock`, so
    `ntm status --all` never takes it for a status socket)."""
    base = status_path[: -len(".sock")] if status_path.endswith(".sock") else status_path
    return base + ".admin"


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def admin_reply(handlers: Mapping[str, AdminHandler], line: bytes) -> dict[str, Any]:
    """The answer to one request line (pure apart from the handler it calls)."""
    try:
        request = json.loads(line)
    except ValueError:
        return {"ok": False, "error": 'the request is not JSON; send one line like {"command": …}'}
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        return {"ok": False, "error": 'the request needs "command" (a string) in a JSON object'}
    command = request["command"]
    handler = handlers.get(command)
    if handler is None:
        known = ", ".join(sorted(handlers)) or "none"
        return {"ok": False, "error": f"unknown command {command!r}; this daemon knows: {known}"}
    try:
        result = handler(request)
    except AdminError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # a broken handler must not kill the admin socket
        log.exception("admin command %s failed", command)
        return {"ok": False, "error": f"{command} failed: {type(exc).__name__}: {exc}"}
    return {"ok": True, "command": command, **result}


async def serve_admin(path: str, handlers: Mapping[str, AdminHandler]) -> asyncio.Server:
    """Answer one JSON request line per connection on `path` (mode 0600, root or our uid)."""
    _check_path_len(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    _clear_stale(path)
    allowed = {0, os.geteuid()}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = _peer_uid(writer)
            # Read the request even from a stranger: closing on unread data would reset the
            # connection, and the client would not learn why.
            line = b""
            reply: dict[str, Any]
            try:
                line = await asyncio.wait_for(reader.readline(), ADMIN_READ_TIMEOUT)
            except TimeoutError:
                reply = {"ok": False, "error": f"no request within {ADMIN_READ_TIMEOUT:g} s"}
            except ValueError:  # longer than the stream limit
                reply = {"ok": False, "error": f"request over {ADMIN_MAX_REQUEST} bytes"}
            else:
                reply = admin_reply(handlers, line) if uid in allowed else {}
            if uid not in allowed:
                reply = {"ok": False, "error": "permission denied: admin requests need root"}
                log.warning("admin request from uid %s refused", uid)
            else:
                log.info("admin request %r: %s", line[:200], reply)
            writer.write(json.dumps(reply, sort_keys=True, default=str).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client left early
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    server = await asyncio.start_unix_server(handle, path=path, limit=ADMIN_MAX_REQUEST)
    os.chmod(path, ADMIN_SOCKET_MODE)
    atexit.register(_unlink_if_ours, path, os.lstat(path).st_ino)
    log.debug("admin socket on %s", path)
    return server


def request_admin(path: str, command: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    """Send one admin request (blocking client); the result, or AdminError with the reason."""
    hint = f"no daemon takes admin requests on {path}: is it running?"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(json.dumps({**args, "command": command}).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            chunks: list[bytes] = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise AdminError(hint) from None
        except PermissionError:
            raise AdminError(f"permission denied on {path}: admin requests need root") from None
        except TimeoutError:
            raise AdminError(f"the daemon on {path} did not answer within {timeout:g} s") from None
        except OSError as exc:
            raise AdminError(f"{hint} ({exc.strerror or exc})") from None
    finally:
        sock.close()
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        raise AdminError(f"{path} answered with something that is not JSON") from None
    if not isinstance(reply, dict):
        raise AdminError(f"{path} answered with JSON that is not an object")
    if not reply.get("ok"):
        raise AdminError(str(reply.get("error") or "refused without a reason"))
    return reply
