"""Attention for padded batches: each row's real tokens through SDPA's causal kernel, no mask.

A batch of prompts of different lengths is padded, and a padded batch hands SDPA a mask. On CPU
a mask keeps SDPA off its causal kernel, which skips the scores above the diagonal: for 8
``listing_v1`` prompts of ~2,750 tokens it spends 0.40 s a layer there at the tiny
checkpoint's widths (4 heads of 16) against 0.13 s through the causal (flash) kernel, which needs no
mask, and 3.8 s against 2.6 s at Qwen2.5-VL-3B's (16 heads of 128) (2 CPU cores, torch 2.14). Small
models and long prompts gain most: the tiny benchmark's prefill halves, a 3B model's moves by less
than its weights' noise (``benchmarks/label_throughput.py``, benchmarks/RESULTS.md, "Padded batches without a mask").

:func:`unpadded_sdpa` reads the mask once per forward pass (the plan is shared by every layer),
finds each row's real keys and real queries, checks that the mask restricted to them is exactly
causal (the last query sees every key, each earlier one a key less) and that no real query sees a
padding key, and then runs each row alone through ``is_causal`` SDPA, as the flash-attention
``varlen`` kernels do on a GPU. Queries that follow a cache (prefill after a cached prompt prefix,
:mod:`mmllm.models.prefix_cache`) are aligned to the end of the keys by zero queries in front; where
those would cost more than the mask (the causal kernel's work, half of each row's keys squared, above
the masked kernel's, batch x queries x keys: ``listing_v2``'s 2,400 cached tokens before ~370 new
ones), the batch keeps the masked kernel.
Padding queries get zeros: nothing real reads them (their keys are masked for every real query).
Every other call (decoding steps, masks of other shapes, a mask that is not exactly causal over
the real tokens, the vision tower) goes to transformers' own SDPA unchanged.

Registered under :data:`NAME` with transformers' attention and mask interfaces (:func:`register`);
``model.attn_implementation: auto`` picks it on CPU (:func:`mmllm.models.generative.resolve_attention`).
Real rows' outputs equal the masked path's to float rounding (``tests/test_unpadded_attention.py``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

NAME = "sdpa_unpadded"


@dataclass(frozen=True)
class RowPlan:
    """One row of a batch: its real queries and keys (indices) and how many keys precede its first query."""

    queries: torch.Tensor  # [n_q] indices into the query axis
    keys: torch.Tensor  # [n_k] indices into the key axis
    lead: int  # n_k - n_q: the real keys before the first real query's own (a cached prefix)


_last: tuple[Any, list[RowPlan] | None] | None = None  # (weak ref to the mask, its plan): layers share one mask


def plan_rows(mask: torch.Tensor, batch: int) -> list[RowPlan] | None:
    """Per-row plans for a boolean ``[B or 1, 1, Q, K]`` mask (True = attend), or ``None`` when the mask
    is not exactly causal over each row's real tokens (then the caller takes the masked path).

    A key is real when the last query sees it (with padding on the left the last query is real;
    on the right it is padding that sees every real key), a query when its own key is; each real
    query must see exactly the real keys up to its own position, checked over the whole mask."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch):
        return None
    q_len, k_len = mask.shape[-2:]
    if q_len < 2 or q_len > k_len:
        return None
    offset = k_len - q_len  # query i sits at key position i + offset (keys before it came from a cache)
    rows = mask[:, 0]  # [B or 1, Q, K]
    real_keys = rows[:, -1]  # [B or 1, K]
    real_queries = real_keys[:, offset:]  # [B or 1, Q]
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril(diagonal=offset)
    plans = []
    for b in range(batch):
        r = min(b, len(rows) - 1)
        keys, queries = real_keys[r].nonzero().flatten(), real_queries[r].nonzero().flatten()
        if len(queries) == 0:
            return None
        lo, hi = int(queries[0]), int(queries[-1]) + 1
        if hi - lo != len(queries):  # real queries in one run (any padding side, a cached prefix before them)
            return None
        if not torch.equal(rows[r, lo:hi], causal[lo:hi] & real_keys[r]):  # one pass over the row's real queries
            return None
        plans.append(RowPlan(queries, keys, len(keys) - len(queries)))
    if sum(len(p.keys) ** 2 for p in plans) / 2 > batch * q_len * k_len:
        return None  # a long cached prefix before few queries: the zero queries would cost more than the mask saves
    return plans


def _plan_for(mask: torch.Tensor, batch: int) -> list[RowPlan] | None:
    """The plan of ``mask``, computed once for all the layers of one forward pass."""
    global _last
    last = _last  # read once: another thread (the demo's) may replace it between two reads
    if last is not None and last[0]() is mask:
        return last[1]
    plans = plan_rows(mask, batch)
    _last = (weakref.ref(mask), plans)
    return plans


