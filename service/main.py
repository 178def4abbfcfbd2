"""Assembles the app: settings -> feature store -> model registry (+ its Redis follower) -> scorer -> routers.

`uvicorn --factory service.main:create_app` (what `udg serve` runs) builds one app per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI

from service import errors, metrics, ratelog, shutdown, tracing
from service.api import admin, docs, events, health, openapi, score
from service.api.deps import Services
from service.batching import MicroBatcher
from service.control import Control
from service.feature_store import FeatureStore, create_redis
from service.redis_client import pipelined_reader
from service.redis_layout import RedisLayout
from service.registry import ModelRegistry
from service.request_context import RequestContext
from service.scoring import Scorer
from service.settings import Settings, get_settings

log = logging.getLogger("udg.service")


def start_state_cache(settings: Settings, store: FeatureStore, redis) -> asyncio.Task | None:
    """With UDG_STATE_CACHE on one Redis node: the worker's state cache and its invalidation listener task."""
    if not settings.state_cache:
        return None
    from service.redis_client import is_cluster
    from service.state_cache import StateCache

    if is_cluster(redis):
        log.warning("UDG_STATE_CACHE is not supported on a Redis Cluster: the state cache stays off")
        metrics.STATE_CACHE_ACTIVE.set(0)
        return None
    store.use_cache(StateCache(settings.key_prefix, settings.state_cache_users, settings.state_cache_max_age_s,
                               settings.state_cache_ping_s, on_active=metrics.STATE_CACHE_ACTIVE.set))
    return asyncio.create_task(store.cache.run(settings.redis_url, max(settings.redis_timeout_s, 1.0),
                                               settings.redis_ca_certs))


class ScoringApp(FastAPI):
    """FastAPI, with POST /v1/score answered in front of its middleware stack when `fast_score` is set
    (UDG_FAST_SCORE_PATH, on by default; service/fast_score.py)."""

    fast_score = False
    fast_score_access_log = False

    def build_middleware_stack(self):
        stack = super().build_middleware_stack()
        if not self.fast_score:
            return stack
        from service.fast_score import FastScore

        return FastScore(self, stack, access_log=self.fast_score_access_log)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        redis = create_redis(settings.redis_url, settings.redis_timeout_s, settings.redis_pool_size,
                             settings.redis_ca_certs)
        reader = (pipelined_reader(settings.redis_url, settings.redis_timeout_s, settings.redis_ca_certs, redis)
                  if settings.redis_pipelined_reads else None)
        store = FeatureStore(redis, RedisLayout.from_settings(settings),
                             observe=tracing.redis_observer(metrics.observe_redis), reader=reader)
        registry = ModelRegistry(settings.model_repo, store, settings.providers, settings.ort_threads,
                                 settings.require_publish_marker, cuda_graph=settings.cuda_graph,
                                 precision=settings.scorer_precision)
        control = Control(settings, registry, redis)
        services = Services(settings, store, registry, Scorer(store, batcher=MicroBatcher.from_settings(settings)),
                            control)
        app.state.services = services
        cache_task = start_state_cache(settings, store, redis)
        if cache_task is not None:
            services.background.append(cache_task)
        log.info("feature store %s, model repository %s", settings.redis_url_for_logs(), settings.model_repo)
        # Activation and every later version change: follow the routing document in Redis (control.py).
        follower = asyncio.create_task(control.follow())
        services.background.append(follower)
        shutdown.install(settings.shutdown_drain_s, settings.shutdown_timeout_s)  # SIGTERM: drain, then stop
        readiness = asyncio.create_task(health.publish_readiness(services, settings.readiness_period_s))
        services.background.append(readiness)
        try:
            yield
        finally:
            readiness.cancel()
            if cache_task is not None:
                cache_task.cancel()
                await asyncio.gather(cache_task, return_exceptions=True)
            await control.stop(follower)
            await control.forget()
            await services.scorer.drain()
            await registry.drain()
            registry.close()
            await store.close()
            tracing.shutdown()

    # /docs and /redoc are served from assets installed with the package (service/api/docs.py), never a CDN.
    app = ScoringApp(title="UDG CTR scoring", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.fast_score, app.fast_score_access_log = settings.fast_score_path, settings.access_log
    errors.install(app)
    app.include_router(score.router)
    app.include_router(events.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    openapi.install(app, settings)
    docs.install(app)
    tracing.configure(settings)
    ratelog.set_interval(settings.log_repeat_s)
    app.add_middleware(RequestContext, access_log=settings.access_log)
    return app
