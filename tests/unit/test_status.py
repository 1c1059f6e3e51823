"""Status socket server/client and `ntm status` (no root needed)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ntm_cli import status as cli_status
from ntm_cli.main import main
from ntm_io import status as st
from ntm_io.config import ConfigError
from ntm_io.log import add_log_level_argument, parse_level, setup_logging


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 107-byte AF_UNIX path limit
    d = tempfile.mkdtemp(prefix="ntm-st-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def serving(path: str, provider: Callable[[], dict[str, Any]]) -> Iterator[None]:
    """Run serve_status in a background loop so sync clients can be tested."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None
    error: list[BaseException] = []

    async def body() -> None:
        nonlocal stop
        stop = asyncio.Event()
        try:
            server = await st.serve_status(path, provider)
        except BaseException as exc:
            error.append(exc)
            ready.set()
            return
        ready.set()
        async with server:
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(body(),), daemon=True)
    thread.start()
    assert ready.wait(5), "status server did not start"
    if error:
        raise error[0]
    try:
        yield
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        loop.close()


def test_roundtrip_adds_pid_and_uptime(short_dir: Path) -> None:
    path = str(short_dir / "sub" / "node-mn1.sock")  # parent created on demand

    async def scenario() -> dict[str, Any]:
        server = await st.serve_status(path, lambda: {"role": "node", "paths": 2})
        async with server:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
            return await asyncio.to_thread(st.read_status, path)

    doc = asyncio.run(scenario())
    assert doc["role"] == "node" and doc["paths"] == 2
    assert doc["pid"] == os.getpid()
    assert isinstance(doc["uptime_s"], float) and doc["uptime_s"] >= 0


def test_each_connection_gets_a_fresh_document(short_dir: Path) -> None:
    path = str(short_dir / "dc.sock")
    counter = iter(range(100))

    async def scenario() -> list[dict[str, Any]]:
        server = await st.serve_status(path, lambda: {"n": next(counter)})
        async with server:
            return [await asyncio.to_thread(st.read_status, path) for _ in range(3)]

    assert [d["n"] for d in asyncio.run(scenario())] == [0, 1, 2]


def test_non_json_values_are_stringified_and_provider_errors_reported(short_dir: Path) -> None:
    path = str(short_dir / "x.sock")

    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with await st.serve_status(path, lambda: {"p": Path("/a")}):
            ok = await asyncio.to_thread(st.read_status, path)
        async with await st.serve_status(path, broken):
            bad = await asyncio.to_thread(st.read_status, path)
        return ok, bad

    logging.getLogger("ntm_io.status").disabled = True
    try:
        ok, bad = asyncio.run(scenario())
    finally:
        logging.getLogger("ntm_io.status").disabled = False
    assert ok["p"] == "/a"
    assert "boom" in bad["error"] and bad["pid"] == os.getpid()


def test_stale_socket_is_replaced(short_dir: Path) -> None:
    path = str(short_dir / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # bound but never listening: what a crashed daemon leaves behind
    dead.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)

    async def scenario() -> dict[str, Any]:
        async with await st.serve_status(path, lambda: {"fresh": True}):
            return await asyncio.to_thread(st.read_status, path)

    assert asyncio.run(scenario())["fresh"] is True


def test_live_socket_is_not_stolen(short_dir: Path) -> None:
    path = str(short_dir / "live.sock")

    async def scenario() -> None:
        async with await st.serve_status(path, dict):
            with pytest.raises(ConfigError, match="another daemon already answers"):
                await st.serve_status(path, dict)

    asyncio.run(scenario())


def test_regular_file_is_not_removed(short_dir: Path) -> None:
    path = short_dir / "precious.sock"
    path.write_text("keep me")

    async def scenario() -> None:
        await st.serve_status(str(path), dict)

    with pytest.raises(ConfigError, match="not a socket"):
        asyncio.run(scenario())
    assert path.read_text() == "keep me"


def test_too_long_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="longer than"):
        asyncio.run(st.serve_status("/tmp/" + "x" * 200 + ".sock", dict))


def test_read_status_when_nothing_listens(short_dir: Path) -> None:
    missing = str(short_dir / "none.sock")
    with pytest.raises(st.StatusError) as info:
        st.read_status(missing)
    assert str(info.value) == (
        f"no daemon answers on {missing}: is it running? (ntm status --socket {missing})"
    )
    # a socket file without a listener answers ECONNREFUSED: same message
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(missing)
    dead.close()
    with pytest.raises(st.StatusError, match="no daemon answers on"):
        st.read_status(missing)


