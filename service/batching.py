"""Cross-request batching in one worker: concurrent score requests of one version in ONE onnxruntime call.

Opt-in (`UDG_BATCH_WAIT_MS`, off by default). A request's model call joins the open batch of its version; the
batch runs (the multi-user graph, `Artifact.score_many`) when its first request has waited `max_wait_s`, or
at once when it holds `max_candidates` candidates. So no request waits more than `max_wait_s` for others
before its batch runs (the bounded wait), and a lone request costs that wait plus one call. A bound of 0 runs
the batch at the event loop's next turn: it holds the requests that reach their model call before then, and
nobody waits (on a CPU, the setting that pays at about 100 candidates per request, docs/performance.md). A version
without the multi-user graph (exported before it) is scored one request per call, as without batching.

The call runs on the event loop, as the unbatched call does: requests that arrive meanwhile queue in the
next batch. An error of the call fails every request of that batch with it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Batch:
    artifact: object
    requests: list = field(default_factory=list)  # (arguments of Artifact.score, future)
    candidates: int = 0
    timer: asyncio.TimerHandle | None = None


class MicroBatcher:
    def __init__(self, max_wait_s: float, max_candidates: int = 8192):
        if max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0")
        self.max_wait_s = max_wait_s
        self.max_candidates = max_candidates
        self._open: dict[int, _Batch] = {}  # id(artifact) -> its open batch
        self.calls = 0  # model calls made (batches run); tests and benchmarks read it
        self.batched_requests = 0

    @classmethod
    def from_settings(cls, settings) -> MicroBatcher | None:
        wait_ms = getattr(settings, "batch_wait_ms", None)
        if wait_ms is None:
            return None
        return cls(wait_ms / 1e3, settings.batch_max_candidates)

    async def score(self, artifact, user_vec, udg_vec, history, candidate_idx, fields=None) -> np.ndarray:
        """`artifact.score(...)`'s result, computed in a batch with the other requests waiting now."""
        if not getattr(artifact, "can_batch", False):
            return artifact.score(user_vec, udg_vec, history, candidate_idx, fields)
        loop = asyncio.get_running_loop()
        key = id(artifact)
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Batch(artifact)
            batch.timer = loop.call_later(self.max_wait_s, self._run, key, batch)
        future = loop.create_future()
        batch.requests.append(((user_vec, udg_vec, history, candidate_idx, fields), future))
        batch.candidates += len(candidate_idx)
        if batch.candidates >= self.max_candidates:
            self._run(key, batch)
        return await future

    def _run(self, key: int, batch: _Batch) -> None:
        if self._open.get(key) is not batch:  # already run (size reached before the timer fired)
            return
        del self._open[key]
        if batch.timer is not None:
            batch.timer.cancel()
        live = [(args, future) for args, future in batch.requests if not future.done()]  # cancelled callers
        if not live:
            return
        self.calls += 1
        self.batched_requests += len(live)
        try:
            results = (batch.artifact.score_many([args for args, _ in live]) if len(live) > 1
                       else [batch.artifact.score(*live[0][0])])
        except Exception as error:  # every request of the batch gets the call's error
            for _, future in live:
                future.set_exception(error)
            return
        for (_, future), result in zip(live, results, strict=True):
            future.set_result(result)
