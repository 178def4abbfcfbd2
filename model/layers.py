"""Reusable layers: masked pooling, the (optionally gated) final MLP, and a split first layer."""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of `values` [B, L, d] where `mask` [B, L] is 1; zeros for an empty history."""
    mask = mask.unsqueeze(-1).to(values.dtype)
    total = (values * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1.0)


def padded_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`masked_mean` for `values` that are already zero where `mask` is 0 (rows of PAD, which embeds to zero):
    the same result without the multiply."""
    return values.sum(dim=1) / mask.to(values.dtype).sum(dim=1, keepdim=True).clamp(min=1.0)


def broadcast_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate 2-D tensors on the last dim, broadcasting a batch of 1 (one user) to the batch of N.

    A part that already has the batch is not expanded: an exported graph would copy it once more. (Serving
    graphs are traced with N >= 2 candidates, so which parts are the user's is never ambiguous.)"""
    batch = max(p.shape[0] for p in parts)
    return torch.cat([p if p.shape[0] == batch else p.expand(batch, -1) for p in parts], dim=-1)


class MLP(nn.Module):
    """The final prediction network: ReLU hidden layers, then one logit.

    `forward(h, gates)` implements Eq. 7: layer l sees g^(l-1) ⊙ h^(l-1). A gate list one longer than the
    hidden layers also scales the last hidden output before the logit layer (the official code's variant).
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], dropout: float = 0.0):
        super().__init__()
        dims = [in_dim, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.out = nn.Linear(dims[-1], 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.layer_input_dims = dims  # size of h^(0), h^(1), ... h^(L)

    def forward(self, h: torch.Tensor, gates: list[torch.Tensor] | None = None) -> torch.Tensor:
        for layer_index, layer in enumerate(self.hidden):
            if gates is not None:
                h = gates[layer_index] * h
            h = self.dropout(torch.relu(layer(h)))
        if gates is not None and len(gates) > len(self.hidden):
            h = gates[len(self.hidden)] * h
        return self.out(h).squeeze(-1)


class SplitLinear(nn.Module):
    """W·[c; u] + b computed as W_c·c + (W_u·u + b): the user half runs once per request and broadcasts.

    `candidate` is [N, c_dim] (or None when c_dim is 0); `user` is [N or 1, u_dim].
    """

    def __init__(self, candidate_dim: int, user_dim: int, out_dim: int):
        super().__init__()
        self.candidate = nn.Linear(candidate_dim, out_dim, bias=False) if candidate_dim else None
        self.user = nn.Linear(user_dim, out_dim)

    def forward(self, candidate: torch.Tensor | None, user: torch.Tensor) -> torch.Tensor:
        out = self.user(user)
        if self.candidate is not None:
            out = self.candidate(candidate) + out
        return out
