"""Optional OpenTelemetry traces: one server span per request, with the score request's stages (parse, redis,
cold_start, encode, model, respond) and each Redis call as child spans, exported by OTLP over HTTP.

Off unless `UDG_OTLP_ENDPOINT` is set (e.g. `http://otel-collector:4318`); the SDK and exporter are the
`otel` extra (`pip install 'udg-ctr[otel]'`). Off, nothing of OpenTelemetry is imported and the request
path pays one boolean test per stage (`ENABLED`). On, stage spans are made after the fact from the timings
the request records anyway (StageTimer), so tracing adds no timer calls of its own; export runs in the
SDK's batch processor thread. An incoming W3C `traceparent` header makes the request's span its child.
`UDG_TRACE_SAMPLE_RATIO` samples a share of the traces (parent-based: a sampled caller is always followed).
"""

from __future__ import annotations

import contextlib
import time

ENABLED = False  # read on the request path: tracing configured in this process
_STATE: dict = {}  # tracer, provider, propagator once configured
_OFFSET_NS = time.time_ns() - time.perf_counter_ns()  # perf_counter -> epoch nanoseconds for span times


def epoch_ns(perf_seconds: float) -> int:
    return int(perf_seconds * 1e9) + _OFFSET_NS


def traces_url(endpoint: str) -> str:
    """An OTLP/HTTP base URL (`http://collector:4318`) or the full traces URL -> the traces URL."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


def configure(settings=None, processor=None) -> bool:
    """Turn tracing on when `settings.otlp_endpoint` is set (or a span `processor` is given: tests, benchmarks).
    -> whether it is on. Missing SDK with an endpoint set: a clear error at start-up, never a silent no-op."""
    global ENABLED
    endpoint = getattr(settings, "otlp_endpoint", None)
    if processor is None and not endpoint:
        return ENABLED
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as error:
        raise RuntimeError(f"UDG_OTLP_ENDPOINT is set but OpenTelemetry is not installed ({error}); install the "
                           "`otel` extra: pip install 'udg-ctr[otel]'") from None
    from service.logs import service_version

    name = getattr(settings, "otel_service_name", None) or "udg-ctr"
    ratio = getattr(settings, "trace_sample_ratio", 1.0)
    provider = TracerProvider(resource=Resource.create({"service.name": name, "service.version": service_version()}),
                              sampler=ParentBased(TraceIdRatioBased(ratio)))
    if processor is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint)))
    provider.add_span_processor(processor)
    _STATE.update(provider=provider, tracer=provider.get_tracer("udg.service"),
                  propagator=TraceContextTextMapPropagator())
    ENABLED = True
    return True


def shutdown() -> None:
    """Flush and stop the exporter (the app's shutdown); tracing is off afterwards."""
    global ENABLED
    provider = _STATE.pop("provider", None)
    _STATE.clear()
    ENABLED = False
    if provider is not None:
        provider.shutdown()


def _header_getter():
    from opentelemetry.propagators.textmap import Getter

    class AsgiHeaders(Getter):
        def get(self, carrier, key):
            wanted = key.encode("latin-1")
            return [value.decode("latin-1") for name, value in carrier if name == wanted] or None

        def keys(self, carrier):
            return [name.decode("latin-1") for name, _ in carrier]

    return AsgiHeaders()


@contextlib.contextmanager
def server_span(scope: dict, request_id: str):
    """The request's SERVER span (current while the app runs), child of `traceparent`. Its start and end are
    read from the clock its stage and Redis spans are (perf_counter, `epoch_ns`): the SDK's default, the wall
    clock, can be stepped against it, and a child would then fall outside its parent."""
    from opentelemetry.trace import SpanKind

    getter = _STATE.get("getter") or _STATE.setdefault("getter", _header_getter())
    parent = _STATE["propagator"].extract(scope.get("headers", ()), getter=getter)
    method, path = scope.get("method", "GET"), scope.get("path", "")
    with _STATE["tracer"].start_as_current_span(
            f"{method} {path}", context=parent, kind=SpanKind.SERVER, start_time=epoch_ns(time.perf_counter()),
            end_on_exit=False,
            attributes={"http.request.method": method, "url.path": path, "udg.request_id": request_id}) as span:
        try:
            yield span
        finally:
            span.end(end_time=epoch_ns(time.perf_counter()))


def set_status(span, status: int) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


def stage_spans(marks: list[tuple[str, float]]) -> None:
    """Child spans of the current span from [(stage, perf_counter at its end)], the first entry the start."""
    tracer = _STATE.get("tracer")
    if tracer is None or len(marks) < 2:
        return
    previous = marks[0][1]
    for stage, at in marks[1:]:
        tracer.start_span(stage, start_time=epoch_ns(previous)).end(end_time=epoch_ns(at))
        previous = at


def redis_observer(observe):
    """FeatureStore's `observe(op, seconds)`: the metric, plus a `redis <op>` span when tracing is on."""
    if not ENABLED:
        return observe

    def observe_and_trace(op: str, seconds: float) -> None:
        observe(op, seconds)
        tracer = _STATE.get("tracer")
        if tracer is not None:
            end = time.perf_counter()
            span = tracer.start_span(f"redis {op}", start_time=epoch_ns(end - seconds),
                                     attributes={"db.system": "redis", "db.operation": op})
            span.end(end_time=epoch_ns(end))

    return observe_and_trace
