"""HTTP limits of a real `udg serve` (service/http_server.py), over real sockets on 127.0.0.1.

The server serves a model repository with no version and an unreachable Redis: every limit acts before a
request reaches a model (the drill in loadtest/http_drill.py does the same), so it starts in about a second.
It logs JSON to a file, every line (no rate limit), so the answers the HTTP layer gives can be matched to
their log lines by request id.
"""

from __future__ import annotations

import ast
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest

from loadtest import http_drill as drill
from tests.serve_process import start_serve, stop, wait_until

MB = 1 << 20
LIMITS = {"UDG_HTTP_HEADER_TIMEOUT_S": "1", "UDG_HTTP_BODY_TIMEOUT_S": "1.5", "UDG_HTTP_MAX_CONNECTIONS": "40",
          "UDG_HTTP_MAX_HEADER_BYTES": "16384", "UDG_HTTP_MAX_HEADERS": "50", "UDG_WORKERS": "1"}
LOGS = {"UDG_LOG_FORMAT": "json", "UDG_LOG_LEVEL": "info", "UDG_LOG_REPEAT_S": "0.001"}  # see REPEAT_PAUSE_S
REPEAT_PAUSE_S = 0.01  # between two answers of one kind whose lines a test reads: longer than UDG_LOG_REPEAT_S


@pytest.fixture(scope="module")
def log_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("http-limits") / "serve.log"


@pytest.fixture(scope="module")
def server(log_path):
    served = start_serve(drill.server_env({**LIMITS, **LOGS}), log_path, ready_path="/healthz")  # no Redis: never ready
    yield served.base, served.port, served.process
    stop(served.process, grace_s=10)


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
        assert drill.parse_status(sock.recv(4096)) == 200  # blocks until the answer
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
        # the server counts a connection once it has accepted it: until all 40 are, a new one may still pass
        status, answer, _ = wait_until(lambda: overloaded(port), 10, "503 with 40 connections held")
        assert status == 503 and _json_error(answer)["error"] == "overloaded"
        assert b"retry-after: 1" in answer.lower()
        assert len(_request_id(answer) or "") == 16  # answered in place of the app: the HTTP layer's own id
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: drill.raw_exchange("127.0.0.1", port, GET + b"Connection: close\r\n\r\n", timeout=5)[0]
               == 200, 10, "200 once the held connections are closed")


def overloaded(port: int):
    """The exchange of one request on a new connection if it was answered 503, else None."""
    exchange = drill.raw_exchange("127.0.0.1", port, GET + b"Connection: close\r\n\r\n", timeout=5)
    return exchange if exchange[0] == 503 else None


def _request_id(answer: bytes) -> str | None:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-request-id":
            return value.strip().decode()
    return None


def _logged(log_path: Path, request_id: str, timeout_s: float = 5.0) -> dict:
    """The udg.http JSON line carrying `request_id` (the server writes it as it answers)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for line in log_path.read_text().splitlines():
            if line.startswith("{") and f'"{request_id}"' in line:
                record = json.loads(line)
                if record.get("request_id") == request_id and record["logger"] == "udg.http":
                    return record
        assert time.monotonic() < deadline, f"no udg.http line with request_id {request_id}"
        time.sleep(0.05)


def test_http_layer_answers_carry_the_request_id_and_log_it(server, log_path):
    """431 and 408 are answered before the app (which sets X-Request-ID) runs: the HTTP layer gives them the
    request's own id when it sent a sane one before the limit hit, else a generated one, and logs each."""
    _, port, _ = server
    big = b"X-Big: " + b"a" * 17_000 + b"\r\n"
    cases = {  # how the head goes -> the id the client sent (None: none, or not a sane token)
        "431 given": (GET + b"X-Request-ID: drill-431.a:1\r\n" + big + b"\r\n", "drill-431.a:1"),
        "431 none": (GET + big + b"\r\n", None),
        "431 unsafe": (GET + b'X-Request-ID: "bad" id\r\n' + big + b"\r\n", None),
        "431 fields": (GET + b"X-Request-ID: drill-431-fields\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(60))
                       + b"\r\n", "drill-431-fields"),
    }
    for case, (head, given) in cases.items():
        time.sleep(REPEAT_PAUSE_S)
        status, answer, _ = drill.raw_exchange("127.0.0.1", port, head)
        returned = _request_id(answer)
        assert status == 431 and returned, (case, answer[:300])
        if given:
            assert returned == given, case
        else:
            assert len(returned) == 16 and int(returned, 16) >= 0, (case, returned)
        record = _logged(log_path, returned)
        assert record["status"] == 431 and record["what"] == "header_too_large" and record["level"] == "info", record

    # 408, head not received in time: the id of a field already received is kept
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(GET + b"X-Request-ID: drill-408-head\r\nX-Slow: ")
        answer = drill.read_answer(sock, timeout=5)
    assert drill.parse_status(answer) == 408 and _request_id(answer) == "drill-408-head"
    assert _logged(log_path, "drill-408-head")["what"] == "header_timeout"

    # 408, body not received in time: the id the app had given the request (its own here, else generated)
    for given in (b"drill-408-body", None):
        time.sleep(REPEAT_PAUSE_S)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(drill.post_head("/v1/score", 1000, extra=b"X-Request-ID: %s\r\n" % given if given else b"")
                         + b'{"user_id"')
            answer = drill.read_answer(sock, timeout=5)
        returned = _request_id(answer)
        assert drill.parse_status(answer) == 408 and b'"body_timeout"' in answer, answer[:300]
        assert returned == (given.decode() if given else returned) and len(returned) >= 1
        if not given:
            assert len(returned) == 16, returned
        record = _logged(log_path, returned)
        assert record["status"] == 408 and record["what"] == "body_timeout", record


