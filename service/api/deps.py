"""Shared dependencies of the routes: the service container and a size-limited body reader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import orjson
from fastapi import Depends, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service.errors import BodyTooLarge, InvalidField
from service.feature_store import FeatureStore
from service.registry import ModelRegistry
from service.scoring import Scorer
from service.settings import Settings


@dataclass
class Services:
    settings: Settings
    store: FeatureStore
    registry: ModelRegistry
    scorer: Scorer
    control: object = None  # service.control.Control (follows the routing document in Redis)
    background: list = field(default_factory=list)


async def get_services(request: Request) -> Services:  # async: FastAPI runs sync dependencies in a thread
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 beyond `limit` bytes (declared length checked before reading)."""
    return await receive_body(request.receive, request.headers.get("content-length"), limit)


async def receive_body(receive, declared: str | bytes | None, limit: int) -> bytes:
    """The body from an ASGI `receive` (shared by the routes and the score fast path, which has no Request):
    413 beyond `limit` bytes, the declared Content-Length checked before reading, ClientDisconnect as Starlette."""
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidField("Content-Length is not a number", field="Content-Length") from None
        if size > limit:
            raise BodyTooLarge(f"body of {size} bytes exceeds the limit of {limit} bytes", field="body")
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                total += len(chunk)
                if declared is None and total > limit:
                    raise BodyTooLarge(f"body exceeds the limit of {limit} bytes", field="body")
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


def json_ok(body: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")
