"""The shared prompt prefix, encoded once per loaded model and reused by every batch (a prefix KV cache).

A template that puts its row-independent text first (instructions, taxonomy, attribute list:
``listing_v2``) renders the same first tokens for every listing. :func:`shared_prefix_ids` finds
them once, from the tokenizer alone: the longest token prefix common to probe listings that differ
in every field, with and without images. :class:`PrefixCache` runs the model over those tokens
once and, for each batch, hands ``generate`` their keys and values expanded to the batch, so a
batch's prefill covers only what follows the prefix.

The processor left-pads a batch: ``[pad | prefix | row]``. A cache shared by every row needs the
prefix at the same positions in every row, so :meth:`PrefixCache.lay_out` moves each row's padding
behind the prefix: ``[prefix | pad | row]``. Padding is masked out and positions (1-D, or the 3-D
mrope positions of the Qwen-VL families) are counted over the attention mask, so every real token
keeps the position and the context it has in the left-padded layout: the answers are the plain
path's. A batch the layout cannot serve (a row that does not start with the prefix, padding that
is not on the left, an input it does not know) gets ``None`` and takes the plain path.

The keys and values are those of the weights when the cache was built: a model trained further
needs a new cache (the predictor builds one per template, schema and model it is given).

Shared tokens of the shipped templates (toy tokenizer, toy schema): ``listing_compact_v1`` 69 of
~400 (the system text); ``listing_v1`` 102 of ~2,750, because it puts the listing before the
taxonomy; ``listing_v2`` 2,387 of ~2,750.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmllm.catalog import Listing
from mmllm.prompts import PromptTemplate, build_messages
from mmllm.schema import LabelSchema

# batch keys laid out with the tokens ([B, T]); the others (pixels, image grids) are per image
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_end|>")
# Probe listings for the shared prefix: every field differs between them, and each field starts
# with another kind of character (letter, digit, punctuation, non-ASCII), so a token that would
# merge across the end of the shared text differs between probes and is left out of the prefix.
PROBES = (
    (Listing("probe-a", "alpha", "first", {"Colour": "red"}), 0),
    (Listing("probe-b", "7 boats", "(second)", {"9": "x y"}), 1),
    (Listing("probe-c", "\u00dcber - toy", "", {}), 2),
    (Listing("probe-d", "-", "zz", {"k": ["a", "b"]}), 0),
)


def shared_prefix_ids(processor: Any, schema: LabelSchema, template: PromptTemplate) -> list[int]:
    """The token ids every rendered prompt of ``template`` starts with, whatever the listing.

    Stops before any vision token, so the images of a row always fall after the prefix."""
    tokenizer = processor.tokenizer
    encoded = []
    for listing, n_images in PROBES:
        text = processor.apply_chat_template(build_messages(listing, schema, template, n_images=n_images),
                                             tokenize=False, add_generation_prompt=True)
        encoded.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    length = 0
    while all(len(ids) > length for ids in encoded) and len({ids[length] for ids in encoded}) == 1:
        length += 1
    vision = {tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    prefix = encoded[0][:length]
    return next((prefix[:i] for i, token in enumerate(prefix) if token in vision), prefix)


@dataclass
class PrefixCache:
    """The shared prefix's token ids and, per decoder layer, its keys and values ([1, H_kv, P, D])."""

    ids: torch.Tensor  # [P]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    cache_arg: str  # how generate takes a cache: "cache" (transformers 5.24) or "past_key_values" (5.17)
    host_ids: np.ndarray = field(init=False, repr=False)  # the ids on the host, for the layout's checks

    def __post_init__(self) -> None:
        self.host_ids = host(self.ids)

    @classmethod
    def build(cls, model: Any, ids: list[int]) -> "PrefixCache | None":
        """Run ``model`` once over ``ids``; ``None`` when the model's cache is not one this layout serves."""
        from transformers import DynamicCache

        hf_model = base_model(model)
        takes = inspect.signature(hf_model.forward).parameters
        cache_arg = cache_argument(model)
        cache = DynamicCache(config=hf_model.config)
        if not ids or any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
            return None  # e.g. sliding-window layers keep only a window: the prefix would fall out of it
        device = next(model.parameters()).device
        tokens = torch.tensor([ids], device=device)  # [1, P]
        # the output layer at the last position only: over a 2,400-token prefix and a 151,936-entry
        # vocabulary, every position would be a 1.5 GB float32 tensor nobody reads
        only_last = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}
        reset_rope_deltas(hf_model)
        with torch.no_grad():
            model(input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=True, **{cache_arg: cache}, **only_last)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        if not layers or any(keys.shape[-2] != len(ids) for keys, _ in layers):
            return None
        return cls(tokens[0], layers, cache_arg)

    def lay_out(self, enc: dict[str, torch.Tensor], empty: Any = None) -> dict[str, Any] | None:
        """``generate`` arguments for a left-padded batch: ``[prefix | pad | row]`` and the prefix's cache
        (written into ``empty``, an unused cache such as :func:`new_static_cache`'s, else a growing one).

        ``None`` when the batch cannot be served (the caller then generates as usual). A
        :class:`PromptBatch` laid out for this prefix where it was encoded is not laid out again."""
        if isinstance(enc, PromptBatch) and enc.prefix is not None and np.array_equal(enc.prefix, self.host_ids):
            laid = enc.laid_out
        else:
            laid = lay_out_tokens(enc, self.host_ids)
        if laid is None:
            return None
        return {**laid, self.cache_arg: self.batch_cache(enc["input_ids"].shape[0], empty)}

    def batch_cache(self, batch: int, empty: Any = None) -> Any:
        """A cache holding the prefix for ``batch`` rows (generate appends to it, so one per call):
        ``empty`` filled, or a fresh growing one."""
        from transformers import DynamicCache

        cache = DynamicCache() if empty is None else empty
        for index, (keys, values) in enumerate(self.layers):
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), index)
        return cache


