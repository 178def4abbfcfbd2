"""Logs of a real `udg serve`: JSON lines of a fixed shape, the X-Request-ID round trip into every line of
its request, the access log, and repeated failures rate-limited with exact counts through a real Redis
outage (the test's redis-server killed)."""

from __future__ import annotations

import json
import logging
import re
import time

import httpx
import pytest

from tests.serve_process import FAST_FOLLOW, serve_env, start_serve, stop, wait_until

SHAPE = {"ts", "level", "logger", "message", "version", "pid"}


def json_lines(path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    for line in parsed:
        assert set(line) >= SHAPE, line
        assert line["level"] in ("debug", "info", "warning", "error", "critical")
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", line["ts"]), line["ts"]
    return parsed


@pytest.mark.slow
def test_json_logs_request_id_and_rate_limited_redis_outage(published, redis_server, model_repo, artifact,
                                                            users, tmp_path):
    env = serve_env(redis_server.url, model_repo, tmp_path, **FAST_FOLLOW, UDG_LOG_FORMAT="json",
                    UDG_ACCESS_LOG="true", UDG_LOG_REPEAT_S="1.5")
    server, base, _, log_path = start_serve(env, tmp_path / "serve.log")
    user = str(users["user_ids"][0])
    items = list(artifact.schema.items.tokens[2:12])
    try:
        with httpx.Client(base_url=base, timeout=5) as http:
            # the id is taken from the request, returned, and in the request's access line
            reply = http.post("/v1/score", json={"user_id": user, "candidates": items},
                              headers={"X-Request-ID": "req-test.0001"})
            assert reply.status_code == 200 and reply.headers["x-request-id"] == "req-test.0001"
            generated = http.get("/healthz").headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{16}", generated)
            unsafe = http.get("/healthz", headers={"X-Request-ID": "a b\"c"}).headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{16}", unsafe)  # not a safe token: replaced, never echoed into logs
            error = http.post("/v1/score", json={"user_id": user, "candidates": [items[0], items[0]]},
                              headers={"X-Request-ID": "req-bad"})
            assert error.status_code == 422 and error.headers["x-request-id"] == "req-bad"

            # Redis down: every score request is a 503 and a failure line; they are rate-limited
            redis_server.process.kill()
            redis_server.process.wait()
            failures, started = 0, time.monotonic()
            while time.monotonic() - started < 4.0:
                reply = http.post("/v1/score", json={"user_id": user, "candidates": items})
                assert reply.status_code == 503 and reply.json()["error"] == "redis_unavailable"
                failures += 1
            redis_server.start()  # back, empty: the service reports the state lost (not our concern here)

            def flushed():  # the burst's last count is written once its window passed without a new line
                lines = [line for line in json_lines(log_path) if line.get("what") == "redis"]
                return lines if lines and "similar lines not logged" in lines[-1]["message"] else None

            redis_lines = wait_until(flushed, 10, "the rate-limited count flushed")
    finally:
        stop(server)

    lines = json_lines(log_path)
    access = {line["request_id"]: line for line in lines if line["logger"] == "udg.access"}
    assert access["req-test.0001"]["status"] == 200 and access["req-test.0001"]["path"] == "/v1/score"
    assert access["req-test.0001"]["method"] == "POST" and access["req-test.0001"]["duration_ms"] > 0
    assert access["req-bad"]["status"] == 422 and access[generated]["path"] == "/healthz"
    assert access[unsafe]["status"] == 200
    # one line per 1.5 s window, then the final count; logged failures + suppressed counts == failures, exactly
    assert failures >= 20
    assert 2 <= len(redis_lines) <= 4 + 1, [line["message"] for line in redis_lines]
    logged_failures = len(redis_lines) - 1  # the last line is the count alone
    assert logged_failures + sum(line.get("suppressed", 0) for line in redis_lines) == failures
    for line in redis_lines[:-1]:  # logged inside a score request: its id and the version serving it
        assert line["level"] == "warning" and re.fullmatch(r"[0-9a-f]{16}", line["request_id"])
        assert line["model_version"] == "v1" and "Redis fetch failed" in line["message"]
    assert all("suppressed" in line for line in redis_lines[1:])
    others = [line for line in lines if line["logger"] != "udg.access"]  # the access log has one per request
    assert len(others) < 40, [line["message"] for line in others]  # the outage did not print a line per request


def test_text_format_carries_the_request_id():
    from service.logs import REQUEST_ID, TextFormatter

    record = logging.LogRecord("udg.test", logging.WARNING, __file__, 1, "hello %s", ("there",), None)
    token = REQUEST_ID.set("abc123")
    try:
        text = TextFormatter().format(record)
    finally:
        REQUEST_ID.reset(token)
    assert text.endswith("WARNING udg.test [abc123]: hello there")


def test_auto_format_is_text_on_a_terminal_and_json_elsewhere(tmp_path):
    from service.logs import resolve_format

    class Terminal:
        def isatty(self):
            return True

    assert resolve_format("auto", Terminal()) == "text"
    with (tmp_path / "file").open("w") as not_a_terminal:
        assert resolve_format("auto", not_a_terminal) == "json"
    assert resolve_format("text", not_a_terminal) == "text"


def test_rate_limited_log_flushes_the_count_of_an_ended_burst(caplog):
    from service.ratelog import RateLimitedLog

    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t.flush"), every_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t.flush"):
        assert limited.warning("redis", "down: %s", 1)
        assert not limited.warning("redis", "down: %s", 2) and not limited.warning("redis", "down: %s", 3)
        assert limited.flush() == 0  # the window is still open: a new line may yet carry the count
        now[0] = 10.5
        assert limited.flush() == 1 and limited.flush() == 0
    records = caplog.records
    assert len(records) == 2 and records[1].suppressed == 2 and "the last: down: 3" in records[1].getMessage()


def test_request_id_on_a_500_and_every_answer_counted_by_bounded_route(client, users, caplog, monkeypatch):
    """In process: an unhandled bug's 500 still carries the request id (it is answered outside the layer),
    its traceback is logged once per window, and answers are counted under a bounded route label."""
    from service import errors

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    def count(route: str, status: int) -> float:  # the registry is per process: other tests count too
        found = re.search(rf'udg_http_responses_total{{route="{route}",status="{status}"}} (\S+)',
                          client.get("/metrics").text)
        return float(found.group(1)) if found else 0.0

    before = count("/v1/score", 500)
    monkeypatch.setattr(client.app.state.services.scorer, "score", broken)
    monkeypatch.setattr(errors.BUGS, "every_s", 60.0)
    body = {"user_id": str(users["user_ids"][0]), "candidates": ["1", "2"]}
    with caplog.at_level(logging.ERROR, "service.errors"):
        replies = [client.post("/v1/score", json=body, headers={"X-Request-ID": f"bug-{i}"}) for i in range(5)]
    assert [r.status_code for r in replies] == [500] * 5
    assert [r.headers["x-request-id"] for r in replies] == [f"bug-{i}" for i in range(5)]
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "a bug" in str(tracebacks[0].exc_info[1])
    assert client.get("/no/such/path").status_code == 404
    assert client.post("/v1/admin/versions/v1/load").status_code in (401, 403)
    assert count("/v1/score", 500) == before + 5 and count("other", 404) >= 1
    metrics = client.get("/metrics").text
    assert 'route="/v1/admin",status="40' in metrics and "/no/such/path" not in metrics
