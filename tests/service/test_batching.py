"""Cross-request batching (service/batching.py): concurrent requests in one multi-user call give the one-user
scores, no request waits longer than the bound for others, a full batch runs at once, an error reaches every
request of its batch, and the service batches only when told to."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from service.batching import MicroBatcher  # noqa: E402


def requests_of(artifact, users, count: int, n: int = 9, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(users["user_ids"]), size=count, replace=False)
    items = artifact.schema.items.tokens[2:]
    out = []
    for row in rows:
        candidates, _ = artifact.encode_items([items[i] for i in rng.choice(len(items), size=n, replace=False)])
        history = users["history_idx"][row][:users["history_len"][row]]
        out.append((users["user_vec"][row], users["udg_vec"][row], history, candidates, None))
    return out


async def _gather(batcher: MicroBatcher, artifact, requests: list[tuple]) -> list[np.ndarray]:
    return await asyncio.gather(*(batcher.score(artifact, *r) for r in requests))


def test_concurrent_requests_run_as_one_call_with_the_one_user_scores(artifact, users):
    batcher = MicroBatcher(max_wait_s=0.02)
    requests = requests_of(artifact, users, 6)
    batched = asyncio.run(_gather(batcher, artifact, requests))
    assert batcher.calls == 1 and batcher.batched_requests == 6
    for request, got in zip(requests, batched, strict=True):
        np.testing.assert_allclose(got, artifact.score(*request), atol=1e-6, rtol=0)


def test_a_lone_request_waits_the_bound_and_no_longer(artifact, users):
    wait = 0.06
    batcher = MicroBatcher(max_wait_s=wait)
    request = requests_of(artifact, users, 1)[0]
    artifact.score(*request)  # warm

    async def timed():
        started = time.perf_counter()
        result = await batcher.score(artifact, *request)
        return time.perf_counter() - started, result

    elapsed, result = asyncio.run(timed())
    assert wait * 0.9 <= elapsed <= wait + 0.5  # the bound, plus one small call on a possibly loaded machine
    np.testing.assert_allclose(result, artifact.score(*request), atol=1e-6, rtol=0)
    assert batcher.calls == 1


def test_a_zero_bound_batches_requests_that_are_ready_together_and_makes_nobody_wait(artifact, users):
    """UDG_BATCH_WAIT_MS=0 (the setting to try on a CPU): requests that reach their model call together share
    one call, which runs at the event loop's next turn; a later request starts a batch of its own; a lone request
    waits for no other."""
    batcher = MicroBatcher(max_wait_s=0.0)
    requests = requests_of(artifact, users, 5)
    artifact.score(*requests[0])  # warm

    async def run():
        together = await asyncio.gather(*(batcher.score(artifact, *r) for r in requests[:3]))
        later = await asyncio.gather(*(batcher.score(artifact, *r) for r in requests[3:]))
        started = time.perf_counter()
        await batcher.score(artifact, *requests[0])
        return [*together, *later], time.perf_counter() - started

    batched, lone_s = asyncio.run(run())
    assert batcher.calls == 3 and batcher.batched_requests == 6
    assert lone_s < 0.25  # one small call, no bound to wait out (generous: the machine may be loaded)
    for request, got in zip(requests, batched, strict=True):
        np.testing.assert_allclose(got, artifact.score(*request), atol=1e-6, rtol=0)


def test_later_arrivals_wait_less_and_a_full_batch_runs_at_once(artifact, users):
    requests = requests_of(artifact, users, 4, n=10)
    batcher = MicroBatcher(max_wait_s=0.08)

    async def staggered():
        started = time.perf_counter()
        first = asyncio.ensure_future(batcher.score(artifact, *requests[0]))
        await asyncio.sleep(0.05)  # the batch opened 50 ms ago: the second request waits ~30 ms, not 80
        second = await batcher.score(artifact, *requests[1])
        return time.perf_counter() - started, await first, second

    elapsed, *_ = asyncio.run(staggered())
    assert elapsed <= 0.08 + 0.5 and batcher.calls == 1  # both ran when the FIRST request's wait was over

    capped = MicroBatcher(max_wait_s=5.0, max_candidates=20)  # two requests of 10 fill it

    async def full():
        started = time.perf_counter()
        results = await _gather(capped, artifact, requests[:2])
        return time.perf_counter() - started, results

    elapsed, results = asyncio.run(full())
    assert elapsed < 2.0 and capped.calls == 1  # far below the 5 s wait
    for request, got in zip(requests[:2], results, strict=True):
        np.testing.assert_allclose(got, artifact.score(*request), atol=1e-6, rtol=0)


def test_an_error_of_the_call_reaches_every_request_of_its_batch(artifact, users):
    good, other = requests_of(artifact, users, 2)
    bad = (np.zeros(artifact.user_dim + 1, np.float32), *good[1:])  # wrong width: the call raises

    batcher = MicroBatcher(max_wait_s=0.01)

    async def mixed():
        return await asyncio.gather(batcher.score(artifact, *good), batcher.score(artifact, *bad),
                                    return_exceptions=True)

    results = asyncio.run(mixed())
    assert all(isinstance(r, ValueError) for r in results), results
    assert "user_vec" in str(results[0]) and batcher.calls == 1
    assert isinstance(asyncio.run(_gather(batcher, artifact, [other]))[0], np.ndarray)  # the next batch is fine


def test_off_by_default_and_opt_in_through_the_settings(make_client, published, artifact, users):
    from service.settings import Settings

    assert Settings().batch_wait_ms is None and MicroBatcher.from_settings(Settings()) is None

    client = make_client(batch_wait_ms=40)
    batcher = client.app.state.services.scorer.batcher
    assert batcher is not None and batcher.max_wait_s == pytest.approx(0.04)
    ids = [str(u) for u in users["user_ids"][:4]]
    candidates = artifact.schema.items.tokens[2:12]
    answers: dict[str, dict] = {}

    def call(user_id: str) -> None:
        response = client.post("/v1/score", json={"user_id": user_id, "candidates": candidates})
        assert response.status_code == 200, response.text
        answers[user_id] = response.json()

    threads = [threading.Thread(target=call, args=(u,)) for u in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert batcher.batched_requests == 4 and batcher.calls < 4  # at least two requests shared a call
    plain = make_client()
    assert plain.app.state.services.scorer.batcher is None
    for user_id in ids:
        expected = plain.post("/v1/score", json={"user_id": user_id, "candidates": candidates}).json()
        np.testing.assert_allclose(answers[user_id]["scores"], expected["scores"], atol=1e-6, rtol=0)
        assert answers[user_id]["ranking"] == expected["ranking"]
