"""The request id (`X-Request-ID`): a client's when it is a sane token, else generated. Shared by the app's
outer layer (service.request_context) and the HTTP layer's own answers (service.http_server). No metrics or
other state here: `udg serve`'s supervisor imports it before the workers start.

- taken from the request when it is 1-128 characters of `A-Za-z0-9._:-`, so a client cannot inject log syntax;
- else generated: 16 hex digits, a random per-process prefix and a counter (unique without a syscall).
"""

from __future__ import annotations

import itertools
import os
import re

HEADER = b"x-request-id"
SCOPE_KEY = "udg.request_id"  # where RequestContext leaves the id in the ASGI scope, for the HTTP layer
_VALID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
_ID_PREFIX = os.urandom(4).hex()  # per process
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(3), "big"))


def new_request_id() -> str:
    """16 hex digits: this process's random prefix and its request counter."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


def given_request_id(value: bytes) -> str | None:
    """A client's X-Request-ID value when it is a sane token, else None (then one is generated)."""
    return value.decode("ascii") if _VALID.match(value) else None


def scope_request_id(scope) -> str | None:
    """The id RequestContext gave a request (the HTTP layer's own answer to it reuses it)."""
    return scope.get(SCOPE_KEY)
