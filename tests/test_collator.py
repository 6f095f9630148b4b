"""The collator: labels supervise exactly the answer JSON and its end token, nothing else."""

import json

import pytest
import torch
from transformers import AutoProcessor

from mmllm.catalog import load_listings
from mmllm.collator import IGNORE_INDEX, TrainCollator, encode_prompts, load_listing_images, set_pixel_budget
from mmllm.images import ImagePolicy
from mmllm.prompts import PromptTemplate, target_text

from listings import small_schema, toy_row, write_catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    path = write_catalog(tmp_path_factory.mktemp("cat"), n=4, row=toy_row(text_only_every=2))
    return path, load_listings(path)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_supervised_tokens_are_exactly_the_target_json(tiny_checkpoint, catalog, arch):
    path, rows = catalog
    processor = AutoProcessor.from_pretrained(tiny_checkpoint(arch))
    schema = small_schema()
    collate = TrainCollator(processor, schema, PromptTemplate.load("listing_v1"), ImagePolicy(root=path.parent))
    batch = collate([(rows[0], 0), (rows[1], 0), (rows[2], 0)])  # with image, text-only, with image
    assert {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(batch)
    tok = processor.tokenizer
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    for i, row in enumerate(rows[:3]):
        labels = batch["labels"][i]
        supervised = labels[labels != IGNORE_INDEX]
        assert tok.decode(supervised) == target_text(row, schema) + "<|im_end|>"
        json.loads(tok.decode(supervised[:-1]))  # the answer is valid JSON on its own
        ids = batch["input_ids"][i]
        assert (labels[ids == image_pad] == IGNORE_INDEX).all()  # image tokens masked
        assert (labels[batch["attention_mask"][i] == 0] == IGNORE_INDEX).all()  # padding masked
        first = int((labels != IGNORE_INDEX).nonzero()[0])
        assert "<|im_start|>assistant\n" in tok.decode(ids[:first])  # all of the prompt is masked
        assert batch["attention_mask"][i, 0] == 1  # right padding for training
    assert int((batch["input_ids"][1] == image_pad).sum()) == 0  # the text-only listing
    assert int((batch["input_ids"][0] == image_pad).sum()) > 0


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_a_category_only_label_supervises_the_category_alone(tiny_checkpoint, catalog, arch):
    """A row labelled for its category only teaches the category, not "not stated" for every attribute."""
    path, rows = catalog
    processor = AutoProcessor.from_pretrained(tiny_checkpoint(arch))
    schema = small_schema()
    collate = TrainCollator(processor, schema, PromptTemplate.load("listing_v1"), ImagePolicy(root=path.parent))
    only = rows[1].__class__(**{**rows[1].__dict__, "label": {"category": rows[1].label["category"], "attributes": None}})
    batch = collate([(rows[0], 0), (only, 0)])
    tok = processor.tokenizer
    full = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert tok.decode(full) == target_text(rows[0], schema) + "<|im_end|>"  # a whole label: all of it
    part = batch["labels"][1][batch["labels"][1] != IGNORE_INDEX]
    text = tok.decode(part)
    head = '{"category":' + json.dumps(rows[1].label["category"], ensure_ascii=False) + ","
    assert head.startswith(text) and len(text) >= len(head) - 2  # the category, up to a straddling token
    assert "attributes" not in text and "<|im_end|>" not in text
    first = int((batch["labels"][1] != IGNORE_INDEX).nonzero()[0])
    assert tok.decode(batch["input_ids"][1][first:first + len(part)]) == text  # contiguous, from the answer's start


def test_pixel_budget_bounds_image_tokens(tiny_checkpoint, catalog, tmp_path):
    from PIL import Image

    path, rows = catalog
    processor = AutoProcessor.from_pretrained(tiny_checkpoint("qwen2_vl"))
    Image.new("RGB", (640, 480), "red").save(path.parent / "img" / "big.png")
    big = rows[0].__class__(**{**rows[0].__dict__, "images": ("img/big.png",)})
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = []
    for max_pixels in (56 * 56, 112 * 112):
        set_pixel_budget(processor, 28 * 28, max_pixels)
        images = [load_listing_images(big, ImagePolicy(root=path.parent), 4)]
        enc = encode_prompts(processor, [big], small_schema(), PromptTemplate.load("listing_v1"), images)
        counts.append(int((enc["input_ids"] == image_pad).sum()))
    assert counts[0] <= 56 * 56 // (28 * 28) and counts[0] < counts[1] <= 112 * 112 // (28 * 28)


def test_generation_inputs_are_left_padded(tiny_checkpoint, catalog):
    path, rows = catalog
    processor = AutoProcessor.from_pretrained(tiny_checkpoint("qwen2_5_vl"))
    processor.tokenizer.padding_side = "right"  # what a reload gives; encode_prompts must not care
    images = [load_listing_images(r, ImagePolicy(root=path.parent), 4) for r in rows[:2]]
    enc = encode_prompts(processor, rows[:2], small_schema(), PromptTemplate.load("listing_v1"), images)
    mask = enc["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()


def test_collator_augmentation_is_seeded(tiny_checkpoint, catalog):
    from mmllm.augment import AugmentConfig

    path, rows = catalog
    processor = AutoProcessor.from_pretrained(tiny_checkpoint("qwen2_vl"))
    augment = AugmentConfig(image_flip=0.5, color_jitter=0.3, title_perturb=1.0)
    collate = TrainCollator(processor, small_schema(), PromptTemplate.load("listing_v1"), ImagePolicy(root=path.parent),
                            augment=augment)
    a, b, c = (collate([(rows[0], seed)]) for seed in (1, 1, 2))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert not torch.equal(a["input_ids"], c["input_ids"]) or not torch.equal(a["pixel_values"], c["pixel_values"])
    tok = processor.tokenizer
    assert tok.decode(a["labels"][0][a["labels"][0] != IGNORE_INDEX]) == target_text(rows[0], small_schema()) + "<|im_end|>"
