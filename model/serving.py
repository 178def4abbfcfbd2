"""What a model hands export: its serving modules and their inputs and outputs (a predict factory).

Export turns these into ONNX graphs and the manifest's I/O schema without knowing the model's kind or whether
it has UDG gates; the service feeds the graphs by the names given here.

- scorer: (user_vec [1, user_dim], udg_vec [1, udg_dim] (UDG only), history [1, L], candidates [N],
  candidate_<field> [N, width] per item field) -> probabilities [N]. The user side is one row broadcast over
  the N candidates inside the graph; the candidates' field tokens are inputs, so an item that arrived after
  training is scored with its known features.
- scorer_multi: the scorer for U users at once (cross-request batching): user_vec [U, user_dim], udg_vec
  [U, udg_dim] (UDG only), history [U, L], candidate_user [N] (each candidate's row in the user inputs),
  candidates [N], candidate_<field> [N, width] -> probabilities [N]. Each candidate is scored with its user's
  rows (gathered in the graph), by `model.score` itself: the same values as U one-user calls.
- meta: profile [B, user fields] -> user_vec [B, user_dim] (an unseen user's base embedding: the OOV id row
  plus the profile rows) and, for UDG models, udg_vec [B, udg_dim] (the meta generator's, Eq. 11, or — for a
  checkpoint without one — the mean UDG row of the known users).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dataset.schema import OOV, FeatureSchema
from model.base import Items


@dataclass
class TensorSpec:
    name: str
    dtype: str  # "float32" or "int64"
    shape: list  # ints, or names of dynamic axes

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}


@dataclass
class ServingGraph:
    module: nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    example: tuple
    dynamic_axes: dict = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def io_json(self, file: str) -> dict:
        return {"file": file, "inputs": [s.to_json() for s in self.inputs],
                "outputs": [s.to_json() for s in self.outputs]}


def candidate_input(field_name: str) -> str:
    """The scorer input carrying the candidates' tokens of one item field."""
    return f"candidate_{field_name}"


class StackedGates(nn.Module):
    """Every gating network of a UDG model, for serving: their first layers share the input, so they run as
    ONE GEMM (weights concatenated here, the result split after); the second and third layers stay apart.

    Same math as `UDG.gate_values` (a snapshot of the trained weights, taken at export)."""

    def __init__(self, udg: nn.Module):
        super().__init__()
        gates = list(udg.gates)
        self.hidden = [gate.first.user.out_features for gate in gates]
        self.register_buffer("user_weight_t", torch.cat([g.first.user.weight for g in gates]).t().contiguous())
        self.register_buffer("user_bias", torch.cat([g.first.user.bias for g in gates]))
        with_candidate = gates[0].first.candidate is not None
        self.register_buffer("candidate_weight_t", torch.cat([g.first.candidate.weight for g in gates]).t()
                             .contiguous() if with_candidate else None)
        self.seconds = nn.ModuleList(gate.second for gate in gates)
        self.thirds = nn.ModuleList(gate.third for gate in gates)
        self.scales = [gate.scale for gate in gates]

    def forward(self, candidate: torch.Tensor | None, user: torch.Tensor,
                candidate_user: torch.Tensor | None = None) -> list[torch.Tensor]:
        """`user` is [1, u] (one user), or [U, u] with `candidate_user` [N] naming each candidate's row."""
        user_part = torch.addmm(self.user_bias, user, self.user_weight_t)  # [1 or U, sum(hidden)], once per user
        if candidate_user is not None:
            user_part = user_part.index_select(0, candidate_user)  # [N, sum(hidden)]
        if self.candidate_weight_t is None:
            first = torch.relu(user_part)
        else:  # one Gemm with the user part as its bias (+ Relu: onnxruntime fuses it into the Gemm)
            first = torch.relu(torch.addmm(user_part, candidate, self.candidate_weight_t))
        gates = []
        for part, second, third, scale in zip(first.split(self.hidden, dim=-1), self.seconds, self.thirds,
                                              self.scales, strict=True):
            gate = torch.sigmoid(third(torch.relu(second(part))))
            gates.append(gate if scale == 1.0 else scale * gate)
        return gates


