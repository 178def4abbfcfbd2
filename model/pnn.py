"""PNN (inner-product variant): field embeddings plus all pairwise inner products feed the MLP."""

from __future__ import annotations

import torch

from dataset.schema import FeatureSchema
from model.base import BaseCTR, Items, ModelConfig
from model.layers import broadcast_cat


class PNN(BaseCTR):
    """Fields: user id + profile, item id + item fields, and the pooled behavior of each item field; the MLP
    sees them all and every pairwise inner product (MovieLens: 4 + 2 + 2 fields, 28 products)."""

    def __init__(self, config: ModelConfig, schema: FeatureSchema):
        super().__init__(config, schema)
        n_fields = self.user_fields + 2 * self.item_field_count
        rows, cols = torch.triu_indices(n_fields, n_fields, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        self.build_mlp(n_fields * config.embed_dim + len(rows))

    def fields(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        """All field embeddings per candidate -> [N, n_fields, d]."""
        d = self.config.embed_dim
        user_side = torch.cat([user_vec, self.behavior(history)], dim=-1)  # [1 or N, user_dim + item_dim]
        candidate = self.item_fields(items).flatten(-2)  # [N, item_dim]
        flat = broadcast_cat([candidate, user_side])
        return flat.reshape(flat.shape[0], -1, d)

    def mlp_input(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        fields = self.fields(user_vec, history, items)
        products = (fields[:, self.pair_rows] * fields[:, self.pair_cols]).sum(-1)
        return torch.cat([fields.flatten(1), products], dim=-1)
