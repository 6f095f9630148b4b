"""Mini-sequence MLPs (``model.mlp_chunks``, #16): the language model's MLPs run over checkpointed slices
of the sequence while training, with the same loss and the same LoRA gradients as whole, on every
architecture; evaluation runs them whole; nothing saved changes."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from peft import get_peft_model_state_dict
from transformers import AutoModelForImageTextToText

from mmllm.catalog import load_listings
from mmllm.collator import TrainCollator
from mmllm.images import ImagePolicy
from mmllm.models.generative import LoraSettings, ModelConfig, attach_lora, load_processor
from mmllm.models.mini_sequence import MiniSequence, chunk_mlps, language_mlps
from mmllm.prompts import PromptTemplate
from mmllm.recipes.generate import build_backbone
from mmllm.training import causal_lm_loss

from listings import small_schema, toy_row, write_catalog

ARCHES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    path = write_catalog(tmp_path_factory.mktemp("cat"), n=4, row=toy_row(text_only_every=2))
    return path, load_listings(path)


def _lora_model(folder):
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    model = attach_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.0), gradient_checkpointing=True)
    for name, param in model.named_parameters():  # B starts at zero: make every adapter carry a gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    loss, count = causal_lm_loss(model, batch)
    (loss / count).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach() / count), grads


@pytest.mark.parametrize("arch", ARCHES)
def test_chunked_mlps_give_the_same_loss_and_lora_gradients(tiny_checkpoint, catalog, arch):
    folder = tiny_checkpoint(arch)
    path, rows = catalog
    model = _lora_model(folder)
    collate = TrainCollator(load_processor(folder), small_schema(), PromptTemplate.load("listing_v1"),
                            ImagePolicy(root=path.parent))
    batch = collate([(rows[0], 0), (rows[1], 0)])  # one row with a picture, one text-only: padding included
    seq = batch["input_ids"].shape[1]
    whole_loss, whole_grads = _step(model, batch)

    mlps = language_mlps(model)
    layers = model.config.get_text_config().num_hidden_layers
    assert len(mlps) == layers and all("visual" not in name for name, _ in mlps)
    assert chunk_mlps(model, 3) == layers
    assert all(isinstance(m.forward, MiniSequence) for _, m in mlps)
    vision = [m for n, m in model.named_modules() if n.endswith(".mlp") and "visual" in n]
    assert vision and not any("forward" in m.__dict__ for m in vision)  # the vision tower is left whole

    lengths = []
    hook = mlps[0][1].down_proj.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    try:
        chunked_loss, chunked_grads = _step(model, batch)
        assert lengths and max(lengths) <= -(-seq // 3) < seq  # every MLP call saw a third of the sequence
        lengths.clear()
        model.eval()
        with torch.no_grad():
            causal_lm_loss(model, batch)
        assert set(lengths) == {seq}  # evaluation: whole
    finally:
        hook.remove()
        model.train()
    assert abs(chunked_loss - whole_loss) <= 1e-5 * max(1.0, abs(whole_loss))
    assert whole_grads.keys() == chunked_grads.keys() and len(whole_grads) > 0
    for name, grad in whole_grads.items():
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-6), name
    assert any(float(g.abs().sum()) > 0 for n, g in chunked_grads.items() if ".mlp." in n)


def test_chunking_changes_no_saved_name_and_one_chunk_restores_the_plain_forward(tiny_checkpoint):
    model = _lora_model(tiny_checkpoint("qwen2_5_vl"))
    names = set(get_peft_model_state_dict(model))
    paths = [n for n, _ in model.named_modules()]
    chunk_mlps(model, 4)
    chunk_mlps(model, 2)  # re-chunking wraps the original forward, not the wrapper
    mlp = language_mlps(model)[0][1]
    assert mlp.forward.chunks == 2 and not isinstance(mlp.forward.forward, MiniSequence)
    assert set(get_peft_model_state_dict(model)) == names and [n for n, _ in model.named_modules()] == paths
    assert chunk_mlps(model, 1) == 0
    assert not any("forward" in m.__dict__ for _, m in language_mlps(model))
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        chunk_mlps(model, 0)


def test_the_recipe_setting_is_checked_and_applied_by_the_backbone(tiny_checkpoint, capsys):
    with pytest.raises(ValueError, match="model.mlp_chunks must be >= 1, got 0"):
        ModelConfig(mlp_chunks=0)
    folder = tiny_checkpoint("qwen2_vl")
    _, model = build_backbone(ModelConfig(base=str(folder), mlp_chunks=2, gradient_checkpointing=True),
                              LoraSettings(rank=4), Accelerator(cpu=True))
    mlps = language_mlps(model)
    assert mlps and all(isinstance(m.forward, MiniSequence) and m.forward.chunks == 2 for _, m in mlps)
    assert f"mini-sequence MLPs: {len(mlps)} language-model MLPs run in 2" in capsys.readouterr().out
