"""The body formats of POST /v1/score: JSON (the default) and msgpack (`application/msgpack`), both ways.

- **Request**: by `Content-Type`: none or `application/json` -> JSON; `application/msgpack` -> msgpack; any
  other -> 415 naming it. Both are validated by the same pydantic model (errors name the field alike); a body
  that is not msgpack is a 400 naming the body, as one that is not JSON.
- **Response**: by `Accept`: the preferred of `application/json` and `application/msgpack` (q-values); none
  or a wildcard -> the request's format; neither named -> JSON (the service has always answered JSON).
  msgpack scores are float32, the values the model computed (JSON writes the same float32 values).
- **Errors** are JSON whatever was asked (service/errors.py: one error body everywhere).

What each format costs per request: docs/performance.md (`udg bench compare --variant msgpack:body=msgpack`).
"""

from __future__ import annotations

from functools import lru_cache

import msgpack
import orjson

from service.api.schemas import ScoreRequest
from service.errors import InvalidMsgpack, UnsupportedMediaType

JSON = "application/json"
MSGPACK = "application/msgpack"
MEDIA_TYPES = (JSON, MSGPACK)


def _bare(value: str) -> str:
    """'Application/JSON; charset=utf-8' -> 'application/json'."""
    return value.split(";", 1)[0].strip().lower()


def _q(params: list[str]) -> float | None:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value)
            except ValueError:
                return None
            return q if 0 <= q <= 1 else None
    return 1.0


@lru_cache(maxsize=256)  # clients send a handful of distinct header pairs
def negotiate(content_type: str | None, accept: str | None) -> tuple[str, str]:
    """(request format, response format) from the Content-Type and Accept headers; 415 for another type."""
    request = JSON if content_type is None or _bare(content_type) in ("", JSON) else _bare(content_type)
    if request not in MEDIA_TYPES:
        raise UnsupportedMediaType(f"Content-Type {content_type!r} is not supported: send {JSON} or {MSGPACK}",
                                   field="Content-Type")
    if not accept:
        return request, request
    best, best_q = None, 0.0
    for part in accept.split(","):
        media, *params = part.split(";")
        media = media.strip().lower()
        if media in MEDIA_TYPES:
            offer = media
        elif media in ("*/*", "application/*"):
            offer = request
        else:
            continue
        q = _q(params)
        if q is not None and q > best_q:
            best, best_q = offer, q
    return request, best or JSON


def decode(media: str, body: bytes) -> ScoreRequest:
    if media == JSON:
        return ScoreRequest.model_validate_json(body)
    try:
        # strict_map_key off: a non-string key is the model's 422 naming it, not a decoding error
        value = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise InvalidMsgpack(f"body is not valid msgpack: {error or type(error).__name__}", field="body") from None
    return ScoreRequest.model_validate(value)


def encode(media: str, result: dict) -> bytes:
    """The score answer (`scores` a float32 array) in `media`."""
    if media == JSON:
        return orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY)
    scores = result["scores"]
    return msgpack.packb({**result, "scores": scores.tolist() if hasattr(scores, "tolist") else scores},
                         use_single_float=True)
