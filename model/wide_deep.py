"""Wide & Deep: a linear model over sparse and cross features beside a deep MLP over the field embeddings."""

from __future__ import annotations

import torch
from torch import nn

from model.base import BaseCTR, ModelConfig
from model.deepfm import scalar_table
from model.features import PAD, FeatureSpace
from model.layers import broadcast_cat, masked_mean

# Multiplier of the candidate x clicked-item hash; a prime larger than any realistic item vocabulary.
ITEM_CROSS_PRIME = 1_000_003


class WideDeep(BaseCTR):
    """Deep part: the MLP over item id + genre, user id + profile, and pooled behavior fields.

    Wide part (`side_logit`), one scalar weight per sparse feature value:
      - item id, item genres, clicked items (averaged over the history);
      - user id and profile: a linear read-out of their embeddings, since `score` receives the user side
        as the feature store's vector rather than as ids;
      - cross genre x clicked genre: weight[g_candidate, g_clicked] times the share of the user's clicks in
        g_clicked — "this item's genre and the genres the user clicked", a table of G*G scalars;
      - cross item x clicked item: hashed (candidate id, clicked id) pairs into `wide_hash_buckets` scalars
        (config.extra), averaged over the history — memorises co-clicks as the paper's wide part does.
    """

    def __init__(self, config: ModelConfig, space: FeatureSpace):
        super().__init__(config, space)
        n_genres = len(space.genres)
        self.hash_buckets = int(config.extra.get("wide_hash_buckets", 1 << 17))
        self.item_weight = scalar_table(len(space.items))
        self.genre_weight = scalar_table(n_genres)
        self.behavior_weight = scalar_table(len(space.items))
        self.item_cross_weight = nn.Embedding(self.hash_buckets, 1)
        self.genre_cross_weight = nn.Embedding(n_genres, n_genres)  # row: candidate genre, column: clicked
        nn.init.zeros_(self.item_cross_weight.weight)
        nn.init.zeros_(self.genre_cross_weight.weight)
        self.user_weight = nn.Linear(self.user_dim, 1)  # its bias is the wide part's global bias
        nn.init.zeros_(self.user_weight.weight)
        nn.init.zeros_(self.user_weight.bias)
        # Row g of this one-hot table is genre g's indicator; the padding row is all zeros.
        one_hot = torch.eye(n_genres)
        one_hot[PAD] = 0.0
        self.register_buffer("genre_one_hot", one_hot, persistent=False)
        self.build_mlp((self.user_fields + 2 + 2) * config.embed_dim)

    def embedding_tables(self) -> list[nn.Embedding]:
        # Wide weights are sparse per-value weights: they get the same L2 as the embedding rows.
        return [*super().embedding_tables(), self.item_weight, self.genre_weight, self.behavior_weight,
                self.item_cross_weight, self.genre_cross_weight]

    def mlp_input(self, user_vec: torch.Tensor, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        candidate = self.item_fields(items).flatten(-2)
        return broadcast_cat([candidate, user_vec, self.behavior(history)])

    def clicked_genre_share(self, history: torch.Tensor) -> torch.Tensor:
        """Per user, the share of clicked items in each genre -> [B, G] (zeros for an empty history)."""
        per_item = self.genre_one_hot[self.item_genres[history]].sum(-2)  # [B, L, G]
        return masked_mean(per_item, history != PAD)

    def genre_cross(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        genres = self.item_genres[items]  # [N, Gi]
        rows = (self.genre_cross_weight(genres) * (genres != PAD).unsqueeze(-1).float()).sum(1)  # [N, G]
        return (rows * self.clicked_genre_share(history)).sum(-1)

    def item_cross(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        bucket = torch.remainder(items.unsqueeze(-1) * ITEM_CROSS_PRIME + history, self.hash_buckets)  # [N, L]
        return masked_mean(self.item_cross_weight(bucket), (history != PAD).expand_as(bucket)).squeeze(-1)

    def side_logit(self, user_vec: torch.Tensor, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        genres = self.item_genres[items]
        genre = masked_mean(self.genre_weight(genres), genres != PAD).squeeze(-1)
        behavior = masked_mean(self.behavior_weight(history), history != PAD).squeeze(-1)
        user = self.user_weight(user_vec).squeeze(-1)
        return (self.item_weight(items).squeeze(-1) + genre + (user + behavior)
                + self.genre_cross(history, items) + self.item_cross(history, items))