class PromptBatch(dict):
    """An encoded batch (the processor's tensors, as a dict) that carries its tokens laid out behind a
    shared prefix (:func:`lay_out_tokens`; ``None``: the batch cannot be served), worked out where the
    batch was encoded: in the labelling engine's workers, ahead of the model, not between its calls.
    Anything that reads the dict reads the processor's own layout; a copy is a plain dict, which
    :meth:`PrefixCache.lay_out` lays out itself."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: np.ndarray | None = None) -> None:
        super().__init__(tensors)
        self.prefix = prefix
        self.laid_out = lay_out_tokens(tensors, prefix) if prefix is not None and len(prefix) else None


def lay_out_tokens(enc: dict[str, torch.Tensor], prefix: np.ndarray) -> dict[str, torch.Tensor] | None:
    """A left-padded batch's tensors with each row's padding moved behind ``prefix`` (host token ids):
    ``[prefix | pad | row]``; ``None`` when the batch cannot be served: an input the layout does not
    know, padding not (only) on the left, a row that does not start with the prefix or has nothing
    after it. Worked out in NumPy on the host: a dozen tiny tensor operations cost ~0.3 ms."""
    if set(enc) - set(TOKEN_KEYS) - set(IMAGE_KEYS) or "attention_mask" not in enc:
        return None
    mask = host(enc["attention_mask"]) != 0  # [B, T]
    batch, length = mask.shape
    n = len(prefix)
    pads = length - mask.sum(axis=1, keepdims=True)  # [B, 1]
    position = np.arange(length)
    if not np.array_equal(mask, position >= pads) or bool((length - pads <= n).any()):
        return None
    # new slot j takes old slot: the prefix (after the row's pads) first, then the pads, then the rest;
    # as indices into the flattened [B * T] batch
    order = position + np.where(position < n, pads, np.where(position < n + pads, -n, 0))
    order += np.arange(0, batch * length, length)[:, None]
    if not (host(enc["input_ids"]).reshape(-1)[order[:, :n]] == prefix).all():
        return None
    return {k: (_gathered(v, order) if k in TOKEN_KEYS else v) for k, v in enc.items()}


def host(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as a NumPy array (a view of a CPU tensor, a copy of a device one)."""
    return tensor.detach().cpu().numpy()


def _gathered(tensor: torch.Tensor, order: np.ndarray) -> torch.Tensor:
    """``tensor.flatten()[order]`` for a [B, T] tensor and [B, T] indices into its flattened values: on the
    host in NumPy, on a device by ``take``."""
    if tensor.device.type == "cpu":
        return torch.from_numpy(tensor.numpy().reshape(-1)[order])
    return tensor.take(torch.from_numpy(order).to(tensor.device))


def cache_argument(model: Any) -> str:
    """The name ``generate`` takes a cache under: ``cache`` (transformers 5.24) or ``past_key_values`` (5.17,
    below the pinned range, but what a GPU machine runs when the locked wheels do not import there:
    benchmarks/gpu_check.sh). Read once per forward function: a signature costs ~30 us, on every batch."""
    forward = base_model(model).forward
    return cache_keyword(getattr(forward, "__func__", forward))


@functools.lru_cache(maxsize=None)
def cache_keyword(forward: Any) -> str:
    """The name a forward function (``generate``'s model, a decoder layer) takes a cache under."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def new_static_cache(model: Any, length: int) -> Any:
    """An empty cache of ``length`` tokens for ``model``'s decoder, allocated on its first update."""
    from transformers import StaticCache

    return StaticCache(config=base_model(model).config.get_text_config(decoder=True), max_cache_len=length)


def base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def reset_rope_deltas(hf_model: Any) -> None:
    """Forget the mrope offsets a Qwen-VL model keeps from its last call.

    Given a cache, ``generate`` would reuse them (transformers 5.17 for every batch, 5.24 for a
    batch without images) instead of computing this batch's from its tokens and images."""
    inner = getattr(hf_model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None
