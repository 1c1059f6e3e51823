"""Admin requests beside the status socket (`ntm status --forget-paths`), and the node's
`forget-paths` command. No lab; the root-only check forks a child as `nobody` when run as
root."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ntm_cli.main import main
from ntm_io import status as st
from ntm_node.daemon import NodeDaemon


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 107-byte AF_UNIX path limit
    d = tempfile.mkdtemp(prefix="ntm-adm-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def admin_serving(path: str, handlers: Mapping[str, st.AdminHandler]) -> Iterator[None]:
    """serve_admin in a background loop, so the blocking client can be tested."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None
    error: list[BaseException] = []

    async def body() -> None:
        nonlocal stop
        stop = asyncio.Event()
        try:
            server = await st.serve_admin(path, handlers)
        except BaseException as exc:
            error.append(exc)
            ready.set()
            return
        ready.set()
        async with server:
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(body(),), daemon=True)
    thread.start()
    assert ready.wait(5), "admin server did not start"
    if error:
        raise error[0]
    try:
        yield
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        loop.close()


def raw_request(path: str, payload: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


def echo(request: dict[str, Any]) -> dict[str, Any]:
    return {"seen": request.get("fqdn")}


def test_admin_socket_sits_beside_the_status_socket_and_is_no_status_socket() -> None:
    assert st.admin_socket_path("/run/ntm/node-mn1.sock") == "/run/ntm/node-mn1.admin"
    assert st.admin_socket_path("/tmp/x/status") == "/tmp/x/status.admin"
    assert not st.admin_socket_path("/run/ntm/node-mn1.sock").endswith(".sock")  # --all glob


def test_request_round_trip_and_socket_is_owner_only(short_dir: Path) -> None:
    path = str(short_dir / "run" / "mn1.admin")
    with admin_serving(path, {"forget-paths": echo}):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        reply = st.request_admin(path, "forget-paths", fqdn="cn2.ntm.example.com")
    assert reply == {"ok": True, "command": "forget-paths", "seen": "cn2.ntm.example.com"}


def test_unknown_command_is_refused_with_the_known_ones(short_dir: Path) -> None:
    path = str(short_dir / "mn1.admin")
    with (
        admin_serving(path, {"forget-paths": echo}),
        pytest.raises(st.AdminError, match=r"unknown command 'reboot'.*forget-paths"),
    ):
        st.request_admin(path, "reboot")


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", '"command"'),
        (b'{"command": 7}\n', '"command"'),
        (b"", "not JSON"),  # the client closed without a request
        (b'{"command": "' + b"x" * (70 * 1024) + b'"}\n', "request over"),
    ],
)
def test_malformed_requests_get_an_error_and_the_socket_keeps_serving(
    short_dir: Path, payload: bytes, error: str
) -> None:
    path = str(short_dir / "mn1.admin")
    with admin_serving(path, {"forget-paths": echo}):
        reply = raw_request(path, payload)
        assert reply["ok"] is False and error in reply["error"]
        assert st.request_admin(path, "forget-paths", fqdn="a")["seen"] == "a"


def test_handler_errors_become_replies(short_dir: Path) -> None:
    def refuse(_request: dict[str, Any]) -> dict[str, Any]:
        raise st.AdminError("no such thing")

    def broken(_request: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("bug")

    path = str(short_dir / "mn1.admin")
    with admin_serving(path, {"refuse": refuse, "broken": broken, "ok": echo}):
        with pytest.raises(st.AdminError, match="no such thing"):
            st.request_admin(path, "refuse")
        with pytest.raises(st.AdminError, match="broken failed: RuntimeError: bug"):
            st.request_admin(path, "broken")
        assert st.request_admin(path, "ok")["ok"] is True


def test_a_peer_with_another_uid_is_refused(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Besides the file mode: SO_PEERCRED must name root or the daemon's own uid."""
    calls: list[str] = []

    def handler(_request: dict[str, Any]) -> dict[str, Any]:
        calls.append("ran")
        return {}

    monkeypatch.setattr(st, "_peer_uid", lambda _writer: 4242)
    path = str(short_dir / "mn1.admin")
    with (
        admin_serving(path, {"forget-paths": handler}),
        pytest.raises(st.AdminError, match="permission denied"),
    ):
        st.request_admin(path, "forget-paths", fqdn="x")
    assert calls == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_the_socket_file_refuses_an_unprivileged_user(short_dir: Path) -> None:
    os.chmod(short_dir, 0o755)  # let `nobody` reach the socket file itself
    path = str(short_dir / "mn1.admin")
    with admin_serving(path, {"forget-paths": echo}):
        pid = os.fork()
        if pid == 0:  # child: drop to nobody and try
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                st.request_admin(path, "forget-paths", fqdn="x")
                code = 0
            except st.AdminError as exc:
                code = 1 if "permission denied" in str(exc) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1


def test_cli_forget_paths(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--forget-paths", "cn2.ntm.example.com"]) == 1
    assert "--forget-paths needs --socket" in capsys.readouterr().err
    status_path = str(short_dir / "mn1.sock")
    with admin_serving(st.admin_socket_path(status_path), {"forget-paths": echo}):
        rc = main(["status", "--socket", status_path, "--forget-paths", "cn2.ntm.example.com"])
        out = capsys.readouterr().out
    assert rc == 0
    assert json.loads(out)["seen"] == "cn2.ntm.example.com"
    rc = main(["status", "--socket", status_path, "--forget-paths", "x"])  # nobody there now
    assert rc == 1
    assert "no daemon takes admin requests" in capsys.readouterr().err


# --- the node's command --------------------------------------------------------------------


@dataclass
class FakeRd:
    peer_fqdn: str


@dataclass
class FakePath:
    path_id: bytes


@dataclass
class FakeEndpoint:
    paths: list[FakePath]


@dataclass
class FakeEngine:
    rds: dict[bytes, FakeRd]
    removed: list[bytes] = field(default_factory=list)

    @property
    def endpoint(self) -> FakeEndpoint:
        return FakeEndpoint([FakePath(p) for p in self.rds if p not in self.removed])

    def route_direction(self, path_id: bytes) -> FakeRd | None:
        return self.rds.get(path_id)

    def remove_path(self, path_id: bytes) -> None:
        self.removed.append(path_id)


@dataclass
class FakeNode:
    engine: FakeEngine


def test_node_forgets_only_the_paths_to_that_peer() -> None:
    engine = FakeEngine(
        {
            b"\x01" * 8: FakeRd("cn2.ntm.example.com"),
            b"\x02" * 8: FakeRd("cn1.ntm.example.com"),
            b"\x03" * 8: FakeRd("cn2.ntm.example.com"),
        }
    )
    node: Any = FakeNode(engine)
    reply = NodeDaemon.forget_paths(
        node, {"command": "forget-paths", "fqdn": "CN2.ntm.example.com."}
    )
    assert reply == {"fqdn": "cn2.ntm.example.com", "removed": ["01" * 8, "03" * 8]}
    assert engine.removed == [b"\x01" * 8, b"\x03" * 8]
    again = NodeDaemon.forget_paths(
        node, {"command": "forget-paths", "fqdn": "cn2.ntm.example.com"}
    )
    assert again["removed"] == []


@pytest.mark.parametrize("fqdn", [None, "", ".", 5])
def test_node_refuses_forget_paths_without_a_name(fqdn: object) -> None:
    node: Any = FakeNode(FakeEngine({}))
    with pytest.raises(st.AdminError, match='needs "fqdn"'):
        NodeDaemon.forget_paths(node, {"command": "forget-paths", "fqdn": fqdn})
