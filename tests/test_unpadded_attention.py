"""Attention for padded batches without a mask (#16): each row's real tokens through SDPA's causal
kernel give the masked kernel's outputs, for left and right padding and after a cached prefix; any
other mask takes transformers' SDPA; on CPU ``auto`` loads it, and labelling, the prefix cache and
a training step give what they give with plain SDPA."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sdpa_mask

from mmllm.collator import TrainCollator
from mmllm.images import ImagePolicy
from mmllm.models import unpadded_attention
from mmllm.models.generative import GenerativePredictor, ModelConfig, load_base_model, load_processor, resolve_attention
from mmllm.models.unpadded_attention import CausalPadding, causal_padding_mask, plan_rows, unpadded_sdpa
from mmllm.prompts import PromptTemplate
from mmllm.training import causal_lm_loss

from listings import small_schema


class Attention(torch.nn.Module):
    """What the attention functions read of a decoder layer's attention module."""

    is_causal = True

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def _mask(padding: torch.Tensor, q_length: int) -> torch.Tensor:
    """transformers' own SDPA mask for a [B, K] padding mask and the last ``q_length`` positions."""
    batch, k_length = padding.shape
    return sdpa_mask(batch_size=batch, q_length=q_length, kv_length=k_length, q_offset=k_length - q_length,
                     mask_function=causal_mask_function, attention_mask=padding.bool(), allow_is_causal_skip=False)


