"""Every error is JSON: `{"error": kind, "message": text, "field": dotted.path | null, "details": [...]}`.

4xx for anything a client sent (the field is named), 503 for an unavailable dependency (Redis, no model
version ready) with `Retry-After`, and a 500 only for a bug in this service (logged with its traceback).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service import metrics
from service.feature_store import FeatureStoreUnavailable
from service.logs import REQUEST_ID
from service.ratelog import RateLimitedLog

log = logging.getLogger(__name__)
REDIS_FAILURES = RateLimitedLog(log)  # one line per 10 s, with the count of the others
BUGS = RateLimitedLog(log)


class ErrorBody(BaseModel):
    """The body of every error answer (4xx, 5xx), whatever raised it."""

    error: str = Field(description="machine-readable kind, e.g. invalid_field, body_too_large, unavailable")
    message: str = Field(description="what went wrong, for a person")
    field: str | None = Field(description="dotted path of the offending request field (body, candidates.3, ...)")
    details: list[dict[str, Any]] = Field(description="every problem found, each {field, message, type}")


STATUS_TEXT = {
    400: "Not valid JSON (`invalid_json`), a msgpack score body that is not msgpack (`invalid_msgpack`), or a "
         "malformed HTTP request",
    401: "Missing or wrong bearer token (`unauthorized`)",
    403: "The admin API is disabled: UDG_ADMIN_TOKEN is not set (`admin_disabled`)",
    404: "Unknown version or route (`not_found`)",
    405: "Method not allowed (`method_not_allowed`)",
    408: "Request head or body not received in time (`header_timeout`, `body_timeout`)",
    409: "A conflict: the pinned version is not loaded (`version_not_loaded`) or the change contradicts the "
         "routing (`conflict`)",
    413: "Body over UDG_MAX_BODY_BYTES (`body_too_large`)",
    415: "The request's Content-Type is not one the route reads (`unsupported_media_type`, names it)",
    422: "A field is invalid (`invalid_field`, names it), or a version was refused (`version_refused`)",
    429: "The user's event-deduplication window is full (`dedup_window_full`): the event was not stored",
    431: "Request headers too large or too many (`header_too_large`)",
    503: "A dependency is unavailable (`redis_unavailable`, `model_unavailable`), the feature store lost the "
         "published state (`state_lost`: republish the version) or the worker is overloaded; retry after "
         "`Retry-After` seconds",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def responses(*statuses: int) -> dict:
    """`responses=` of a route: each status with the error body's schema (and Retry-After on 503)."""
    out: dict = {}
    for status in statuses:
        out[status] = {"model": ErrorBody, "description": STATUS_TEXT[status]}
        if status == 503:
            out[status]["headers"] = RETRY_AFTER
    return out


# Every request may get these from the HTTP layer (service/http_server.py) or the framework.
HTTP_STATUSES = (400, 408, 431, 503)