def test_read_status_times_out_on_a_silent_listener(short_dir: Path) -> None:
    path = str(short_dir / "mute.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(path)
        mute.listen(1)  # accepts into the backlog, never writes
        with pytest.raises(st.StatusError, match="did not answer within"):
            st.read_status(path, timeout=0.2)


def test_default_socket_path() -> None:
    assert st.default_socket_path("node", "mn1") == "/run/ntm/node-mn1.sock"


# -- ntm status --------------------------------------------------------------------


def test_cli_socket_prints_sorted_json_and_exits_0(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(short_dir / "node-a.sock")
    with serving(path, lambda: {"zeta": 1, "alpha": {"b": 2, "a": 1}}):
        assert main(["status", "--socket", path]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert doc["zeta"] == 1 and doc["pid"] == os.getpid()
    assert out.index('"alpha"') < out.index('"pid"') < out.index('"zeta"')  # sorted
    assert '\n  "alpha"' in out  # pretty


def test_cli_socket_exits_1_when_nothing_answers(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(short_dir / "gone.sock")
    assert main(["status", "--socket", path]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"no daemon answers on {path}" in captured.err


def test_cli_all_lists_run_dir_and_lab_state(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = short_dir / "run-ntm"
    lab = short_dir / "lab"
    (lab / "run").mkdir(parents=True)
    monkeypatch.setattr(st, "RUN_DIR", str(run_dir))
    monkeypatch.setenv("NTM_LAB_STATE", str(lab))
    a = str(run_dir / "dc-dc1.sock")
    b = str(lab / "run" / "node-mn1.sock")
    with serving(a, lambda: {"who": "dc1"}), serving(b, lambda: {"who": "mn1"}):
        assert cli_status.discover_sockets() == sorted([a, b])
        assert main(["status", "--all"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert {p: d["who"] for p, d in doc.items()} == {a: "dc1", b: "mn1"}
        assert main(["status"]) == 0  # no flag means --all
        capsys.readouterr()

    # both daemons gone, their socket files left behind (Python 3.11 servers do not
    # unlink on close; atexit does): unhealthy
    for p in (a, b):
        assert stat.S_ISSOCK(os.lstat(p).st_mode)
    assert main(["status", "--all"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert "no daemon answers on" in doc[a]["error"]
    assert "2 of 2" in captured.err


def test_cli_all_with_no_sockets_exits_1(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(st, "RUN_DIR", str(short_dir / "empty"))
    monkeypatch.delenv("NTM_LAB_STATE", raising=False)
    assert main(["status", "--all"]) == 1
    assert "no daemon status sockets" in capsys.readouterr().err


def test_cli_socket_and_all_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["status", "--socket", "/x.sock", "--all"])
    assert info.value.code == 2
    capsys.readouterr()


# -- logging -----------------------------------------------------------------------


def test_setup_logging_one_line_format() -> None:
    buf = io.StringIO()
    logger = setup_logging("debug", "node-mn1", stream=buf)
    try:
        logging.getLogger("ntm_node.tunnel").debug("path %s up", "198.51.100.30")
        logger.info("%d%% ready", 100)
        setup_logging("warning", "node-mn1", stream=buf)  # replaces, never duplicates
        logging.getLogger("x").warning("once")
    finally:
        root = logging.getLogger()
        for h in root.handlers[:]:
            if getattr(h, "_ntm_handler", False):
                root.removeHandler(h)
        root.setLevel(logging.WARNING)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith(" node-mn1 DEBUG ntm_node.tunnel: path 198.51.100.30 up")
    assert lines[1].endswith(" node-mn1 INFO node-mn1: 100% ready")
    assert lines[2].endswith(" node-mn1 WARNING x: once")
    assert lines[0][2] == ":" and lines[0][8] == "."  # HH:MM:SS.mmm


def test_log_levels() -> None:
    assert parse_level("INFO") == logging.INFO
    assert parse_level("warn") == logging.WARNING
    with pytest.raises(ConfigError, match="use one of debug, info, warning, error"):
        parse_level("loud")
    import argparse

    p = argparse.ArgumentParser()
    add_log_level_argument(p)
    assert p.parse_args([]).log_level == "info"
    assert p.parse_args(["--log-level", "DEBUG"]).log_level == "debug"
