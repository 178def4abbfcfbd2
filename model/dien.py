"""DIEN: a GRU extracts interest states from the click history; an attention-gated GRU (AUGRU) evolves them
towards the candidate.

Both recurrences are explicit loops over a history padded (or cut) to `schema.max_history` steps, with the
masked update h = m * h_new + (1 - m) * h. The step count is therefore a constant of the model: the
exported graph unrolls it and accepts any history length, with no data-dependent control flow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dataset.schema import PAD, FeatureSchema
from model.base import BaseCTR, Items, ModelConfig
from model.layers import broadcast_cat

# Added to the attention logits of padding steps; softmax then gives them weight 0.
MASKED_LOGIT = -1e9


class GRUGates(nn.Module):
    """Parameters of a GRU cell (update gate u, reset gate r, candidate n); convention h' = (1-u)*h + u*n.

    The input projection is separate so it can run once over a whole sequence (and, for the AUGRU, once per
    user rather than once per candidate).
    """

    def __init__(self, input_dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.input_proj = nn.Linear(input_dim, 3 * hidden)
        self.hidden_proj = nn.Linear(hidden, 3 * hidden)

    def step(self, projected_input: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from an input already passed through `input_proj` -> (update gate u, candidate n)."""
        gates_x, x_n = projected_input.split([2 * self.hidden, self.hidden], dim=-1)
        gates_h, h_n = self.hidden_proj(h).split([2 * self.hidden, self.hidden], dim=-1)
        update, reset = torch.sigmoid(gates_x + gates_h).split(self.hidden, dim=-1)
        candidate = torch.tanh(x_n + reset * h_n)
        return update, candidate


