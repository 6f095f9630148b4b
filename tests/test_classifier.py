"""The classification-head variant: pooling, loss, masking, learning from both modalities,
reload, calibration, and predictions in the same JSON as the generative path."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmllm.catalog import load_listings
from mmllm.finetune import finetune, load_recipe_config
from mmllm.images import ImagePolicy
from mmllm.models.classifier import ListingClassifier
from mmllm.models.heads import (
    NOT_STATED,
    HeadSpec,
    classification_loss,
    encode_targets,
    answer_calibration_error,
    expected_calibration_error,
    fit_answer_temperature,
    fit_temperature,
    head_specs,
    pool,
)
from mmllm.schema import LabelSchema

from helpers import ROOT, reload_in_fresh_process
from listings import COLOUR_SCHEMA, colour_row, write_catalog


def test_pooling_finds_the_last_real_token_under_both_paddings():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)  # [B, T, H]
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(pool(hidden, right, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(pool(hidden, left, "last"), torch.stack([hidden[0, 3], hidden[1, 3]]))
    assert torch.allclose(pool(hidden, right, "mean")[0], hidden[0, :2].mean(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["last", "mean"])
def test_pool_keeps_nan_in_padding_out_and_equals_the_formulas_it_replaced(how, dtype):
    torch.manual_seed(0)
    t = 300  # past 256 a bf16 count of ones rounds: pool must divide by the same rounded count
    hidden = torch.randn(4, t, 8).to(dtype)  # [B, T, D]
    mask = torch.zeros(4, t, dtype=torch.long)
    mask[0, 3:], mask[1, :t - 5], mask[2], mask[3, 1:t - 1] = 1, 1, 1, 1  # left, right, none, both sides
    if how == "mean":  # classifier.pool / fusion.masked_mean: multiplied by the mask
        w = mask.unsqueeze(-1).to(dtype)
        expected = (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)
    else:  # classifier.pool: the largest masked position
        positions = torch.arange(t).expand_as(mask)
        expected = hidden[torch.arange(4), (positions * mask).argmax(1)]
    assert torch.equal(pool(hidden, mask, how), expected)
    poisoned = hidden.masked_fill(~mask.bool().unsqueeze(-1), float("nan"))
    poisoned[0, 0] = float("inf")
    assert torch.equal(pool(poisoned, mask, how), expected)
    empty = torch.full((1, 4, 8), float("nan"), dtype=dtype)  # a row with no position at all: zeros
    assert torch.equal(pool(empty, torch.zeros(1, 4, dtype=torch.long), how), torch.zeros(1, 8, dtype=dtype))


def test_pooled_batch_equals_per_row_runs_with_left_and_right_padding(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmllm.collator import encode_prompts, load_listing_images
    from mmllm.prompts import PromptTemplate

    catalog = write_catalog(tmp_path, 3, colour_row(seed=1), schema=COLOUR_SCHEMA)
    rows = load_listings(catalog)
    rows[1] = rows[1].__class__(**{**rows[1].__dict__, "title": rows[1].title + " with a much longer title " * 3})
    processor = AutoProcessor.from_pretrained(tiny_checkpoint("qwen2_vl"))
    backbone = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint("qwen2_vl")).eval()
    schema = LabelSchema.from_dict(COLOUR_SCHEMA)
    model = ListingClassifier(backbone, 64, head_specs(schema, []), "last").eval()
    template = PromptTemplate.load("listing_compact_v1")
    images = [load_listing_images(r, ImagePolicy(root=tmp_path), 2) for r in rows]
    with torch.no_grad():
        single = torch.cat([model(**encode_prompts(processor, [r], schema, template, [im]))["category"]
                            for r, im in zip(rows, images)])
        left = model(**encode_prompts(processor, rows, schema, template, images))["category"]
        texts = [processor.apply_chat_template(__import__("mmllm.prompts", fromlist=["x"]).build_messages(
            r, schema, template, n_images=1), tokenize=False, add_generation_prompt=True) for r in rows]
        enc = processor(text=texts, images=[i[0] for i in images], padding=True, padding_side="right", return_tensors="pt")
        right = model(**dict(enc))["category"]
    assert torch.allclose(left, single, atol=1e-4) and torch.allclose(right, single, atol=1e-4)


def test_the_number_of_alternatives_a_folder_lists_is_its_classify_top_k(tiny_checkpoint, tmp_path):
    """classify.top_k was checked and written into config.yaml, then never read: every record listed 5."""
    from transformers import AutoModelForImageTextToText

    schema = LabelSchema.from_dict(COLOUR_SCHEMA)
    backbone = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint("qwen2_vl")).eval()
    model = ListingClassifier(backbone, 64, head_specs(schema, []), "last", top_k=2)
    model.save_heads(tmp_path)
    again = ListingClassifier.load(backbone, tmp_path)
    assert again.top_k == 2 and again.pooling == "last"
    probs = {"category": torch.softmax(torch.randn(1, len(schema.categories)), -1)}
    specs = [s for s in again.specs if s.name == "category"]
    from mmllm.models.heads import prediction_record

    assert len(prediction_record(specs, probs, 0, schema, again.top_k)["top_k"]) == 2


def test_loss_matches_a_hand_computation_and_unknowns_add_nothing():
    specs = [HeadSpec("category", "softmax", ["a", "b", "c"]),
             HeadSpec("flag", "softmax", [NOT_STATED, "False", "True"], values=[None, False, True]),
             HeadSpec("tags", "sigmoid", ["x", "y"])]
    logits = {"category": torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]),
              "flag": torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 3.0]]),
              "tags": torch.tensor([[1.0, -1.0], [0.0, 0.0]])}
    batch = {"target_category": torch.tensor([0, 2]), "target_flag": torch.tensor([-100, 2]),
             "target_tags": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "mask_tags": torch.tensor([1.0, 0.0])}

    def nll(row, k):
        return -math.log(math.exp(row[k]) / sum(math.exp(v) for v in row))

    def bce(x, t):
        p = 1 / (1 + math.exp(-x))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    expected = (nll([2.0, 0.0, -1.0], 0) + nll([0.5, 0.5, 0.5], 2)  # category
                + nll([1.0, 1.0, 3.0], 2)  # flag: row 0 unknown, masked
                + bce(1.0, 1) + bce(-1.0, 0))  # tags: row 1 unknown, masked
    assert float(classification_loss(logits, batch, specs)) == pytest.approx(expected, rel=1e-5)
    changed = {**logits, "flag": torch.tensor([[9.0, -9.0, 9.0], [1.0, 1.0, 3.0]]), "tags": torch.tensor([[1.0, -1.0], [5.0, -5.0]])}
    assert float(classification_loss(changed, batch, specs)) == pytest.approx(expected, rel=1e-5)


def test_targets_bins_and_masks():
    schema = LabelSchema.from_dict(COLOUR_SCHEMA)
    labels = [{"category": "Red > Wooden", "attributes": {"piece_count": 10, "material": ["wood"]}},
              {"category": "Blue > Plastic", "attributes": {"batteries_required": True}}, None]
    specs = head_specs(schema, labels)
    by_name = {s.name: s for s in specs}
    assert by_name["piece_count"].values == [None, 10] and by_name["batteries_required"].classes[0] == NOT_STATED
    targets = encode_targets(specs, labels, schema)
    assert targets["target_category"].tolist() == [0, 3, -100]
    assert targets["target_batteries_required"].tolist() == [-100, 2, -100]
    assert targets["target_piece_count"].tolist() == [1, -100, -100]
    assert targets["mask_material"].tolist() == [1.0, 0.0, 0.0] and targets["target_material"][0].tolist() == [1.0, 0.0]


def test_a_category_only_label_trains_the_category_and_no_attribute():
    """``"attributes": {}`` says every attribute is not stated (the abstaining heads learn
    "<not stated>"); a label without ``attributes`` says nothing of them (masked), as the catalog
    reads it."""
    from mmllm.catalog import load_listings

    schema = LabelSchema.from_dict(COLOUR_SCHEMA)
    rows = load_listings([{"id": "a", "title": "t", "label": {"category": "Red > Wooden", "attributes": {}}},
                          {"id": "b", "title": "t", "label": {"category": "Blue > Plastic"}},
                          {"id": "c", "title": "t", "label": {"category": "Blue > Plastic", "attributes": None}},
                          {"id": "d", "title": "t", "label": {"category": "Red > Wooden",
                                                              "attributes": {"batteries_required": True, "material": ["wood"]}}}])
    labels = [r.label for r in rows]
    assert labels[1]["attributes"] is None and labels[2]["attributes"] is None and labels[0]["attributes"] == {}
    specs = head_specs(schema, labels, null_class=True)
    targets = encode_targets(specs, labels, schema)
    assert targets["target_category"].tolist() == [0, 3, 3, 0]
    assert targets["target_batteries_required"].tolist() == [0, -100, -100, 2]
    assert targets["mask_material"].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_temperature_scaling_reduces_overconfidence():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (400,))
    logits = torch.randn(400, 3)
    logits[torch.arange(400), target] += 1.0
    logits *= 5  # far too sharp for a 60%-accurate model
    t = fit_temperature(logits, target)
    assert t > 2.0
    assert expected_calibration_error(torch.softmax(logits / t, -1), target) < expected_calibration_error(torch.softmax(logits, -1), target)


def test_answer_temperature_calibrates_another_models_answers():
    """``fit_answer_temperature``: a second distribution's probability of answers chosen elsewhere (half of
    them not its argmax) is made to match how often those answers are right; ``fit_temperature`` would fit
    the distribution for its own argmax."""
    torch.manual_seed(0)
    n = 600
    target = torch.randint(0, 4, (n,))
    answers = torch.where(torch.rand(n) < 0.7, target, (target + 1) % 4)  # 70% right
    logits = torch.randn(n, 4)
    logits[torch.arange(n), answers] += 1.5  # the check leans towards the answer ...
    logits[torch.arange(n), target] += 1.0  # ... and towards the truth
    logits *= 4  # far too sharp
    right = answers == target

    def confidence(t: float) -> torch.Tensor:
        return torch.softmax(logits / t, -1).gather(1, answers[:, None])[:, 0]

    t = fit_answer_temperature(logits, answers, target)
    assert t > 1.5
    assert answer_calibration_error(confidence(t), right) < 0.5 * answer_calibration_error(confidence(1.0), right)
    assert abs(confidence(t).mean().item() - right.float().mean().item()) < 0.05
    assert fit_answer_temperature(logits[:1], answers[:1], target[:1]) == 1.0  # nothing to fit


@pytest.mark.slow
def test_learns_from_image_and_title_together_and_reloads(tmp_path, caplog):
    """Trained on two catalogs in two folders (data.train as a list): each row's picture is found in its own
    catalog's folder, or the colour half of the category could not be learned."""
    train = write_catalog(tmp_path / "train", 24, colour_row(seed=1), schema=COLOUR_SCHEMA)
    more = write_catalog(tmp_path / "more", 24, colour_row(seed=3), schema=COLOUR_SCHEMA, name="more.jsonl")
    held_out = write_catalog(tmp_path / "dev", 16, colour_row(seed=2), schema=COLOUR_SCHEMA)
    cfg = load_recipe_config(ROOT / "finetune/tiny_cpu_classify.yaml", [
        f"data.train=[{train}, {more}]", f"data.dev={held_out}", f"data.schema={train.parent / 'schema.yaml'}",
        "data.max_train_rows=null", "data.max_dev_rows=null", f"train.output_dir={tmp_path / 'model'}",
        "train.max_steps=150", "train.batch_size=8", "train.lr=0.01", "lora.rank=16", "lora.alpha=32",
        "train.save_every=0", "train.log_every=50", "eval.every=0", "classify.top_k=3"])
    summary = finetune(cfg)
    assert not [m for m in caplog.messages if "image dropped" in m]
    assert summary["category_acc"] >= 0.9, summary
    assert summary["temperature"] > 0 and "ece_calibrated" in summary
    out = tmp_path / "model"
    assert (out / "heads.safetensors").is_file() and json.loads((out / "mmllm_model.json").read_text())["kind"] == "classifier"
    fresh = reload_in_fresh_process(out, held_out)
    from listings import load_model_dir

    here = load_model_dir(out).predict(load_listings(held_out), ImagePolicy(root=held_out.parent))
    schema = LabelSchema.from_dict(COLOUR_SCHEMA)
    gold = {r.id: r.label["category"] for r in load_listings(held_out)}
    assert [p["id"] for p in fresh] == [p["id"] for p in here] == list(gold)  # every row, in order, once
    assert sum(p["category"] == gold[p["id"]] for p in fresh) >= 0.9 * len(fresh)
    for a, b in zip(fresh, here):
        assert a["category"] == b["category"] and a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)
        assert [t["score"] for t in a["top_k"]] == pytest.approx([t["score"] for t in b["top_k"]], abs=1e-5)
        assert a["status"] == "ok" and schema.validate({"category": a["category"], "attributes": a["attributes"]}).ok
        assert len(a["top_k"]) == 3 and a["top_k"][0]["category"] == a["category"]  # classify.top_k, of 4
    from mmllm.label import main as label_main

    out_file = tmp_path / "labels.jsonl"
    assert label_main([str(held_out), "--model", str(out), "--out", str(out_file), "--quiet"]) == 0
    labelled = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(labelled) == 16 and all(r["status"] == "ok" and "top_k" in r for r in labelled)