LAYOUTS = {  # [B, K] padding masks; the query length
    "left padding": ([[0] * 7 + [1] * 33, [1] * 40, [0] * 2 + [1] * 38], 40),
    "right padding": ([[1] * 33 + [0] * 7, [1] * 40, [1] * 38 + [0] * 2], 40),
    "after a cached prefix": ([[1] * 6 + [0] * 4 + [1] * 30, [1] * 40, [1] * 6 + [0] * 9 + [1] * 25], 34),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", [1, 2])
def test_each_row_alone_gives_the_masked_kernels_outputs_on_its_real_tokens(layout, groups):
    torch.manual_seed(0)
    padding, q_length = torch.tensor(LAYOUTS[layout][0]), LAYOUTS[layout][1]
    batch, k_length = padding.shape
    query = torch.randn(batch, 4, q_length, 8)
    key, value = torch.randn(2, batch, 4 // groups, k_length, 8)
    mask = _mask(padding, q_length)
    plans = plan_rows(mask, batch)
    real = padding[:, k_length - q_length:].bool()  # [B, Q]
    assert [len(p.queries) for p in plans] == real.sum(1).tolist()
    assert [len(p.keys) for p in plans] == padding.sum(1).tolist()
    assert [p.lead for p in plans] == [k_length - q_length - int((padding[b, :k_length - q_length] == 0).sum())
                                      for b in range(batch)]
    expected, _ = sdpa_attention_forward(Attention(groups), query, key, value, mask, scaling=0.3)
    got, _ = unpadded_sdpa(Attention(groups), query, key, value, mask, scaling=0.3)
    assert got.shape == expected.shape == (batch, q_length, 4, 8)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(got[~real]) == 0  # padding queries: zeros, read by nothing


def _arguments(padding: torch.Tensor, q_length: int, **extra) -> dict:
    """What transformers' create_causal_mask hands a mask function for a prefill (transformers 5.24)."""
    batch, k_length = padding.shape
    return dict(batch_size=batch, q_length=q_length, kv_length=k_length, q_offset=k_length - q_length, kv_offset=0,
                mask_function=causal_mask_function, attention_mask=padding.bool(), allow_is_causal_skip=True,
                dtype=torch.float32, config=None, use_vmap=False, device="cpu", **extra)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_prefill_mask_stays_its_padding_and_plans_as_the_dense_one(layout):
    padding, q_length = torch.tensor(LAYOUTS[layout][0]), LAYOUTS[layout][1]
    batch, k_length = padding.shape
    mask = causal_padding_mask(**_arguments(padding, q_length))
    assert isinstance(mask, CausalPadding) and mask._dense is None  # nothing [B, 1, Q, K] built for the plans
    plans, dense_plans = mask.plans(batch), plan_rows(_mask(padding, q_length), batch)
    assert mask._dense is None and mask.plans(batch) is plans  # once for every layer
    assert [(p.queries.tolist(), p.keys.tolist(), p.lead) for p in plans] == [
        (p.queries.tolist(), p.keys.tolist(), p.lead) for p in dense_plans]
    assert torch.equal(mask.dense(), sdpa_mask(**_arguments(padding, q_length)))  # built on demand, as transformers does
    torch.manual_seed(3)
    query = torch.randn(batch, 4, q_length, 8)
    key, value = torch.randn(2, batch, 2, k_length, 8)
    fresh = causal_padding_mask(**_arguments(padding, q_length))
    assert torch.equal(unpadded_sdpa(Attention(2), query, key, value, fresh, scaling=0.3)[0],
                       unpadded_sdpa(Attention(2), query, key, value, _mask(padding, q_length), scaling=0.3)[0])
    assert fresh._dense is None


def test_every_other_mask_is_transformers_own():
    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    full = torch.ones(2, 6, dtype=torch.long)
    cases = [_arguments(padding, 1, ),  # a decoding step
             _arguments(full, 6),  # no padding: SDPA's is_causal (None)
             {**_arguments(padding, 6), "local_size": 3},  # a sliding window
             {**_arguments(padding, 6), "mask_function": lambda b, h, q, kv: kv <= q}]  # another pattern
    for arguments in cases:
        got, want = causal_padding_mask(**arguments), sdpa_mask(**arguments)
        assert not isinstance(got, CausalPadding)
        assert (got is None and want is None) or torch.equal(got, want)
    assert causal_padding_mask(**_arguments(full, 6)) is None
    # a mask the plans cannot serve (a row of padding queries only) is handed to SDPA dense
    padding = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    mask = causal_padding_mask(**_arguments(padding, 3))
    assert isinstance(mask, CausalPadding) and mask.plans(2) is None
    query, key, value = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    expected, _ = sdpa_attention_forward(Attention(1), query, key, value, sdpa_mask(**_arguments(padding, 3)))
    assert torch.equal(unpadded_sdpa(Attention(1), query, key, value, mask)[0], expected)


def test_a_mask_that_is_not_causal_over_the_real_tokens_takes_the_masked_kernel():
    torch.manual_seed(1)
    padding = torch.tensor([[0] * 4 + [1] * 20, [1] * 24])
    mask = _mask(padding, 24).clone()
    mask[1, 0, 10:14, 10:14] = True  # a block that sees itself both ways (an image read bidirectionally)
    assert plan_rows(mask, 2) is None
    query, key, value = torch.randn(3, 2, 2, 24, 8)
    expected, _ = sdpa_attention_forward(Attention(1), query, key, value, mask)
    got, _ = unpadded_sdpa(Attention(1), query, key, value, mask)
    assert torch.equal(got, expected)
    assert plan_rows(mask.float(), 2) is None and plan_rows(mask[:, :, :1], 2) is None  # float masks, one query


def test_a_long_cached_prefix_before_few_queries_keeps_the_masked_kernel():
    torch.manual_seed(2)
    padding = torch.tensor([[1] * 30 + [0] * 2 + [1] * 4, [1] * 36])  # 30 cached tokens, then 4-6 new ones
    mask = _mask(padding, 6)
    assert plan_rows(mask, 2) is None  # causal work (34^2 + 36^2) / 2 = 1,226 > masked work 2 x 6 x 36 = 432
    assert plan_rows(_mask(padding[:, 24:], 6), 2) is not None  # 6 cached: (10^2 + 12^2) / 2 = 122 <= 144
    query = torch.randn(2, 2, 6, 8)
    key, value = torch.randn(2, 2, 2, 36, 8)
    expected, _ = sdpa_attention_forward(Attention(1), query, key, value, mask)
    assert torch.equal(unpadded_sdpa(Attention(1), query, key, value, mask)[0], expected)


def test_decoding_steps_and_unmasked_calls_go_to_transformers_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr("transformers.integrations.sdpa_attention.sdpa_attention_forward",
                        lambda *a, **k: calls.append(a[1].shape[2]) or (torch.zeros(1), None))
    padding = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    step = _mask(padding, 1)  # one new token a row
    unpadded_sdpa(Attention(1), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), step)
    unpadded_sdpa(Attention(1), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), None)
    assert calls == [1, 4]


