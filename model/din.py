"""DIN: the user's interest is the history pooled with weights from a local activation unit per candidate."""

from __future__ import annotations

import torch
from torch import nn

from dataset.schema import FeatureSchema
from model.base import BaseCTR, Items, ModelConfig
from model.layers import broadcast_cat


class LocalActivationUnit(nn.Module):
    """Relevance of each clicked item h to the candidate c: MLP([h, c, h - c, h * c]) -> one weight.

    The first layer is applied by splitting its weight, W·[h, c, h-c, h*c] = (W_h + W_d)·h + (W_c - W_d)·c
    + W_p·(h*c): the h and c terms are computed once per clicked item and once per candidate, and only the
    product term runs per (candidate, clicked item) pair. Activation: PReLU (Dice's batch statistics
    would make one candidate's score depend on the others in the request).
    """

    def __init__(self, item_dim: int, hidden: int):
        super().__init__()
        self.item_dim = item_dim
        self.first = nn.Linear(4 * item_dim, hidden)
        # PReLU on the last dim (nn.PReLU's channels are dim 1): relu(x) - slope * relu(-x)
        self.negative_slope = nn.Parameter(torch.full((hidden,), 0.25))
        self.out = nn.Linear(hidden, 1)

    def forward(self, clicked: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """clicked [B, L, D] (B = 1 or N), candidate [N, D] -> weights [N, L]."""
        w_h, w_c, w_d, w_p = self.first.weight.split(self.item_dim, dim=1)
        clicked_part = clicked @ (w_h + w_d).t()  # [B, L, H]
        candidate_part = (candidate @ (w_c - w_d).t() + self.first.bias).unsqueeze(1)  # [N, 1, H]
        product_part = (clicked * candidate.unsqueeze(1)) @ w_p.t()  # [N, L, H]
        pre = clicked_part + candidate_part + product_part
        hidden = torch.relu(pre) - self.negative_slope * torch.relu(-pre)
        return self.out(hidden).squeeze(-1)

    def one_user(self, clicked: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """`forward` for one user's clicks `clicked` [L, D] and N candidates [N, D] -> weights [N, L], with
        every (candidate, click) pair's first layer as ONE GEMM: W·[h, c, h-c, h*c] + b =
        c·(W_c - W_d + diag(h) W_p)ᵀ + (W_h + W_d)·h + b, whose per-click matrices and biases [D, L*H], [L*H]
        depend on the user only."""
        w_h, w_c, w_d, w_p = self.first.weight.split(self.item_dim, dim=1)  # each [H, D]
        length, hidden = clicked.shape[0], w_p.shape[0]
        per_click = clicked.unsqueeze(-1) * w_p.t().unsqueeze(0) + (w_c - w_d).t().unsqueeze(0)  # [L, D, H]
        weight = per_click.permute(1, 0, 2).reshape(self.item_dim, length * hidden)  # [D, L*H]
        bias = (clicked @ (w_h + w_d).t() + self.first.bias).reshape(1, length * hidden)
        pre = torch.addmm(bias, candidate, weight)  # [N, L*H]
        # PReLU over whole rows, its slope tiled over the L clicks (long contiguous spans run faster)
        activated = torch.nn.functional.prelu(pre, self.negative_slope.repeat(length))
        return self.out(activated.reshape(-1, hidden)).reshape(candidate.shape[0], length)


class DIN(BaseCTR):
    """Middle layer (Eq. 2): f_mid = sum over clicked items of activation(h, c) * h, padding weighted 0.

    As in the DIN paper the weights are not softmax-normalised, so the interest keeps the intensity of the
    user's relevant clicks. MLP input (Eq. 3): [f_mid, candidate item fields, user fields].
    config.extra["attention_hidden"] sets the activation unit's width (default 36).
    """

    def __init__(self, config: ModelConfig, schema: FeatureSchema):
        super().__init__(config, schema)
        item_dim = self.item_dim
        self.attention = LocalActivationUnit(item_dim, int(config.extra.get("attention_hidden", 36)))
        self.build_mlp(item_dim + item_dim + self.user_dim)

    def interest(self, history: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """Attention-pooled history per candidate -> [N, item_dim]."""
        fields, mask = self.history_fields(history)
        clicked = fields.flatten(-2)  # [B, L, item_dim]
        weights = self.attention(clicked, candidate) * mask.to(clicked.dtype)  # [N, L]
        return (weights.unsqueeze(-1) * clicked).sum(1)

    def mlp_input(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        candidate = self.item_fields(items).flatten(-2)  # [N, item_dim]
        return broadcast_cat([self.interest(history, candidate), candidate, user_vec])

    def mlp_input_one_user(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        """`mlp_input` for one user: the activation unit as one GEMM over all (candidate, click) pairs
        (`LocalActivationUnit.one_user`), and the pooling as a matmul against the masked clicks."""
        candidate = self.item_fields(items).flatten(-2)  # [N, item_dim]
        fields, mask = self.history_fields(history)
        clicked = fields.flatten(-2)[0]  # [L, item_dim]
        weights = self.attention.one_user(clicked, candidate)  # [N, L]
        interest = weights @ (clicked * mask[0].unsqueeze(-1).to(clicked.dtype))  # padding clicks weigh 0
        return broadcast_cat([interest, candidate, user_vec])
