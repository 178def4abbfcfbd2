"""PNN (inner-product variant): field embeddings plus all pairwise inner products feed the MLP."""

from __future__ import annotations

import torch

from model.base import BaseCTR, ModelConfig
from model.features import FeatureSpace
from model.layers import broadcast_cat


class PNN(BaseCTR):
    """Fields: user id + profile (4), item id + genre (2), pooled behavior items + genres (2)."""

    def __init__(self, config: ModelConfig, space: FeatureSpace):
        super().__init__(config, space)
        n_fields = self.user_fields + 2 + 2
        rows, cols = torch.triu_indices(n_fields, n_fields, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        self.build_mlp(n_fields * config.embed_dim + len(rows))

    def fields(self, user_vec: torch.Tensor, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """All field embeddings per candidate -> [N, n_fields, d]."""
        d = self.config.embed_dim
        user_side = torch.cat([user_vec, self.behavior(history)], dim=-1)  # [1 or N, (4 + 2) d]
        candidate = self.item_fields(items).flatten(-2)  # [N, 2 d]
        flat = broadcast_cat([candidate, user_side])
        return flat.reshape(flat.shape[0], -1, d)

    def mlp_input(self, user_vec: torch.Tensor, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        fields = self.fields(user_vec, history, items)
        products = (fields[:, self.pair_rows] * fields[:, self.pair_cols]).sum(-1)
        return torch.cat([fields.flatten(1), products], dim=-1)
