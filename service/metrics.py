"""Prometheus metrics. Names start with `udg_`; latency is in seconds with sub-millisecond buckets.

Per-stage timers (`udg_stage_seconds{stage=…}`) split a score request into: `parse` (body read + validation),
`redis` (the MGET), `cold_start` (meta generator), `encode` (raw ids -> indices), `model` (the onnxruntime
call), `respond` (ranking + JSON). Their sum against `udg_request_seconds` shows the framework's share.

With several uvicorn workers, `udg serve` sets PROMETHEUS_MULTIPROC_DIR before the workers start, and
`/metrics` aggregates every worker's values (prometheus_client multiprocess mode): one scrape of a process
gives all its workers' counters and histograms summed, and the per-worker gauges (`udg_ready`,
`udg_worker_in_sync`, `udg_state_lost`, ...) once per live worker with a `pid` label. A worker that died
leaves its gauge files behind; `render()` drops those of processes that no longer exist, so a dead worker's
last values do not hold an alert (ops/prometheus/ scrapes every replica; docs/observability.md).
"""

from __future__ import annotations

import glob
import os
import re

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)

LATENCY_BUCKETS = (0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0004, 0.0005, 0.00075, 0.001, 0.0015, 0.002,
                   0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SIZE_BUCKETS = (1, 10, 50, 100, 200, 500, 1000, 2000, 5000)

REQUEST_SECONDS = Histogram("udg_request_seconds", "End-to-end handler latency", ["route", "model_version"],
                            buckets=LATENCY_BUCKETS)
STAGE_SECONDS = Histogram("udg_stage_seconds", "Latency of one stage of a score request", ["stage"],
                          buckets=LATENCY_BUCKETS)
REDIS_SECONDS = Histogram("udg_redis_seconds", "Latency of one Redis call", ["op"], buckets=LATENCY_BUCKETS)
CANDIDATES = Counter("udg_candidates_scored", "Candidates scored", ["model_version"])
CANDIDATES_PER_REQUEST = Histogram("udg_candidates_per_request", "Candidates per score request",
                                   buckets=SIZE_BUCKETS)
UNKNOWN_CANDIDATES = Counter("udg_unknown_candidates", "Candidates scored through the OOV row", ["model_version"])
PROFILE_OOV = Counter("udg_profile_oov_values", "Profile values a version has no row for (scored as OOV or a "
                      "hash bucket)", ["model_version", "field"])
NEW_ITEM_CANDIDATES = Counter("udg_new_item_candidates", "Unknown candidates scored with features from the "
                              "version's item table", ["model_version"])
COLD_STARTS = Counter("udg_cold_starts", "Users without state for the serving version",
                      ["model_version", "profile_source"])
EVENTS = Counter("udg_events", "Click events by outcome", ["outcome"])
ERRORS = Counter("udg_errors", "Error responses by kind", ["kind"])
WRITE_BACK_FAILURES = Counter("udg_write_back_failures", "Cold-start states that could not be written back")
GENERATED_USERS = Counter("udg_generated_users", "Cold-start write-backs: written, or capped (the window's cap on "
                          "new generated users was reached: scored, not written)", ["outcome"])
STATE_LOST = Gauge("udg_state_lost", "1 while this worker has detected that Redis lost the published state "
                   "(score requests get 503 state_lost until the serving versions are republished)",
                   multiprocess_mode="liveall")
STATE_CACHE_LOOKUPS = Counter("udg_state_cache_lookups", "Score requests' lookups in the hot-user state cache "
                              "(UDG_STATE_CACHE): hit (no Redis read), miss, off (bypassed: no invalidation "
                              "connection)", ["outcome"])
STATE_CACHE_ACTIVE = Gauge("udg_state_cache_active", "1 while this worker's state cache has a tracking invalidation "
                           "connection (0: bypassed, or UDG_STATE_CACHE on a cluster)", multiprocess_mode="liveall")
STATE_LOSSES = Counter("udg_state_losses", "State losses detected (epoch changed or vanished)")
LOG_SUPPRESSED = Counter("udg_log_lines_suppressed", "Repeated warning lines not written (rate-limited)", ["what"])
MODEL_LOADED = Gauge("udg_model_loaded", "1 for the version serving requests", ["model_version"],
                     multiprocess_mode="liveall")

# --- per model version and A/B arm (arm: active | split | pinned) ------------------------------------------
VERSION_REQUESTS = Counter("udg_version_requests", "Score requests by serving version and arm",
                           ["model_version", "arm"])
VERSION_SECONDS = Histogram("udg_version_request_seconds", "Score handler latency by serving version and arm",
                            ["model_version", "arm"], buckets=LATENCY_BUCKETS)
VERSION_SCORE = Summary("udg_version_mean_score", "Mean click probability of a request's candidates",
                        ["model_version", "arm"])
VERSION_STATE = Gauge("udg_version_state", "1 for the state each version is in, per worker",
                      ["model_version", "state"], multiprocess_mode="liveall")
WORKER_IN_SYNC = Gauge("udg_worker_in_sync", "1 when this worker serves the routing stored in Redis",
                       multiprocess_mode="liveall")
ROUTING_GENERATION = Gauge("udg_routing_generation", "Generation of the routing document this worker applied",
                           multiprocess_mode="liveall")
ROUTING_CHANGES = Counter("udg_routing_changes", "Routing swaps applied (active version or split changed)")
LOAD_SECONDS = Histogram("udg_version_load_seconds", "Load + verify + warm-up time of a version",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
_VERSION_CHILDREN: dict = {}

# --- operations: readiness, every HTTP answer, observed click-through per arm ------------------------------
READY = Gauge("udg_ready", "1 while this worker would answer /readyz with 200 (a version active, Redis "
              "reachable, no state lost); refreshed every few seconds", multiprocess_mode="liveall")
HTTP_RESPONSES = Counter("udg_http_responses", "Every HTTP answer of the app by route and status code "
                         "(the denominator of the error ratio)", ["route", "status"])
ARM_EVENTS = Counter("udg_arm_events", "Impressions (events) by the version and arm serving their user now, "
                     "and whether they were clicks: clicked / all is the arm's observed CTR",
                     ["model_version", "arm", "clicked"])


def observe_version(version: str, arm: str, seconds: float, mean_score: float) -> None:
    children = _VERSION_CHILDREN.get((version, arm))
    if children is None:
        children = (VERSION_REQUESTS.labels(version, arm), VERSION_SECONDS.labels(version, arm),
                    VERSION_SCORE.labels(version, arm))
        _VERSION_CHILDREN[(version, arm)] = children
    children[0].inc()
    children[1].observe(seconds)
    children[2].observe(mean_score)


def observe_redis(op: str, seconds: float) -> None:
    REDIS_SECONDS.labels(op).observe(seconds)


def count_arm_events(select, events) -> None:
    """Each event under the version and arm that `select(user_id)` (the routing's choice) serves its user."""
    counts: dict[tuple[str, str, str], int] = {}
    for event in events:
        model, arm = select(event.user_id)
        if model is not None:
            key = (model.version, arm, "true" if event.clicked else "false")
            counts[key] = counts.get(key, 0) + 1
    for key, count in counts.items():
        ARM_EVENTS.labels(*key).inc(count)


_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w*_(\d+)\.db$")


def forget_dead_workers(directory: str) -> list[int]:
    """Remove the live-gauge files of worker processes that no longer exist; -> their pids."""
    from prometheus_client import multiprocess

    dead = set()
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        match = _LIVE_GAUGE_FILE.search(path)
        if not match:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead.add(pid)
        except PermissionError:  # alive, another user's
            pass
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)
    return sorted(dead)


def render() -> tuple[bytes, str]:
    """The exposition text: this process's registry, or all workers' in multiprocess mode."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        from prometheus_client import multiprocess

        forget_dead_workers(directory)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
