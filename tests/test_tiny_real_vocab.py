"""mmllm.tiny with vocab="real": the toy BPE padded to the real Qwen size, special tokens at the real ids.

What scales with the vocabulary (logits, the loss, grammar compilation, ``get_vocab()``) must cost
here what it costs with the real tokenizer, while text still tokenizes as with the toy BPE.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TOYS_SCHEMA, benchmark_module
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from mmllm.catalog import load_listings
from mmllm.collator import IGNORE_INDEX, TrainCollator, end_of_turn_id
from mmllm.images import ImagePolicy
from mmllm.prompts import PromptTemplate, target_text
from mmllm.schema import load_schema
from mmllm.tiny import BPE_VOCAB, REAL_VOCAB_ROWS, build_tiny_checkpoint, main, resolve

# tokenizer_config.json of Qwen/Qwen2.5-VL-3B-Instruct: 151,643 BPE entries, then these added tokens
REAL_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
    "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
    "<tool_call>": 151657, "<|file_sep|>": 151664,
}
QWEN2_5_VL_TOKENIZER_SIZE = 151_665


def draw(side: int = 64) -> Image.Image:
    image = Image.new("RGB", (side, side), "white")
    ImageDraw.Draw(image).ellipse([side // 8, side // 8, side - 4, side - 4], fill="red")
    return image


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(folder, processor, model) of a real-vocabulary tiny Qwen2.5-VL, loaded with Auto classes."""
    folder = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-real"), arch="qwen2_5_vl", seed=0, vocab="real")
    return folder, AutoProcessor.from_pretrained(folder), AutoModelForImageTextToText.from_pretrained(folder).eval()


def test_real_sizes_and_ids(real):
    folder, processor, model = real
    tok, cfg = processor.tokenizer, model.config
    assert len(tok) == QWEN2_5_VL_TOKENIZER_SIZE == len(tok.get_vocab())
    assert cfg.get_text_config().vocab_size == REAL_VOCAB_ROWS == 151_936
    assert model.get_input_embeddings().num_embeddings == REAL_VOCAB_ROWS
    assert model.get_output_embeddings().weight.shape[0] == REAL_VOCAB_ROWS
    for token, token_id in REAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id, token
        assert tok(token, add_special_tokens=False)["input_ids"] == [token_id]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert end_of_turn_id(tok) == REAL_IDS["<|im_end|>"]
    assert model.generation_config.eos_token_id == [REAL_IDS["<|im_end|>"], REAL_IDS["<|endoftext|>"]]
    # small everywhere else: width 64, two layers
    text = cfg.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers) == (64, 2)
    assert "--vocab real" in (folder / "README.md").read_text()


def test_ids_are_those_the_real_size_benchmark_uses(real):
    """benchmarks/train_step.py builds real-size configs with these ids and borrows this tokenizer."""
    train_step = benchmark_module("train_step")
    _, _, model = real
    for key, token_id in train_step.IDS.items():
        assert getattr(model.config, key) == token_id, key


def test_text_tokenizes_as_with_the_toy_bpe(real, tiny_checkpoint):
    _, processor, _ = real
    tok = processor.tokenizer
    toy = AutoTokenizer.from_pretrained(tiny_checkpoint("qwen2_5_vl"))
    text = 'Wooden train set, 3+ years. {"category": "Trains & Train Sets", "attributes": {"piece_count": 50}}'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == toy(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < BPE_VOCAB  # the filler entries are never produced by a merge
    assert tok.decode(ids) == text
    # a filler decodes to visible text, and that text does not tokenize back to the filler
    assert tok.decode([5000]) == "<filler_5000>"
    assert 5000 not in tok("<filler_5000>", add_special_tokens=False)["input_ids"]


def test_chat_template_and_listing_prompt(real, tmp_path):
    _, processor, model = real
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Extract JSON."}]}],
        add_generation_prompt=True,
    )
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert prompt.endswith("<|vision_start|><|image_pad|><|vision_end|>Extract JSON.<|im_end|>\n<|im_start|>assistant\n")

    draw().save(tmp_path / "0.png")
    schema = load_schema(TOYS_SCHEMA)
    rows = [dataclasses.replace(row, images=("0.png",))
            for row in load_listings(ROOT / "examples" / "amazon_uk_toys" / "train.jsonl")[:2]]
    collate = TrainCollator(processor, schema, PromptTemplate.load("listing_v1"), ImagePolicy(root=tmp_path), max_images=1)
    batch = collate([(row, 0) for row in rows])
    ids, labels = batch["input_ids"], batch["labels"]  # [2, T]
    assert ids.max() < REAL_VOCAB_ROWS
    for row, listing in enumerate(rows):
        assert int((ids[row] == REAL_IDS["<|im_start|>"]).sum()) == 3  # system, user, assistant
        image_tokens = int((ids[row] == REAL_IDS["<|image_pad|>"]).sum())
        assert image_tokens == int(batch["image_grid_thw"][row].prod()) // 4 > 0
        supervised = ids[row][labels[row] != IGNORE_INDEX]
        assert processor.tokenizer.decode(supervised) == target_text(listing, schema) + "<|im_end|>"
    # the output layer has one logit per real vocabulary row
    short = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": draw()}, {"type": "text", "text": "Hi"}]}],
        tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True)
    with torch.no_grad():
        assert model(**short).logits.shape[-1] == REAL_VOCAB_ROWS
        out = model.generate(**short, max_new_tokens=3)
    assert out.shape[1] <= short["input_ids"].shape[1] + 3


def test_resolve_real_builds_its_own_folder_once():
    folder = resolve("tiny:qwen2_5_vl:real")
    assert folder.endswith("qwen2_5_vl-real-seed0")
    assert json.loads((Path(folder) / "config.json").read_text())["text_config"]["vocab_size"] == REAL_VOCAB_ROWS
    stamp = (Path(folder) / "model.safetensors").stat().st_mtime_ns
    assert resolve("tiny:qwen2_5_vl:real") == folder
    assert (Path(folder) / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    with pytest.raises(ValueError, match="tiny:ARCH:real"):
        resolve("tiny:qwen2_5_vl:huge")


def test_cli_real_vocab_qwen3_vl(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main([str(out), "--arch", "qwen3_vl", "--vocab", "real"]) == 0
    assert "real vocabulary" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 151_669  # Qwen3-VL adds <tool_response>, </tool_response>, <think>, </think>
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645 and tok.convert_tokens_to_ids("<think>") == 151667
    assert json.loads((out / "config.json").read_text())["text_config"]["vocab_size"] == REAL_VOCAB_ROWS


def test_unknown_vocab_is_refused(tmp_path):
    with pytest.raises(ValueError, match="real"):
        build_tiny_checkpoint(tmp_path, arch="qwen2_vl", vocab="huge")