class DIEN(BaseCTR):
    """Interest extractor GRU + auxiliary loss, AUGRU interest evolution, then the MLP (Eq. 2-3).

    - Extractor: GRU over the clicked items' fields (id + item fields) in chronological order -> states s_t.
    - Auxiliary loss: s_t must tell the next clicked item from a negative sampled from the batch's
      candidate items (a popularity-like distribution), via a small MLP on [s_t, item].
    - Evolution: a_t = softmax_t(s_t · W c) over the non-padding steps; AUGRU update u'_t = a_t * u_t.
    - f_mid = the last AUGRU state; MLP input = [f_mid, candidate fields, user fields, mean behavior].
    config.extra: "gru_hidden" (default 2 * embed_dim), "aux_hidden" (default 64).
    """

    def __init__(self, config: ModelConfig, schema: FeatureSchema):
        super().__init__(config, schema)
        item_dim = self.item_dim
        hidden = int(config.extra.get("gru_hidden", item_dim))
        aux_hidden = int(config.extra.get("aux_hidden", 64))
        self.steps = int(schema.max_history)
        self.extractor = GRUGates(item_dim, hidden)
        self.evolution = GRUGates(hidden, hidden)
        self.attention = nn.Linear(hidden, item_dim, bias=False)  # bilinear s_t · W c
        self.aux_net = nn.Sequential(nn.Linear(hidden + item_dim, aux_hidden), nn.ReLU(),
                                     nn.Linear(aux_hidden, 1))
        self._extracted: tuple[torch.Tensor, ...] | None = None
        self.build_mlp(hidden + item_dim + self.user_dim + item_dim)

    def chronological(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Most-recent-first history [B, L] -> oldest-first [B, steps] (padding first) and its float mask."""
        # cat, not F.pad: onnxruntime's CUDA Pad has no int64 kernel, and one CPU node (with its copies)
        # in the graph rules out CUDA graphs for the whole scorer.
        padding = torch.full((history.shape[0], self.steps), PAD, dtype=history.dtype, device=history.device)
        fixed = torch.cat([history, padding], dim=1)[:, :self.steps]
        ordered = torch.flip(fixed, dims=[1])
        return ordered, (ordered != PAD).to(torch.float32)

    def extract(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Interest states [B, steps, H], the chronological items [B, steps] and mask [B, steps]."""
        ordered, mask = self.chronological(history)
        projected = self.extractor.input_proj(self.item_fields(ordered).flatten(-2))  # [B, steps, 3H]
        h = torch.zeros_like(projected[:, 0, :self.extractor.hidden])
        states = []
        # unbind, not projected[:, t]: indexing one step would back-propagate a full-size zero tensor per step.
        for step_input, m in zip(projected.unbind(1), mask.unsqueeze(-1).unbind(1), strict=True):
            update, candidate = self.extractor.step(step_input, h)
            # h = m * h_new + (1 - m) * h with h_new = (1 - u) * h + u * n, folded into one update.
            h = h + (m * update) * (candidate - h)
            states.append(h)
        return torch.stack(states, dim=1), ordered, mask

    def evolve(self, states: torch.Tensor, mask: torch.Tensor, candidate: torch.Tensor,
               one_user: bool = False) -> torch.Tensor:
        """AUGRU over the interest states, attention w.r.t. each candidate -> final state [N, H]. With
        `one_user` (states [1, steps, H]) the attention logits of all N candidates are one GEMM."""
        if one_user:
            logits = candidate @ self.attention(states[0]).transpose(0, 1)  # [N, D] x [D, steps]
        else:
            logits = (self.attention(states) * candidate.unsqueeze(1)).sum(-1)  # [N, steps]
        attention = torch.softmax(logits + (1 - mask) * MASKED_LOGIT, dim=-1)
        projected = self.evolution.input_proj(states)  # [B, steps, 3H], once per user
        h = torch.zeros_like(attention[:, :1]).expand(-1, self.evolution.hidden)
        # AUGRU: the update gate scaled by the attention, u' = a_t * u; padding steps (m = 0) keep h.
        step_weights = (attention * mask).unsqueeze(-1).unbind(1)  # [N, 1] each
        for step_input, weight in zip(projected.unbind(1), step_weights, strict=True):
            update, new = self.evolution.step(step_input, h)
            h = h + (weight * update) * (new - h)
        return h

    def mlp_input(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        states, ordered, mask = self.extract(history)
        if self.training:
            # ctr_forward asks for the auxiliary loss right after scoring the same batch: reuse the states.
            self._extracted = (history, states, ordered, mask)
        candidate = self.item_fields(items).flatten(-2)
        evolved = self.evolve(states, mask, candidate)
        return broadcast_cat([evolved, candidate, user_vec, self.behavior(history)])

    def mlp_input_one_user(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        """`mlp_input` for one user: the extractor GRU, the AUGRU's input projection and the attention keys run
        once (batch 1); only the AUGRU recurrence itself depends on the candidate."""
        states, _, mask = self.extract(history)
        candidate = self.item_fields(items).flatten(-2)
        evolved = self.evolve(states, mask, candidate, one_user=True)
        return broadcast_cat([evolved, candidate, user_vec, self.behavior(history)])

    def auxiliary_loss(self, user_vec: torch.Tensor, history: torch.Tensor, items: Items) -> torch.Tensor:
        """Mean over consecutive click pairs of BCE(s_t -> next click, 1) + BCE(s_t -> sampled item, 0)."""
        cached, self._extracted = self._extracted, None
        if cached is not None and cached[0] is history:
            _, states, ordered, mask = cached
        else:
            states, ordered, mask = self.extract(history)
        states = states[:, :-1]
        positive = ordered[:, 1:]
        pair_mask = mask[:, :-1] * mask[:, 1:]
        negative = items.ids[torch.randint(len(items), positive.shape, device=items.ids.device)]
        pair_mask_negative = pair_mask * (negative != positive).to(pair_mask.dtype)
        loss_positive = F.binary_cross_entropy_with_logits(
            self.aux_logit(states, positive), torch.ones_like(pair_mask), reduction="none")
        loss_negative = F.binary_cross_entropy_with_logits(
            self.aux_logit(states, negative), torch.zeros_like(pair_mask), reduction="none")
        total = (loss_positive * pair_mask).sum() + (loss_negative * pair_mask_negative).sum()
        return total / pair_mask.sum().clamp(min=1.0)

    def aux_logit(self, states: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        item = self.item_fields(items).flatten(-2)
        return self.aux_net(torch.cat([states, item], dim=-1)).squeeze(-1)
