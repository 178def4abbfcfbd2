"""HTTP limits of a real `udg serve` (service/http_server.py), over real sockets on 127.0.0.1.

The server serves a model repository with no version and an unreachable Redis: every limit acts before a
request reaches a model (the drill in loadtest/http_drill.py does the same), so it starts in about a second.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import httpx
import pytest

from loadtest import http_drill as drill
from loadtest.stack import stop
from service.local_redis import free_port

MB = 1 << 20
LIMITS = {"UDG_HTTP_HEADER_TIMEOUT_S": "1", "UDG_HTTP_BODY_TIMEOUT_S": "1.5", "UDG_HTTP_MAX_CONNECTIONS": "40",
          "UDG_HTTP_MAX_HEADER_BYTES": "16384", "UDG_HTTP_MAX_HEADERS": "50", "UDG_WORKERS": "1"}


@pytest.fixture(scope="module")
def server():
    port = free_port()
    process = drill.start_server(port, LIMITS)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, "udg serve exited"
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1).read()
            break
        except OSError:
            assert time.monotonic() < deadline, "not serving within 60 s"
            time.sleep(0.1)
    yield base, port, process
    stop(process, grace_s=10)


def _json_error(answer: bytes) -> dict:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    error = json.loads(body)
    assert set(error) == {"error", "message", "field", "details"}
    return error


GET = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def test_head_limits_431_and_memory_bounded(server):
    _, port, process = server
    status, answer, _ = drill.raw_exchange("127.0.0.1", port, GET + b"X-Ok: " + b"a" * 15_000 + b"\r\n\r\n")
    assert status == 200  # under the limit
    status, answer, _ = drill.raw_exchange("127.0.0.1", port, GET + b"X-Big: " + b"a" * 17_000 + b"\r\n\r\n")
    assert status == 431 and _json_error(answer)["error"] == "header_too_large"
    status, answer, _ = drill.raw_exchange("127.0.0.1", port, GET + b"".join(b"X-%d: 1\r\n" % i for i in range(60))
                                           + b"\r\n")
    assert status == 431 and "header fields" in _json_error(answer)["message"]
    status, answer, _ = drill.raw_exchange("127.0.0.1", port, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n")
    assert status == 431

    before = drill.rss_mb(process.pid)
    for _ in range(2):  # 64 MB header values: read no further than the limit (+ what is drained and dropped)
        status, _, _ = drill.raw_exchange("127.0.0.1", port, GET + b"X-Big: " + b"a" * (64 * MB) + b"\r\n\r\n")
        assert status in (431, None)
    assert drill.rss_mb(process.pid) - before < 40, (before, drill.rss_mb(process.pid))
    status, answer, _ = drill.raw_exchange("127.0.0.1", port, b"NOT HTTP\r\n\r\n")
    assert status == 400 and _json_error(answer)["error"] == "bad_http"


def test_slowloris_and_idle_connections_closed_within_the_timeout(server):
    _, port, _ = server
    closed = drill.slowloris("127.0.0.1", port, 30, interval_s=0.2, give_up_s=8)
    assert max(closed) < 1 + 1.0 and min(closed) > 0.8, closed
    closed = drill.idle_connections("127.0.0.1", port, 20, give_up_s=8)
    assert max(closed) < 1 + 1.0, closed
    status, seconds = drill.slow_body("127.0.0.1", port, interval_s=0.2, give_up_s=8)
    assert status == 408 and 1.2 < seconds < 1.5 + 1.0, (status, seconds)
    # a kept-alive connection: the next request's head gets the same timeout from its first byte
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(GET + b"\r\n")
        time.sleep(0.2)
        assert drill.parse_status(sock.recv(4096)) == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        started = time.monotonic()
        answer = drill.read_answer(sock, timeout=5)
        assert b"HTTP/1.1 408 " in answer and b'"header_timeout"' in answer and time.monotonic() - started < 2.0


@pytest.mark.parametrize("size", [MB + 1, 2 * MB, 8 * MB])
def test_oversized_body_answered_413_to_standard_clients(server, size):
    base, port, _ = server
    body = drill.json_body(size)
    request = urllib.request.Request(base + "/v1/score", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:  # urllib sends `Connection: close`
        urllib.request.urlopen(request, timeout=20)
    assert raised.value.code == 413 and json.loads(raised.value.read())["error"] == "body_too_large"
    with httpx.Client(base_url=base, timeout=20) as client:  # keep-alive: the connection survives the 413
        reply = client.post("/v1/score", content=body, headers={"Content-Type": "application/json"})
        assert reply.status_code == 413 and reply.json()["error"] == "body_too_large"
        assert client.get("/healthz").status_code == 200
        chunked = client.post("/v1/score", content=iter([body[:size // 2], body[size // 2:]]))  # no length
        assert chunked.status_code == 413 and chunked.json()["error"] == "body_too_large"
    assert drill.raw_post("127.0.0.1", port, "/v1/score", body) == "413 body_too_large"
    requests = pytest.importorskip("requests")
    reply = requests.post(base + "/v1/score", data=body, headers={"Content-Type": "application/json"}, timeout=20)
    assert reply.status_code == 413 and reply.json()["error"] == "body_too_large"


def test_connection_cap_answers_503_overloaded(server):
    _, port, _ = server
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
    try:
        time.sleep(0.2)
        status, answer, _ = drill.raw_exchange("127.0.0.1", port, GET + b"\r\n", timeout=5)
        assert status == 503 and _json_error(answer)["error"] == "overloaded"
        assert b"retry-after: 1" in answer.lower()
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    status, _, _ = drill.raw_exchange("127.0.0.1", port, GET + b"Connection: close\r\n\r\n", timeout=5)
    assert status == 200


def test_serve_help_documents_the_limits():
    from service.commands import SERVE_EPILOG
    from service.settings import Settings

    for name, field in Settings.model_fields.items():
        if name.startswith("http_"):
            value = f"{field.default:g}" if isinstance(field.default, float) else str(field.default)
            assert f"UDG_{name.upper()}={value} " in SERVE_EPILOG, name