class CausalPadding:
    """A causal mask over a padded batch, kept as its 2-D padding mask: what a model loaded with :data:`NAME`
    gets from transformers' ``create_causal_mask`` for a prefill (:func:`causal_padding_mask` is the mask
    function registered with it). transformers would build the ``[B, 1, Q, K]`` booleans, 76 ms a
    prefill of 8 ``listing_v1`` prompts of ~3,000 tokens (and 72 MB), and :func:`plan_rows` would read
    them back (23 ms more; cProfile, 2 cores, 2026-12-05); the row plans come from the padding mask alone,
    and the dense mask is built, by transformers' own ``sdpa_mask``, only for a call that needs it."""

    def __init__(self, padding: torch.Tensor, q_length: int, arguments: dict[str, Any]) -> None:
        self.padding = padding  # [B, K] bool, True = a real key (K: every key, cached ones first)
        self.q_length = q_length  # the queries are the last q_length keys' tokens
        self._arguments = arguments  # sdpa_mask's keyword arguments
        self._dense: torch.Tensor | None = None
        self._plans: dict[int, list[RowPlan] | None] = {}

    def dense(self) -> torch.Tensor | None:
        """The mask transformers would have handed over (built once)."""
        if self._dense is None:
            from transformers.masking_utils import sdpa_mask

            self._dense = sdpa_mask(**self._arguments)
        return self._dense

    def plans(self, batch: int) -> list[RowPlan] | None:
        """:func:`plan_rows` of the dense mask, read from the padding mask (once for every layer)."""
        if batch not in self._plans:
            self._plans[batch] = self._plan(batch)
        return self._plans[batch]

    def _plan(self, batch: int) -> list[RowPlan] | None:
        if self.padding.shape[0] not in (1, batch):
            return None
        k_len = self.padding.shape[1]
        offset = k_len - self.q_length
        plans = []
        for b in range(batch):
            real = self.padding[min(b, self.padding.shape[0] - 1)]
            keys, queries = real.nonzero().flatten(), real[offset:].nonzero().flatten()
            if len(queries) == 0 or int(queries[-1]) + 1 - int(queries[0]) != len(queries):
                return None  # a row of padding only, or real queries in more than one run: the masked path
            plans.append(RowPlan(queries, keys, len(keys) - len(queries)))
        if sum(len(p.keys) ** 2 for p in plans) / 2 > batch * self.q_length * k_len:
            return None  # as plan_rows: the zero queries would cost more than the mask saves
        return plans


def causal_padding_mask(**arguments: Any) -> Any:
    """transformers' SDPA mask function for :data:`NAME`: a prefill's plain causal mask over padded rows as
    a :class:`CausalPadding`; everything else (a decoding step, no padding, sliding windows, masks of
    other patterns, a key offset) exactly what ``sdpa_mask`` gives."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    padding, q_length, kv_length = arguments.get("attention_mask"), arguments.get("q_length"), arguments.get("kv_length")
    q_offset, kv_offset = arguments.get("q_offset", 0), arguments.get("kv_offset", 0)
    if (arguments.get("mask_function", causal_mask_function) is not causal_mask_function or arguments.get("use_vmap")
            or arguments.get("local_size") is not None or padding is None or padding.dim() != 2
            or not isinstance(q_length, int) or not isinstance(kv_length, int) or q_length < 2
            or kv_offset != 0 or not isinstance(q_offset, int) or q_offset != kv_length - q_length):
        return sdpa_mask(**arguments)
    padding = torch.nn.functional.pad(padding, (0, max(0, kv_length - padding.shape[-1])))[:, :kv_length].bool()
    if bool(padding.all()):
        return sdpa_mask(**arguments)  # no padding: None (SDPA's is_causal) or the causal mask, as it decides
    return CausalPadding(padding, q_length, arguments)


def unpadded_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query`` [B, H, Q, D], ``key`` / ``value`` [B, H_kv, K, D];
    returns ``([B, Q, H, D], None)`` as ``sdpa_attention_forward`` does, which takes every call this
    one does not serve."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    plans = None
    causal = is_causal is not False and getattr(module, "is_causal", True)
    if (attention_mask is not None and query.shape[2] > 1 and causal and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions")):
        if isinstance(attention_mask, CausalPadding):
            plans = attention_mask.plans(query.shape[0]) if attention_mask.q_length == query.shape[2] else None
        else:
            plans = _plan_for(attention_mask, query.shape[0])
    if isinstance(attention_mask, CausalPadding) and plans is None:
        attention_mask = attention_mask.dense()
    if plans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    out = query.new_zeros(query.shape)  # padding queries stay 0
    for b, plan in enumerate(plans):
        q = query[b:b + 1].index_select(2, plan.queries)
        k = key[b:b + 1].index_select(2, plan.keys)
        v = value[b:b + 1].index_select(2, plan.keys)
        if groups > 1:
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        if plan.lead:  # is_causal aligns queries to the first key: zero queries in front align them to the last
            q = torch.cat([q.new_zeros(1, q.shape[1], plan.lead, q.shape[3]), q], dim=2)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        out[b:b + 1, :, plan.queries] = o[:, :, plan.lead:]
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make :data:`NAME` an attention implementation transformers can load a model with (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, unpadded_sdpa)
    AttentionMaskInterface.register(NAME, causal_padding_mask)
    return NAME
