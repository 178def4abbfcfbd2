"""Smaller state guarantees: dedup cap refuses instead of forgetting, merge on republish is idempotent,
rate-limited failure logs, publish refusals with clear messages, the admin token's whitespace."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.redis_layout import Click, RedisLayout

ROOT = Path(__file__).resolve().parents[2]


def _append(url, layout, batches):
    from service.feature_store import FeatureStore, create_redis

    async def go():
        store = FeatureStore(create_redis(url, 2.0, 4), layout)
        try:
            return await store.append_clicks(batches)
        finally:
            await store.close()

    return asyncio.run(go())


@pytest.mark.backends
def test_dedup_cap_refuses_and_old_ts_stays_remembered(redis_client, redis_server):
    layout = RedisLayout(dedup_cap=3)
    assert _append(redis_server.url, layout, {"u": ([Click("a", 1), Click("b", 2), Click("c", 3)], None)}) == \
        {"u": [1, 1, 1]}
    # past the cap: refused (-1), not stored; an old identity is still known (0), whatever its ts
    assert _append(redis_server.url, layout, {"u": ([Click("a", 1), Click("d", 4)], None)}) == {"u": [0, -1]}
    assert layout.split_history(redis_client.get(layout.history("u")), 9) == ["c", "b", "a"]
    assert 0 < redis_client.pttl(layout.dedup("u")) <= layout.dedup_window_ms
    # a legacy (ts-scored) identity is still consulted
    redis_client.zadd(layout.legacy_dedup("w"), {"x\x1f7": 7})
    assert _append(redis_server.url, layout, {"w": ([Click("x", 7)], None)}) == {"w": [0]}


@pytest.mark.backends
def test_merge_after_loss_is_idempotent(redis_client, model_repo, users):
    from service.publish import publish

    layout = RedisLayout()
    row = int(users["history_len"].argmax())
    uid = str(users["user_ids"][row])
    snapshot = users["history"][row][:users["history_len"][row]].tolist()
    redis_client.set(layout.history(uid), "live2\x1e\x1flive1\x1e")  # clicks received since a wipe
    first = publish(model_repo / "v1", redis_client, progress=False)
    assert first.merged >= 1 and first.marker["epoch"]
    merged = layout.split_history(redis_client.get(layout.history(uid)), 10**4)
    assert merged[:2] == ["live2", "live1"] and merged[2:] == snapshot[:layout.history_cap - 2]
    layout.clear_marker(redis_client, "v1")  # an interrupted rerun: no complete marker -> merges again, same result
    publish(model_repo / "v1", redis_client, progress=False)
    assert layout.split_history(redis_client.get(layout.history(uid)), 10**4) == merged
    redis_client.set(layout.history(uid), "newer\x1e\x1f" + redis_client.get(layout.history(uid)).decode())
    assert publish(model_repo / "v1", redis_client, progress=False).merged == 0  # normal republish: SET NX
    assert layout.split_history(redis_client.get(layout.history(uid)), 3)[0] == "newer"


def test_redis_failure_lines_are_rate_limited(caplog):
    from service.ratelog import RateLimitedLog

    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t"), every_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t"):
        assert [limited.warning("redis", "Redis fetch failed: %s", i) for i in range(5)] == [True] + [False] * 4
        now[0] = 11
        assert limited.warning("redis", "Redis fetch failed: %s", "x")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "+4 similar" in lines[1]


def _publish_cli(path, redis_url):
    return subprocess.run([sys.executable, "-m", "udg_cli", "publish", str(path), "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, env={**__import__("os").environ, "REDIS_URL": redis_url},
                          timeout=60)


def test_publish_refuses_truncated_and_mismatched_manifests(model_repo, tmp_path, redis_server, redis_client):
    copy = tmp_path / "v9"
    shutil.copytree(model_repo / "v1", copy)
    done = _publish_cli(copy, redis_server.url)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "named 'v9'" in done.stderr and "version 'v1'" in done.stderr, done.stderr
    manifest = copy / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    done = _publish_cli(copy, redis_server.url)
    assert done.returncode != 0 and "Traceback" not in done.stderr and "truncated" in done.stderr, done.stderr
    assert not list(redis_client.scan_iter("udg:{ctl}:published:*"))


def test_admin_token_whitespace(caplog):
    from pydantic import ValidationError

    from service.settings import Settings

    with caplog.at_level(logging.WARNING, "udg.settings"):
        assert Settings(admin_token=" s3cret\n").admin_token.get_secret_value() == "s3cret"
    assert "stripped" in caplog.text and "s3cret" not in caplog.text
    with pytest.raises(ValidationError, match="only whitespace"):
        Settings(admin_token="  \n")