@pytest.fixture
def on_cpu(monkeypatch):
    """No CUDA device, whatever machine the tests run on: ``auto`` resolves as on CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_picks_it_on_cpu_and_registers_it_with_transformers(on_cpu, monkeypatch):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert resolve_attention("auto") == "sdpa_unpadded" == unpadded_attention.NAME
    assert AttentionInterface._global_mapping["sdpa_unpadded"] is unpadded_sdpa
    assert AttentionMaskInterface._global_mapping["sdpa_unpadded"] is causal_padding_mask
    assert resolve_attention("eager") == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU without flash-attn: plain SDPA
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert resolve_attention("auto") == "sdpa"


@pytest.fixture
def plans_used(monkeypatch) -> list[int]:
    """Rows served by the unpadded path, per forward pass that used it."""
    used: list[int] = []
    original = unpadded_attention.plan_rows

    def spy(mask, batch):
        plans = original(mask, batch)
        if plans is not None:
            used.append(len(plans))
        return plans

    monkeypatch.setattr(unpadded_attention, "plan_rows", spy)
    original_plan = unpadded_attention.CausalPadding._plan  # a prefill's mask kept as its padding

    def spy_plan(self, batch):
        plans = original_plan(self, batch)
        if plans is not None:
            used.append(len(plans))
        return plans

    monkeypatch.setattr(unpadded_attention.CausalPadding, "_plan", spy_plan)
    return used


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("template,cached,served", [
    ("listing_v1", False, [3, 3]),  # each padded batch's prefill once (both layers share the plan), every row; no step
    ("listing_v1", True, [3, 3]),  # after its cached system text (aligned by zero queries)
    ("listing_v2", True, []),  # a long cached prefix before short rows: the masked kernel is cheaper
])
def test_labelling_answers_equal_plain_sdpas(arch, template, cached, served, tiny_checkpoint, padded_catalog, plans_used,
                                           on_cpu):
    folder = tiny_checkpoint(arch)
    model = load_base_model(ModelConfig(base=str(folder), dtype="float32")).eval()
    assert model.config._attn_implementation == "sdpa_unpadded"
    path, rows = padded_catalog
    predictor = GenerativePredictor(model, load_processor(folder), small_schema(), PromptTemplate.load(template),
                                    max_new_tokens=10, batch_size=3, constrained=True, prefix_cache=cached)
    predictor._prefix_cache()  # built before the spy counts: a one-row prefix has no padding
    plans_used.clear()
    unpadded = predictor.predict(rows, ImagePolicy(root=path.parent))
    assert plans_used == served
    model.set_attn_implementation("sdpa")
    plain = predictor.predict(rows, ImagePolicy(root=path.parent))
    assert plans_used == served
    answer = ("id", "category", "attributes", "status")
    assert [{k: r[k] for k in answer} for r in unpadded] == [{k: r[k] for k in answer} for r in plain]
    assert [r["confidence"] for r in unpadded] == pytest.approx([r["confidence"] for r in plain], rel=1e-4)


def test_a_right_padded_training_step_has_the_same_loss_and_gradients(tiny_checkpoint, padded_catalog, plans_used, on_cpu):
    folder = tiny_checkpoint("qwen2_5_vl")
    model = load_base_model(ModelConfig(base=str(folder), dtype="float32"))
    path, rows = padded_catalog
    collate = TrainCollator(load_processor(folder), small_schema(), PromptTemplate.load("listing_compact_v1"),
                            ImagePolicy(root=path.parent))
    batch = collate([(row, 0) for row in rows[:3]])
    assert (batch["attention_mask"] == 0).any()  # padded on the right

    def step():
        model.zero_grad()
        loss, _ = causal_lm_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step()
    assert plans_used == [3]
    model.set_attn_implementation("sdpa")
    plain_loss, plain_grads = step()
    assert plans_used == [3]
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)
