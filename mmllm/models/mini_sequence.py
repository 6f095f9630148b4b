"""Mini-sequence MLPs: the language model's feed-forward blocks run over the sequence in chunks.

Why: a listing prompt is long (``listing_v1``: ~1,400 text tokens + 256 per picture), and in a decoder
layer's backward the MLP's [tokens x intermediate] activations (Qwen2.5-VL-3B: 11,008 wide, five times
the hidden size; gate, up, their product and their gradients) are the largest tensors held at once,
even with gradient checkpointing: that recomputes the whole layer and holds all of them again. The
MLP is position-wise, so it can be run on ``chunks`` slices of the sequence, each slice checkpointed
(Luo et al. 2024, "Mini-Sequence Transformer"): the intermediate activations shrink by that factor,
the answer and the gradients are the same (up to float summation order), and one more MLP forward is
paid per step.

``chunk_mlps(model, chunks)`` patches every language-model MLP in place (``<...>.mlp`` outside the
vision tower): module paths, LoRA targets and saved weights do not change. Only training forwards
with gradients are chunked; evaluation and generation run the MLP whole.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

VISION_PARTS = ("visual", "vision")


class MiniSequence:
    """An MLP's forward, run over ``chunks`` slices of the sequence (dim 1 of [B, T, H]), each checkpointed."""

    def __init__(self, module: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], chunks: int) -> None:
        self.module, self.forward, self.chunks = module, forward, chunks

    def __call__(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (args or kwargs or not (self.module.training and torch.is_grad_enabled()) or hidden.dim() != 3
                or hidden.shape[1] < 2 * self.chunks):
            return self.forward(hidden, *args, **kwargs)
        parts = hidden.chunk(self.chunks, dim=1)
        return torch.cat([checkpoint(self.forward, part, use_reentrant=False) for part in parts], dim=1)


def language_mlps(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The feed-forward blocks of the language model: modules named ``...mlp`` outside the vision tower."""
    return [(name, module) for name, module in model.named_modules()
            if name.split(".")[-1] == "mlp" and not any(part in name.split(".") for part in VISION_PARTS)]


def chunk_mlps(model: torch.nn.Module, chunks: int) -> int:
    """Run every language-model MLP of ``model`` in ``chunks`` checkpointed slices of the sequence
    while training (1 = leave them whole). Returns how many MLPs were patched; a second call re-chunks."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    found = language_mlps(model)
    for _, module in found:
        forward = module.forward
        if isinstance(forward, MiniSequence):
            forward = forward.forward
        if chunks == 1:
            if "forward" in module.__dict__:
                del module.forward  # back to the class's own forward
            continue
        module.forward = MiniSequence(module, forward, chunks)
    return len(found) if chunks > 1 else 0
