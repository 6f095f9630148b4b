"""The classification-head variant: pooling, loss, masking, learning from both modalities,
reload, calibration, and predictions in the same JSON as the generative path."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmllm.catalog import load_listings
from mmllm.config import load_config
from mmllm.finetune import FinetuneConfig, finetune
from mmllm.images import ImagePolicy
from mmllm.models.classifier import (
    NOT_STATED,
    HeadSpec,
    ListingClassifier,
    classification_loss,
    encode_targets,
    expected_calibration_error,
    fit_temperature,
    head_specs,
    pool,
)
from mmllm.schema import LabelSchema

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {
    "name": "colours",
    "taxonomy": ["Red > Wooden", "Red > Plastic", "Blue > Wooden", "Blue > Plastic"],
    "attributes": {"batteries_required": {"type": "boolean", "description": "needs batteries"},
                   "piece_count": {"type": "integer", "minimum": 1, "maximum": 100, "description": "pieces"},
                   "material": {"type": "list", "values": ["wood", "plastic"], "description": "materials"}},
}


def separable_catalog(folder: Path, n: int, seed: int) -> Path:
    """The category needs the image colour AND the title word: neither alone decides it."""
    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, word = rng.choice(["Red", "Blue"]), rng.choice(["Wooden", "Plastic"])
        pixel = (200 + rng.randint(-30, 30), 30, 30) if colour == "Red" else (30, 30, 200 + rng.randint(-30, 30))
        Image.new("RGB", (56, 56), pixel).save(folder / "img" / f"{seed}-{i}.png")
        filler = rng.choice(["toy", "set", "gift", "kit"])
        rows.append({"id": f"{seed}-{i}", "title": f"{word.lower()} {filler} {i}", "images": [f"img/{seed}-{i}.png"],
                     "label": {"category": f"{colour} > {word}",
                               "attributes": {"material": [word.lower().replace("wooden", "wood")]}}})
    path = folder / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    LabelSchema.from_dict(SCHEMA).to_yaml(folder / "schema.yaml")
    return path


def test_pooling_finds_the_last_real_token_under_both_paddings():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)  # [B, T, H]
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(pool(hidden, right, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(pool(hidden, left, "last"), torch.stack([hidden[0, 3], hidden[1, 3]]))
    assert torch.allclose(pool(hidden, right, "mean")[0], hidden[0, :2].mean(0))


def test_pooled_batch_equals_per_row_runs_with_left_and_right_padding(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmllm.collator import encode_prompts, load_listing_images
    from mmllm.prompts import PromptTemplate

    catalog = separable_catalog(tmp_path, 3, seed=1)
    rows = load_listings(catalog)
    rows[1] = rows[1].__class__(**{**rows[1].__dict__, "title": rows[1].title + " with a much longer title " * 3})
    processor = AutoProcessor.from_pretrained(tiny_checkpoint("qwen2_vl"))
    backbone = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint("qwen2_vl")).eval()
    schema = LabelSchema.from_dict(SCHEMA)
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
    schema = LabelSchema.from_dict(SCHEMA)
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


def test_temperature_scaling_reduces_overconfidence():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (400,))
    logits = torch.randn(400, 3)
    logits[torch.arange(400), target] += 1.0
    logits *= 5  # far too sharp for a 60%-accurate model
    t = fit_temperature(logits, target)
    assert t > 2.0
    assert expected_calibration_error(torch.softmax(logits / t, -1), target) < expected_calibration_error(torch.softmax(logits, -1), target)


@pytest.mark.slow
def test_learns_from_image_and_title_together_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLLM_CACHE", str(tmp_path / "cache"))
    train = separable_catalog(tmp_path / "train", 48, seed=1)
    held_out = separable_catalog(tmp_path / "dev", 16, seed=2)
    cfg = load_config(FinetuneConfig, ROOT / "finetune/tiny_cpu_classify.yaml", [
        f"data.train={train}", f"data.dev={held_out}", f"data.schema={train.parent / 'schema.yaml'}",
        "data.max_train_rows=null", "data.max_dev_rows=null", f"train.output_dir={tmp_path / 'model'}",
        "train.max_steps=150", "train.batch_size=8", "train.lr=0.01", "lora.rank=16", "lora.alpha=32",
        "train.save_every=0", "train.log_every=50", "eval.every=0"])
    summary = finetune(cfg)
    assert summary["category_acc"] >= 0.9, summary
    assert summary["temperature"] > 0 and "ece_calibrated" in summary
    out = tmp_path / "model"
    assert (out / "heads.safetensors").is_file() and json.loads((out / "mmllm_model.json").read_text())["kind"] == "classifier"
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from mmllm.catalog import load_listings\n"
        "from mmllm.images import ImagePolicy\n"
        "from mmllm.models.generative import load_model_dir\n"
        "p = load_model_dir(sys.argv[1])\n"
        "rows = load_listings(sys.argv[2])\n"
        "print(json.dumps(p.predict(rows, ImagePolicy(root=Path(sys.argv[2]).parent))))\n")
    result = subprocess.run([sys.executable, "-c", script, str(out), str(held_out)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    fresh = json.loads(result.stdout.strip().splitlines()[-1])
    from mmllm.models.generative import load_model_dir

    here = load_model_dir(out).predict(load_listings(held_out), ImagePolicy(root=held_out.parent))
    schema = LabelSchema.from_dict(SCHEMA)
    gold = {r.id: r.label["category"] for r in load_listings(held_out)}
    assert sum(p["category"] == gold[p["id"]] for p in fresh) >= 0.9 * len(fresh)
    for a, b in zip(fresh, here):
        assert a["category"] == b["category"] and a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)
        assert [t["score"] for t in a["top_k"]] == pytest.approx([t["score"] for t in b["top_k"]], abs=1e-5)
        assert a["status"] == "ok" and schema.validate({"category": a["category"], "attributes": a["attributes"]}).ok
        assert len(a["top_k"]) == 4 and a["top_k"][0]["category"] == a["category"]
    from mmllm.label import main as label_main

    out_file = tmp_path / "labels.jsonl"
    assert label_main([str(held_out), "--model", str(out), "--out", str(out_file), "--quiet"]) == 0
    labelled = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(labelled) == 16 and all(r["status"] == "ok" and "top_k" in r for r in labelled)
