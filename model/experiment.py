"""Named, reproducible experiment settings: which data, how it is split, which model options.

A checkpoint records its `DataSpec` so `udg evaluate` and `udg meta` rebuild exactly the same splits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from model.base import ModelConfig
from model.datasets import SyntheticSpec, load_dataset
from model.features import PreparedData, prepare


@dataclass
class DataSpec:
    name: str = "movielens"  # "movielens" or "synthetic"
    path: str | None = None  # a GroupLens/RecBole directory; None = the verified cache
    synthetic: dict = field(default_factory=dict)  # SyntheticSpec fields
    max_history: int = 50
    valid_frac: float = 0.1
    test_frac: float = 0.1
    cold_user_frac: float = 0.0
    split_seed: int = 0

    def load(self) -> PreparedData:
        raw = load_dataset(self.name, self.path, SyntheticSpec(**self.synthetic))
        return prepare(raw, self.max_history, self.valid_frac, self.test_frac, self.cold_user_frac,
                       self.split_seed)

    def to_json(self) -> dict:
        data = asdict(self)
        if self.name == "synthetic":  # the generator's defaults too: a record must survive a new default world
            data["synthetic"] = {**asdict(SyntheticSpec()), **self.synthetic}
        return data


# Model presets: "udg" = the paper's gates (Eq. 6, sigmoid); "udg-detach" = the same gates scaled by 2, whose
# inputs do not back-propagate into the main embedding tables; "udg-official" = the authors' public code.
PRESETS: dict[str, dict] = {
    "base": {},
    "udg": {"udg": True},
    "udg-detach": {"udg": True, "gate_detach": True, "gate_scale": 2.0},
    "udg-official": {"udg": True, "gate_input": "official", "udg_dim": 128, "gate_output_layer": True},
}

# What `udg train --udg` ships for each base model, chosen on the validation splits (README, "Results"): the
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
