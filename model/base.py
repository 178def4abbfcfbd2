"""The base-model interface every CTR model implements, and the model configuration.

The contract shared by training, export and serving is split at the user boundary:

- `user_state(user_idx, profile_idx)` -> (user_vec [B, user_dim], udg_vec [B, udg_dim]): everything that
  depends only on the user. This is what the feature store keeps per user.
- `score(user_vec, udg_vec, history, items)` -> logits [N]: user-side tensors may have batch N (training)
  or 1 (serving: one user, N candidates, broadcast inside the graph).

A base model provides the embedding layer and `mlp_input` (its middle/product layer, Eq. 2-3); its final
MLP is `self.mlp`. UDG (model.udg) wraps any base model without knowing which one it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from model.datasets import PROFILE_FIELDS
from model.features import OOV, PAD, FeatureSpace
from model.layers import MLP, masked_mean


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


class BaseCTR(nn.Module):
    """Embedding layer shared by all base models; subclasses define `mlp_input` and build `self.mlp`."""

    #: how many user fields the user vector holds (user id + profile)
    user_fields = 1 + len(PROFILE_FIELDS)

    def __init__(self, config: ModelConfig, space: FeatureSpace):
        super().__init__()
        d = config.embed_dim
        self.config = config
        self.user_emb = nn.Embedding(len(space.users), d)
        self.profile_embs = nn.ModuleList(nn.Embedding(len(space.profile[f]), d) for f in PROFILE_FIELDS)
        self.item_emb = nn.Embedding(len(space.items), d, padding_idx=PAD)
        self.genre_emb = nn.Embedding(len(space.genres), d, padding_idx=PAD)
        self.register_buffer("item_genres", torch.as_tensor(space.item_genres, dtype=torch.long), persistent=True)
        for table in (self.user_emb, self.item_emb, self.genre_emb, *self.profile_embs):
            nn.init.normal_(table.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()
            self.genre_emb.weight[PAD].zero_()

    # --- the embedding layer (Eq. 1) ---------------------------------------------------------------------
    @property
    def user_dim(self) -> int:
        return self.user_fields * self.config.embed_dim

    def embedding_tables(self) -> list[nn.Embedding]:
        return [self.user_emb, self.item_emb, self.genre_emb, *self.profile_embs]

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

    def item_fields(self, items: torch.Tensor) -> torch.Tensor:
        """Item feature: id row and mean genre row -> [..., 2, d] for items of any shape."""
        genres = self.item_genres[items]  # [..., G]
        genre = masked_mean(self.genre_emb(genres).reshape(-1, genres.shape[-1], self.config.embed_dim),
                            (genres != PAD).reshape(-1, genres.shape[-1]))
        genre = genre.reshape(*items.shape, self.config.embed_dim)
        return torch.stack([self.item_emb(items), genre], dim=-2)

    def history_fields(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """History items as item fields [B, L, 2, d] and the padding mask [B, L]."""
        return self.item_fields(history), history != PAD

    def behavior(self, history: torch.Tensor) -> torch.Tensor:
        """Behavior feature: masked mean of the clicked items' id and genre rows -> [B, 2 * d]."""
        fields, mask = self.history_fields(history)
        return masked_mean(fields.flatten(-2), mask)

    # --- what subclasses provide ------------------------------------------------------------------------
    def mlp_input(self, user_vec: torch.Tensor, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """h^(0) of Eq. 3 for every candidate -> [N, mlp input dim]."""
        raise NotImplementedError

    def side_logit(self, user_vec: torch.Tensor, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor | None:
        """A logit added to the MLP's (FM or wide part); None for models without one."""
        return None

    def auxiliary_loss(self, user_vec: torch.Tensor, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor | None:
        """Extra training loss (DIEN's interest-extractor loss); None for most models."""
        return None

    # --- shared forward ---------------------------------------------------------------------------------
    def user_state(self, user: torch.Tensor, profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.user_vector(user, profile), None

    def score(self, user_vec: torch.Tensor, udg_vec: torch.Tensor | None, history: torch.Tensor,
              items: torch.Tensor) -> torch.Tensor:
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
    out = {"logit": model.score(user_vec, udg_vec, batch["history"], batch["item"])}
    aux = base.auxiliary_loss(user_vec, batch["history"], batch["item"])
    if aux is not None:
        out["aux_loss"] = aux
    return out
