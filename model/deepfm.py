"""DeepFM: a factorisation machine (first + second order) beside a deep MLP, both over the same fields."""

from __future__ import annotations

import torch
from torch import nn

from dataset.schema import PAD, FeatureSchema
from model.base import BaseCTR, Items, ModelConfig
from model.layers import broadcast_cat, masked_mean


def scalar_table(rows: int) -> nn.Embedding:
    """A first-order weight per id (an embedding of size 1), zero at start and at the padding row."""
    table = nn.Embedding(rows, 1, padding_idx=PAD)
    nn.init.zeros_(table.weight)
    return table


def field_first_order(weights: nn.ModuleList, items: Items) -> torch.Tensor:
    """Sum over item fields of each candidate's mean first-order weight of that field's values -> [N]."""
    total = torch.zeros(items.ids.shape, dtype=torch.float32, device=items.ids.device)
    for tokens, weight in zip(items.fields, weights, strict=True):  # tokens [N, width]
        if tokens.shape[-1] == 1:  # single-valued: the mean of one weight is that weight (0 for PAD)
            total = total + weight(tokens[:, 0]).squeeze(-1) * (tokens[:, 0] != PAD).to(torch.float32)
        else:
            total = total + masked_mean(weight(tokens), tokens != PAD).squeeze(-1)
    return total


class DeepFM(BaseCTR):
    """Fields: item id + item fields, user id + profile, pooled behavior of each item field.

    FM first order (in `side_logit`): a scalar weight per item id, per value of each item field (averaged over
    a multi-valued field's values) and per clicked item (averaged over the history). The user id and profile
    reach `score` only as embeddings (the feature store holds the user vector, not the ids), so their
    first-order weights are a learned linear read-out of each field embedding: a per-id scalar tied to that
    id's embedding row.
    FM second order: all pairwise inner products of the field embeddings, in O(fields * d).
    Deep part: the MLP over the flattened fields (`mlp_input`).
    """

    def __init__(self, config: ModelConfig, schema: FeatureSchema):
        super().__init__(config, schema)
        self.item_weight = scalar_table(len(schema.items))
        self.field_weights = nn.ModuleList(scalar_table(len(f.vocab)) for f in schema.item_fields)
        self.behavior_weight = scalar_table(len(schema.items))
        self.user_weight = nn.Linear(self.user_dim, 1)  # its bias is the global bias of the FM
        nn.init.zeros_(self.user_weight.weight)
        nn.init.zeros_(self.user_weight.bias)
        self.build_mlp(self.user_dim + 2 * self.item_dim)

    def embedding_tables(self) -> list[nn.Embedding]:
        # The scalar tables are sparse per-id weights and get the same L2 as the embedding rows.
        return [*super().embedding_tables(), self.item_weight, *self.field_weights, self.behavior_weight]

    def candidate_fields(self, items: Items) -> torch.Tensor:
        return self.item_fields(items).flatten(-2)  # [N, item_dim]

    def user_side_fields(self, user_vec: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return torch.cat([user_vec, self.behavior(history)], dim=-1)  # [1 or N, user_dim + item_dim]

    def mlp_input(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        return broadcast_cat([self.candidate_fields(items), self.user_side_fields(user_vec, history)])

    def mlp_input_users(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items,
                        candidate_user: torch.Tensor) -> torch.Tensor:
        """`mlp_input` for U users: each user's side (behavior pooling included) once, gathered."""
        user_side = self.user_side_fields(user_vec, history).index_select(0, candidate_user)
        return torch.cat([self.candidate_fields(items), user_side], dim=-1)

    def side_logit_users(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items,
                         candidate_user: torch.Tensor) -> torch.Tensor:
        """`side_logit` for U users: each user's first-order terms and FM sums once, gathered to their
        candidates (same values)."""
        d = self.config.embed_dim
        user_side = self.user_side_fields(user_vec, history)
        user_side = user_side.reshape(user_side.shape[0], -1, d)  # [U, n_u, d]
        user_total = user_side.sum(1).index_select(0, candidate_user)  # [N, d]
        user_squares = user_side.square().sum(1).index_select(0, candidate_user)
        user_first = self.user_first_order(user_vec, history).index_select(0, candidate_user)  # [N]
        candidate = self.item_fields(items)  # [N, 1 + fields, d]
        total = candidate.sum(1) + user_total
        squares = candidate.square().sum(1) + user_squares
        second = 0.5 * (total.square() - squares).sum(-1)
        first = self.item_weight(items.ids).squeeze(-1) + field_first_order(self.field_weights, items) + user_first
        return first + second

    def user_first_order(self, user_vec: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """The user side's first-order terms (user read-out + mean clicked-item weight) -> [B]."""
        behavior = masked_mean(self.behavior_weight(history), history != PAD).squeeze(-1)
        return self.user_weight(user_vec).squeeze(-1) + behavior

    def first_order(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        """Sum of first-order weights -> [N] (user-side terms [1 or N] broadcast)."""
        fields = field_first_order(self.field_weights, items)
        return self.item_weight(items.ids).squeeze(-1) + fields + self.user_first_order(user_vec, history)

    def second_order(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        """0.5 * ((sum of fields)^2 - sum of squared fields), summed over d -> [N].

        The user-side and candidate-side sums are formed apart so the user side runs once per request.
        """
        d = self.config.embed_dim
        user_side = self.user_side_fields(user_vec, history)
        user_side = user_side.reshape(user_side.shape[0], -1, d)
        candidate = self.item_fields(items)  # [N, 1 + fields, d]
        total = candidate.sum(1) + user_side.sum(1)
        squares = candidate.square().sum(1) + user_side.square().sum(1)
        return 0.5 * (total.square() - squares).sum(-1)

    def side_logit(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        return self.first_order(user_vec, history, items) + self.second_order(user_vec, history, items)

    def side_logit_one_user(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        """`side_logit` for one user: the user side's FM sums once, the candidates' few fields summed by
        adds (a reduction over a middle axis of size 2-3 costs more than the adds in onnxruntime)."""
        d = self.config.embed_dim
        user_side = self.user_side_fields(user_vec, history).reshape(-1, d)  # [n_u, d]
        candidate = self.item_fields(items)  # [N, n_c, d]
        fields = [candidate[:, k] for k in range(candidate.shape[1])]
        total, squares = fields[0], fields[0].square()
        for field in fields[1:]:
            total, squares = total + field, squares + field.square()
        total = total + user_side.sum(0)
        squares = squares + user_side.square().sum(0)
        second = 0.5 * (total.square() - squares).sum(-1)
        return self.first_order(user_vec, history, items) + second
