"""Training and evaluation: Adam, early stopping on validation AUC.

Batches are gathered from the split's columns one at a time (`Samples.batch`): no split's histories or
profiles are ever materialised whole, so memory grows with the events, not with events x max_history.

Under torchrun (`model.distributed`) every rank draws the same seeded permutation, gathers only its part of
each global batch of `batch_size` events, and scales its loss so that DDP's gradient average is the gradient
of the global batch's mean loss: the same optimisation as one process, up to floating-point order and the
per-rank random user-id dropout. Evaluation is sharded and its predictions all-gathered, so every rank
computes the same metrics and takes the same early-stopping decision."""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from dataset.prepared import PreparedData, Samples
from model.base import ModelConfig
from model.distributed import SINGLE, Distributed
from model.metrics import all_metrics
from model.zoo import build_model, count_parameters

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 1024
    lr: float = 1e-3
    embed_weight_decay: float = 3e-3  # L2 on embedding tables (Adam weight_decay); the rest use weight_decay
    udg_weight_decay: float | None = None  # L2 on the UDG user table; None: embed_weight_decay
    weight_decay: float = 0.0
    aux_loss_weight: float = 1.0
    patience: int = 3
    seed: int = 0
    threads: int = 0  # 0: leave torch's default
    device: str = "cpu"  # "cuda" trains on the GPU; the returned model is always back on the CPU


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_tensors(samples: Samples, rows: np.ndarray | None = None,
               device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The model inputs of `rows` (default: every event) as tensors."""
    batch = samples.batch(np.arange(len(samples)) if rows is None else rows)
    return {
        "user": torch.as_tensor(batch["user"], dtype=torch.long, device=device),
        "profile": torch.as_tensor(batch["profile"], dtype=torch.long, device=device),
        "item": torch.as_tensor(batch["item"], dtype=torch.long, device=device),
        "history": torch.as_tensor(batch["history"], dtype=torch.long, device=device),
        "label": torch.as_tensor(batch["label"], dtype=torch.float32, device=device),
    }


def batches(samples: Samples, batch_size: int, generator: torch.Generator | None = None,
            device: str | torch.device = "cpu"):
    """Batches of `batch_size` events, shuffled by `generator` (None: in order), gathered one at a time."""
    n = len(samples)
    # The order is drawn on the CPU (the seeded generator lives there), so a seed shuffles alike on any device.
    order = torch.randperm(n, generator=generator).numpy() if generator is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield to_tensors(samples, order[start:start + batch_size], device)


def rank_batches(samples: Samples, batch_size: int, generator: torch.Generator, dist: Distributed,
                 device: str | torch.device = "cpu"):
    """This rank's part of each global batch that `batches` draws with the same generator, as (batch,
    events in the global batch, weight). Where a last global batch has fewer events than there are ranks,
    a rank with none gets one event at weight 0, so that every rank still takes part in the all-reduce."""
    n = len(samples)
    order = torch.randperm(n, generator=generator).numpy()
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        mine, weight = dist.shard(rows), 1.0
        if not len(mine):
            mine, weight = rows[:1], 0.0
        yield to_tensors(samples, mine, device), len(rows), weight


@torch.no_grad()
def predict(model: nn.Module, samples: Samples, batch_size: int = 8192) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    out = [torch.sigmoid(model(batch)["logit"]) for batch in batches(samples, batch_size, device=device)]
    return torch.cat(out).cpu().numpy() if out else np.zeros(0, dtype=np.float32)


def evaluate(model: nn.Module, samples: Samples, dist: Distributed = SINGLE) -> dict[str, float]:
    """Metrics of the whole split; under DDP each rank predicts its part and every rank gets all of them."""
    if not dist.active:
        return all_metrics(samples.label, predict(model, samples))
    local = predict(model, samples.subset(dist.shard_rows(len(samples))))
    return all_metrics(samples.label, dist.gather_rows(local, len(samples)))


def shard_loss(out: dict[str, torch.Tensor], label: torch.Tensor, global_size: int, weight: float,
               aux_loss_weight: float, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's loss, scaled so that DDP's average over `world` ranks is the global batch's mean loss,
    and its un-averaged sum (for the epoch's train loss)."""
    total = F.binary_cross_entropy_with_logits(out["logit"], label, reduction="sum")
    if "aux_loss" in out:  # a mean over this rank's events: weighted by their share of the global batch
        total = total + aux_loss_weight * out["aux_loss"] * len(label)
    total = total * weight
    return total * (world / global_size), total.detach()


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    udg_table = getattr(model, "udg_emb", None)
    udg_params = {id(udg_table.weight)} if udg_table is not None else set()
    table_params = {id(t.weight) for t in model.embedding_tables()} - udg_params
    groups = [
        {"params": [p for p in model.parameters() if id(p) in table_params], "weight_decay": config.embed_weight_decay},
        {"params": [p for p in model.parameters() if id(p) not in table_params | udg_params],
         "weight_decay": config.weight_decay},
    ]
    if udg_params:
        decay = config.embed_weight_decay if config.udg_weight_decay is None else config.udg_weight_decay
        groups.append({"params": [udg_table.weight], "weight_decay": decay})
    return torch.optim.Adam(groups, lr=config.lr)


