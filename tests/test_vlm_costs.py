"""Costs the tiny checkpoints hide and real-size models pay (#16): the LM head only where a label
is supervised, vocabulary lookups once per predictor / collator, plain greedy decoding whatever the
checkpoint's generation config says."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForImageTextToText

from mmllm.catalog import load_listings
from mmllm.collator import IGNORE_INDEX, TrainCollator, load_listing_images
from mmllm.images import ImagePolicy
from mmllm.models.generative import GenerativePredictor, load_processor
from mmllm.prompts import PromptTemplate
from mmllm.training import causal_lm_loss

from listings import small_schema, toy_row, write_catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    path = write_catalog(tmp_path_factory.mktemp("cat"), n=4, row=toy_row(text_only_every=2))
    return path, load_listings(path)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    folder = tiny_checkpoint("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return model, load_processor(folder)


def _count_get_vocab(monkeypatch, tokenizer) -> list[int]:
    calls = [0]
    original = type(tokenizer).get_vocab

    def counting(self):
        calls[0] += 1
        return original(self)

    monkeypatch.setattr(type(tokenizer), "get_vocab", counting)
    return calls


def test_loss_runs_the_output_layer_only_at_supervised_positions_and_equals_the_full_loss(loaded, catalog):
    model, processor = loaded
    path, rows = catalog
    collate = TrainCollator(processor, small_schema(), PromptTemplate.load("listing_v1"), ImagePolicy(root=path.parent))
    batch = collate([(rows[0], 0), (rows[1], 0), (rows[2], 0)])
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            loss, count = causal_lm_loss(model, batch)
    finally:
        hook.remove()
    # the reference: every position through the output layer, then shifted cross-entropy
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    labels = batch["labels"][:, 1:]
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                  ignore_index=IGNORE_INDEX, reduction="sum")
    assert int(count) == int((labels != IGNORE_INDEX).sum()) > 0
    assert abs(float(loss) - float(reference)) <= 1e-5 * max(1.0, abs(float(reference)))
    positions = seen[0][1]
    answer_positions = int((labels != IGNORE_INDEX).any(0).sum())
    assert positions == answer_positions < batch["input_ids"].shape[1] // 2


def test_the_loss_gradient_equals_the_full_loss_gradient(loaded, catalog):
    model, processor = loaded
    path, rows = catalog
    collate = TrainCollator(processor, small_schema(), PromptTemplate.load("listing_v1"), ImagePolicy(root=path.parent))
    batch = collate([(rows[1], 0), (rows[3], 0)])
    weight = model.lm_head.weight

    def grad_of(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return weight.grad.detach().clone()

    fast = grad_of(causal_lm_loss(model, batch)[0])
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    full = grad_of(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     batch["labels"][:, 1:].reshape(-1), reduction="sum"))
    model.zero_grad()
    assert torch.allclose(fast, full, atol=1e-5, rtol=1e-4)


def test_no_vocabulary_dict_is_built_per_batch_or_per_generate_call(loaded, catalog, monkeypatch):
    model, processor = loaded
    path, rows = catalog
    policy = ImagePolicy(root=path.parent)
    collate = TrainCollator(processor, small_schema(), PromptTemplate.load("listing_v1"), policy)
    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v1"),
                                    max_new_tokens=4, constrained=False)
    calls = _count_get_vocab(monkeypatch, processor.tokenizer)
    for _ in range(2):
        collate([(rows[0], 0), (rows[1], 0)])
        enc = predictor.encode(rows[:2], [load_listing_images(r, policy, 4) for r in rows[:2]])
        predictor.generate_encoded(enc)
    assert calls[0] == 0
    assert predictor._stops == sorted({processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
                                      | {processor.tokenizer.eos_token_id})


def test_labelling_is_plain_greedy_whatever_the_checkpoint_generation_config_says(loaded, catalog, caplog):
    model, processor = loaded
    path, rows = catalog
    shipped = model.generation_config
    shipped.do_sample, shipped.temperature, shipped.top_p, shipped.top_k = True, 0.1, 0.5, 3
    shipped.repetition_penalty = 50.0  # would change a random model's repetitive output at once
    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v1"),
                                    max_new_tokens=12, constrained=False)
    enc = predictor.encode(rows[1:2], [[]])
    with caplog.at_level(logging.WARNING):
        text = predictor.generate_encoded(enc)[0]
    # the reference: argmax of the next-token logits, step by step, no cache, no processors
    ids = enc["input_ids"]
    with torch.no_grad():
        for _ in range(12):
            mask = torch.ones_like(ids)
            step = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, step], 1)
            if int(step) in predictor._stops:
                break
    expected = processor.tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text == expected
    assert not [r for r in caplog.records if "generation" in r.getMessage().lower()]
    assert model.generation_config is shipped and shipped.repetition_penalty == 50.0  # the checkpoint's own, restored


@pytest.mark.slow
def test_decode_profile_splits_a_labelling_pass_into_forward_passes_operators_and_host_functions(tmp_path):
    """benchmarks/decode_profile.py (its --gpu mode found the H200 busy 22% of a profiled labelling pass):
    on CPU it profiles the tiny model through the real labelling job."""
    import json
    import sys

    from helpers import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import decode_profile

    out = tmp_path / "profile.json"
    assert decode_profile.main(["--rows", "3", "--batch", "2", "--top", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    p = result["profiler"]
    # 3 rows at batch 2 = 2 batches: one prefill each, then one forward pass per decoding step
    assert p["forward_passes"] == p["decode_steps"] + 2 and p["decode_steps"] >= 2
    assert p["decode_ms_per_step"] == pytest.approx(p["decode_s"] / p["decode_steps"] * 1000, rel=0.01, abs=0.01)
    assert p["operators"] > p["forward_passes"] and 0 < p["operator_s"] <= p["wall_s"] * 2  # operators of other threads (image preparation) overlap
    assert p["prefill_s"] > 0 and p["decode_s"] > 0 and p["prefill_s"] + p["decode_s"] <= p["model_s"] + 1e-3
    top = result["host"]["top_own_time"]
    assert len(top) == 5 and all(r["calls"] >= 1 and r["own_s"] <= r["cumulative_s"] + 1e-6 for r in top)
    assert [r["own_s"] for r in top] == sorted((r["own_s"] for r in top), reverse=True)
    assert result["constrained"] is True and result["rows"] == 3


@pytest.mark.slow
def test_the_gpu_benchmarks_random_model_folder_labels_at_the_real_vocabulary(tmp_path):
    """label_throughput / classify_vs_generate / decode_profile --gpu build a random Qwen2-VL-2B with
    the real-size-vocabulary tokenizer; here the same builder at one layer on CPU, labelled end to end."""
    import json
    import sys

    from helpers import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import label_throughput

    folder = label_throughput.random_model_dir(tmp_path / "model", text_layers=1, vision_depth=1, device="cpu")
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    assert (text["hidden_size"], text["vocab_size"], text["num_hidden_layers"]) == (1536, 151936, 1)
    assert config["vision_config"]["depth"] == 1 and config["image_token_id"] == 151655
    built = (folder / "model.safetensors").stat().st_mtime_ns
    assert label_throughput.random_model_dir(folder) == folder  # finished: reused, not built again
    assert (folder / "model.safetensors").stat().st_mtime_ns == built

    dump = label_throughput.make_dump(tmp_path / "rows", 3, with_images=True)
    schema = tmp_path / "schema.yaml"
    small_schema().to_yaml(schema)  # four categories, short answers: a short test
    predictor = label_throughput.load(str(folder), schema, True, 3, 64, template="listing_compact_v1")
    assert len(predictor.processor.tokenizer) > 151_000  # the grammar masks the real vocabulary's size
    summary = label_throughput.run_job(predictor, dump, 3, tmp_path / "labels.jsonl")
    records = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert summary.rows == 3 and sorted(r["id"] for r in records) == ["row-0", "row-1", "row-2"]
    assert all(r["status"] == "ok" and 0 <= r["confidence"] <= 1 for r in records)  # constrained: always valid


def test_no_forward_outside_generation_builds_a_decoding_cache(loaded, catalog):
    """The heads, the search vectors and the training loss run the decoder once over the prompt: a cache
    would keep every layer's keys and values to the end of the pass (GBs at real size and batch)."""
    from mmllm.models.classifier import ListingClassifier
    from mmllm.models.heads import HeadSpec, decoder, hidden_size, prompt_vectors

    model, processor = loaded
    path, rows = catalog
    batch = TrainCollator(processor, small_schema(), PromptTemplate.load("listing_v1"), ImagePolicy(root=path.parent))(
        [(r, 0) for r in rows[:2]])
    outputs = []
    hook = decoder(model).register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        loss, _ = causal_lm_loss(model, batch)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        prompt_vectors(model, inputs)
        heads = ListingClassifier(model, hidden_size(model), [HeadSpec("category", "softmax", ["a", "b"])])
        heads(**inputs)
    finally:
        hook.remove()
    assert torch.isfinite(loss) and len(outputs) == 3
    assert all(out.get("past_key_values") is None for out in outputs)


