"""All service settings in one pydantic-settings class, read from the environment (and an optional `.env`).

Names: `REDIS_URL` as is (the conventional name; `UDG_REDIS_URL` also works), everything else `UDG_<FIELD>`,
e.g. `UDG_MODEL_REPO`, `UDG_MODEL_VERSION`, `UDG_MAX_CANDIDATES`, `UDG_ORT_THREADS`, `UDG_ADMIN_TOKEN`.

`REDIS_URL` takes every form redis-py understands: `redis://[:password@]host:port/db`,
`redis://user:password@host:port/db` (ACL users), `rediss://…` (TLS; `UDG_REDIS_CA_CERTS` names a CA bundle
when the server's certificate is not signed by a system CA), `unix:///path/redis.sock`, and a Redis Cluster:
`redis+cluster://[user:password@]host:port[,host:port…]` (`rediss+cluster://` over TLS; the nodes listed are
seeds, see service/redis_client.py and docs/cluster.md).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from repository import VERSION_RULE, is_version_name


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UDG_", env_file=".env", extra="ignore",
                                      protected_namespaces=())

    # --- feature store ---------------------------------------------------------------------------------
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=AliasChoices("REDIS_URL", "UDG_REDIS_URL"),
                           repr=False)  # may hold a password: kept out of repr; log redis_url_for_logs()
    redis_ca_certs: str | None = None  # CA bundle for rediss:// with a private CA
    redis_timeout_s: float = Field(0.25, gt=0, le=30)  # per Redis call (connect, read, write); then 503
    redis_pool_size: int = Field(64, ge=1, le=10_000)
    # The score path's MGET on one pipelined connection per worker (per primary on a Redis Cluster), parsed by
    # hiredis (service/redis_pipeline.py): less CPU per request than redis-py's client (docs/performance.md);
    # false: every command on redis-py
    redis_pipelined_reads: bool = True
    key_prefix: str = Field("udg", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    # Hot users' state served from the worker, invalidated by Redis client-side caching (BCAST tracking on one
    # connection per worker; service/state_cache.py has the rules). Off by default; not on a Redis Cluster.
    state_cache: bool = False
    state_cache_users: int = Field(100_000, ge=1, le=10_000_000)  # users kept per worker (LRU beyond)
    state_cache_max_age_s: float = Field(30.0, gt=0, le=3600)  # an entry older than this is read again
    state_cache_ping_s: float = Field(1.0, gt=0, le=60)  # the invalidation connection is lost after 2 silent periods
    history_cap: int = Field(200, ge=1, le=10_000)  # clicks kept per user (>= every version's max_history)

    # --- models --------------------------------------------------------------------------------------
    model_repo: Path = Path("runs/quickstart/model_repo")  # where `udg quickstart` exports
    model_version: str | None = None  # None: the newest version directory in model_repo
    ort_threads: int = Field(1, ge=1, le=256)  # onnxruntime intra-op threads; workers * threads <= cores
    ort_providers: str = "CPUExecutionProvider"  # comma-separated onnxruntime providers, in preference order
    # On the CUDA provider, score through one captured CUDA graph per candidate bucket (3-4x lower latency
    # than plain CUDA runs on an H100, see docs/performance.md); ignored on CPU.
    cuda_graph: bool = True
    # "int8": score with each version's int8 graph (`udg export --int8`; validation AUC in docs/performance.md)
    scorer_precision: Literal["fp32", "int8"] = "fp32"
    # Cross-request batching (service/batching.py), off by default: concurrent score requests of a version
    # run as one multi-user call, each waiting at most this long for others (ms); 0 batches only what
    # arrived while the loop was busy. The cap runs a batch at once when it holds that many candidates.
    batch_wait_ms: float | None = Field(None, ge=0, le=100)
    batch_max_candidates: int = Field(8192, ge=1, le=1_000_000)
    require_publish_marker: bool = True  # refuse to activate a version whose per-user state is not complete
    activation_retry_s: float = Field(1.0, gt=0)  # retry period while no version could be activated

    # --- model versions: workers follow the routing document in Redis (service/control.py) --------------
    control_pubsub: bool = True  # react to change notifications at once (else polling only)
    control_poll_s: float = Field(1.0, gt=0, le=60)  # re-read the routing document at least this often
    heartbeat_s: float = Field(5.0, gt=0)  # worker heartbeat period (versions held, generation applied)
    heartbeat_ttl_s: float = Field(15.0, gt=0)  # a worker silent this long counts as gone (udg gc, admin waits)
    admin_wait_s: float = Field(10.0, ge=0, le=300)  # admin changes wait this long for every worker to apply

    # --- API -----------------------------------------------------------------------------------------
    max_candidates: int = Field(2000, ge=1, le=100_000)
    max_events_per_batch: int = Field(1000, ge=1, le=100_000)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    admin_token: SecretStr | None = None  # bearer token of /v1/admin/*; unset: the admin API is disabled
    # POST /v1/score answered in front of FastAPI's middleware stack, same contract (service/fast_score.py);
    # on by default: 9-12 % less CPU per request at N = 500 (docs/performance.md); false: the FastAPI route
    fast_score_path: bool = True

    # --- server --------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    log_level: str = "info"
    access_log: bool = False  # one line per request on logger udg.access (service/request_context.py)

    # --- observability (docs/observability.md) ---------------------------------------------------------
    # auto: text when stderr is a terminal, else JSON (containers); json; text (service/logs.py)
    log_format: Literal["auto", "json", "text"] = "auto"
    otlp_endpoint: str | None = None  # OTLP/HTTP collector, e.g. http://otel-collector:4318; unset: no tracing
    otel_service_name: str = "udg-ctr"
    trace_sample_ratio: float = Field(1.0, ge=0, le=1)  # share of traces kept (parent-based)
    readiness_period_s: float = Field(2.0, gt=0, le=60)  # udg_ready is refreshed this often per worker
    log_repeat_s: float = Field(10.0, gt=0, le=3600)  # a repeated failure is logged once per this, with a count

    # --- HTTP limits, per worker process (service/http_server.py; answers are JSON errors) ----------------
    http_max_header_bytes: int = Field(32 * 1024, ge=1024, le=1 << 20)  # request line + headers; else 431
    http_max_headers: int = Field(100, ge=8, le=1000)  # header fields per request; else 431
    http_header_timeout_s: float = Field(10.0, gt=0, le=300)  # the head must arrive within this; else 408/close
    http_body_timeout_s: float = Field(30.0, gt=0, le=600)  # the body must arrive within this of the head; 408
    http_keep_alive_s: int = Field(5, ge=1, le=600)  # an idle kept-alive connection is closed after this
    http_max_connections: int = Field(1000, ge=1, le=100_000)  # open connections; beyond: 503 overloaded
    # After an early answer (413, 431) the unread body is read and dropped (at most this much, this long) so
    # that clients which send the whole body before reading get the answer instead of a connection reset.
    http_drain_bytes: int = Field(16 << 20, ge=0, le=1 << 30)
    http_drain_timeout_s: float = Field(5.0, gt=0, le=120)

    # --- graceful shutdown (service/shutdown.py) ----------------------------------------------------------
    # After SIGTERM: /readyz answers 503 for shutdown_drain_s while requests are still served (load balancers
    # stop sending), then the worker stops accepting and in-flight requests get shutdown_timeout_s to complete.
    shutdown_drain_s: float = Field(5.0, ge=0, le=300)
    shutdown_timeout_s: float = Field(10.0, gt=0, le=600)

    # --- state: loss detection, dedup, bounded growth (service/control.py, service/redis_layout.py) ------
    # The routing document is also kept in this file (written atomically on every change); a worker that
    # finds no document in Redis restores it from here (or from its memory) and bootstraps from
    # UDG_MODEL_VERSION only when neither exists. None: MODEL_REPO/routing.json.
    routing_file: Path | None = None
    dedup_window_s: float = Field(7 * 24 * 3600, gt=0)  # event identities remembered this long after arrival
    dedup_cap: int = Field(5000, ge=1, le=1_000_000)  # identities per user in the window; past it: refused
    generated_ttl_s: int = Field(30 * 24 * 3600, ge=60)  # TTL of written-back cold-start state, refreshed on use
    generated_cap: int = Field(100_000, ge=0)  # new generated users written back per window (beyond: not written)
    generated_window_s: int = Field(3600, ge=1)
    # Durability of events: after storing a click batch, WAIT until this many replicas acknowledged it (at most
    # events_wait_timeout_ms), else answer 503 (a retry is deduplicated). 0: no WAIT (asynchronous replication;
    # an event answered 200 can be lost if its primary dies before replicating it). docs/cluster.md has the cost.
    events_wait_replicas: int = Field(0, ge=0, le=16)
    events_wait_timeout_ms: int = Field(100, ge=1, le=60_000)
    # --- online warm-up (`udg warmup`, docs/warmup.md) ---------------------------------------------------
    warmup_stream: bool = True  # POST /v1/events also XADDs every accepted event to the warm-up stream
    warmup_stream_maxlen: int = Field(1_000_000, ge=1000)  # MAXLEN ~ of the stream: events kept for the workers

    @field_validator("admin_token", mode="before")
    @classmethod
    def _strip_token(cls, value):
        """A token with surrounding whitespace (a stray newline in a secret file) is stripped, with a warning;
        one that is only whitespace is refused (it would leave the admin API unusable)."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(raw, str) and raw != raw.strip():
            if not raw.strip():
                raise ValueError("UDG_ADMIN_TOKEN is only whitespace; unset it to disable the admin API")
            import logging

            logging.getLogger("udg.settings").warning(
                "UDG_ADMIN_TOKEN has surrounding whitespace (%d characters); stripped", len(raw) - len(raw.strip()))
            return raw.strip()
        return value

    @property
    def routing_path(self) -> Path:
        return self.routing_file if self.routing_file is not None else Path(self.model_repo) / "routing.json"

    @field_validator("model_version")
    @classmethod
    def _version_name(cls, value: str | None) -> str | None:
        if value is not None and not is_version_name(value):
            raise ValueError(VERSION_RULE)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        from service.redis_client import parse_redis_url

        parse_redis_url(value)  # ValueError names what is wrong
        return value

    @property
    def providers(self) -> list[str]:
        return [p.strip() for p in self.ort_providers.split(",") if p.strip()]

    def redis_url_for_logs(self) -> str:
        """REDIS_URL with any password replaced by ***."""
        return mask_url(self.redis_url)


def mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    if "," in parts.netloc:  # a cluster's node list: no single host:port to rebuild
        nodes = parts.netloc.rsplit("@", 1)[1]
        return url.replace(parts.netloc, f"{parts.username or ''}:***@{nodes}", 1)
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
