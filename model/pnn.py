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
        # One user, N candidates: candidate fields come first in `fields`, so the pairs (i, j), i < j, in
        # triu order are the candidate-dependent ones (i < n_c: candidate x candidate, then candidate x user)
        # followed by the user x user ones, which depend on the user only.
        n_c = self.item_field_count
        cc_rows, cc_cols = torch.triu_indices(n_c, n_c, offset=1)
        uu_rows, uu_cols = torch.triu_indices(n_fields - n_c, n_fields - n_c, offset=1)
        self.register_buffer("cc_rows", cc_rows, persistent=False)
        self.register_buffer("cc_cols", cc_cols, persistent=False)
        self.register_buffer("uu_rows", uu_rows, persistent=False)
        self.register_buffer("uu_cols", uu_cols, persistent=False)
        n_u = n_fields - n_c
        position = {(int(i), int(j)): k for k, (i, j) in enumerate(zip(cc_rows, cc_cols, strict=True))}
        position.update({(i, n_c + j): len(cc_rows) + i * n_u + j for i in range(n_c) for j in range(n_u)})
        order = [position[(int(i), int(j))] for i, j in zip(rows, cols, strict=True) if i < n_c]
        self.register_buffer("candidate_pair_order", None if order == sorted(order) else torch.tensor(order),
                             persistent=False)
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

    def mlp_input_one_user(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        """`mlp_input` for one user: the candidate x user inner products as one matmul against the user's
        fields, the user x user products once per call (same values, same layout)."""
        d = self.config.embed_dim
        candidate = self.item_fields(items)  # [N, n_c, d]
        user_side = torch.cat([user_vec, self.behavior(history)], dim=-1)  # [1, n_u * d]
        user_fields = user_side.reshape(-1, d)  # [n_u, d]
        products = self._candidate_products(candidate, torch.matmul(candidate, user_fields.t()))
        user_products = (user_fields[self.uu_rows] * user_fields[self.uu_cols]).sum(-1).unsqueeze(0)
        return broadcast_cat([candidate.reshape(-1, self.item_dim), user_side, products, user_products])

    def mlp_input_users(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items,
                        candidate_user: torch.Tensor) -> torch.Tensor:
        """`mlp_input` for U users and N tagged candidates: each user's behavior pooling and user x user products
        once per user, gathered to their candidates; the candidate x user products as a batched matmul against
        each candidate's user fields (same values, same layout)."""
        d = self.config.embed_dim
        candidate = self.item_fields(items)  # [N, n_c, d]
        user_side = torch.cat([user_vec, self.behavior(history)], dim=-1)  # [U, n_u * d]
        user_fields = user_side.reshape(user_side.shape[0], -1, d)  # [U, n_u, d]
        user_products = (user_fields[:, self.uu_rows] * user_fields[:, self.uu_cols]).sum(-1)  # [U, n_uu]
        mine = user_fields.index_select(0, candidate_user)  # [N, n_u, d]
        products = self._candidate_products(candidate, torch.matmul(candidate, mine.transpose(1, 2)))
        return torch.cat([candidate.reshape(-1, self.item_dim), user_side.index_select(0, candidate_user), products,
                          user_products.index_select(0, candidate_user)], dim=-1)

    def _candidate_products(self, candidate: torch.Tensor, with_user: torch.Tensor) -> torch.Tensor:
        """The candidate-dependent inner products in triu order: candidate x candidate, then `with_user`
        ([N, n_c, n_u], candidate x user) -> [N, pairs]."""
        parts = []
        if len(self.cc_rows):
            parts.append((candidate[:, self.cc_rows] * candidate[:, self.cc_cols]).sum(-1))
        parts.append(with_user.flatten(1))  # [N, n_c * n_u]
        products = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return products if self.candidate_pair_order is None else products[:, self.candidate_pair_order]
