"""HTTP/1.1 limits uvicorn does not enforce: uvicorn's httptools protocol with bounds on every connection.

What uvicorn 0.54 + httptools does by itself (checked in the installed version): no limit on the size or number
of request headers (httptools buffers a header value of any size), no timeout while a request's head or body
arrives (the keep-alive timer is cancelled by the first byte and a fresh connection has none), and a response
sent before the request body was read (413) closes a `Connection: close` request's socket with the body still
unread, so the client gets a reset instead of the answer. `limit_concurrency` answers plain text and counts
idle connections and tasks together. This subclass adds, per worker process:

- **head limits**: request line + headers at most `max_header_bytes`, at most `max_headers` fields -> 431;
  counted on the raw bytes before httptools buffers them, so memory stays bounded whatever the client sends.
- **timeouts**: the head must arrive within `header_timeout_s` of the connection (or of its first byte, for a
  later request on a kept-alive connection) and the body within `body_timeout_s` of the head -> 408 and close;
  a connection that never sent a byte is closed without an answer.
- **connection cap**: beyond `max_connections` open connections, a request is answered 503 `overloaded`
  (`Retry-After`, `Connection: close`) without reaching the app.
- **draining** (after SIGTERM, service/shutdown.py): every response carries `Connection: close`.
- **lingering close**: an answer sent before the request body ended (an over-limit body's 413, a 431) does not
  reset the connection: the server half-closes, reads and discards what the client still sends (at most
  `drain_bytes`, for at most `drain_timeout_s`), then closes; standard clients (urllib, httpx, requests, curl)
  that write the whole body before reading read the answer.

Every answer is the service's JSON error body (service/errors.py) with an `X-Request-ID` (the request's own when
it sent a sane one before the limit hit, else generated) and is logged on `udg.http` with that id,
rate-limited per kind like the service's other repeated lines (service/ratelog.py: a flood of rejected
connections writes one line per `UDG_LOG_REPEAT_S` with the count). `udg serve` selects this protocol.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.logs import REQUEST_ID
from service.ratelog import RateLimitedLog
from service.request_id import HEADER as REQUEST_ID_HEADER
from service.request_id import given_request_id, new_request_id, scope_request_id
from service.shutdown import draining

log = logging.getLogger("udg.http")
_REJECTED = RateLimitedLog(log)  # one line per kind per UDG_LOG_REPEAT_S, with the count of the others


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000
    drain_bytes: int = 16 * 1024 * 1024
    drain_timeout_s: float = 5.0

    @classmethod
    def from_settings(cls, settings) -> HttpLimits:
        return cls(max_header_bytes=settings.http_max_header_bytes, max_headers=settings.http_max_headers,
                   header_timeout_s=settings.http_header_timeout_s, body_timeout_s=settings.http_body_timeout_s,
                   max_connections=settings.http_max_connections, drain_bytes=settings.http_drain_bytes,
                   drain_timeout_s=settings.http_drain_timeout_s)


class _HeadTooLarge(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _count(kind: str) -> None:
    try:
        from service import metrics

        metrics.ERRORS.labels(kind).inc()
    except Exception:  # pragma: no cover - metrics must never break the connection handling
        pass


def log_rejected(status: int, kind: str, message: str, request_id: str, client) -> None:
    """The structured line of an answer given by the HTTP layer (the app, which logs the rest, never ran)."""
    token = REQUEST_ID.set(request_id)
    try:
        _REJECTED.log(logging.INFO, kind, "%d %s: %s", status, kind, message,
                      extra={"status": status, "client": f"{client[0]}:{client[1]}" if client else None})
    finally:
        REQUEST_ID.reset(token)


def error_bytes(status: int, kind: str, message: str, extra_headers: tuple = ()) -> bytes:
    body = orjson.dumps({"error": kind, "message": message, "field": None, "details": []})
    head = [STATUS_LINE[status], b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body), b"connection: close\r\n"]
    head += [name + b": " + value + b"\r\n" for name, value in extra_headers]
    return b"".join(head) + b"\r\n" + body


class _CycleTransport:
    """The transport a request cycle sees: its close() becomes a lingering close while the body is unread."""

    def __init__(self, protocol: LimitedHttpToolsProtocol, transport):
        self._protocol, self._transport = protocol, transport

    def close(self) -> None:
        self._protocol.close_after_body()

    def __getattr__(self, name):
        return getattr(self._transport, name)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args, limits: HttpLimits | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits or HttpLimits()
        self._timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # raw bytes of the current request's head so far (approximate until complete)
        self._head_exact = 0  # request line + header fields, from the parser's callbacks
        self._header_count = 0
        self._message_begun = False
        self._in_body = False
        self._linger: str | None = None  # None | "body" (parse to the body's end) | "discard" (parser unusable)
        self._drained = 0
        self._over_cap = False
        self._request_id: str | None = None  # the current request's X-Request-ID, once its header was parsed

    # --- timers -----------------------------------------------------------------------------------------
    def _arm(self, seconds: float, handler) -> None:
        self._cancel()
        self._timer = self.loop.call_later(seconds, handler)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timeout(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._message_begun:
            _count("header_timeout")
            self._reject(408, "header_timeout", f"request headers not received within "
                                                f"{self.limits.header_timeout_s:g} s")
        else:  # never sent a byte: nothing to answer
            _count("idle_timeout")
            self.transport.close()

    def _body_timeout(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        _count("body_timeout")
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.response_started = True  # the app (waiting for the body) gets a disconnect, writes nothing
            # the id the app gave this request (RequestContext), so the answer and the app's lines agree
            request_id = scope_request_id(cycle.scope) or self._request_id or new_request_id()
            message = f"request body not received within {self.limits.body_timeout_s:g} s"
            log_rejected(408, "body_timeout", message, request_id, self.client)
            self.transport.write(error_bytes(408, "body_timeout", message,
                                             ((REQUEST_ID_HEADER, request_id.encode("ascii")),)))
        self.transport.close()

    # --- connection -------------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._over_cap = len(self.connections) > self.limits.max_connections
        self._arm(self.limits.header_timeout_s, self._head_timeout)

    def connection_lost(self, exc) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if self._linger is not None or (self._in_body and cycle is not None and cycle.response_complete):
            self._drained += len(data)  # an answered request's body: read and dropped, up to a bound
            if self._drained > self.limits.drain_bytes:
                self.transport.close()
                return
            if self._linger == "discard":
                return
        if not self._in_body:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            if self.transport.is_closing() or self._linger is not None:
                return
            if isinstance(error.__context__, _HeadTooLarge):
                self._head_too_large(error.__context__.message)
            else:
                self._bad_request(error)
            return
        except httptools.HttpParserError as error:
            if not self.transport.is_closing() and self._linger is None:
                self._bad_request(error)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if (self._message_begun and not self._in_body and self._linger is None
                and self._head_bytes > self.limits.max_header_bytes and not self.transport.is_closing()):
            self._head_too_large(f"request head exceeds {self.limits.max_header_bytes} bytes")

    def _bad_request(self, error: Exception) -> None:
        _count("bad_http")
        self._reject(400, "bad_http", f"invalid HTTP request: {error}")

    def _head_too_large(self, message: str) -> None:
        _count("header_too_large")
        self._reject(431, "header_too_large", message)

    def _reject(self, status: int, kind: str, message: str, extra_headers: tuple = ()) -> None:
        """Answer from here (the app never sees the request) and close, reading what the client still sends."""
        request_id = self._request_id or new_request_id()
        log_rejected(status, kind, message, request_id, self.client)
        self.transport.write(error_bytes(status, kind, message,
                                         ((REQUEST_ID_HEADER, request_id.encode("ascii")), *extra_headers)))
        self._start_linger("discard")

    # --- lingering close --------------------------------------------------------------------------------
    def _start_linger(self, mode: str) -> None:
        if self.transport.is_closing():
            return
        self._linger = mode
        self._drained = 0
        self._cancel()
        self._timer = self.loop.call_later(self.limits.drain_timeout_s, self.transport.close)
        try:
            if self.transport.can_write_eof():
                self.transport.write_eof()
        except (OSError, RuntimeError):  # pragma: no cover - the peer is gone already
            self.transport.close()
            return
        self.flow.resume_reading()

    def close_after_body(self) -> None:
        """A response cycle closes the connection: at once if the request is complete, else after its body."""
        if self.transport.is_closing():
            return
        if self._in_body and self._linger is None:
            self._start_linger("body")
        elif self._linger is None:
            self.transport.close()

    def eof_received(self):
        if self._linger is not None:
            self.transport.close()
        return None

    # --- parser callbacks -------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_begun, self._in_body = True, False
        self._head_exact, self._header_count = 0, 0
        self._request_id = None
        if self._timer is None and self._linger is None:  # a later request on a kept-alive connection
            self._arm(self.limits.header_timeout_s, self._head_timeout)

    def on_url(self, url: bytes) -> None:
        self._head_exact += len(url)
        if self._head_exact > self.limits.max_header_bytes:
            raise _HeadTooLarge(f"request line exceeds {self.limits.max_header_bytes} bytes")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == REQUEST_ID_HEADER:  # before the limits: a 431 for a later field still carries it
            self._request_id = given_request_id(value)
        self._header_count += 1
        self._head_exact += len(name) + len(value) + 4
        if self._header_count > self.limits.max_headers:
            raise _HeadTooLarge(f"more than {self.limits.max_headers} header fields")
        if self._head_exact > self.limits.max_header_bytes:
            raise _HeadTooLarge(f"request head exceeds {self.limits.max_header_bytes} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel()
        self._in_body, self._head_bytes = True, 0
        if self._linger is not None or self.transport.is_closing():
            raise _HeadTooLarge("connection closing")
        app = self.app
        if self._over_cap:
            _count("overloaded")
            self.app = functools.partial(_overloaded, self.limits.max_connections)
        try:
            super().on_headers_complete()
        finally:
            self.app = app
        if self.cycle is not None:
            self.cycle.transport = _CycleTransport(self, self.transport)
            if self._over_cap or draining():  # draining: kept-alive clients reconnect, to another instance
                self.cycle.keep_alive = False
        self._arm(self.limits.body_timeout_s, self._body_timeout)

    def on_message_complete(self) -> None:
        self._cancel()
        self._in_body = self._message_begun = False
        self._head_bytes = 0
        if self._linger == "body":
            self.transport.close()
            return
        super().on_message_complete()


async def _overloaded(limit: int, scope, receive, send) -> None:
    """The answer over the connection cap, in place of the app (and so of RequestContext, which sets the id)."""
    request_id = next((given_request_id(v) for n, v in scope["headers"] if n == REQUEST_ID_HEADER), None)
    request_id = request_id or new_request_id()
    message = f"this worker holds more than {limit} connections; retry"
    log_rejected(503, "overloaded", message, request_id, scope.get("client"))
    body = orjson.dumps({"error": "overloaded", "message": message, "field": None, "details": []})
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                            (b"retry-after", b"1"), (b"connection", b"close"),
                            (REQUEST_ID_HEADER, request_id.encode("ascii"))]})
    await send({"type": "http.response.body", "body": body})


def protocol_factory(settings):
    """The `http=` argument of uvicorn.run: this protocol with the settings' limits (picklable for workers)."""
    return functools.partial(LimitedHttpToolsProtocol, limits=HttpLimits.from_settings(settings))