def test_the_against_comparison_pairs_each_turns_runs():
    """label_throughput --against: each turn's now / then, their geometric mean, the ratio of the medians
    (hand numbers: turns 3x, 4x, 2x; medians 12 / 4)."""
    import sys

    from helpers import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import label_throughput

    runs = [{"code": "then", "turn": 0, "rows_per_s": 4.0}, {"code": "now", "turn": 0, "rows_per_s": 12.0},
            {"code": "then", "turn": 1, "rows_per_s": 3.0}, {"code": "now", "turn": 1, "rows_per_s": 12.0},
            {"code": "then", "turn": 2, "rows_per_s": 6.0}, {"code": "now", "turn": 2, "rows_per_s": 12.0}]
    paired = label_throughput.paired_ratios(runs)
    assert paired["turn_ratios"] == [3.0, 4.0, 2.0]
    assert paired["speedup_geometric_mean"] == round((3.0 * 4.0 * 2.0) ** (1 / 3), 2) == 2.88
    assert paired["speedup_of_medians"] == 3.0
    assert label_throughput.paired_ratios(runs[:1]) == {}  # a turn without its pair: nothing to say
    replicas = runs + [{"code": "now-r2", "turn": 0, "rows_per_s": 16.0}, {"code": "now-r2", "turn": 2, "rows_per_s": 15.0}]
    paired = label_throughput.paired_ratios(replicas, "now-r2")  # --replicas 2's runs, against the same turns' old code
    assert paired["turn_ratios"] == [4.0, 2.5] and paired["speedup_of_medians"] == round(15.5 / 5.0, 2) == 3.1
    assert label_throughput.paired_ratios(replicas) == label_throughput.paired_ratios(runs)  # "now" alone by default
