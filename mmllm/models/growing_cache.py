"""A decoding cache that grows in place.

transformers' ``DynamicLayer`` appends each decoding step's keys and values with ``torch.cat``: every
step copies the whole cache of every layer to add one token. Over a ``listing_v1`` prompt (~2,700
tokens with the tiny checkpoint's tokenizer, batch 8) that copy is as long as the step's attention
itself. :class:`GrowingLayer` keeps the keys and values in a buffer with room for the batch's prompt
and answer, writes each step's token into it, and hands attention a view of the filled part: the same
numbers, no copy. Greedy labelling gives it room for the prompt and an answer (the generation
budget, capped: ``generative.GROWING_ROOM``); a layer that runs out doubles its buffer.

Anything that replaces a layer's ``keys`` / ``values`` (a crop, a beam reordering, a reset) is adopted
at the next update, so every ``DynamicLayer`` operation keeps working.
"""

from __future__ import annotations

from typing import Any

import torch

from mmllm.models.prefix_cache import base_model


def _dynamic_layer() -> type:
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


class GrowingLayer(_dynamic_layer()):
    """One layer's keys and values [B, H, T, D] in a buffer of ``capacity`` tokens (or more), filled in place."""

    def __init__(self, capacity: int = 0) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._views: tuple[Any, Any] = (None, None)  # what this layer last handed out as keys / values

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(0)
        self.values = value_states.new_zeros(0)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._buffers is None or self.keys is not self._views[0] or self.values is not self._views[1]:
            self._adopt()  # first use, or keys / values replaced from outside
        end = self.length + key_states.shape[-2]
        keys, values = self._buffers if self._buffers is not None else (None, None)
        if keys is None or end > keys.shape[-2]:
            keys, values = self._grow(key_states, value_states, end)
        keys[..., self.length:end, :].copy_(key_states)
        values[..., self.length:end, :].copy_(value_states)
        self.length = end
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        self._views = (self.keys, self.values)
        return self.keys, self.values

    def _adopt(self) -> None:
        """Take the layer's current keys / values (none yet, or set by another operation) as the filled part."""
        if self.keys is None or self.keys.numel() == 0:
            self._buffers, self.length = None, 0
        else:
            self._buffers, self.length = (self.keys.contiguous(), self.values.contiguous()), self.keys.shape[-2]
        self._views = (self.keys, self.values)

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A new buffer for at least ``end`` tokens (the capacity asked for, else twice the old one), the
        filled part copied over."""
        old = self._buffers
        size = max(end, self.capacity, 2 * old[0].shape[-2] if old is not None else 0)
        keys = key_states.new_empty(*key_states.shape[:2], size, key_states.shape[-1])
        values = value_states.new_empty(*value_states.shape[:2], size, value_states.shape[-1])
        if old is not None and self.length:
            keys[..., : self.length, :].copy_(old[0][..., : self.length, :])
            values[..., : self.length, :].copy_(old[1][..., : self.length, :])
        self._buffers = (keys, values)
        return keys, values

    def reset(self) -> None:
        super().reset()
        self._buffers, self.length, self._views = None, 0, (None, None)


def growing_layers(model: Any) -> int | None:
    """How many cache layers ``model``'s decoder has, if all are plain growing ones; ``None`` otherwise
    (sliding windows: the caller leaves the cache to ``generate``). Read from the config: once per model."""
    from transformers import DynamicCache

    layers = DynamicCache(config=base_model(model).config).layers
    plain = _dynamic_layer()
    return len(layers) if layers and all(type(layer) is plain for layer in layers) else None


def growing_cache(layers: int, capacity: int) -> Any:
    """An empty cache of ``layers`` :class:`GrowingLayer` s (:func:`growing_layers`), each with room for
    ``capacity`` tokens."""
    from transformers import DynamicCache

    cache = DynamicCache()  # layers made on first use, unless given: here they are
    cache.layers = [GrowingLayer(capacity) for _ in range(layers)]
    return cache
