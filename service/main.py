"""Assembles the app: settings -> feature store -> model registry -> scorer -> routers. Nothing else.

`uvicorn --factory service.main:create_app` (what `udg serve` runs) builds one app per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI

from service import errors, metrics
from service.api import events, health, score
from service.api.deps import Services
from service.feature_store import FeatureStore, FeatureStoreUnavailable, Keys, create_redis
from service.registry import ActivationError, ModelRegistry
from service.scoring import Scorer
from service.settings import Settings, get_settings

log = logging.getLogger("udg.service")


async def keep_activated(services: Services) -> None:
    """Until a version is active: try to activate the configured one every `activation_retry_s` (the
    service may start before Redis, or before `udg publish` has finished; it becomes ready by itself)."""
    from export.runtime import ArtifactError

    settings, registry = services.settings, services.registry
    reported = None
    while registry.active is None:
        try:
            model = await registry.activate(settings.model_version)
            metrics.MODEL_LOADED.labels(model.version).set(1)
            return
        except (ActivationError, ArtifactError, FeatureStoreUnavailable, OSError) as error:
            registry.last_error = str(error)
            if str(error) != reported:
                log.warning("cannot activate a model version yet (retrying every %.1f s): %s",
                            settings.activation_retry_s, error)
                reported = str(error)
        await asyncio.sleep(settings.activation_retry_s)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        redis = create_redis(settings.redis_url, settings.redis_timeout_s, settings.redis_pool_size,
                             settings.redis_ca_certs)
        store = FeatureStore(redis, Keys(settings.key_prefix), settings.history_cap, observe=metrics.observe_redis)
        registry = ModelRegistry(settings.model_repo, store, settings.providers, settings.ort_threads,
                                 settings.require_publish_marker)
        services = Services(settings, store, registry, Scorer(store))
        app.state.services = services
        log.info("feature store %s, model repository %s", settings.redis_url_for_logs(), settings.model_repo)
        activation = asyncio.create_task(keep_activated(services))
        services.background.append(activation)
        try:
            yield
        finally:
            activation.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await activation
            await services.scorer.drain()
            await store.close()

    app = FastAPI(title="UDG CTR scoring", version="1", lifespan=lifespan)
    errors.install(app)
    app.include_router(score.router)
    app.include_router(events.router)
    app.include_router(health.router)
    return app
