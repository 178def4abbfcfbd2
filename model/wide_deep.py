"""Wide & Deep: a linear model over sparse and cross features beside a deep MLP over the field embeddings."""

from __future__ import annotations

import torch
from torch import nn

from dataset.schema import PAD, FeatureSchema
from model.base import BaseCTR, Items, ModelConfig
from model.deepfm import field_first_order, scalar_table
from model.layers import broadcast_cat, masked_mean

# Multiplier of the candidate x clicked-item hash; a prime larger than any realistic item vocabulary.
ITEM_CROSS_PRIME = 1_000_003
# Item fields with at most this many values get a field x clicked-field cross table (V x V scalars).
CROSS_MAX_VALUES = 1024


class WideDeep(BaseCTR):
    """Deep part: the MLP over item id + item fields, user id + profile, and pooled behavior fields.

    Wide part (`side_logit`), one scalar weight per sparse feature value:
      - item id, each item field's values, clicked items (averaged over the history);
      - user id and profile: a linear read-out of their embeddings, since `score` receives the user side
        as the feature store's vector rather than as ids;
      - per item field with at most `CROSS_MAX_VALUES` values (MovieLens: the genres), cross value x clicked
        value: weight[v_candidate, v_clicked] times the share of the user's clicks holding v_clicked —
        "this item's genre and the genres the user clicked", a table of V*V scalars;
      - cross item x clicked item: hashed (candidate id, clicked id) pairs into `wide_hash_buckets` scalars
        (config.extra), averaged over the history — memorises co-clicks as the paper's wide part does.
    """

    def __init__(self, config: ModelConfig, schema: FeatureSchema):
        super().__init__(config, schema)
        self.hash_buckets = int(config.extra.get("wide_hash_buckets", 1 << 17))
        self.item_weight = scalar_table(len(schema.items))
        self.field_weights = nn.ModuleList(scalar_table(len(f.vocab)) for f in schema.item_fields)
        self.behavior_weight = scalar_table(len(schema.items))
        self.item_cross_weight = nn.Embedding(self.hash_buckets, 1)
        #: which item fields are crossed with the clicked items' values of the same field
        self.crossed = [i for i, f in enumerate(schema.item_fields) if len(f.vocab) <= CROSS_MAX_VALUES]
        sizes = [len(schema.item_fields[i].vocab) for i in self.crossed]
        self.field_cross_weights = nn.ModuleList(nn.Embedding(v, v) for v in sizes)  # row: candidate, col: clicked
        nn.init.zeros_(self.item_cross_weight.weight)
        for table in self.field_cross_weights:
            nn.init.zeros_(table.weight)
        self.user_weight = nn.Linear(self.user_dim, 1)  # its bias is the wide part's global bias
        nn.init.zeros_(self.user_weight.weight)
        nn.init.zeros_(self.user_weight.bias)
        # Row v of a one-hot table is value v's indicator; the padding row is all zeros.
        for position, size in enumerate(sizes):
            one_hot = torch.eye(size)
            one_hot[PAD] = 0.0
            self.register_buffer(f"cross_one_hot_{position}", one_hot, persistent=False)
        self.build_mlp(self.user_dim + 2 * self.item_dim)

    def embedding_tables(self) -> list[nn.Embedding]:
        # Wide weights are sparse per-value weights: they get the same L2 as the embedding rows.
        return [*super().embedding_tables(), self.item_weight, *self.field_weights, self.behavior_weight,
                self.item_cross_weight, *self.field_cross_weights]

    def mlp_input(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        candidate = self.item_fields(items).flatten(-2)
        return broadcast_cat([candidate, user_vec, self.behavior(history)])

    def mlp_input_users(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items,
                        candidate_user: torch.Tensor) -> torch.Tensor:
        """`mlp_input` for U users: each user's vector and behavior pooling once, gathered. (The wide part's
        crosses pair each candidate with its user's clicks, so `side_logit_users` keeps the gathering default.)"""
        candidate = self.item_fields(items).flatten(-2)
        user_side = torch.cat([user_vec, self.behavior(history)], dim=-1).index_select(0, candidate_user)
        return torch.cat([candidate, user_side], dim=-1)

    def clicked_value_share(self, position: int, history: torch.Tensor) -> torch.Tensor:
        """Per user, the share of clicked items holding each value of crossed field `position` -> [B, V]."""
        table = self.item_field_tables()[self.crossed[position]]
        one_hot = getattr(self, f"cross_one_hot_{position}")
        per_item = one_hot[table[history]].sum(-2)  # [B, L, V]
        return masked_mean(per_item, history != PAD)

    def field_cross(self, history: torch.Tensor, items: Items) -> torch.Tensor:
        total = torch.zeros(items.ids.shape, dtype=torch.float32, device=items.ids.device)
        for position, weight in enumerate(self.field_cross_weights):
            values = items.fields[self.crossed[position]]  # [N, width]
            rows = (weight(values) * (values != PAD).unsqueeze(-1).float()).sum(1)  # [N, V]
            total = total + (rows * self.clicked_value_share(position, history)).sum(-1)
        return total

    def item_cross(self, history: torch.Tensor, items: Items) -> torch.Tensor:
        bucket = torch.remainder(items.ids.unsqueeze(-1) * ITEM_CROSS_PRIME + history, self.hash_buckets)  # [N, L]
        return masked_mean(self.item_cross_weight(bucket), (history != PAD).expand_as(bucket)).squeeze(-1)

    def side_logit_one_user(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        """`side_logit` for one user: the history's mask and share of each crossed value once; the means over
        the history as matmuls against them (no reduction over a middle axis)."""
        mask = (history[0] != PAD).to(torch.float32)  # [L]
        click_weights = mask / mask.sum().clamp(min=1.0)
        bucket = torch.remainder(items.ids.unsqueeze(-1) * ITEM_CROSS_PRIME + history, self.hash_buckets)  # [N, L]
        # torch.gather (onnx GatherElements) on the flat table: ~15x faster in onnxruntime than its Gather
        # for 50k single-float rows
        weights = torch.gather(self.item_cross_weight.weight.reshape(1, -1), 1, bucket.reshape(1, -1))
        item_cross = (weights.reshape(bucket.shape) @ click_weights.unsqueeze(-1)).squeeze(-1)
        field_cross = torch.zeros(items.ids.shape, dtype=torch.float32, device=items.ids.device)
        for position, weight in enumerate(self.field_cross_weights):
            values = items.fields[self.crossed[position]]  # [N, width]
            if values.shape[-1] == 1:
                rows = weight(values[:, 0]) * (values[:, :1] != PAD).to(torch.float32)  # [N, V]
            else:
                rows = (weight(values) * (values != PAD).unsqueeze(-1).float()).sum(1)
            share = self.clicked_value_share(position, history).t()  # [V, 1]
            field_cross = field_cross + (rows @ share).squeeze(-1)
        fields = field_first_order(self.field_weights, items)
        behavior = masked_mean(self.behavior_weight(history), history != PAD).squeeze(-1)
        user = self.user_weight(user_vec).squeeze(-1)
        return self.item_weight(items.ids).squeeze(-1) + fields + (user + behavior) + field_cross + item_cross

    def side_logit(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        fields = field_first_order(self.field_weights, items)
        behavior = masked_mean(self.behavior_weight(history), history != PAD).squeeze(-1)
        user = self.user_weight(user_vec).squeeze(-1)
        return (self.item_weight(items.ids).squeeze(-1) + fields + (user + behavior)
                + self.field_cross(history, items) + self.item_cross(history, items))
