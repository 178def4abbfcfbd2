"""Shared fixtures: a real redis-server on a free port per session (flushed between tests), a tiny trained
and exported UDG model in a session-scoped model repository, and a service app wired to both.

Tests (or modules, with `pytestmark`) marked `@pytest.mark.backends` run twice where they use `redis_server`:
against one redis-server and against a local Redis Cluster (3 primaries + 3 replicas, started once per
session when first needed); `redis_server.url` is then a `redis+cluster://` URL."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REDIS_BINARY = shutil.which("redis-server") or "/usr/bin/redis-server"
VERSION = "v1"

try:  # property tests: no per-example deadline (the machine is shared; a slow example is not a failure)
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("udg", deadline=None, print_blob=True)
    # scripts/mutation.py: one pytest run per mutant, so fewer examples each (a killed mutant fails fast anyway)
    _hypothesis_settings.register_profile("mutation", deadline=None, max_examples=25)
    _hypothesis_settings.load_profile(os.environ.get("UDG_HYPOTHESIS_PROFILE", "udg"))
except ImportError:  # the serving-only install has no hypothesis
    pass


def _redis_binary() -> str:
    if Path(REDIS_BINARY).exists():
        return REDIS_BINARY
    from service.local_redis import redis_server_binary

    return redis_server_binary()


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("backends") and "redis_server" in metafunc.fixturenames:
        metafunc.parametrize("redis_server", ["single", "cluster"], indirect=True, scope="session")


@pytest.fixture(scope="session")
def redis_cluster():
    """A local Redis Cluster: 3 primaries + 3 replicas, a primary failed over after 1 s unreachable."""
    from service.local_redis import LocalCluster

    cluster = LocalCluster(_redis_binary(), node_timeout_ms=1000).start()
    yield cluster
    cluster.cleanup()


@pytest.fixture(scope="session")
def single_redis():
    from service.local_redis import RedisServer, free_port

    server = RedisServer(_redis_binary(), free_port()).start(move_on_clash=True)
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_server(request):
    """One redis-server (default), or the local cluster where a `backends` test asks for it."""
    return request.getfixturevalue("redis_cluster" if getattr(request, "param", "single") == "cluster"
                                   else "single_redis")


@pytest.fixture
def redis_client(redis_server):
    """A sync client on a flushed database; restarts the server first if a test left it stopped."""
    from service.local_redis import RedisServer
    from service.publish import sync_redis

    if isinstance(redis_server, RedisServer) and (redis_server.process is None or
                                                   redis_server.process.poll() is not None):
        redis_server.start()
    client = sync_redis(redis_server.url, timeout_s=5)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Generated worlds go to a session cache (never the user's ~/.cache/udg) unless UDG_CACHE_DIR is set."""
    import os

    if "UDG_CACHE_DIR" not in os.environ:
        os.environ["UDG_CACHE_DIR"] = str(tmp_path_factory.mktemp("udg_cache"))
        yield Path(os.environ["UDG_CACHE_DIR"])
        os.environ.pop("UDG_CACHE_DIR", None)
    else:
        yield Path(os.environ["UDG_CACHE_DIR"])


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory) -> Path:
    """Train a tiny PNN+UDG (+ meta generator) on synthetic data, save the checkpoint, export it as v1."""
    torch = pytest.importorskip("torch")

    from export.onnx_export import export_artifact
    from model.checkpoint import Checkpoint, MetaState
    from model.experiment import model_config
    from model.meta import MetaConfig, train_meta
    from model.train import TrainConfig, train_model
    from tests.tiny import tiny_prepared

    torch.set_num_threads(1)  # tiny models; robust when the other core is busy
    cached = os.environ.get("UDG_TEST_MODEL_CACHE")  # scripts/mutation.py: train once, not once per mutant
    if cached and (Path(cached) / "repo" / VERSION / "manifest.json").exists():
        return Path(cached) / "repo"
    root = Path(cached) if cached else tmp_path_factory.mktemp("service_model")
    root.mkdir(parents=True, exist_ok=True)
    data = tiny_prepared(users=200, items=60, events_per_user=12, max_history=8, cold_user_frac=0.1)
    config = model_config("pnn", "udg", embed_dim=8, hidden=(32, 16), udg_dim=8, gate_hidden=16)
    train_config = TrainConfig(epochs=1)
    model, metrics = train_model(data, config, train_config, progress=False)
    generator, info = train_meta(model, data, MetaConfig(steps=20), progress=False)
    checkpoint = Checkpoint.from_training(model, config, train_config, data, metrics,
                                          meta=MetaState(generator.state_dict(), info)).save(root / "checkpoint.pt")
    export_artifact(checkpoint, VERSION, root / "repo")
    return root / "repo"


@pytest.fixture(scope="session")
def parity_data():
    """A tiny prepared data set (200 users, 60 items, histories of 6) for the base-model and export parity
    tests; read, never changed."""
    from tests.tiny import tiny_prepared

    return tiny_prepared(users=200, items=60, events_per_user=12, max_history=6)


@pytest.fixture(scope="session")
def warm_data():
    """A tiny prepared data set with no cold users (60 users, 40 items) for the UDG math tests; read only."""
    from tests.tiny import tiny_prepared

    return tiny_prepared(users=60, items=40, events_per_user=10, max_history=6, cold_user_frac=0.0)


@pytest.fixture(scope="session")
def artifact(model_repo):
    from export.runtime import open_artifact

    return open_artifact(model_repo / VERSION, providers=["CPUExecutionProvider"], threads=1)


@pytest.fixture(scope="session")
def users(artifact):
    return artifact.load_users()


@pytest.fixture
def published(redis_client, model_repo):
    from service.publish import publish

    return publish(model_repo / VERSION, redis_client, progress=False)


def make_settings(redis_url: str, model_repo: Path, **overrides):
    from service.settings import Settings

    values = dict(redis_url=redis_url, model_repo=model_repo, model_version=VERSION, redis_timeout_s=0.3,
                  activation_retry_s=0.05, ort_threads=1, max_candidates=50)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_client(redis_server, model_repo, tmp_path):
    """Factory: a TestClient (lifespan run) on a fresh app over `repo` (default: the tiny model's repository);
    waits until a version is active unless told not."""
    import time

    from fastapi.testclient import TestClient

    from service.main import create_app

    clients = []

    def factory(wait_ready: bool = True, repo=None, **overrides):
        overrides.setdefault("routing_file", tmp_path / "routing.json")  # per test: the repo is shared
        client = TestClient(create_app(make_settings(redis_server.url, repo or model_repo, **overrides)),
                            raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        if wait_ready:
            deadline = time.monotonic() + 30
            while client.app.state.services.registry.active is None:
                assert time.monotonic() < deadline, client.app.state.services.registry.last_error
                time.sleep(0.02)
        return client

    yield factory
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client, published):
    return make_client()
