"""Model registry: config -> model. One base class per file; UDG wraps any of them."""

from __future__ import annotations

import importlib

from torch import nn

from dataset.schema import FeatureSchema
from model.base import BaseCTR, ModelConfig
from model.udg import UDG

# kind -> "module:Class"; imported on demand so one broken model never blocks the others.
BASE_MODELS = {
    "pnn": "model.pnn:PNN",
    "deepfm": "model.deepfm:DeepFM",
    "wide_deep": "model.wide_deep:WideDeep",
    "din": "model.din:DIN",
    "dien": "model.dien:DIEN",
}


def base_class(kind: str) -> type[BaseCTR]:
    try:
        module_name, class_name = BASE_MODELS[kind].split(":")
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; choose from {sorted(BASE_MODELS)}") from None
    return getattr(importlib.import_module(module_name), class_name)


def build_model(config: ModelConfig, schema: FeatureSchema) -> nn.Module:
    base = base_class(config.kind)(config, schema)
    return UDG(base, schema) if config.udg else base


def base_of(model: nn.Module) -> BaseCTR:
    return model.base if isinstance(model, UDG) else model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
