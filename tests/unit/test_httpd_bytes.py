"""`ntm lab httpd` GET /bytes?n=N: deterministic bytes for byte-exact transfer checks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.client import HTTPConnection

import pytest

from lab.httpd import MAX_BYTES, DualStackServer, bytes_wanted, make_handler, pattern


@pytest.fixture
def httpd() -> Iterator[int]:
    server = DualStackServer(("::", 0), make_handler("unit"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_pattern_is_one_stream_whatever_the_slicing() -> None:
    whole = pattern(0, 1000)
    assert len(whole) == 1000
    assert pattern(0, 333) + pattern(333, 1) + pattern(334, 666) == whole
    assert pattern(17, 100) == whole[17:117]
    assert pattern(5, 0) == b""
    # no repeats at any block distance a shifted or duplicated segment would show
    blocks = {whole[i : i + 32] for i in range(0, 992, 32)}
    assert len(blocks) == 31


@pytest.mark.parametrize(
    ("path", "wanted"),
    [
        ("/bytes?n=10", 10),
        ("/bytes?n=0", 0),
        ("/bytes", -1),
        ("/bytes?n=-1", -1),
        ("/bytes?n=abc", -1),
        ("/bytes?n=1&n=2", -1),
        (f"/bytes?n={MAX_BYTES + 1}", -1),
        ("/whoami", None),
        ("/bytesx?n=1", None),
    ],
)
def test_bytes_wanted(path: str, wanted: int | None) -> None:
    assert bytes_wanted(path) == wanted


def test_bytes_then_whoami_on_one_kept_alive_connection(httpd: int) -> None:
    conn = HTTPConnection("127.0.0.1", httpd, timeout=5)
    conn.request("GET", "/bytes?n=100000")
    reply = conn.getresponse()
    assert (reply.status, reply.getheader("X-Server")) == (200, "unit")
    assert reply.getheader("Content-Length") == "100000"
    assert reply.read() == pattern(0, 100000)
    conn.request("HEAD", "/bytes?n=7")
    head = conn.getresponse()
    assert (head.status, head.getheader("Content-Length"), head.read()) == (200, "7", b"")
    conn.request("GET", "/whoami")
    assert conn.getresponse().read() == b"server=unit client=127.0.0.1\n"
    conn.close()


def test_bad_count_is_a_400_that_says_how(httpd: int) -> None:
    conn = HTTPConnection("127.0.0.1", httpd, timeout=5)
    conn.request("GET", "/bytes?n=lots")
    reply = conn.getresponse()
    assert reply.status == 400
    assert b"/bytes?n=N" in reply.read()
    conn.close()
