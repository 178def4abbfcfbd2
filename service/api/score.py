"""POST /v1/score: {user_id, candidates, profile?, top_k?, model_version?} -> scores in request order + ranking.

The registry picks the version (split arm by user-id hash, or the active one) unless the request pins one
(`model_version` in the body, or the `X-Model-Version` header); the request holds that version to the end.
Bodies are JSON or msgpack (service/api/bodies.py). `parse` and `answer` are the route's work; the route
below and the fast path under FastAPI (service/fast_score.py, UDG_FAST_SCORE_PATH) both run them.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import metrics
from service.api import bodies
from service.api.deps import Services, ServicesDep, read_body
from service.api.schemas import ScoreRequest, ScoreResponse, request_body
from service.errors import HTTP_STATUSES, ServiceUnavailable, VersionNotLoadedError, responses
from service.registry import VersionNotLoaded
from service.scoring import StageTimer, check_candidates

router = APIRouter()
ROUTE = "/v1/score"
_OPENAPI = {**request_body(ScoreRequest, bodies.MEDIA_TYPES), "parameters": [{
    "name": "X-Model-Version", "in": "header", "required": False,
    "description": "pin a loaded version (as `model_version` in the body); not loaded: 409",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}}]}
_SCORE_RESPONSE = {"$ref": "#/components/schemas/ScoreResponse"}


@router.post(ROUTE, openapi_extra=_OPENAPI, summary="Score candidates for one user",
             responses={200: {"model": ScoreResponse, "description": "Scores in request order and the ranking "
                              "(JSON, or msgpack by `Accept`)",
                              "content": {bodies.MSGPACK: {"schema": _SCORE_RESPONSE}}},
                        **responses(*HTTP_STATUSES, 409, 413, 415, 422)})
async def score(request: Request, services: ServicesDep):
    """Response: `model_version`, `cold_start`, `scores` (click probabilities, one per candidate, request
    order), `ranking` (the top_k candidate ids by score; all of them without top_k) and `unknown_candidates`
    (ids the model never saw, scored through the OOV row). Errors: see service/errors.py."""
    started = time.perf_counter()
    timer = StageTimer(started)
    headers = request.headers
    media, answer_media = bodies.negotiate(headers.get("content-type"), headers.get("accept"))
    payload = parse(services, await read_body(request, services.settings.max_body_bytes), media)
    timer.mark("parse")
    content = await answer(services, payload, headers.get("x-model-version"), answer_media, timer, started)
    return Response(content, media_type=answer_media)


def parse(services: Services, body: bytes, media: str) -> ScoreRequest:
    """The validated request (400/422 naming the field)."""
    payload = bodies.decode(media, body)
    check_candidates(payload.candidates, services.settings.max_candidates)
    return payload


async def answer(services: Services, payload: ScoreRequest, header_version: str | None, media: str,
                 timer: StageTimer, started: float) -> bytes:
    """Score `payload` under the version the registry leases for it -> the response body in `media`."""
    pinned = payload.model_version or header_version
    try:
        with services.registry.lease(payload.user_id, pinned) as (model, arm):
            if model is None:
                raise ServiceUnavailable(f"no model version is active ({services.registry.last_error})",
                                         kind="model_unavailable")
            if services.registry.state_lost:  # never cold-start scores for users whose state is gone
                raise ServiceUnavailable(services.registry.state_lost, kind="state_lost", retry_after_s=5)
            result = await services.scorer.score(model, payload, timer)
            content = bodies.encode(media, result)
            timer.mark("respond")
            timer.flush()
            elapsed = time.perf_counter() - started
            metrics.REQUEST_SECONDS.labels(ROUTE, model.version).observe(elapsed)
            scores = result["scores"]
            metrics.observe_version(model.version, arm, elapsed, float(scores.mean()) if len(scores) else 0.0)
    except VersionNotLoaded as error:  # raised by lease() only, before anything ran
        raise VersionNotLoadedError(str(error), field="model_version") from None
    return content
