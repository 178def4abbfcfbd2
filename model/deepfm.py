"""DeepFM: a factorisation machine (first + second order) beside a deep MLP, both over the same fields."""

from __future__ import annotations

import torch
from torch import nn

from model.base import BaseCTR, ModelConfig
from model.features import PAD, FeatureSpace
from model.layers import broadcast_cat, masked_mean


def scalar_table(rows: int) -> nn.Embedding:
    """A first-order weight per id (an embedding of size 1), zero at start and at the padding row."""
    table = nn.Embedding(rows, 1, padding_idx=PAD)
    nn.init.zeros_(table.weight)
    return table


class DeepFM(BaseCTR):
    """Fields: item id + genre (2), user id + profile (4), pooled behavior items + genres (2).

    FM first order (in `side_logit`): a scalar weight per item id, per genre (averaged over the item's
    genres) and per clicked item (averaged over the history). The user id and profile reach `score` only
    as embeddings (the feature store holds the user vector, not the ids), so their first-order weights are
    a learned linear read-out of each field embedding: a per-id scalar tied to that id's embedding row.
    FM second order: all pairwise inner products of the field embeddings, in O(fields * d).
    Deep part: the MLP over the flattened fields (`mlp_input`).
    """

    def __init__(self, config: ModelConfig, space: FeatureSpace):
        super().__init__(config, space)
        self.item_weight = scalar_table(len(space.items))
        self.genre_weight = scalar_table(len(space.genres))
        self.behavior_weight = scalar_table(len(space.items))
        self.user_weight = nn.Linear(self.user_dim, 1)  # its bias is the global bias of the FM
        nn.init.zeros_(self.user_weight.weight)
        nn.init.zeros_(self.user_weight.bias)
        self.build_mlp((self.user_fields + 2 + 2) * config.embed_dim)

    def embedding_tables(self) -> list[nn.Embedding]:
        # The scalar tables are sparse per-id weights and get the same L2 as the embedding rows.
        return [*super().embedding_tables(), self.item_weight, self.genre_weight, self.behavior_weight]

    def candidate_fields(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_fields(items).flatten(-2)  # [N, 2 d]

    def user_side_fields(self, user_vec: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return torch.cat([user_vec, self.behavior(history)], dim=-1)  # [1 or N, (4 + 2) d]

    def mlp_input(self, user_vec: torch.Tensor, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return broadcast_cat([self.candidate_fields(items), self.user_side_fields(user_vec, history)])

    def first_order(self, user_vec: torch.Tensor, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Sum of first-order weights -> [N] (user-side terms [1 or N] broadcast)."""
        genres = self.item_genres[items]  # [N, G]
        genre = masked_mean(self.genre_weight(genres), genres != PAD).squeeze(-1)
        behavior = masked_mean(self.behavior_weight(history), history != PAD).squeeze(-1)
        user = self.user_weight(user_vec).squeeze(-1)
        return self.item_weight(items).squeeze(-1) + genre + (user + behavior)

    def second_order(self, user_vec: torch.Tensor, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """0.5 * ((sum of fields)^2 - sum of squared fields), summed over d -> [N].

        The user-side and candidate-side sums are formed apart so the user side runs once per request.
        """
        d = self.config.embed_dim
        user_side = self.user_side_fields(user_vec, history)
        user_side = user_side.reshape(user_side.shape[0], -1, d)
        candidate = self.item_fields(items)  # [N, 2, d]
        total = candidate.sum(1) + user_side.sum(1)
        squares = candidate.square().sum(1) + user_side.square().sum(1)
        return 0.5 * (total.square() - squares).sum(-1)

    def side_logit(self, user_vec: torch.Tensor, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.first_order(user_vec, history, items) + self.second_order(user_vec, history, items)