class ScorerModule(nn.Module):
    """(user_vec, [udg_vec], history, candidates, *candidate fields) -> probabilities [N].

    The serving form of `model.score` for one user (batch-1 user side, broadcast over the N candidates): the
    base model's `mlp_input_one_user` (PNN: candidate x user products as one matmul, user x user products
    once) and, for UDG, the gating networks' first layers as one GEMM (`StackedGates`). `plain=True` runs
    `model.score` itself, and `per_candidate=True` (implies plain) expands the user side to N rows first:
    everything user-side then runs once per candidate. Both exist to measure what the serving form saves
    (loadtest/bench_model.py); tests/export/test_export.py checks the serving form equals `model.score`.
    """

    def __init__(self, model: nn.Module, per_candidate: bool = False, plain: bool = False):
        super().__init__()
        self.model = model
        self.udg = model.udg_dim > 0
        self.per_candidate = per_candidate
        self.plain = plain or per_candidate
        self.stacked_gates = StackedGates(model) if self.udg and not self.plain else None

    def forward(self, *inputs):
        if self.udg:
            user_vec, udg_vec, history, candidates, *fields = inputs
        else:
            (user_vec, history, candidates, *fields), udg_vec = inputs, None
        items = Items(candidates, list(fields))
        if self.per_candidate:
            n = candidates.shape[0]
            user_vec, history = user_vec.expand(n, -1), history.expand(n, -1)
            udg_vec = None if udg_vec is None else udg_vec.expand(n, -1)
        if self.plain:
            return torch.sigmoid(self.model.score(user_vec, udg_vec, history, items))
        return torch.sigmoid(self.one_user_logit(user_vec, udg_vec, history, items))

    def one_user_logit(self, user_vec, udg_vec, history, items: Items) -> torch.Tensor:
        base = self.model.base_model
        h0 = base.mlp_input_one_user(user_vec, history, items)
        if self.udg:
            gates = self.stacked_gates(*self.model.gate_inputs(user_vec, udg_vec, history, items))
            logit = base.mlp(h0, gates)  # [N or 1, width] gates broadcast in the Mul (no Expand copy)
        else:
            logit = base.mlp(h0)
        side = base.side_logit_one_user(user_vec, history, items)
        return logit if side is None else logit + side


