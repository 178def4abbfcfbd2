"""The checkpoint: one typed object with load and save — what training hands to evaluation and export.

It holds the model's configuration and weights, the dataset spec it was trained on (so evaluation rebuilds
the same splits), the feature schema (every field's vocabulary: what export writes into the manifest), the
metrics, each known user's raw profile and latest behavior (what `udg publish` loads into Redis), and the meta
generator of a UDG model. On disk it is one `torch.save` of tensors and plain containers only, read back
with `torch.load(weights_only=True)`: loading a checkpoint never runs code from the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dataset.prepared import KnownUsers, PreparedData
from dataset.schema import FeatureSchema
from dataset.spec import DatasetSpec
from model.base import ModelConfig

CHECKPOINT_FORMAT = "udg-checkpoint/2"


class CheckpointError(ValueError):
    """A file is not a checkpoint of this format, or does not fit the model it describes."""


@dataclass
class MetaState:
    """The meta generator of a UDG model (Algorithm 1): its weights and how it was trained/evaluated."""

    state_dict: dict
    info: dict = field(default_factory=dict)  # config, final_loss, cold_start metrics

    def generator(self, schema: FeatureSchema, udg_dim: int):
        from model.meta import MetaGenerator

        generator = MetaGenerator(schema, udg_dim, self.state_dict.get("anchor"))  # anchor: residual variant
        generator.load_state_dict(self.state_dict)
        return generator.eval()


def _known_users_to_json(users: KnownUsers | None) -> dict | None:
    if users is None:
        return None
    return {"user_ids": users.user_ids.tolist(), "profile": users.profile.tolist(),
            "history": [row[:length] for row, length in zip(users.history.tolist(), users.history_len.tolist(),
                                                            strict=True)]}


def _known_users_from_json(data: dict | None, fields: int, width: int) -> KnownUsers | None:
    if data is None:
        return None
    n = len(data["user_ids"])
    history = np.full((n, width), "", dtype=object)
    lengths = np.zeros(n, np.int64)
    for row, items in enumerate(data["history"]):
        history[row, :len(items)] = items
        lengths[row] = len(items)
    return KnownUsers(user_ids=np.array(data["user_ids"], dtype=str).reshape(n),
                      profile=np.array(data["profile"], dtype=str).reshape(n, fields),
                      history=history.astype(str), history_len=lengths)


def _catalogue_from_json(data: dict | None, schema: FeatureSchema) -> dict:
    if not data:
        return {}
    n = len(data["item_ids"])
    catalogue = {"item_ids": np.array(data["item_ids"], dtype=str).reshape(n)}
    for spec in schema.item_fields:
        catalogue[spec.name] = np.asarray(data.get(spec.name, []), dtype=np.int64).reshape(n, spec.width)
    return catalogue


@dataclass
class Checkpoint:
    model_config: ModelConfig
    train_config: dict
    spec: DatasetSpec
    schema: FeatureSchema
    state_dict: dict
    metrics: dict = field(default_factory=dict)
    known_users: KnownUsers | None = None
    meta: MetaState | None = None
    item_catalogue: dict = field(default_factory=dict)  # PreparedData.item_catalogue

    @classmethod
    def from_training(cls, model: nn.Module, model_config: ModelConfig, train_config, data: PreparedData,
                      metrics: dict, meta: MetaState | None = None) -> Checkpoint:
        train = dataclasses.asdict(train_config) if dataclasses.is_dataclass(train_config) else dict(train_config)
        return cls(model_config=model_config, train_config=train, spec=data.spec, schema=data.schema,
                   state_dict=model.state_dict(), metrics=metrics, known_users=data.known_users, meta=meta,
                   item_catalogue=data.item_catalogue)

    # --- the model ----------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The model, weights loaded, in eval mode."""
        from model.zoo import build_model

        model = build_model(self.model_config, self.schema)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as error:
            raise CheckpointError(f"the weights do not fit a {self.model_config.kind} model of this schema: "
                                  f"{str(error).splitlines()[0]}") from None
        return model.eval()

    def meta_generator(self):
        """The meta generator (eval mode), or None if this checkpoint has none."""
        if self.meta is None or not self.meta.state_dict:
            return None
        return self.meta.generator(self.schema, self.model_config.udg_dim)

    @property
    def parameters(self) -> int | None:
        return self.metrics.get("parameters")

    # --- disk -------------------------------------------------------------------------------------------
    def to_payload(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.model_config.to_json(),
            "train_config": self.train_config,
            "spec": self.spec.model_dump(mode="json"),
            "schema": self.schema.to_json(),
            "state_dict": self.state_dict,
            "metrics": self.metrics,
            "known_users": _known_users_to_json(self.known_users),
            "meta": None if self.meta is None else {"state_dict": self.meta.state_dict, "info": self.meta.info},
            "item_catalogue": {name: np.asarray(values).tolist() for name, values in self.item_catalogue.items()},
        }

    def save(self, path: Path) -> Path:
        """Written beside and renamed into place: a reader never sees half a checkpoint."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.to_payload(), tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        try:
            payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such checkpoint") from None
        except Exception as error:  # torch raises several types for a file that is not its format
            raise CheckpointError(f"{path}: not a checkpoint ({type(error).__name__}: {error})") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(f"{path}: format {found!r}, expected {CHECKPOINT_FORMAT!r} (retrain it)")
        schema = FeatureSchema.from_json(payload["schema"])
        meta = payload.get("meta")
        return cls(model_config=ModelConfig.from_json(payload["model_config"]),
                   train_config=payload["train_config"], spec=DatasetSpec.model_validate(payload["spec"]),
                   schema=schema, state_dict=payload["state_dict"], metrics=payload.get("metrics") or {},
                   known_users=_known_users_from_json(payload.get("known_users"), len(schema.user_fields),
                                                      schema.max_history),
                   meta=None if meta is None else MetaState(meta["state_dict"], meta.get("info") or {}),
                   item_catalogue=_catalogue_from_json(payload.get("item_catalogue"), schema))

    def with_meta(self, meta: MetaState | None) -> Checkpoint:
        return dataclasses.replace(self, meta=meta)
