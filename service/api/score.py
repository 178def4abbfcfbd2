"""POST /v1/score: {user_id, candidates, profile?, top_k?, model_version?} -> scores in request order + ranking.

The registry picks the version (split arm by user-id hash, or the active one) unless the request pins one
(`model_version` in the body, or the `X-Model-Version` header); the request holds that version to the end.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from service import metrics
from service.api.deps import ServicesDep, json_ok, read_body
from service.api.schemas import ScoreRequest, ScoreResponse, request_body
from service.errors import HTTP_STATUSES, ServiceUnavailable, VersionNotLoadedError, responses
from service.registry import VersionNotLoaded
from service.scoring import StageTimer, check_candidates

router = APIRouter()
ROUTE = "/v1/score"
_OPENAPI = {**request_body(ScoreRequest), "parameters": [{
    "name": "X-Model-Version", "in": "header", "required": False,
    "description": "pin a loaded version (as `model_version` in the body); not loaded: 409",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}}]}


@router.post(ROUTE, openapi_extra=_OPENAPI, summary="Score candidates for one user",
             responses={200: {"model": ScoreResponse, "description": "Scores in request order and the ranking"},
                        **responses(*HTTP_STATUSES, 409, 413, 422)})
async def score(request: Request, services: ServicesDep):
    """Response: `model_version`, `cold_start`, `scores` (click probabilities, one per candidate, request
    order), `ranking` (the top_k candidate ids by score; all of them without top_k) and `unknown_candidates`
    (ids the model never saw, scored through the OOV row). Errors: see service/errors.py."""
    started = time.perf_counter()
    timer = StageTimer(started)
    body = await read_body(request, services.settings.max_body_bytes)
    payload = ScoreRequest.model_validate_json(body)
    check_candidates(payload.candidates, services.settings.max_candidates)
    timer.mark("parse")
    pinned = payload.model_version or request.headers.get("x-model-version")
    try:
        with services.registry.lease(payload.user_id, pinned) as (model, arm):
            if model is None:
                raise ServiceUnavailable(f"no model version is active ({services.registry.last_error})",
                                         kind="model_unavailable")
            if services.registry.state_lost:  # never cold-start scores for users whose state is gone
                raise ServiceUnavailable(services.registry.state_lost, kind="state_lost", retry_after_s=5)
            result = await services.scorer.score(model, payload, timer)
            response = json_ok(result)
            timer.mark("respond")
            timer.flush()
            elapsed = time.perf_counter() - started
            metrics.REQUEST_SECONDS.labels(ROUTE, model.version).observe(elapsed)
            scores = result["scores"]
            metrics.observe_version(model.version, arm, elapsed, float(scores.mean()) if len(scores) else 0.0)
    except VersionNotLoaded as error:  # raised by lease() only, before anything ran
        raise VersionNotLoadedError(str(error), field="model_version") from None
    return response