class MultiUserScorerModule(nn.Module):
    """(user_vec [U], [udg_vec [U]], history [U, L], candidate_user [N], candidates [N], *fields) -> [N]: each
    candidate scored against the user rows it is tagged with.

    The user side runs once per user where the model allows: the base model's `mlp_input_users` (PNN: each
    user's behavior pooling and user x user products once, gathered to their candidates; the other kinds
    gather the user rows per candidate first) and the gates' first layers as one GEMM over the U users
    (`StackedGates`), gathered. Same values as one call per user (tests/export/test_export.py)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.udg = model.udg_dim > 0
        self.stacked_gates = StackedGates(model) if self.udg else None

    def forward(self, *inputs):
        if self.udg:
            user_vec, udg_vec, history, candidate_user, candidates, *fields = inputs
        else:
            (user_vec, history, candidate_user, candidates, *fields), udg_vec = inputs, None
        items = Items(candidates, list(fields))
        base = self.model.base_model
        h0 = base.mlp_input_users(user_vec, history, items, candidate_user)
        if self.udg:
            gates = self.stacked_gates(*self.model.gate_inputs(user_vec, udg_vec, history, items), candidate_user)
            logit = base.mlp(h0, gates)
        else:
            logit = base.mlp(h0)
        side = base.side_logit_users(user_vec, history, items, candidate_user)
        return torch.sigmoid(logit if side is None else logit + side)


class MetaModule(nn.Module):
    """profile [B, fields] -> user_vec [B, user_dim] and, for UDG models, udg_vec [B, udg_dim]."""

    def __init__(self, model: nn.Module, generator: nn.Module | None, fallback_udg: torch.Tensor | None):
        super().__init__()
        self.base = model.base_model
        self.udg = model.udg_dim > 0
        self.generator = generator
        if fallback_udg is not None:
            self.register_buffer("fallback_udg", fallback_udg.reshape(1, -1).clone())
        else:
            self.fallback_udg = None

    def forward(self, profile):
        user_vec = self.base.unseen_user_vector(profile)
        if not self.udg:
            return user_vec
        if self.generator is not None:
            return user_vec, self.generator(profile)
        return user_vec, self.fallback_udg.expand(profile.shape[0], -1)


@dataclass
class ServingModules:
    scorer: ServingGraph
    meta: ServingGraph
    dims: dict
    meta_info: dict  # where an unseen user's UDG embedding comes from
    multi_scorer: ServingGraph | None = None

    @property
    def udg(self) -> bool:
        return self.dims["udg_dim"] > 0


def scorer_graph(model: nn.Module, schema: FeatureSchema, per_candidate: bool = False, n: int = 3,
                 history_len: int = 4, plain: bool = False) -> ServingGraph:
    """The scorer with example inputs of batch 1, N >= 2 candidates and L >= 2 history (size-0/1 dims would
    be specialised by the exporter)."""
    base = model.base_model
    n_items = len(schema.items)
    lowest = min(2, n_items - 1)  # the first item row (OOV for a vocabulary without items)
    history = torch.arange(2, 2 + history_len, dtype=torch.long).remainder(n_items).clamp(min=lowest)[None]
    candidates = torch.arange(2, 2 + n, dtype=torch.long).remainder(n_items).clamp(min=lowest)
    example = [torch.randn(1, base.user_dim) * 0.05]
    inputs = [TensorSpec("user_vec", "float32", [1, base.user_dim])]
    if model.udg_dim:
        example.append(torch.randn(1, model.udg_dim) * 0.05)
        inputs.append(TensorSpec("udg_vec", "float32", [1, model.udg_dim]))
    example += [history, candidates]
    inputs += [TensorSpec("history", "int64", [1, "history_len"]), TensorSpec("candidates", "int64", ["candidates"])]
    dynamic = {"history": {1: "history_len"}, "candidates": {0: "candidates"}, "probabilities": {0: "candidates"}}
    for spec, tokens in zip(schema.item_fields, base.lookup_items(candidates).fields, strict=True):
        name = candidate_input(spec.name)
        example.append(tokens)
        inputs.append(TensorSpec(name, "int64", ["candidates", spec.width]))
        dynamic[name] = {0: "candidates"}
    return ServingGraph(ScorerModule(model, per_candidate, plain).eval(), inputs,
                        [TensorSpec("probabilities", "float32", ["candidates"])], tuple(example), dynamic)


def multi_scorer_graph(model: nn.Module, schema: FeatureSchema, users: int = 2, n: int = 5,
                       history_len: int = 4) -> ServingGraph:
    """The multi-user scorer with example inputs of U >= 2 users, N >= 2 candidates and L >= 2 history."""
    one = scorer_graph(model, schema, n=n, history_len=history_len)
    example, inputs = [], []
    dynamic = {"candidates": {0: "candidates"}, "probabilities": {0: "candidates"},
               "candidate_user": {0: "candidates"}}
    for spec, value in zip(one.inputs, one.example, strict=True):
        if spec.name in ("user_vec", "udg_vec", "history"):
            value = torch.cat([value, value.flip(-1)])  # U = 2 distinct rows
            spec = TensorSpec(spec.name, spec.dtype, ["users", *spec.shape[1:]])
            dynamic[spec.name] = {0: "users", **({1: "history_len"} if spec.name == "history" else {})}
        elif spec.name != "candidates":
            dynamic[spec.name] = {0: "candidates"}
        if spec.name == "candidates":
            example.append(torch.arange(n, dtype=torch.long).remainder(users))
            inputs.append(TensorSpec("candidate_user", "int64", ["candidates"]))
        example.append(value)
        inputs.append(spec)
    return ServingGraph(MultiUserScorerModule(model).eval(), inputs, one.outputs, tuple(example), dynamic)


def serving_modules(model: nn.Module, schema: FeatureSchema, generator: nn.Module | None = None,
                    known_user_index: torch.Tensor | None = None) -> ServingModules:
    """The scorer and meta modules of a trained model (eval mode), with their I/O metadata."""
    model.eval()
    base = model.base_model
    udg_dim = model.udg_dim
    fallback, info = None, {"udg_source": None, "outputs": ["user_vec"],
                            "note": "no UDG: meta.onnx gives an unseen user's base embedding (OOV id row + "
                                    "profile rows)"}
    if udg_dim and generator is not None:
        info = {"udg_source": "meta_generator", "outputs": ["user_vec", "udg_vec"]}
    elif udg_dim:
        table = model.udg_emb.weight
        rows = table[known_user_index] if known_user_index is not None and len(known_user_index) else table[2:]
        fallback = (rows if len(rows) else table[OOV:OOV + 1]).detach().mean(0)  # no user rows: the OOV row
        info = {"udg_source": "mean_known_users", "outputs": ["user_vec", "udg_vec"],
                "note": "checkpoint has no meta generator: udg_vec is the mean UDG row of the known users"}
    fields = len(schema.user_fields)
    meta_outputs = [TensorSpec("user_vec", "float32", ["batch", base.user_dim])]
    if udg_dim:
        meta_outputs.append(TensorSpec("udg_vec", "float32", ["batch", udg_dim]))
    example = torch.tensor([[2] * fields, [3, *([2] * (fields - 1))]] if fields else [[], []],
                           dtype=torch.long).reshape(2, fields)
    example = torch.where(example < torch.tensor([len(f.vocab) for f in schema.user_fields] or [1])[:fields],
                          example, torch.full_like(example, OOV))
    meta = ServingGraph(MetaModule(model, generator, fallback).eval(),
                        [TensorSpec("profile", "int64", ["batch", fields])], meta_outputs, (example,),
                        {"profile": {0: "batch"}, **{s.name: {0: "batch"} for s in meta_outputs}})
    dims = {"user_dim": base.user_dim, "udg_dim": udg_dim, "embed_dim": model.config.embed_dim,
            "max_history": schema.max_history, "profile_fields": fields}
    return ServingModules(scorer_graph(model, schema), meta, dims, info, multi_scorer_graph(model, schema))
