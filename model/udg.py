"""User-Dependent Gating (Eq. 6-9): one wrapper that personalises the final MLP of any base model."""

from __future__ import annotations

import torch
from torch import nn

from dataset.schema import FeatureSchema
from model.base import BaseCTR, Items, ctr_forward
from model.layers import SplitLinear


class GateNet(nn.Module):
    """GN^(l): three FC layers, sigmoid output sized to the layer input it scales (Eq. 6).

    The first layer is split into a candidate half and a user half so the user half runs once per request.
    """

    def __init__(self, candidate_dim: int, user_dim: int, hidden: int, out_dim: int, scale: float):
        super().__init__()
        self.first = SplitLinear(candidate_dim, user_dim, hidden)
        self.second = nn.Linear(hidden, hidden)
        self.third = nn.Linear(hidden, out_dim)
        self.scale = scale

    def forward(self, candidate: torch.Tensor | None, user: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(candidate, user))
        h = torch.relu(self.second(h))
        gate = torch.sigmoid(self.third(h))
        return gate if self.scale == 1.0 else self.scale * gate


class UDG(nn.Module):
    """Base model + a UDG user-embedding table + one gating network per gated MLP layer.

    Gate input (config.gate_input):
      "paper"    Concat(item emb, behavior emb, UDG user emb) — Eq. 6, the default;
      "official" Concat(UDG user emb, profile embs) — what the authors' public code feeds its gates.
    """

    def __init__(self, base: BaseCTR, schema: FeatureSchema):
        super().__init__()
        config = base.config
        if config.gate_input not in ("paper", "official"):
            raise ValueError(f"gate_input must be 'paper' or 'official', not {config.gate_input!r}")
        self.base = base
        self.config = config
        self.udg_emb = nn.Embedding(len(schema.users), config.udg_dim)
        nn.init.normal_(self.udg_emb.weight, std=0.05)
        if config.gate_input == "paper":
            candidate_dim, user_dim = base.item_dim, base.item_dim + config.udg_dim
        else:
            candidate_dim, user_dim = 0, config.udg_dim + (base.user_fields - 1) * config.embed_dim
        layer_dims = base.mlp.layer_input_dims
        n_gates = len(config.hidden) + (1 if config.gate_output_layer else 0)
        self.gates = nn.ModuleList(
            GateNet(candidate_dim, user_dim, config.gate_hidden, layer_dims[i], config.gate_scale)
            for i in range(n_gates)
        )

    @property
    def user_dim(self) -> int:
        return self.base.user_dim

    @property
    def base_model(self) -> BaseCTR:
        return self.base

    @property
    def udg_dim(self) -> int:
        return self.config.udg_dim

    def embedding_tables(self) -> list[nn.Embedding]:
        return [*self.base.embedding_tables(), self.udg_emb]

    def user_state(self, user: torch.Tensor, profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.user_vector(user, profile), self.udg_emb(user)

    def gate_inputs(self, user_vec: torch.Tensor, udg_vec: torch.Tensor, history: torch.Tensor,
                    items: Items) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(candidate part [N, c], user part [1 or N, u]) of the gate input."""
        if self.config.gate_input == "paper":
            candidate = self.base.item_fields(items).reshape(-1, self.base.item_dim)
            behavior = self.base.behavior(history)
            if self.config.gate_detach:
                candidate, behavior = candidate.detach(), behavior.detach()
            return candidate, torch.cat([behavior, udg_vec], dim=-1)
        profile = user_vec[:, self.config.embed_dim:]
        if self.config.gate_detach:
            profile = profile.detach()
        return None, torch.cat([udg_vec, profile], dim=-1)

    def gate_values(self, user_vec, udg_vec, history, items) -> list[torch.Tensor]:
        candidate, user = self.gate_inputs(user_vec, udg_vec, history, items)
        return [gate(candidate, user) for gate in self.gates]

    def score(self, user_vec: torch.Tensor, udg_vec: torch.Tensor, history: torch.Tensor,
              items: torch.Tensor | Items) -> torch.Tensor:
        items = self.base.as_items(items)
        h0 = self.base.mlp_input(user_vec, history, items)
        gates = self.gate_values(user_vec, udg_vec, history, items)
        n = h0.shape[0]
        logit = self.base.mlp(h0, [g.expand(n, -1) for g in gates])
        side = self.base.side_logit(user_vec, history, items)
        return logit if side is None else logit + side

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return ctr_forward(self, self.base, batch)

    def unseen_user_vector(self, profile: torch.Tensor) -> torch.Tensor:
        return self.base.unseen_user_vector(profile)
