"""OpenTelemetry traces: the score request's spans through the SDK's in-memory exporter (in process), a real
OTLP/HTTP export from `udg serve` to an in-process collector, and tracing off loads neither the SDK nor an exporter."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading

import httpx
import pytest

from tests.serve_process import FAST_FOLLOW, ROOT, serve_env, start_serve, stop, wait_until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
STAGES = {"parse", "redis", "encode", "model", "respond"}


@pytest.fixture
def memory_spans():
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service import tracing

    exporter = InMemorySpanExporter()
    tracing.configure(processor=SimpleSpanProcessor(exporter))
    yield exporter
    tracing.shutdown()


def test_score_request_spans_in_memory(memory_spans, make_client, published, users, artifact):
    client = make_client()
    items = list(artifact.schema.items.tokens[2:12])
    known = client.post("/v1/score", json={"user_id": str(users["user_ids"][0]), "candidates": items},
                        headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "X-Request-ID": "trace-1"})
    assert known.status_code == 200
    cold = client.post("/v1/score", json={"user_id": "nobody-seen", "candidates": items})
    assert cold.status_code == 200 and cold.json()["cold_start"]
    spans = memory_spans.get_finished_spans()
    servers = [s for s in spans if s.name == "POST /v1/score"]
    assert len(servers) == 2
    first, second = servers
    # the first request continues the caller's trace; its id and status are on the span
    assert format(first.context.trace_id, "032x") == TRACE_ID and format(first.parent.span_id, "016x") == PARENT_ID
    assert first.attributes["udg.request_id"] == "trace-1" and first.attributes["http.response.status_code"] == 200
    for server, extra in ((first, set()), (second, {"cold_start"})):
        children = [s for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id]
        names = {s.name for s in children}
        assert STAGES | extra | {"redis fetch"} <= names, names
        for child in children:  # inside the request's span, in time order
            assert server.start_time <= child.start_time <= child.end_time <= server.end_time
        stages = sorted((s for s in children if s.name in STAGES | extra), key=lambda s: s.start_time)
        assert stages[0].name == "parse" and stages[-1].name == "respond"
    assert "cold_start" not in {s.name for s in spans if s.parent and s.parent.span_id == first.context.span_id}


def test_spans_keep_their_order_when_the_wall_clock_is_stepped(memory_spans, make_client, published, users,
                                                               artifact, monkeypatch):
    """Every span of a request reads one clock: with the wall clock (the SDK's default) stepped back 5 ms, the
    stage and Redis spans still lie inside their request's span (they did not: a CI run caught it)."""
    import time

    import opentelemetry.sdk.trace as sdk_trace

    monkeypatch.setattr(sdk_trace, "time_ns", lambda: time.time_ns() - 5_000_000)
    client = make_client()
    items = list(artifact.schema.items.tokens[2:12])
    assert client.post("/v1/score", json={"user_id": str(users["user_ids"][0]), "candidates": items}).status_code == 200
    spans = memory_spans.get_finished_spans()
    [server] = [s for s in spans if s.name == "POST /v1/score"]
    children = [s for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id]
    assert children
    for child in children:
        assert server.start_time <= child.start_time <= child.end_time <= server.end_time, child.name


class Collector(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: decodes each ExportTraceServiceRequest into (name, attributes) spans."""

    def __init__(self):
        self.spans: list[tuple[str, dict]] = []
        self.paths: list[str] = []
        super().__init__(("127.0.0.1", 0), _CollectorHandler)


class _CollectorHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - the http.server API
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.server.paths.append(self.path)
        for resource in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}
            for scope in resource.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: a.value.string_value or a.value.int_value for a in span.attributes}
                    self.server.spans.append((span.name, {**attributes, **service}))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_udg_serve_exports_spans_over_otlp(published, redis_server, model_repo, users, artifact, tmp_path):
    collector = Collector()
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    env = serve_env(redis_server.url, model_repo, tmp_path, **FAST_FOLLOW, UDG_OTLP_ENDPOINT=endpoint,
                    OTEL_BSP_SCHEDULE_DELAY="100", UDG_OTEL_SERVICE_NAME="udg-test")
    server, base, _, _ = start_serve(env, tmp_path / "serve.log")
    try:
        reply = httpx.post(base + "/v1/score", json={"user_id": str(users["user_ids"][1]),
                                                     "candidates": list(artifact.schema.items.tokens[2:8])},
                           headers={"X-Request-ID": "otlp-1"}, timeout=5)
        assert reply.status_code == 200

        def exported():
            names = {name for name, attributes in collector.spans}
            return names if {"POST /v1/score", "redis fetch"} | STAGES <= names else None

        wait_until(exported, 20, "spans at the collector")
    finally:
        stop(server)
        collector.shutdown()
    assert set(collector.paths) == {"/v1/traces"}
    (request_span,) = [a for n, a in collector.spans if n == "POST /v1/score" and a.get("udg.request_id") == "otlp-1"]
    assert request_span["service.name"] == "udg-test"


def test_tracing_off_imports_no_sdk_or_exporter():
    # (FastAPI itself imports the opentelemetry API package; its native tracing stays off: no global provider)
    code = ("import sys; from service.main import create_app; from service.settings import Settings; "
            "from service import tracing; create_app(Settings()); "
            "from opentelemetry import trace; "
            "print(tracing.ENABLED, type(trace.get_tracer_provider()).__name__, sorted(m for m in sys.modules "
            "if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False ProxyTracerProvider []"
