"""The grammar's logits processor (mmllm.constrained.GrammarProcessor) against xgrammar's own
``contrib.hf`` processor: the same masked scores step by step, rows that finish early included, at a
vocabulary that is and one that is not a multiple of 32; and the same answers from a tiny model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from mmllm.catalog import load_listings
from mmllm.constrained import GrammarFactory, GrammarProcessor
from mmllm.images import ImagePolicy
from mmllm.models.answer_scores import stop_ids
from mmllm.models.generative import GenerativePredictor, load_processor
from mmllm.prompts import PromptTemplate

from listings import small_schema, toy_row, write_catalog

import xgrammar as xgr  # noqa: E402  (a core dependency: missing is a failure, not a skip)


@pytest.mark.parametrize("padded", [0, 10])  # the model's vocabulary: 1,280 rows (40 words of 32), or 1,290
def test_masks_equal_xgrammars_own_processor_step_by_step(tiny_checkpoint, padded):
    processor = load_processor(tiny_checkpoint("qwen2_vl"))
    tokenizer = processor.tokenizer
    vocab = len(tokenizer) + padded
    stops = stop_ids(tokenizer)
    factory = GrammarFactory(small_schema(), tokenizer, vocab, stops)
    ours, theirs = factory.processor(), xgr.contrib.hf.LogitsProcessor(factory.compiled)
    assert isinstance(ours, GrammarProcessor)
    generator = torch.Generator().manual_seed(0)
    batch = 3
    ids = torch.full((batch, 5), tokenizer.pad_token_id)  # a prompt; only its length matters
    finished = torch.zeros(batch, dtype=torch.bool)
    for step in range(factory.max_tokens):
        scores = torch.randn(batch, vocab, generator=generator) * 4
        scores[1, stops] += 3.0 * step  # row 1 is ever more drawn to end its answer: it finishes first
        mine, xgrammars = ours(ids, scores.clone()), theirs(ids, scores.clone())
        assert torch.equal(mine, xgrammars), f"step {step}"
        allowed = torch.isfinite(mine).sum(1)
        assert bool((allowed[~finished] >= 1).all()) and bool((allowed[~finished] < vocab).all())
        picked = torch.where(finished, tokenizer.pad_token_id, mine.argmax(-1))  # generate pads finished rows
        finished |= torch.isin(picked, torch.tensor(stops))
        ids = torch.cat([ids, picked[:, None]], 1)
        if bool(finished.all()):
            break
    assert bool(finished.all())  # every answer completed within the grammar's bound
    for row in ids[:, 5:].tolist():
        answer = tokenizer.decode([t for t in row if t not in (*stops, tokenizer.pad_token_id)])
        assert small_schema().parse(answer).ok, answer


def test_a_tiny_model_answers_as_under_xgrammars_processor(tiny_checkpoint, tmp_path, monkeypatch):
    folder = tiny_checkpoint("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    path = write_catalog(tmp_path, n=5, row=toy_row(text_only_every=2))
    rows = load_listings(path)
    predictor = GenerativePredictor(model, load_processor(folder), small_schema(), PromptTemplate.load("listing_compact_v1"),
                                    constrained=True, batch_size=5)
    ours = predictor.generate(rows, ImagePolicy(root=path.parent))
    monkeypatch.setattr(GrammarFactory, "processor", lambda self: xgr.contrib.hf.LogitsProcessor(self.compiled))
    assert predictor.generate(rows, ImagePolicy(root=path.parent)) == ours
    assert all(small_schema().parse(text).ok for text in ours)


NUMBER_TEXTS = ["0", "1", "-1", "007", "00.5", "0.5", "-0.5", "-0", "10", "-10", "-10.5", "-9.5", "-5.5", "-19.5",
                "-20.5", "40", "40.5", "39.9", "20.5", "21", "21.5", "41", "-11", "1e3", "100000", "999999999999999",
                "1000000000000000", "-999999999999999", "0.000001", "2.75"]


@pytest.mark.parametrize("spec", [
    {"type": "integer"}, {"type": "number"}, {"type": "integer", "minimum": -10, "maximum": 40},
    {"type": "number", "minimum": -10, "maximum": 40}, {"type": "number", "minimum": 0, "maximum": 21},
    {"type": "number", "minimum": -20, "maximum": -5}, {"type": "integer", "minimum": 1, "maximum": 100000}])
def test_the_grammar_lets_through_exactly_the_numbers_the_schema_accepts(spec):
    """Every number the grammar accepts is JSON and in range ("007" is not JSON; "-10.5" is below a minimum of
    -10: a constrained answer came back invalid), and every number the schema accepts (up to 6 decimals and
    15 digits) the grammar accepts."""
    from mmllm.constrained import answer_grammar
    from mmllm.schema import LabelSchema

    schema = LabelSchema.from_dict({"name": "s", "taxonomy": ["Kites"], "attributes": {"v": {**spec, "description": "v"}}})
    grammar = xgr.Grammar.from_ebnf(answer_grammar(schema))
    for number in NUMBER_TEXTS:
        text = '{"category":"Kites","attributes":{"v":%s}}' % number
        accepted = xgr.testing._is_grammar_accept_string(grammar, text)
        valid = schema.parse(text).ok  # JSON, and within the bounds
        # the grammar writes a number out in at most 15 digits before the point, never "1e3" or "-0"
        written_out = "e" not in number and number != "-0" and len(number.lstrip("-").split(".")[0]) <= 15
        assert accepted == (valid and written_out), (spec, number, accepted, valid)
