"""The outermost layer of the app: each request gets an id, every answer is counted, optionally logged, and
traced when tracing is on. Pure ASGI (not BaseHTTPMiddleware, which wraps every request in tasks and
streams): a few microseconds a request, measured by loadtest/bench_observability.py.

- **X-Request-ID**: taken from the request when it is a sane token, else generated (service.request_id);
  returned in the response and present in every log line written while the request runs (service.logs
  reads the context variable).
- **udg_http_responses{route, status}**: every answer of the app, the error ratio's denominator. `route` is
  one of the service's routes (or `/v1/admin`, `other`): bounded label values whatever the path.
- **access log** (`UDG_ACCESS_LOG=true`): one line per request on logger `udg.access` with method, path,
  status and duration (JSON fields when logs are JSON); off by default.
- **traces**: with tracing on (service.tracing), the request runs inside its SERVER span.
"""

from __future__ import annotations

import logging
import time

from service import metrics, tracing
from service.logs import REQUEST_ID
from service.request_id import HEADER, SCOPE_KEY, given_request_id, new_request_id

ROUTES = frozenset(("/v1/score", "/v1/events", "/v1/events/batch", "/healthz", "/readyz", "/metrics", "/docs",
                    "/redoc", "/openapi.json"))
access_log = logging.getLogger("udg.access")


def route_label(path: str) -> str:
    if path in ROUTES:
        return path
    if path.startswith("/v1/admin"):
        return "/v1/admin"
    if path.startswith("/docs/"):
        return "/docs"
    return "other"


class RequestContext:
    def __init__(self, app, access_log: bool = False):
        self.app = app
        self.access_log = access_log
        self._counters: dict[tuple[str, int], object] = {}

    def _count(self, path: str, status: int) -> None:
        key = (path, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = metrics.HTTP_RESPONSES.labels(route_label(path), str(status))
            if len(self._counters) < 4096:  # paths are client-chosen: keep the cache bounded
                self._counters[key] = counter
        counter.inc()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == HEADER:
                request_id = given_request_id(value)
                break
        if request_id is None:
            request_id = new_request_id()
        scope[SCOPE_KEY] = request_id
        header = (HEADER, request_id.encode("ascii"))
        token = REQUEST_ID.set(request_id)
        status = 500  # what the client gets if the app raises before answering (ServerErrorMiddleware's 500)
        started = time.perf_counter() if self.access_log else 0.0

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            if tracing.ENABLED:
                with tracing.server_span(scope, request_id) as span:
                    try:
                        await self.app(scope, receive, send_with_id)
                    finally:
                        tracing.set_status(span, status)
            else:
                await self.app(scope, receive, send_with_id)
        except BaseException:
            self._finish(scope, status, started)
            raise  # the id stays set: the 500 answer and its log line (service.errors) carry it
        self._finish(scope, status, started)
        REQUEST_ID.reset(token)

    def _finish(self, scope, status: int, started: float) -> None:
        self._count(scope["path"], status)
        if self.access_log:
            self._log(scope, status, started)

    def _log(self, scope, status: int, started: float) -> None:
        ms = (time.perf_counter() - started) * 1000
        client = scope.get("client")
        access_log.info("%s %s %d %.2f ms", scope["method"], scope["path"], status, ms,
                        extra={"method": scope["method"], "path": scope["path"], "status": status,
                               "duration_ms": round(ms, 3), "client": f"{client[0]}:{client[1]}" if client else None})
