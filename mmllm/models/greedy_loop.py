"""Greedy decoding steps of our own, around the model's decoder layers.

``generate`` spends most of a small model's decoding step outside the arithmetic: preparing inputs,
building the step's attention mask through transformers' mask functions, positions, the model's
wrappers and output objects, the stopping criteria. On ``listing_v1`` at batch 8 with the tiny
checkpoint (2 CPU cores) a step took 3.3-5.3 ms that way, and 1.7-1.9 ms when the same decoder layers
are called from a plain loop (an ad-hoc timing of 59 steps, 2026-12-05; the attention over the
~3,000-token cache is ~0.6 ms of it).

:func:`greedy_decode` lets ``generate`` do the prefill and pick the first token, so the prompt's
positions (mrope's three sections, images included), the prefix cache's layout and the first step
are transformers' own. It then runs the remaining steps itself, as ``generate``'s greedy loop does:

* the step's input is each row's last token (a finished row's is the pad token), embedded by the
  model's own embedding;
* positions continue from the last prompt position, read from the text model's prefill call, one
  more each step (every mrope section: answer tokens are text);
* the mask is the prompt's attention mask followed by ones, handed to attention as
  ``[B, 1, 1, keys]`` booleans, or no mask at all when no row has padding, exactly the cases in
  which transformers' SDPA mask builder gives one or none;
* each decoder layer, the final norm and the output layer are the model's modules (LoRA layers
  included), so the numbers are those of ``generate``: the answers, spans and log-probabilities are
  equal to the bit (``tests/test_greedy_loop.py``, all three families, padding, pictures, the prefix
  cache, the grammar);
* the logits processors (the grammar, the confidence recorder) see the scores in float32, the
  chosen token is their argmax, finished rows get the pad token, a row finishes at a stop id, the
  loop ends when every row has or at the token budget.

Served: decoders whose text model has ``embed_tokens``, ``rotary_emb``, ``layers`` and ``norm``
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL) under SDPA (``sdpa``, ``sdpa_unpadded``), with a growing cache.
Anything else (eager or flash attention, a static cache, sliding windows) keeps ``generate``
(:func:`decoding_step` returns ``None``), and so does a job whose first batch the loop fails on
(another transformers' layer arguments: ``GenerativePredictor._own_loop`` says so once). Speed-up and
its measurement: benchmarks/RESULTS.md, "Where ``listing_v1`` stands".
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch

from mmllm.models.prefix_cache import base_model, cache_keyword

ATTENTION = ("sdpa", "sdpa_unpadded")  # attention kernels whose decoding-step mask this loop builds


class DecodingStep(torch.nn.Module):
    """One decoding step through a loaded model's text decoder: each row's last token in, its float32
    scores over the vocabulary out, the keys and values written into the cache. A module, so forward
    hooks (the benchmarks' timers) see each step as they see the model's own forward passes.

    The decoder layers are called whole. Running their parts inline instead (norms, projections, the
    family's rotary function, the attention kernel) was measured and not kept: 1-2% on the labelling
    pass of ``benchmarks/label_throughput.py``'s rows (four alternations, ad-hoc, 2026-12-05), for a
    copy of every family's layer to keep in step with transformers."""

    def __init__(self, text_model: Any, lm_head: Any, cache_kw: str) -> None:
        super().__init__()
        object.__setattr__(self, "parts", (text_model, lm_head))  # not registered: the model owns them
        self.cache_kw = cache_kw  # the layers' name for the cache: "cache" (transformers 5.24) or "past_key_values"

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                cache: Any) -> torch.Tensor:
        text, lm_head = self.parts
        hidden = text.embed_tokens(input_ids)
        embeddings = text.rotary_emb(hidden, position_ids)
        for layer in text.layers:
            hidden = layer(hidden, attention_mask=attention_mask, position_embeddings=embeddings, position_ids=None,
                           use_cache=True, **{self.cache_kw: cache})
        return lm_head(text.norm(hidden))[:, -1].to(copy=True, dtype=torch.float32)


_STEPS: "weakref.WeakKeyDictionary[Any, DecodingStep]" = weakref.WeakKeyDictionary()  # one per loaded model


def decoding_step(model: Any) -> DecodingStep | None:
    """The decoding step of ``model`` if this loop serves it (see the module's docstring), else ``None``;
    the same module for every call on one model."""
    hf = base_model(model)
    text = getattr(getattr(hf, "model", None), "language_model", None)
    lm_head = getattr(hf, "lm_head", None)
    if text is None or lm_head is None:
        return None
    if not all(hasattr(text, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm")) or not len(text.layers):
        return None
    config = text.config
    if getattr(config, "_attn_implementation", None) not in ATTENTION:  # read every call: it can be switched
        return None
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ["full_attention"]):
        return None
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
        return None
    step = _STEPS.get(model)
    if step is None or step.parts[0] is not text:
        step = _STEPS[model] = DecodingStep(text, lm_head, cache_keyword(type(text.layers[0]).forward))
    return step


def greedy_decode(model: Any, step: DecodingStep, inputs: dict[str, Any], cache: Any, cache_arg: str,
                  processors: Sequence[Any], stops: Sequence[int], pad_token_id: int | None,
                  max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding of one encoded batch: ``[B, prompt + new]`` token ids, as ``generate`` returns them.

    ``inputs`` are ``generate``'s keyword inputs (ids, mask, pixels), ``cache`` the empty (or prefix-filled)
    growing cache handed to it under ``cache_arg``; ``processors`` are called in order on every step's
    float32 scores. The caller holds ``torch.no_grad`` and the greedy generation config."""
    seen: list[torch.Tensor] = []

    def positions(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        if not seen:  # the prefill: the prompt's rotary positions, as the text model handed them over
            seen.append(kwargs["position_ids"] if "position_ids" in kwargs else args[1])

    hook = step.parts[0].rotary_emb.register_forward_pre_hook(positions, with_kwargs=True)
    try:
        first = model.generate(**inputs, **{cache_arg: cache}, max_new_tokens=1, logits_processor=list(processors))
    finally:
        hook.remove()
    batch, prompt = first.shape[0], first.shape[1] - 1
    device = first.device
    last = seen[0][..., -1:].to(device)  # the last prompt token's positions: [sections, B, 1] or [B, 1]
    prompt_mask = inputs.get("attention_mask")
    padded = prompt_mask is not None and not bool(prompt_mask.all())
    ids = first.new_empty(batch, prompt + max(max_new_tokens, 1))
    ids[:, : prompt + 1] = first
    mask = None
    if padded:
        mask = torch.ones(batch, 1, 1, ids.shape[1], dtype=torch.bool, device=device)
        mask[:, 0, 0, :prompt] = prompt_mask.to(device=device, dtype=torch.bool)
    stop_ids = torch.tensor(list(stops), dtype=first.dtype, device=device)
    if pad_token_id is None:  # as generate: the first stop id pads
        pad_token_id = stops[0] if len(stops) else 0
    pad = torch.tensor(pad_token_id, dtype=first.dtype, device=device)
    unfinished = ~torch.isin(first[:, -1], stop_ids)
    new = 1
    while new < max_new_tokens and bool(unfinished.any()):
        length = prompt + new  # tokens in the cache once this step's is in
        scores = step(input_ids=ids[:, length - 1: length], position_ids=last + new,
                      attention_mask=mask[..., :length].contiguous() if padded else None, cache=cache)
        for processor in processors:
            scores = processor(ids[:, :length], scores)
        chosen = torch.where(unfinished, torch.argmax(scores, dim=-1), pad)
        ids[:, length] = chosen
        unfinished &= ~torch.isin(chosen, stop_ids)
        new += 1
    return ids[:, : prompt + new]