def test_the_http_layer_loads_no_metrics_in_the_supervisor():
    """`udg serve` imports the protocol in the supervisor before the workers start; a metric made there would be
    one more process in the multiprocess scrape (a udg_ready of 0 that no worker owns)."""
    import subprocess
    import sys

    code = "import sys, service.http_server; print(sorted(m for m in sys.modules if m in {'service.metrics', " \
           "'prometheus_client', 'service.request_context'}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_serve_help_documents_the_limits():
    from service.commands import SERVE_EPILOG
    from service.settings import Settings

    for name, field in Settings.model_fields.items():
        if name.startswith("http_"):
            value = f"{field.default:g}" if isinstance(field.default, float) else str(field.default)
            assert f"UDG_{name.upper()}={value} " in SERVE_EPILOG, name


def test_the_drill_prints_every_check_with_the_expected_outcome(server, monkeypatch, capsys):
    """loadtest/http_drill.py's table, run against this server (its limits given as the drill reads them)."""
    base, _, process = server
    for name, value in LIMITS.items():
        monkeypatch.setenv(name, value)
    assert drill.main(["--url", base, "--pid", str(process.pid)]) == 0
    rows = {row[0]: row[1] for row in (line.strip("|").split(" | ") for line in capsys.readouterr().out.splitlines()
                                       if line.startswith("| ") and not line.startswith("| check"))}
    rows = {check.strip(): result.strip() for check, result in rows.items()}
    assert rows["header of 40 KB (raw socket)"] == rows["150 header fields (raw socket)"] == "431"
    assert rows["header of 32 MB (raw socket)"].split()[0] in ("431", "None")  # answered or reset
    statuses, memory = rows["4 concurrent headers of 128 MB"].split("; worker RSS ")
    assert set(ast.literal_eval(statuses)) <= {431, None}
    before, after = (float(v.split()[0]) for v in memory.split(" -> "))
    assert after - before < 40  # bounded: the heads are never buffered whole
    for check in ("100 slowloris connections (1 header byte / 0.5 s)", "50 idle connections (no byte sent)"):
        low, high = (float(v) for v in rows[check].removeprefix("all closed after ").removesuffix(" s").split("-"))
        assert 0.8 < low <= high < 1 + 1.5, (check, rows[check])  # UDG_HTTP_HEADER_TIMEOUT_S=1
    status, seconds = rows["slow body (1 byte / 0.5 s)"].split(" after ")
    assert status == "408" and 1.2 < float(seconds.removesuffix(" s")) < 1.5 + 1.5
    for mb in (1, 2, 8, 32):
        answers = rows[f"body {mb} MiB + 1 B: urllib / httpx / requests / raw socket"].split(" / ")
        assert len(answers) == 4 and all(a == "413 body_too_large" or "reset" in a.lower() or "pipe" in a.lower()
                                         for a in answers), answers
    held = next(check for check in rows if check.endswith("open connections + 5 requests on new ones"))
    assert held.startswith("40 ") and 503 in ast.literal_eval(rows[held])