class ApiError(Exception):
    status = 400
    kind = "bad_request"

    def __init__(self, message: str, field: str | None = None, details: list | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.message, self.field, self.details, self.headers = message, field, details or [], headers


class InvalidJson(ApiError):
    status, kind = 400, "invalid_json"


class InvalidMsgpack(ApiError):
    status, kind = 400, "invalid_msgpack"


class UnsupportedMediaType(ApiError):
    status, kind = 415, "unsupported_media_type"


class InvalidField(ApiError):
    status, kind = 422, "invalid_field"


class BodyTooLarge(ApiError):
    status, kind = 413, "body_too_large"


class ServiceUnavailable(ApiError):
    status, kind = 503, "unavailable"

    def __init__(self, message: str, kind: str = "unavailable", retry_after_s: int = 1):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
        self.kind = kind


class Unauthorized(ApiError):
    status, kind = 401, "unauthorized"


class AdminDisabled(ApiError):
    status, kind = 403, "admin_disabled"


class NotFound(ApiError):
    status, kind = 404, "not_found"


class Conflict(ApiError):
    status, kind = 409, "conflict"


class VersionNotLoadedError(ApiError):
    status, kind = 409, "version_not_loaded"


class VersionRefusedError(ApiError):
    status, kind = 422, "version_refused"


def json_response(status: int, body: dict, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def error_response(error: ApiError) -> Response:
    metrics.ERRORS.labels(error.kind).inc()
    return json_response(error.status, {"error": error.kind, "message": error.message, "field": error.field,
                                        "details": error.details}, error.headers)


def field_path(loc) -> str:
    return ".".join(str(part) for part in loc if part not in ("body",)) or "body"


def from_validation_errors(errors: list[dict]) -> InvalidField:
    details = []
    for item in errors:
        path = field_path(item.get("loc", ()))
        details.append({"field": path, "message": item.get("msg", "invalid"), "type": item.get("type")})
    first = details[0] if details else {"field": "body", "message": "invalid request"}
    if first.get("type") == "json_invalid":
        return InvalidJson(f"body is not valid JSON: {first['message']}", field="body", details=details)
    return InvalidField(f"{first['field']}: {first['message']}", field=first["field"], details=details)


# --- the answers to exceptions: registered on the app by install(), and used as they are by the score route's
# fast path (service/fast_score.py), which runs below FastAPI. Each takes (method, path, error).
def _api_error(method: str, path: str, error: ApiError) -> Response:
    return error_response(error)


def _store_down(method: str, path: str, error: FeatureStoreUnavailable) -> Response:
    REDIS_FAILURES.warning("redis", "%s %s: %s", method, path, error)
    return error_response(ServiceUnavailable(f"feature store unavailable: {error}", kind="redis_unavailable"))


def _validation(method: str, path: str, error: ValidationError) -> Response:
    return error_response(from_validation_errors(error.errors(include_url=False)))


def _request_validation(method: str, path: str, error: RequestValidationError) -> Response:
    return error_response(from_validation_errors(list(error.errors())))


def _http(method: str, path: str, error: StarletteHTTPException) -> Response:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    metrics.ERRORS.labels(kind).inc()
    return json_response(error.status_code, {"error": kind, "message": str(error.detail), "field": None,
                                             "details": []}, getattr(error, "headers", None))


def _gone(method: str, path: str, error: ClientDisconnect) -> Response:
    # The client went away (or the body timeout closed the connection) while the body was being read:
    # not a bug; nobody reads this answer.
    metrics.ERRORS.labels("client_disconnected").inc()
    return json_response(400, {"error": "client_disconnected", "message": "the client disconnected before "
                               "the request body was received", "field": "body", "details": []})


def _bug(method: str, path: str, error: Exception) -> Response:
    # One traceback per route and exception type per 10 s: a bug hit by every request must not flood.
    BUGS.error(f"internal {path} {type(error).__name__}", "unhandled error on %s %s", method, path, exc_info=error)
    metrics.ERRORS.labels("internal").inc()
    request_id = REQUEST_ID.get()  # answered outside the request-id layer: it adds no header here
    return json_response(500, {"error": "internal", "message": "internal error (logged)", "field": None,
                               "details": []}, {"X-Request-ID": request_id} if request_id else None)


# Looked up along the exception's MRO, as Starlette does; `Exception` is the 500 answered outside every other
# layer (Starlette's ServerErrorMiddleware), and the exception is raised on afterwards.
HANDLERS = {ApiError: _api_error, FeatureStoreUnavailable: _store_down, ValidationError: _validation,
            RequestValidationError: _request_validation, StarletteHTTPException: _http, ClientDisconnect: _gone,
            Exception: _bug}


def handled(error: Exception, method: str, path: str) -> Response | None:
    """The answer to an exception a layer below the request-id layer answers; None: a bug (see `bug_answer`)."""
    for cls in type(error).__mro__:
        handler = HANDLERS.get(cls)
        if handler is not None:
            return None if handler is _bug else handler(method, path, error)
    return None


def bug_answer(error: Exception, method: str, path: str) -> Response:
    return _bug(method, path, error)


def install(app: FastAPI) -> None:
    for cls, handler in HANDLERS.items():
        async def answer(request: Request, error: Exception, handler=handler):
            return handler(request.method, request.url.path, error)

        app.add_exception_handler(cls, answer)
