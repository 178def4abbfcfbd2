"""The base-model interface every CTR model implements, and the model configuration.

The contract shared by training, export and serving is split at the user boundary:

- `user_state(user_idx, profile_idx)` -> (user_vec [B, user_dim], udg_vec [B, udg_dim]): everything that
  depends only on the user. This is what the feature store keeps per user.
- `score(user_vec, udg_vec, history, items)` -> logits [N]: user-side tensors may have batch N (training)
  or 1 (serving: one user, N candidates, broadcast inside the graph).

A base model provides the embedding layer and `mlp_input` (its middle/product layer, Eq. 2-3); its final
MLP is `self.mlp`. UDG (model.udg) wraps any base model without knowing which one it is.

Every size comes from the feature schema (`dataset.schema.FeatureSchema`): a user is the id plus one field per
profile field; an item is the id plus one pooled field per item field (a multi-valued field is the mean of
its values' rows), whatever the data set declares.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dataset.schema import OOV, PAD, FeatureSchema
from model.layers import MLP, padded_mean


@dataclass
class ModelConfig:
    kind: str = "pnn"
    embed_dim: int = 16
    hidden: tuple[int, ...] = (200, 80)
    dropout: float = 0.0
    # UDG (Eq. 6-9)
    udg: bool = False
    udg_dim: int = 16
    gate_hidden: int = 64
    gate_input: str = "paper"  # "paper": item + behavior + UDG emb; "official": UDG emb + profile embs
    gate_scale: float = 1.0  # gate = scale * sigmoid(.); 2.0 starts the gates near 1 (PEPNet-style)
    gate_detach: bool = False  # stop gradients from the gates into the main embedding tables
    gate_output_layer: bool = False  # also gate the last hidden output (the official code's len(hidden)+1)
    # Training-time regularisation of the user id: a share of events see the OOV row, which then serves as
    # the base user embedding of users unseen in training.
    user_id_dropout: float = 0.05
    extra: dict = field(default_factory=dict)  # model-specific options (e.g. attention sizes)

    def to_json(self) -> dict:
        data = asdict(self)
        data["hidden"] = list(self.hidden)
        return data

    @classmethod
    def from_json(cls, data: dict) -> ModelConfig:
        data = dict(data)
        data["hidden"] = tuple(data.get("hidden", (200, 80)))
        return cls(**data)


@dataclass
class Items:
    """Candidate items: ids [N] and, per item field, their token indices [N, width].

    Training looks the fields up in the model's item table by id; serving passes them in, so that an item
    that arrived after training is scored with its known features (its id row is the OOV row)."""

    ids: torch.Tensor
    fields: list[torch.Tensor]

    def __len__(self) -> int:
        return self.ids.shape[0]


class BaseCTR(nn.Module):
    """Embedding layer shared by all base models; subclasses define `mlp_input` and build `self.mlp`."""

    def __init__(self, config: ModelConfig, schema: FeatureSchema):
        super().__init__()
        d = config.embed_dim
        self.config = config
        #: how many user fields the user vector holds (user id + profile)
        self.user_fields = 1 + len(schema.user_fields)
        #: how many fields an item contributes (item id + item fields)
        self.item_field_count = 1 + len(schema.item_fields)
        self.user_emb = nn.Embedding(len(schema.users), d)
        self.profile_embs = nn.ModuleList(nn.Embedding(len(f.vocab), d) for f in schema.user_fields)
        self.item_emb = nn.Embedding(len(schema.items), d, padding_idx=PAD)
        self.item_field_embs = nn.ModuleList(nn.Embedding(len(f.vocab), d, padding_idx=PAD)
                                             for f in schema.item_fields)
        # Each item field's token indices per item row: the model looks an item's fields up by its id.
        for index, spec in enumerate(schema.item_fields):
            self.register_buffer(f"item_field_table_{index}",
                                 torch.as_tensor(schema.item_table[spec.name], dtype=torch.long), persistent=True)
        for table in (self.user_emb, self.item_emb, *self.item_field_embs, *self.profile_embs):
            nn.init.normal_(table.weight, std=0.05)
        # Row PAD of every item table is zero, and stays zero: `padding_idx` gives it no gradient, and loading
        # weights checks it. PAD tokens therefore add nothing to a sum, and pooling needs no mask multiply
        # (one fewer pass over every candidate's and click's rows, in training and in the serving graph).
        with torch.no_grad():
            for table in self.padded_tables().values():
                table.weight[PAD].zero_()
        self.register_load_state_dict_post_hook(_check_padding_rows)

    # --- the embedding layer (Eq. 1) ---------------------------------------------------------------------
    @property
    def base_model(self) -> BaseCTR:
        """The base model (itself; a UDG wrapper answers its wrapped model)."""
        return self

    @property
    def udg_dim(self) -> int:
        """Width of the UDG user embedding: 0, a base model has none."""
        return 0

    @property
    def user_dim(self) -> int:
        return self.user_fields * self.config.embed_dim

    @property
    def item_dim(self) -> int:
        """Width of one item's flattened fields (candidate or clicked item)."""
        return self.item_field_count * self.config.embed_dim

    def item_field_tables(self) -> list[torch.Tensor]:
        return [getattr(self, f"item_field_table_{i}") for i in range(len(self.item_field_embs))]

    def embedding_tables(self) -> list[nn.Embedding]:
        return [self.user_emb, self.item_emb, *self.item_field_embs, *self.profile_embs]

    def padded_tables(self) -> dict[str, nn.Embedding]:
        """The item tables, whose row PAD must be zero, by parameter name."""
        tables = {"item_emb": self.item_emb}
        tables.update({f"item_field_embs.{i}": table for i, table in enumerate(self.item_field_embs)})
        return tables

    def nonzero_padding_rows(self) -> list[str]:
        """Names of the item tables whose row PAD is not zero (none in a valid model)."""
        return [name for name, table in self.padded_tables().items() if bool(table.weight[PAD].any())]

    def user_vector(self, user: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        """Base user embedding: user id row and profile rows, concatenated -> [B, user_fields * d]."""
        if self.training and self.config.user_id_dropout > 0:
            drop = torch.rand(user.shape, device=user.device) < self.config.user_id_dropout
            user = torch.where(drop, torch.full_like(user, OOV), user)
        parts = [self.user_emb(user)] + [emb(profile[:, i]) for i, emb in enumerate(self.profile_embs)]
        return torch.cat(parts, dim=-1)

    def unseen_user_vector(self, profile: torch.Tensor) -> torch.Tensor:
        """Base user embedding of a user unseen in training: the OOV id row plus their profile rows."""
        oov = torch.full(profile.shape[:1], OOV, dtype=torch.long, device=profile.device)
        parts = [self.user_emb(oov)] + [emb(profile[:, i]) for i, emb in enumerate(self.profile_embs)]
        return torch.cat(parts, dim=-1)

    def split_user_vector(self, user_vec: torch.Tensor) -> torch.Tensor:
        """[B, user_fields * d] -> [B, user_fields, d]."""
        return user_vec.reshape(user_vec.shape[0], self.user_fields, self.config.embed_dim)

    def pooled_field(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        """Item field `index` of items whose token indices are `tokens` [..., width] -> mean row [..., d]."""
        d = self.config.embed_dim
        width = tokens.shape[-1]
        if width == 1:  # a single-valued field: the mean of one row is that row (PAD's row is 0), no reduction
            return self.item_field_embs[index](tokens[..., 0])
        pooled = padded_mean(self.item_field_embs[index](tokens).reshape(-1, width, d),
                             (tokens != PAD).reshape(-1, width))
        return pooled.reshape(*tokens.shape[:-1], d)

    def lookup_items(self, ids: torch.Tensor) -> Items:
        """Items by id, their fields from the model's item table."""
        return Items(ids, [table[ids] for table in self.item_field_tables()])

    def as_items(self, items: torch.Tensor | Items) -> Items:
        return items if isinstance(items, Items) else self.lookup_items(items)

    def item_fields(self, items: torch.Tensor | Items) -> torch.Tensor:
        """Item feature: id row and one pooled row per item field -> [..., 1 + fields, d] for items of any shape
        (ids of any shape are looked up in the item table; `Items` bring their own fields)."""
        items = self.as_items(items)
        parts = [self.item_emb(items.ids)]
        for index, tokens in enumerate(items.fields):
            parts.append(self.pooled_field(index, tokens))
        return torch.stack(parts, dim=-2)

    def history_fields(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """History items as item fields [B, L, 1 + fields, d] and the padding mask [B, L]."""
        return self.item_fields(history), history != PAD

    def behavior(self, history: torch.Tensor) -> torch.Tensor:
        """Behavior feature: masked mean of the clicked items' fields -> [B, item_dim]."""
        fields, mask = self.history_fields(history)
        return padded_mean(fields.flatten(-2), mask)

    # --- what subclasses provide ------------------------------------------------------------------------
    def mlp_input(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        """h^(0) of Eq. 3 for every candidate -> [N, mlp input dim]."""
        raise NotImplementedError

    def mlp_input_one_user(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        """`mlp_input` for ONE user (user side of batch 1) and N candidates, as serving graphs compute it; a
        model whose middle layer has cheaper one-user algebra overrides it (same values)."""
        return self.mlp_input(user_vec, history, items)

    def mlp_input_users(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items,
                        candidate_user: torch.Tensor) -> torch.Tensor:
        """`mlp_input` for U users (user side [U, ...]) and N candidates, candidate i scored for user row
        `candidate_user[i]`, as the multi-user serving graph computes it. This default gathers each candidate's
        user rows first (the user side then runs per candidate); a model with cheaper algebra overrides it."""
        return self.mlp_input(user_vec.index_select(0, candidate_user), history.index_select(0, candidate_user),
                              items)

    def side_logit(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor | None:
        """A logit added to the MLP's (FM or wide part); None for models without one."""
        return None

    def side_logit_one_user(self, user_vec: torch.Tensor, history: torch.Tensor,
                            items: Items) -> torch.Tensor | None:
        """`side_logit` for one user and N candidates, as serving graphs compute it (same values)."""
        return self.side_logit(user_vec, history, items)

    def side_logit_users(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items,
                         candidate_user: torch.Tensor) -> torch.Tensor | None:
        """`side_logit` for U users and N tagged candidates (see `mlp_input_users`)."""
        return self.side_logit(user_vec.index_select(0, candidate_user), history.index_select(0, candidate_user),
                               items)

    def auxiliary_loss(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor | None:
        """Extra training loss (DIEN's interest-extractor loss); None for most models."""
        return None

    # --- shared forward ---------------------------------------------------------------------------------
    def user_state(self, user: torch.Tensor, profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.user_vector(user, profile), None

    def score(self, user_vec: torch.Tensor, udg_vec: torch.Tensor | None, history: torch.Tensor,
              items: torch.Tensor | Items) -> torch.Tensor:
        items = self.as_items(items)
        logit = self.mlp(self.mlp_input(user_vec, history, items))
        side = self.side_logit(user_vec, history, items)
        return logit if side is None else logit + side

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return ctr_forward(self, self, batch)

    def build_mlp(self, in_dim: int) -> None:
        self.mlp = MLP(in_dim, tuple(self.config.hidden), self.config.dropout)


def ctr_forward(model: nn.Module, base: BaseCTR, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training forward of any CTR model (base or wrapped): {"logit": [B], "aux_loss"?: scalar}."""
    user_vec, udg_vec = model.user_state(batch["user"], batch["profile"])
    items = base.lookup_items(batch["item"])
    out = {"logit": model.score(user_vec, udg_vec, batch["history"], items)}
    aux = base.auxiliary_loss(user_vec, batch["history"], items)
    if aux is not None:
        out["aux_loss"] = aux
    return out


def _check_padding_rows(model: BaseCTR, incompatible_keys) -> None:
    """Loaded weights keep the model's invariant: row PAD of every item table is zero."""
    bad = model.nonzero_padding_rows()
    if bad:
        raise RuntimeError(f"row {PAD} (padding) of {', '.join(bad)} is not zero; padding must embed to zero "
                           f"(training keeps it so)")
