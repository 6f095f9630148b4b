"""The decoding cache that grows in place: the same keys and values as transformers' ``DynamicLayer``
(which appends by ``torch.cat``), without copying the cache at each step."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from mmllm.models.growing_cache import GrowingLayer


def _states(tokens: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, tokens, 4, generator=g), torch.randn(batch, 3, tokens, 4, generator=g)


def test_steps_are_written_in_place_and_read_as_the_concatenation():
    growing, plain = GrowingLayer(capacity=8), DynamicLayer()
    buffers = set()
    for step, tokens in enumerate([5, 1, 1, 1, 1, 1, 1]):  # a prompt of 5, then decoding steps past the room of 8
        k, v = _states(tokens, seed=step)
        keys, values = growing.update(k, v)
        want_k, want_v = plain.update(k, v)
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)
        assert growing.get_seq_length() == plain.get_seq_length() == keys.shape[-2]
        buffers.add(keys.untyped_storage().data_ptr())
    assert len(buffers) == 2  # one buffer of 8 tokens, then one of 16 (doubled once): no copy per step
    assert growing._buffers[0].shape[-2] == 16


def test_operations_that_replace_the_keys_are_adopted():
    """A crop, a reordering of the batch and a reset replace a layer's keys from outside; the next step
    continues from what they left, as DynamicLayer's does."""
    growing, plain = GrowingLayer(capacity=32), DynamicLayer()
    for layer in (growing, plain):
        layer.update(*_states(6))
        layer.crop(-2)  # drop the last 2 tokens
        layer.batch_select_indices(torch.tensor([1, 0]))
    k, v = _states(1, seed=9)
    assert torch.equal(growing.update(k, v)[0], plain.update(k, v)[0])
    assert growing.get_seq_length() == plain.get_seq_length() == 5
    growing.reset()
    keys, _ = growing.update(*_states(3, batch=4, seed=3))  # another batch after the reset
    assert keys.shape == (4, 3, 3, 4) and torch.equal(keys, _states(3, batch=4, seed=3)[0])


def test_a_prefix_expanded_over_the_batch_is_copied_in():
    """The prefix cache hands each batch its keys as an expanded view [1 -> B]; they are copied into the
    buffer, so the batch's rows then grow apart."""
    growing = GrowingLayer(capacity=10)
    k, v = _states(4, batch=1)
    growing.update(k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1))
    keys, _ = growing.update(*_states(2, batch=3, seed=5))
    assert keys.shape == (3, 3, 6, 4) and torch.equal(keys[:, :, :4], k.expand(3, -1, -1, -1))
    assert torch.equal(keys[:, :, 4:], _states(2, batch=3, seed=5)[0])
