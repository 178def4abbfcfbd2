"""GET /healthz (process alive), /readyz (a version active and Redis reachable), /metrics (Prometheus)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from starlette.responses import PlainTextResponse, Response

from service import metrics, shutdown
from service.api.deps import ServicesDep, json_ok
from service.api.schemas import Liveness, Readiness
from service.errors import HTTP_STATUSES, responses
from service.feature_store import FeatureStoreUnavailable

router = APIRouter()


@router.get("/healthz", summary="Liveness: the process answers",
            responses={200: {"model": Liveness, "description": "Alive"}, **responses(*HTTP_STATUSES)})
async def healthz():
    return json_ok({"status": "alive"})


@router.get("/readyz", summary="Readiness: a model version is active and Redis answers",
            responses={**responses(*HTTP_STATUSES), 200: {"model": Readiness, "description": "Ready"},
                       503: {"model": Readiness, "description": "Not ready: `reasons` says why"}})
async def readyz(services: ServicesDep):
    body = await readiness(services)
    return json_ok(body, 200 if body["status"] == "ready" else 503)


async def readiness(services) -> dict:
    """The /readyz body; `status` is "ready" or "not_ready" (then `reasons` says why)."""
    active = services.registry.active
    registry = services.registry
    body = {"model_version": active.version if active else None, "redis": "ok", "reasons": []}
    if active is None:
        body["reasons"].append(f"no model version active: {services.registry.last_error}")
    body["state_lost"] = registry.state_lost
    if registry.state_lost:
        body["reasons"].append(f"state lost: {registry.state_lost}")
    # A worker that could not follow the routing in Redis keeps serving what it had: still ready (it answers
    # correctly for its routing), but says so here and in udg_worker_in_sync.
    wanted = registry.wanted or {}
    body["routing"] = {"generation": registry.routing.generation, "split": registry.routing.split,
                       "wanted_active": wanted.get("active"), "wanted_split": wanted.get("split"),
                       "in_sync": registry.in_sync, "problems": registry.sync_problems,
                       "failed": {v: f.reason for v, f in registry.failed.items()},
                       "worker": getattr(services.control, "worker_id", None),
                       "routing_file_error": getattr(services.control, "routing_file_error", None)}
    try:
        await services.store.ping()
    except FeatureStoreUnavailable as error:
        body["redis"] = "unavailable"
        body["reasons"].append(str(error))
    if shutdown.draining():  # SIGTERM received: tell load balancers first, still serving (service/shutdown.py)
        body["reasons"].append(shutdown.DRAIN.reason())
    body["status"] = "not_ready" if body["reasons"] else "ready"
    return body


async def publish_readiness(services, period_s: float) -> None:
    """This worker's udg_ready gauge, refreshed every `period_s` from the same check as /readyz (the task
    also writes the counts of rate-limited log lines whose burst ended)."""
    from service import ratelog

    while True:
        try:
            body = await readiness(services)
            metrics.READY.set(1 if body["status"] == "ready" else 0)
        except Exception:  # never let the gauge loop die; a failed check is "not ready"
            metrics.READY.set(0)
        ratelog.flush_all()
        await asyncio.sleep(period_s)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}},
                       **responses(*HTTP_STATUSES)})
async def prometheus_metrics():
    data, content_type = metrics.render()
    return Response(data, media_type=content_type)
