"""Named, reproducible model settings: the gate presets, the variants a report compares, the preset
`udg train --udg` ships per model kind, and the named experiments of `experiments/experiments.toml`.

This is the one place for them: `udg train`, `udg report`, `udg coldstart` and the results pages read them from
here. (Which data, and how it is split, is the dataset spec's job: `dataset.spec`.) Torch-free: every `udg`
invocation imports it.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # model.base imports torch; this module must not (`udg` on the serving install reads it)
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

MODEL_KINDS = ("pnn", "deepfm", "wide_deep", "din", "dien")


@dataclass(frozen=True)
class Variant:
    """What a report compares against the base model: a preset, optionally with a wider embedding."""

    preset: str
    label: str
    embed_scale: int = 1  # the paper's Table 3 control: the base model with a doubled embedding


VARIANTS: dict[str, Variant] = {
    "base": Variant("base", "base"),
    "udg": Variant("udg", "+UDG"),
    "udg-detach": Variant("udg-detach", "+UDG (detached 2·sigmoid gates)"),
    "udg-official": Variant("udg-official", "+UDG (official gates)"),
    "double": Variant("base", "2x embedding", embed_scale=2),
}
GATED_VARIANTS = tuple(name for name, v in VARIANTS.items() if PRESETS[v.preset].get("udg"))


def udg_preset(kind: str) -> str:
    """The UDG preset shipped for a base model kind."""
    return UDG_PRESET_BY_KIND.get(kind, "udg")


def model_config(kind: str, preset: str = "base", **overrides) -> ModelConfig:
    from model.base import ModelConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return replace(ModelConfig(kind=kind), **{**PRESETS[preset], **overrides})  # an option beats its preset


def variant_config(kind: str, variant: str, **overrides) -> ModelConfig:
    """The model a report trains for (kind, variant)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
    config = model_config(kind, VARIANTS[variant].preset, **overrides)
    scale = VARIANTS[variant].embed_scale
    return replace(config, embed_dim=config.embed_dim * scale) if scale != 1 else config


# --- named experiments --------------------------------------------------------------------------------------

EXPERIMENTS_FILE = Path(__file__).resolve().parent.parent / "experiments" / "experiments.toml"

# Training options an experiment may set: the `udg train` / `udg report` option names (TrainConfig's fields,
# `embed_wd` for embed_weight_decay). Checked against TrainConfig by the tests.
TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "embed_wd", "patience", "threads", "device")
DEFAULT_SEEDS = 5  # seeds of a report grid
DEFAULT_SPEC = "movielens-100k"


def train_defaults() -> dict:
    """TRAIN_OPTIONS as TrainConfig sets them: the one source of the training defaults (imports torch)."""
    from model.train import TrainConfig

    config = TrainConfig()
    return {name: getattr(config, "embed_weight_decay" if name == "embed_wd" else name) for name in TRAIN_OPTIONS}


class ExperimentError(ValueError):
    """An experiments file or a name that does not resolve; the message names the entry and the key."""


@dataclass(frozen=True)
class Experiment:
    """One named experiment: a model kind and variant trained on a data spec with training options.

    Experiments of one grid share a spec, training options, seeds and an output folder (one run journal):
    `udg report --experiments 'movielens/*'` trains and reports them together."""

    name: str
    model: str
    variant: str
    spec: str
    grid: str | None = None
    spec_overrides: tuple[str, ...] = ()  # the entry's `set`: KEY=VALUE as `--set` takes them
    seeds: int = DEFAULT_SEEDS
    out: str | None = None  # the grid's folder (runs.jsonl, report.md, auc.png)
    report: str = "report.md"  # the grid's table in `out`; its plot is named after it
    train: dict = field(default_factory=dict)  # TRAIN_OPTIONS given by the grid or the entry
    model_options: dict = field(default_factory=dict)  # ModelConfig fields beyond the variant's preset

    @property
    def preset(self) -> str:
        return VARIANTS[self.variant].preset

    def model_config(self) -> ModelConfig:
        return variant_config(self.model, self.variant, **self.model_options)


_ENTRY_KEYS = {"grid", "model", "variant", "spec", "set", "seeds", "out", "report", "model_options", *TRAIN_OPTIONS}


def _model_fields() -> set[str]:
    from model.base import ModelConfig

    return {f.name for f in fields(ModelConfig)} - {"kind", "udg"}


def _check_keys(where: str, table: dict, allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ExperimentError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _resolve(name: str, entry: dict, grids: dict, origin: str) -> Experiment:
    where = f"{origin}: experiment {name!r}"
    _check_keys(where, entry, _ENTRY_KEYS)
    merged = dict(entry)
    if "grid" in entry:
        if entry["grid"] not in grids:
            raise ExperimentError(f"{where}: grid {entry['grid']!r} is not defined; defined: {sorted(grids)}")
        merged = {**grids[entry["grid"]], **entry}
    for key in ("model", "variant", "spec"):
        if key not in merged:
            raise ExperimentError(f"{where}: {key!r} is required (in the entry or its grid)")
    if merged["model"] not in MODEL_KINDS:
        raise ExperimentError(f"{where}: model {merged['model']!r}; choose from {list(MODEL_KINDS)}")
    if merged["variant"] not in VARIANTS:
        raise ExperimentError(f"{where}: variant {merged['variant']!r}; choose from {list(VARIANTS)}")
    options = merged.get("model_options", {})
    if options:
        _check_keys(f"{where}: model_options", options, _model_fields())
    if "hidden" in options:
        options = {**options, "hidden": tuple(options["hidden"])}
    return Experiment(name=name, model=merged["model"], variant=merged["variant"], spec=merged["spec"],
                      grid=merged.get("grid"), spec_overrides=tuple(merged.get("set", ())),
                      seeds=int(merged.get("seeds", DEFAULT_SEEDS)), out=merged.get("out"),
                      report=merged.get("report", "report.md"),
                      train={k: merged[k] for k in TRAIN_OPTIONS if k in merged},
                      model_options=options)


def load_experiments(path: Path | str = EXPERIMENTS_FILE) -> dict[str, Experiment]:
    """Every experiment of a file, its grid's settings applied; a bad entry raises ExperimentError."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ExperimentError(f"{path}: {error}") from None
    _check_keys(str(path), document, {"grids", "experiments"})
    grids = document.get("grids", {})
    for name, grid in grids.items():
        _check_keys(f"{path}: grid {name!r}", grid, _ENTRY_KEYS - {"grid", "model", "variant"})
    return {name: _resolve(name, entry, grids, str(path)) for name, entry in document.get("experiments", {}).items()}


def select_experiments(patterns: str, path: Path | str = EXPERIMENTS_FILE) -> list[Experiment]:
    """The experiments whose names match comma-separated names or globs (`movielens/*`), in file order."""
    experiments = load_experiments(path)
    chosen: dict[str, Experiment] = {}
    for pattern in (p.strip() for p in patterns.split(",")):
        if not pattern:
            continue
        matches = [e for name, e in experiments.items() if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise ExperimentError(f"no experiment matches {pattern!r} in {path}; "
                                  f"`udg experiments` lists them")
        chosen.update((e.name, e) for e in matches)
    order = list(experiments)
    return sorted(chosen.values(), key=lambda e: order.index(e.name))


def experiment(name: str, path: Path | str = EXPERIMENTS_FILE) -> Experiment:
    experiments = load_experiments(path)
    if name not in experiments:
        close = fnmatch.filter(experiments, f"*{name}*")[:5]
        raise ExperimentError(f"no experiment {name!r} in {path}" + (f"; did you mean {close}?" if close else ""))
    return experiments[name]
