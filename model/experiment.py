"""Named, reproducible model settings: the presets and the one `udg train --udg` ships per model kind.

(Which data, and how it is split, is the dataset spec's job: `dataset.spec`.)
"""

from __future__ import annotations

from dataclasses import replace

from model.base import ModelConfig

# Model presets: "udg" = the paper's gates (Eq. 6, sigmoid); "udg-detach" = the same gates scaled by 2, whose
# inputs do not back-propagate into the main embedding tables; "udg-official" = the authors' public code.
PRESETS: dict[str, dict] = {
    "base": {},
    "udg": {"udg": True},
    "udg-detach": {"udg": True, "gate_detach": True, "gate_scale": 2.0},
    "udg-official": {"udg": True, "gate_input": "official", "udg_dim": 128, "gate_output_layer": True},
}

# What `udg train --udg` ships for each base model, chosen on the validation splits (docs/results.md): the
# paper's gates won PNN's on MovieLens; the detached gates won every other model's on both data sets (DIEN's
# MovieLens comparison has 2 seeds only).
UDG_PRESET_BY_KIND = {"pnn": "udg", "deepfm": "udg-detach", "wide_deep": "udg-detach", "din": "udg-detach",
                      "dien": "udg-detach"}


def udg_preset(kind: str) -> str:
    """The UDG preset shipped for a base model kind."""
    return UDG_PRESET_BY_KIND.get(kind, "udg")


def model_config(kind: str, preset: str = "base", **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return replace(ModelConfig(kind=kind), **{**PRESETS[preset], **overrides})  # an option beats its preset
