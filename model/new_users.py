"""The offline protocol's rows of its new users (`udg coldstart`, model/coldstart.py) when they are more than a
plain embedding table: transformed by MWUF's networks (the `mwuf` arm, model/mwuf.py) or with a base user-id
row of their own (`--warm-base-user`)."""

from __future__ import annotations

import torch
from torch import nn


class NewUserTable(nn.Embedding):
    """UDG rows (`weight`: what warm-up updates) and, optionally, MWUF's networks `nets` that transform them per
    event (frozen) and per-user base id rows `base`, warmed alongside (a new user's id is OOV: without them,
    every new user shares the OOV row, which warm-up of the embeddings never moves)."""

    def __init__(self, init: torch.Tensor, freeze: bool, nets: nn.Module | None = None,
                 base_init: torch.Tensor | None = None):
        super().__init__(*init.shape, _weight=init.clone(), _freeze=freeze)
        self.nets = nets
        self.shift_history: torch.Tensor | None = None  # [n, L] per user, for "phase" networks (set per phase)
        self.base = None if base_init is None else nn.Embedding.from_pretrained(base_init.clone(), freeze=freeze)

    def extra_rows(self) -> list[nn.Parameter]:
        """Parameters warm-up updates besides `weight`."""
        return [] if self.base is None or not self.base.weight.requires_grad else [self.base.weight]

    def vectors(self, model, batch: dict, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(base user vector, UDG vector) of the events of `batch`, whose users' rows are `index`."""
        user_vec = model.unseen_user_vector(batch["profile"])  # OOV id row + profile rows, as served
        if self.base is not None:  # the id row comes first in the user vector (BaseCTR.user_vector)
            user_vec = torch.cat([self.base(index), user_vec[:, model.base_model.config.embed_dim:]], dim=-1)
        udg = self(index)
        if self.nets is not None:
            phase = getattr(self.nets, "shift_source", "event") == "phase"
            if phase and self.shift_history is None:
                raise ValueError("phase MWUF networks need the users' clicks so far: set shift_history")
            history = self.shift_history[index] if phase else batch["history"]
            udg = self.nets.warm(model, udg, batch["profile"], history)
        return user_vec, udg


def new_user_table(init: torch.Tensor, freeze: bool, nets: nn.Module | None = None,
                   base_init: torch.Tensor | None = None) -> nn.Embedding:
    """A plain embedding of `init` (every arm's table before these options existed: the same computation), or a
    `NewUserTable` when there are networks or base rows."""
    if nets is None and base_init is None:
        return nn.Embedding.from_pretrained(init.clone(), freeze=freeze)
    return NewUserTable(init, freeze, nets, base_init)
