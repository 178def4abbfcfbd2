"""Log lines of the service: one line per event, JSON or text, each carrying the request it belongs to.

`UDG_LOG_FORMAT`: `json` (one object per line: ts, level, logger, message, version, pid, and within a request
request_id and model_version; an exception adds `exc`; rate-limited lines add `suppressed`), `text` (for a
terminal), or `auto` (the default: text when stderr is a terminal, else JSON — so containers, which have no
terminal, log JSON). The same configuration is given to uvicorn, so its own lines have the same shape.

The request id and model version live in context variables set by service.request_context (and the model
registry's lease); the formatters read them, so every line logged while a request runs carries them.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import logging.config
import os
import sys

import orjson

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("udg_request_id", default=None)
MODEL_VERSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("udg_model_version", default=None)
# Extra attributes a caller may attach with `extra=` that belong in the JSON object (service.ratelog uses them).
EXTRA_FIELDS = ("suppressed", "suppressed_s", "what", "method", "path", "status", "duration_ms", "client")


def service_version() -> str:
    try:
        from importlib.metadata import version

        return version("udg-ctr")
    except Exception:  # running from a source tree that was never installed
        return "0+unknown"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (orjson: a few microseconds a line)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.version = service_version()
        self.pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
                "version": self.version, "pid": self.pid}
        request_id = REQUEST_ID.get()
        if request_id is not None:
            line["request_id"] = request_id
        model_version = MODEL_VERSION.get()
        if model_version is not None:
            line["model_version"] = model_version
        for name in EXTRA_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request id] message` for a person at a terminal."""

    def __init__(self, *args, **kwargs):
        super().__init__("%(asctime)s %(levelname)s %(name)s%(request)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = REQUEST_ID.get()
        record.request = f" [{request_id}]" if request_id else ""
        return super().format(record)


def resolve_format(log_format: str, stream=None) -> str:
    if log_format != "auto":
        return log_format
    stream = stream or sys.stderr
    return "text" if hasattr(stream, "isatty") and stream.isatty() else "json"


def log_config(log_format: str = "auto", level: str = "info") -> dict:
    """A logging.config dict: root, udg.* and uvicorn's loggers through one stderr handler (uvicorn.run's
    `log_config`, applied again in every worker process)."""
    formatter = JsonFormatter if resolve_format(log_format) == "json" else TextFormatter
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"udg": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "udg", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {name: {"handlers": [], "level": level, "propagate": True}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "udg")},
    }


def configure(log_format: str = "auto", level: str = "info") -> dict:
    config = log_config(log_format, level)
    logging.config.dictConfig(config)
    return config
