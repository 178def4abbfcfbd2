"""A model version as the warm-up worker uses it: the version's own PyTorch weights, frozen, and the α step of
Algorithm 1 on one user's UDG embedding.

Why a checkpoint in the version directory: the ONNX graphs give scores, not gradients, and a gradient taken with
any other weights than the version's would write under its namespace an embedding its model did not compute.
`udg export` therefore keeps the model and meta generator it exported (`warmup.pt`, listed with its sha256 in
the manifest like every file); loading checks the sha256 (`ModelRepository.verify`) and that the weights
reproduce the manifest's golden scores, so a checkpoint that is not the graphs' is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataset.schema import PAD
from model.checkpoint import Checkpoint
from model.warm_rule import WarmRule, event_steps
from repository import WARMUP_FILE, ModelRepository

GOLDEN_ATOL = 1e-4


class NotWarmable(RuntimeError):
    """A version the worker cannot warm (no warmup.pt: exported before it existed, or a model without UDG)."""


@dataclass
class WarmEvent:
    """One event of a user, parsed from the stream."""

    entry_id: bytes
    user_id: str
    item_id: str
    clicked: bool
    identity: str
    profile: dict | None


class WarmupModel:
    """One version's frozen model + generator; `step` takes the α steps of a user's events."""

    def __init__(self, version: str, manifest: dict, manifest_sha256: str, checkpoint: Checkpoint):
        self.version = version
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.schema = checkpoint.schema
        self.model = checkpoint.build_model()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.generator = checkpoint.meta_generator()
        self.user_dim = int(manifest["dims"]["user_dim"])
        self.udg_dim = int(manifest["dims"]["udg_dim"])
        self.max_history = int(manifest["dims"]["max_history"])
        self.meta_alpha = float(((manifest.get("meta") or {}).get("config") or {}).get("alpha", 0.1))
        self.train_lr = float((checkpoint.train_config or {}).get("lr", 1e-3))

    def rule(self, name: str = "sgd", step: float | None = None) -> WarmRule:
        """The warm-up rule `name` with its step: `step`, else this version's own (the generator's meta-training
        α for sgd, the pre-training learning rate for adam: what `udg coldstart --warm-rule event-…` uses)."""
        default = self.meta_alpha if name == "sgd" else self.train_lr
        return WarmRule(name, default if step is None else step)

    @classmethod
    def load(cls, repo: ModelRepository, version: str) -> WarmupModel:
        manifest = repo.verify(version)  # size + sha256 of every listed file, warmup.pt included
        if WARMUP_FILE not in manifest["files"]:
            raise NotWarmable(f"version {version} has no {WARMUP_FILE} (exported before online warm-up existed, "
                              "or a model without UDG): export it again to warm it up")
        checkpoint = Checkpoint.load(Path(repo.path(version)) / WARMUP_FILE)
        loaded = cls(version, manifest, repo.manifest_sha256(version), checkpoint)
        loaded.check_golden()
        return loaded

    def check_golden(self) -> float:
        """The weights must give the manifest's golden scores (what the exported graphs give)."""
        from model.base import Items

        worst = 0.0
        base = self.model.base_model
        names = [spec.name for spec in self.schema.item_fields]
        with torch.no_grad():
            for case in self.manifest["golden"]["scorer"]:
                inputs = case["inputs"]
                fields = [torch.as_tensor(np.asarray(inputs[f"candidate_{name}"], np.int64)) for name in names]
                items = Items(torch.as_tensor(np.asarray(inputs["candidates"], np.int64)), fields) if names \
                    else base.lookup_items(torch.as_tensor(np.asarray(inputs["candidates"], np.int64)))
                logits = self.model.score(torch.as_tensor(np.asarray(inputs["user_vec"], np.float32)),
                                          torch.as_tensor(np.asarray(inputs["udg_vec"], np.float32)),
                                          torch.as_tensor(np.asarray(inputs["history"], np.int64)), items)
                expected = np.asarray(case["outputs"]["probabilities"], np.float32)
                worst = max(worst, float(np.max(np.abs(torch.sigmoid(logits).numpy() - expected))))
        if worst > GOLDEN_ATOL:
            raise NotWarmable(f"version {self.version}: {WARMUP_FILE} does not reproduce the manifest's golden "
                              f"scores (max abs diff {worst:.3g}): it is not the model of these graphs")
        return worst

    # --- encoding ---------------------------------------------------------------------------------------
    def knows_item(self, item_id: str) -> bool:
        return self.schema.items.known(item_id)

    def encode_history(self, items: list[str]) -> torch.Tensor:
        """Raw ids, most recent first -> [1, max_history] PAD-filled (as the service feeds the scorer)."""
        row = np.full((1, self.max_history), PAD, np.int64)
        items = items[:self.max_history]
        if items:
            row[0, :len(items)] = self.schema.items.lookup_many(items)
        return torch.as_tensor(row)

    def generated_state(self, profile: dict | None) -> tuple[np.ndarray, np.ndarray]:
        """A new user's initial state, as meta.onnx gives it: unseen-user vector and the generator's row."""
        fields = self.schema.profile_fields
        profile = {k: v for k, v in (profile or {}).items() if k in fields}
        index = torch.as_tensor(self.schema.encode_profile(profile)[None])
        with torch.no_grad():
            user_vec = self.model.unseen_user_vector(index)
            if self.generator is not None:
                udg_vec = self.generator(index)
            else:  # a checkpoint without a generator: meta.onnx's fallback, the mean known-user UDG row
                udg_vec = self.model.udg_emb.weight[2:].mean(0, keepdim=True)
        return user_vec.numpy().astype(np.float32), udg_vec.numpy().astype(np.float32)

    # --- Algorithm 1's α step (and the adaptive rule) --------------------------------------------------------
    def step(self, user_vec: np.ndarray, udg_vec: np.ndarray, histories: list[list[str]], items: list[str],
             labels: list[float], alpha: float, steps: int = 1) -> np.ndarray:
        """For each event in order (oldest first): `steps` gradient steps θ ← θ − α ∇ CE(θ) on the UDG embedding
        alone (model, gates, base user vector frozen), the event's behavior feature its history before it."""
        return self.step_many([user_vec], [udg_vec], [histories], [items], [labels], alpha, steps)[0]

    def step_many(self, user_vecs: list[np.ndarray], udg_vecs: list[np.ndarray], histories: list[list[list[str]]],
                  items: list[list[str]], labels: list[list[float]], alpha: float, steps: int = 1) -> list[np.ndarray]:
        """`step` for several users at once (`apply_rule` with the sgd rule of step α)."""
        return self.apply_rule(WarmRule("sgd", alpha), user_vecs, udg_vecs, None, histories, items, labels, steps)[0]

    def apply_rule(self, rule: WarmRule, user_vecs: list[np.ndarray], udg_vecs: list[np.ndarray],
                   states: list[np.ndarray | None] | None, histories: list[list[list[str]]], items: list[list[str]],
                   labels: list[list[float]], steps: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each user's events in order under `rule` (model/warm_rule.py), from their rule state (None: fresh).
        Their k-th events share one forward and backward pass (`event_steps`), which is what makes a worker's
        events/s (one pass per event position, not per event). -> (UDG rows [1, udg_dim], states [1, width])."""
        n = len(user_vecs)
        width = rule.state_width(self.udg_dim)
        user = torch.tensor(np.stack([np.asarray(u, np.float32).reshape(-1) for u in user_vecs]))
        udg = torch.tensor(np.stack([np.asarray(u, np.float32).reshape(-1) for u in udg_vecs]))
        state = rule.initial_state(n, self.udg_dim)
        for row, given in enumerate(states or []):
            if given is not None:
                state[row] = torch.as_tensor(np.asarray(given, np.float32).reshape(width))
        lengths = np.array([len(i) for i in items])
        depth = int(lengths.max()) if n else 0
        item_idx = np.zeros((n, depth), np.int64)
        label = np.zeros((n, depth), np.float32)
        history = np.full((n, depth, self.max_history), PAD, np.int64)
        for row in range(n):
            if lengths[row]:
                item_idx[row, :lengths[row]] = self.schema.items.lookup_many(items[row])
                label[row, :lengths[row]] = labels[row]
                for k, past in enumerate(histories[row]):
                    history[row, k] = self.encode_history(past)[0].numpy()
        udg, state = event_steps(self.model, rule, user, udg, state, torch.as_tensor(history),
                                 torch.as_tensor(item_idx), torch.as_tensor(label), lengths, steps)
        return ([udg[row:row + 1].numpy().astype(np.float32) for row in range(n)],
                [state[row:row + 1].numpy().astype(np.float32) for row in range(n)])