@dataclass
class FitResult:
    model: nn.Module
    best_epoch: int
    valid: dict
    history: list[dict]
    seconds_per_epoch: float


def fit(model: nn.Module, data: PreparedData, config: TrainConfig, progress: bool = True,
        dist: Distributed = SINGLE) -> FitResult:
    """Train with early stopping on validation AUC; returns the model restored to its best epoch.

    `config.batch_size` is the global batch: under DDP each rank computes batch_size / world of it."""
    if config.threads:
        torch.set_num_threads(config.threads)
    generator = torch.Generator().manual_seed(config.seed)
    model.to(config.device)
    net = dist.wrap(model)
    if dist.active:  # the weights are rank 0's now; user-id dropout draws its own events' masks per rank
        torch.manual_seed(config.seed + dist.rank)
    train = data.splits["train"]
    optimizer = make_optimizer(model, config)
    loss_fn = nn.BCEWithLogitsLoss()
    best_auc, best_state, best_epoch, stale = -1.0, None, 0, 0
    history, epoch_seconds = [], []
    for epoch in range(1, config.epochs + 1):
        model.train()
        started = time.perf_counter()
        total, count = 0.0, 0
        if dist.active:
            epoch_batches = rank_batches(train, config.batch_size, generator, dist, config.device)
        else:
            epoch_batches = ((batch, len(batch["label"]), 1.0)
                             for batch in batches(train, config.batch_size, generator, config.device))
        steps = tqdm(epoch_batches, desc=f"epoch {epoch}", leave=False,
                     total=(len(train) + config.batch_size - 1) // config.batch_size, disable=not progress)
        for batch, global_size, weight in steps:
            out = net(batch)
            if dist.active:
                loss, batch_total = shard_loss(out, batch["label"], global_size, weight, config.aux_loss_weight,
                                               dist.world)
            else:
                loss = loss_fn(out["logit"], batch["label"])
                if "aux_loss" in out:
                    loss = loss + config.aux_loss_weight * out["aux_loss"]
                batch_total = loss.detach() * len(batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += batch_total  # a tensor: no device sync per step
            count += len(batch["label"]) * weight
        epoch_seconds.append(time.perf_counter() - started)
        valid = evaluate(model, data.splits["valid"], dist)
        total, count = dist.sum([float(total), float(count)])
        history.append({"epoch": epoch, "train_loss": total / max(count, 1), **{f"valid_{k}": v
                                                                                 for k, v in valid.items()}})
        log.debug("epoch %d loss %.4f valid auc %.4f", epoch, total / max(count, 1), valid["auc"])
        if valid["auc"] > best_auc:
            best_auc, best_state, best_epoch, stale = valid["auc"], copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    valid = evaluate(model, data.splits["valid"], dist)
    return FitResult(model, best_epoch, valid, history, float(np.mean(epoch_seconds)))


def train_model(data: PreparedData, model_config: ModelConfig, train_config: TrainConfig,
                progress: bool = True, dist: Distributed = SINGLE) -> tuple[nn.Module, dict]:
    """Seeded build + fit + test evaluation; returns the model and a metrics dict (the same on every rank)."""
    seed_everything(train_config.seed)
    model = build_model(model_config, data.schema)
    result = fit(model, data, train_config, progress=progress, dist=dist)
    metrics = {
        "best_epoch": result.best_epoch,
        "seconds_per_epoch": result.seconds_per_epoch,
        "parameters": count_parameters(model),
        "valid": result.valid,
        "test": evaluate(model, data.splits["test"], dist),
        "history": result.history,
    }
    if dist.active:
        metrics["distributed"] = {"world": dist.world, "backend": dist.backend,
                                  "rank_batch": -(-train_config.batch_size // dist.world)}
    return model.cpu(), metrics
