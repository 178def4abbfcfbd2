"""A naive baseline for `udg bench compare`: the scoring service written the way most people would first write it.

    NAIVE_CHECKPOINT=runs/x/checkpoint.pt REDIS_URL=redis://127.0.0.1:6379/0 \
        uvicorn loadtest.naive_app:app --workers 2

- a plain FastAPI app, a sync `def` route (FastAPI runs it in its thread pool), a pydantic request model and
  the default JSON response;
- the PyTorch eager model from the training checkpoint, called per request under `torch.no_grad()`, with
  PyTorch's default thread settings (intra-op threads = CPU cores, in every worker);
- features from Redis with one GET per feature (user embedding, UDG embedding, click history), each a JSON
  string, through a blocking redis-py client.

It computes what the service computes — the same model (`model.score`: user side once, broadcast over the N
candidates), the same user state — so the comparison measures the serving stack, not the maths. It is NOT a
strawman: it already uses the model's broadcast path and keeps the item tables in the model. The keys,
`naive:<user_id>:<feature>`, are written by `bench_compare.write_naive_features`.
"""

from __future__ import annotations

import json
import os

import redis
import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from loadtest.bench_compare import NAIVE_KEY
from model.checkpoint import Checkpoint

FEATURES = ("user_vec", "udg_vec", "history")


def feature_key(user_id: str, feature: str) -> str:
    return NAIVE_KEY.format(user_id=user_id, feature=feature)


class ScoreRequest(BaseModel):
    user_id: str
    candidates: list[str]


checkpoint = Checkpoint.load(os.environ["NAIVE_CHECKPOINT"])
model = checkpoint.build_model()
space = checkpoint.schema
store = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
app = FastAPI()


@app.get("/readyz")
def ready():
    return {"status": "ready"}


@app.post("/v1/score")
def score(request: ScoreRequest):
    values = {}
    for feature in FEATURES:
        raw = store.get(feature_key(request.user_id, feature))
        if raw is None:
            raise HTTPException(status_code=404, detail=f"no {feature} for user {request.user_id}")
        values[feature] = json.loads(raw)
    history = [space.items.lookup(item) for item in values["history"]][: space.max_history]
    history += [0] * (space.max_history - len(history))
    candidates = [space.items.lookup(item) for item in request.candidates]
    with torch.no_grad():
        logits = model.score(torch.tensor([values["user_vec"]]), torch.tensor([values["udg_vec"]]),
                             torch.tensor([history]), torch.tensor(candidates))
        scores = torch.sigmoid(logits).reshape(-1).tolist()
    return {"user_id": request.user_id, "scores": scores}
