"""mmllm.tiny: tiny random checkpoints load with plain Auto* classes offline and run end to end."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from mmllm.tiny import ARCHES, build_tiny_checkpoint, main

VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def draw_toy(size=(64, 64)) -> Image.Image:
    """A white picture with a red block and a blue ball."""
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.rectangle([w // 8, h // 8, w // 2, h // 2], fill="red")
    draw.ellipse([w // 2, h // 2, w - 4, h - 4], fill="blue")
    return img


def ask(image: Image.Image, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module", params=ARCHES)
def loaded(request, tiny_checkpoint):
    """(arch, processor, model) loaded the way any user would: Auto classes, no extra code."""
    path = tiny_checkpoint(request.param)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return request.param, processor, model


def test_config_agrees_with_tokenizer(loaded):
    arch, processor, model = loaded
    tok, cfg = processor.tokenizer, model.config
    assert cfg.model_type == arch
    assert type(tok).__name__ == "Qwen2Tokenizer"
    for name, token in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ]:
        assert getattr(cfg, name) == tok.convert_tokens_to_ids(token)
    text = cfg.get_text_config()
    assert text.vocab_size >= len(tok) and text.vocab_size % 64 == 0
    assert model.get_input_embeddings().num_embeddings == text.vocab_size
    sizes = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads)
    assert sizes == (64, 2, 4, 2)
    assert text.initializer_range == 0.1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|endoftext|>") < tok.convert_tokens_to_ids("<|im_start|>")
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert tok.eos_token_id in model.generation_config.eos_token_id
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_chat_template_renders_family_prompt(loaded):
    arch, processor, _ = loaded
    prompt = processor.apply_chat_template(ask(draw_toy(), "Extract JSON."), add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>Extract JSON.<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # Qwen2/2.5-VL add a default system prompt; Qwen3-VL does not.
    assert prompt.startswith(DEFAULT_SYSTEM) == (arch != "qwen3_vl")
    with_system = [{"role": "system", "content": "Be brief."}, *ask(draw_toy(), "Hi")]
    assert processor.apply_chat_template(with_system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_image_prompt_generates(loaded):
    arch, processor, model = loaded
    inputs = processor.apply_chat_template(
        ask(draw_toy(), "Extract the attributes as JSON."),
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        add_generation_prompt=True,
    )
    ids = inputs["input_ids"][0]
    # 64x64 pixels become a 4x4 patch grid (14 px patches resized to 56x56, or 16 px
    # patches for Qwen3-VL), merged 2x2 into 4 image tokens.
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]
    n_pad = int((ids == model.config.image_token_id).sum())
    assert n_pad == int(inputs["image_grid_thw"].prod()) // 4 == 4
    assert int((ids == model.config.vision_start_token_id).sum()) == 1
    assert "mm_token_type_ids" in inputs
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5)
    assert out.shape[0] == 1 and ids.shape[0] < out.shape[1] <= ids.shape[0] + 5
    assert torch.equal(out[0, : ids.shape[0]], ids)


def test_batched_left_padded_generate_matches_single(loaded):
    _, processor, model = loaded
    conversations = [
        ask(draw_toy(), "Short?"),
        ask(draw_toy((100, 60)), "A much longer question about a wooden train set with many pieces?"),
    ]
    singles = []
    with torch.no_grad():
        for conv in conversations:
            one = processor.apply_chat_template(
                conv, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
            )
            singles.append(model.generate(**one, max_new_tokens=5)[0, one["input_ids"].shape[1] :])
        batch = processor.apply_chat_template(
            conversations,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            add_generation_prompt=True,
            processor_kwargs={"padding": True, "padding_side": "left"},
        )
        mask = batch["attention_mask"]
        assert mask[0, 0] == 0 and mask[:, -1].all()  # the short prompt is padded on the left
        out = model.generate(**batch, max_new_tokens=5)[:, batch["input_ids"].shape[1] :]
    pad = model.generation_config.pad_token_id
    for row, single in zip(out, singles):
        assert row[: len(single)].tolist() == single.tolist()
        assert (row[len(single) :] == pad).all()


@pytest.mark.parametrize("arch", ARCHES)
def test_tokenizer_round_trips_json(arch, tiny_checkpoint):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint(arch))
    label = '{"category":"Games > Board Games","attributes":{"piece_count":500}}'
    ids = tok(label, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == label
    assert len(ids) < len(label) // 2  # trained merges, not bytes
    assert 1000 <= len(tok) <= 2000
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", *VISION_TOKENS):
        assert tok(token, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(token)]
    chat = "<|im_start|>user\nhi<|im_end|>"
    assert tok.decode(tok(chat)["input_ids"], skip_special_tokens=True) == "user\nhi"


def test_same_seed_same_bytes_other_seed_differs(tmp_path, tiny_checkpoint):
    first = tiny_checkpoint("qwen2_vl")  # seed 0
    again = build_tiny_checkpoint(tmp_path / "again", "qwen2_vl", seed=0)
    other = build_tiny_checkpoint(tmp_path / "other", "qwen2_vl", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json", "README.md"):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_building_leaves_the_callers_random_state_alone(tmp_path):
    """A recipe seeds, then resolves tiny:ARCH; building it the first time must not reseed the caller
    (test_finetune's resume test, run alone, trained from other LoRA weights when it did)."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_checkpoint(tmp_path / "built", "qwen2_vl", seed=0)
    assert torch.equal(torch.rand(4), expected)


def test_unknown_arch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="qwen2_vl"):
        build_tiny_checkpoint(tmp_path, arch="llava")


def test_cli_builds_qwen3_vl(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main([str(out), "--arch", "qwen3_vl"]) == 0
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_vl"
    readme = (out / "README.md").read_text()
    assert "random" in readme.lower() and "never" in readme.lower() and "predictions" in readme
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_processor.patch_size == 16


def test_cli_help_warns(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "tests and smoke runs only" in text and "Never use" in text
    assert all(arch in text for arch in ARCHES)
