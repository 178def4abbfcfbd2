"""Every error is JSON: `{"error": kind, "message": text, "field": dotted.path | null, "details": [...]}`.

4xx for anything a client sent (the field is named), 503 for an unavailable dependency (Redis, no model
version ready) with `Retry-After`, and a 500 only for a bug in this service (logged with its traceback).
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service import metrics
from service.feature_store import FeatureStoreUnavailable
from service.ratelog import RateLimitedLog

log = logging.getLogger(__name__)
REDIS_FAILURES = RateLimitedLog(log)  # one line per 10 s, with the count of the others


class ApiError(Exception):
    status = 400
    kind = "bad_request"

    def __init__(self, message: str, field: str | None = None, details: list | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.message, self.field, self.details, self.headers = message, field, details or [], headers


class InvalidJson(ApiError):
    status, kind = 400, "invalid_json"


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


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return error_response(error)

    @app.exception_handler(FeatureStoreUnavailable)
    async def _store_down(request: Request, error: FeatureStoreUnavailable):
        REDIS_FAILURES.warning("redis", "%s %s: %s", request.method, request.url.path, error)
        return error_response(ServiceUnavailable(f"feature store unavailable: {error}", kind="redis_unavailable"))

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, error: ValidationError):
        return error_response(from_validation_errors(error.errors(include_url=False)))

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, error: RequestValidationError):
        return error_response(from_validation_errors(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        metrics.ERRORS.labels(kind).inc()
        return json_response(error.status_code, {"error": kind, "message": str(error.detail), "field": None,
                                                 "details": []}, getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        metrics.ERRORS.labels("internal").inc()
        return json_response(500, {"error": "internal", "message": "internal error (logged)", "field": None,
                                   "details": []})
