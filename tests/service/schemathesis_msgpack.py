"""Schemathesis hooks (SCHEMATHESIS_HOOKS) of tests/service/test_openapi_schemathesis.py: POST /v1/score reads and
answers application/msgpack as well as JSON, so the run sends msgpack bodies too and checks msgpack answers
against the response schema."""

from __future__ import annotations

import msgpack
import schemathesis

INT_RANGE = (-(2**63), 2**64 - 1)  # what msgpack can carry; a generated integer beyond goes as a float


def _packable(value):
    if isinstance(value, dict):
        return {_packable(k): _packable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_packable(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not INT_RANGE[0] <= value <= INT_RANGE[1]:
        return float(value)
    return value


@schemathesis.serializer("application/msgpack")
def to_msgpack(ctx, value):
    return msgpack.packb(_packable(value))


@schemathesis.deserializer("application/msgpack")
def from_msgpack(ctx, response):
    return msgpack.unpackb(response.content, raw=False)
