"""The three ways the fusion model fuses its modalities (each: tokens [B, T, H] + masks [B, T] per modality).

* ``concat``: masked pooled vectors side by side (+ presence flags) -> linear heads;
* ``attention``: a softmax over the available modalities (missing ones get weight 0); the
  weights are part of each prediction (``modality_weights``);
* ``coattention``: each modality's tokens attend to the other modalities' tokens (cross
  attention, a learned null token when nothing else is there), then masked mean pooling.
"""

from __future__ import annotations

import torch
from torch import nn

from mmllm.models.heads import pool


class ConcatFusion(nn.Module):
    """Pooled vectors side by side (zeros for a missing modality) + presence flags; the heads are
    linear on it (late fusion). A hidden layer here was measured worse on 691 training rows."""

    def __init__(self, n: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.out_dim = n * hidden + n

    def forward(self, tokens: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, None]:
        present = torch.stack([(m.sum(1) > 0).float() for m in masks], 1)  # [B, M]
        pooled = [pool(t, m, "mean") * present[:, i:i + 1] for i, (t, m) in enumerate(zip(tokens, masks))]
        return torch.cat([*pooled, present], -1), None


class AttentionFusion(nn.Module):
    """A learned weight per modality and listing: softmax over the modalities that are there."""

    def __init__(self, n: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.out_dim = hidden

    def forward(self, tokens: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = torch.stack([pool(t, m, "mean") for t, m in zip(tokens, masks)], 1)  # [B, M, H]
        present = torch.stack([m.sum(1) > 0 for m in masks], 1)  # [B, M]
        scores = self.score(pooled).squeeze(-1).masked_fill(~present, -1e9)
        weights = torch.softmax(scores, -1) * present  # a row with nothing present gets all zeros
        return (weights.unsqueeze(-1) * pooled).sum(1), weights


class CoAttentionFusion(nn.Module):
    """Each modality's tokens attend to every other modality's tokens; pooled and averaged."""

    def __init__(self, n: int, hidden: int, dropout: float, heads: int = 4) -> None:
        super().__init__()
        self.kind = nn.Parameter(torch.randn(n, hidden) * 0.02)  # which modality a token is from
        self.null = nn.Parameter(torch.zeros(1, 1, hidden))  # always attendable: no NaN when alone
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.out_dim = hidden

    def forward(self, tokens: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, None]:
        tokens = [t + self.kind[i] for i, t in enumerate(tokens)]
        b = tokens[0].shape[0]
        null = self.null.expand(b, 1, -1)
        pooled, present = [], []
        for i, (query, qmask) in enumerate(zip(tokens, masks)):
            others = [j for j in range(len(tokens)) if j != i]
            keys = torch.cat([null, *[tokens[j] for j in others]], 1)
            kmask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=query.device),
                               *[masks[j].bool() for j in others]], 1)
            attended, _ = self.attn(query, keys, keys, key_padding_mask=~kmask, need_weights=False)
            pooled.append(pool(self.norm(query + attended), qmask, "mean"))
            present.append((qmask.sum(1) > 0).float())
        p = torch.stack(present, 1).unsqueeze(-1)  # [B, M, 1]
        fused = (torch.stack(pooled, 1) * p).sum(1) / p.sum(1).clamp(min=1.0)
        return fused, None


FUSIONS = {"concat": ConcatFusion, "attention": AttentionFusion, "coattention": CoAttentionFusion}
