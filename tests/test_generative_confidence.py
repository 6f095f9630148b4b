"""A generative model's confidence: each generated token's log-probability as decoded (under the grammar
when constrained), the value spans of the answer, the category path probability as their product, and
the Platt map of the model folder's calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from mmllm.catalog import load_listings
from mmllm.confidence import Calibration, Platt
from mmllm.models.answer_scores import (AnswerTokens, ChosenLogprobs, TokenSpans, answer_confidence, answer_decoder,
                                        stop_ids)
from mmllm.models.decoding import greedy_generation
from mmllm.models.generative import GenerativePredictor, load_processor
from mmllm.prompts import PromptTemplate
from mmllm.schema import answer_spans

from listings import small_schema, toy_row, write_catalog


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    folder = tiny_checkpoint("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return model, load_processor(folder)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return load_listings(write_catalog(tmp_path_factory.mktemp("cat"), n=3, row=toy_row(text_only_every=1)))


def predictor(loaded, **kwargs) -> GenerativePredictor:
    model, processor = loaded
    return GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v1"), **kwargs)


def test_recorded_log_probabilities_are_the_models_own_step_by_step(loaded, rows):
    """Unconstrained greedy decoding: the recorder's value at each step is log_softmax of a plain forward
    pass over the prompt and the tokens before it, at the token generated; the predictor's token spans
    carry the same values and tile the answer text."""
    model, processor = loaded
    p = predictor(loaded, max_new_tokens=8, constrained=False, prefix_cache=False)
    enc = p.encode(rows[:1], [[]])
    recorder = ChosenLogprobs(capacity=3)  # 8 steps: its buffer grows twice
    with torch.no_grad(), greedy_generation(model, stop_ids(processor.tokenizer), processor.tokenizer.pad_token_id):
        # (no min_new_tokens: its processor would mask the stop tokens before the recorder sees the scores)
        out = model.generate(**enc, max_new_tokens=8, logits_processor=[recorder])
    prompt = enc["input_ids"].shape[1]
    ids = out[0, prompt:].tolist()
    with torch.no_grad():
        logits = model(input_ids=out, attention_mask=torch.ones_like(out)).logits[0].float()
    reference = [torch.log_softmax(logits[prompt - 1 + i], -1)[t].item() for i, t in enumerate(ids)]
    assert recorder.result(len(ids))[0].tolist() == pytest.approx(reference, abs=1e-4)

    text, tokens = p.generate_scored(enc)[0]
    assert 1 <= len(tokens) <= len(ids)  # cut at a stop token, if the random model writes one
    assert [lp for _, _, lp in tokens] == pytest.approx(reference[: len(tokens)], abs=1e-4)
    assert tokens.starts[0] == 0 and tokens.ends[-1] == len(text)
    assert (tokens.starts[1:] == tokens.ends[:-1]).all()


def test_constrained_answers_carry_the_category_path_probability(loaded, rows):
    p = predictor(loaded, max_new_tokens=40, constrained=True)
    enc = p.encode(rows, [[] for _ in rows])
    for text, tokens in p.generate_scored(enc):
        record = p.record("x", text, tokens)
        assert record["status"] == "ok"
        lo, hi = answer_spans(text)["category"]
        spans = list(tokens)
        inside = [i for i, (a, b, _) in enumerate(spans) if a < hi - 1 and b > lo + 1]  # without its quotes
        closing = [inside[-1] + 1] if spans[inside[-1]][1] <= hi - 1 else []  # the step that ended the path there
        assert record["confidence"] == pytest.approx(math.exp(sum(spans[i][2] for i in inside + closing)), abs=1e-6)
        assert 0 < record["confidence"] <= 1
        assert set(record["attribute_confidence"]) == {k for k, v in record["attributes"].items() if v is not None}
        # under the grammar each step renormalizes over the allowed tokens: no token is less likely than
        # it is without the grammar, and the whole answer is no more likely than its category
        assert all(lp <= 1e-6 for _, _, lp in tokens)
        assert math.exp(sum(lp for _, _, lp in tokens)) <= record["confidence"] + 1e-6


def test_answer_confidence_by_hand_and_through_a_calibration():
    text = '{"category":"Games > Chess","attributes":{"piece_count":12,"material":null}}'
    c0 = text.index("Games")
    n0 = text.index("12")
    tokens = [(0, c0, 0.0), (c0, c0 + 5, math.log(0.5)), (c0 + 5, c0 + 13, math.log(0.8)), (c0 + 13, n0, 0.0),
              (n0, n0 + 2, math.log(0.25)), (n0 + 2, len(text), 0.0)]
    record = {"category": "Games > Chess", "attributes": {"piece_count": 12, "material": None}}
    out = answer_confidence(text, tokens, record)
    assert out == {"confidence": pytest.approx(0.4), "attribute_confidence": {"piece_count": pytest.approx(0.25)}}
    calibration = Calibration("platt", Platt(2.0, 0.5, 50), Platt(1.0, 1.0, 50))
    mapped = calibration.apply({**record, **out})
    assert mapped["confidence"] == pytest.approx(Platt(2.0, 0.5)(0.4), abs=1e-6)
    assert mapped["attribute_confidence"]["piece_count"] == pytest.approx(Platt(1.0, 1.0)(0.25), abs=1e-6)


def test_a_value_that_a_longer_one_could_have_continued_counts_the_step_that_ended_it():
    """"4" where "40".."49" were allowed, "Games" where "Games > Board" was: the probability of the value is
    that of its tokens times that of ending it there (the closing quote, the "," after a number)."""
    text = '{"category":"Games","attributes":{"piece_count":4,"material":null}}'
    c0, n0 = text.index("Games"), text.index("4,")
    tokens = [(0, c0, 0.0), (c0, c0 + 5, math.log(0.5)), (c0 + 5, c0 + 6, math.log(0.6)),  # '"' rather than ' >'
              (c0 + 6, n0, 0.0), (n0, n0 + 1, math.log(0.8)), (n0 + 1, n0 + 2, math.log(0.25)),  # ',' not '0'-'9'
              (n0 + 2, len(text), 0.0)]
    record = {"category": "Games", "attributes": {"piece_count": 4, "material": None}}
    out = answer_confidence(text, tokens, record)
    assert out == {"confidence": pytest.approx(0.3), "attribute_confidence": {"piece_count": pytest.approx(0.2)}}
    # a token that already covers the value's end holds the decision: nothing after it is counted
    merged = [(0, c0, 0.0), (c0, c0 + 6, math.log(0.5)), (c0 + 6, n0, math.log(0.1)), (n0, n0 + 2, math.log(0.8)),
              (n0 + 2, len(text), math.log(0.1))]
    assert answer_confidence(text, merged, record) == {
        "confidence": pytest.approx(0.5), "attribute_confidence": {"piece_count": pytest.approx(0.8)}}


def test_an_invalid_answer_has_no_confidence(loaded):
    p = predictor(loaded)
    record = p.record("x", "not json at all", [(0, 15, -0.1)])
    assert record["status"] == "invalid" and "confidence" not in record


def spans_of(tokenizer, ids: list[int], stop: int, answers: AnswerTokens | None = None):
    """One row through :class:`AnswerTokens` (a fresh one unless given), ended by ``stop`` and padded after it."""
    answers = answers or AnswerTokens(tokenizer, [stop])
    row = np.array([[*ids, stop, stop]])
    text, spans = answers(row, np.full(row.shape, -0.5, dtype=np.float32))[0]
    return text, list(spans)


def plain_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int, float]]]:
    """The reference: the text decoded whole, each token ending where the decoded prefix up to it ends."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    spans, before = [], 0
    for i in range(len(ids)):
        end = max(before, min(len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)), len(text)))
        spans.append((before, end, -0.5))
        before = end
    return text, spans


@pytest.mark.parametrize("text", ['{"category":"Games > Chess","attributes":{"piece_count":12}}',
                                  '{"category":"Pokémon > Cartes","attributes":{"brand":"日本語"}}'])
def test_token_spans_tile_the_answer_whatever_its_characters(loaded, text):
    """ASCII answers are measured token by token; a character split over byte-level tokens (é, 日) is
    given to the token that completes it, and the spans still tile the text."""
    tokenizer = loaded[1].tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded, spans = spans_of(tokenizer, ids, stop_ids(tokenizer)[0])
    assert decoded == text and len(spans) == len(ids)  # cut at the stop
    assert spans[0][0] == 0 and spans[-1][1] == len(text) and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    lo, hi = answer_spans(text)["category"]
    covering = "".join(text[a:b] for a, b, _ in spans if a < hi - 1 and b > lo + 1)  # what the confidence reads
    assert text[lo + 1:hi - 1] in covering


@pytest.mark.parametrize("vocab", ["tiny", "real"])
def test_answers_and_spans_are_what_the_tokenizer_decodes(tmp_path, vocab, monkeypatch):
    """Whatever the ids (special tokens, characters split over tokens, random ids, padded-vocabulary
    ids past the tokenizer), a batch's answers are ``decode``'s text and each token ends where its
    decoded prefix ends; rows of a batch are cut at their own stops. ``answer_decoder`` reads the Rust
    backend directly (a Qwen tokenizer cleans up no spaces), and where every token is whole characters
    the pieces are joined without decoding the row at all."""
    import random

    from transformers import AutoProcessor

    from mmllm.tiny import build_tiny_checkpoint

    tokenizer = AutoProcessor.from_pretrained(build_tiny_checkpoint(tmp_path, "qwen2_vl", vocab=vocab)).tokenizer
    rng, stop = random.Random(0), stop_ids(tokenizer)[0]
    texts = ['{"category":"Pokémon > Cartes","attributes":{"brand":"日本語"}}', "a  b\n c ,. ?", " leading space"]
    samples = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    samples += [[rng.randrange(len(tokenizer) + 64) for _ in range(rng.randrange(60))] for _ in range(200)]
    answers = AnswerTokens(tokenizer, [stop])
    for start in range(0, len(samples), 8):  # batches of 8 rows of different lengths
        batch = [[t for t in ids if t != stop] for ids in samples[start:start + 8]]
        width = max(map(len, batch)) + 1
        rows = np.array([[*ids, *[stop] * (width - len(ids))] for ids in batch])
        got = answers(rows, np.full(rows.shape, -0.5, dtype=np.float32))
        assert [(text, list(spans)) for text, spans in got] == [plain_spans(tokenizer, ids) for ids in batch]
    decode = answer_decoder(tokenizer)
    calls = []
    original = type(tokenizer).decode
    monkeypatch.setattr(type(tokenizer), "decode", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    assert decode(samples[0]) == texts[0] and not calls  # the backend alone, not decode's type checks
    assert spans_of(tokenizer, samples[2], stop, answers)[0] == texts[2] and not calls
    tokenizer.clean_up_tokenization_spaces = True  # a tokenizer that post-processes goes through decode
    assert answer_decoder(tokenizer)(samples[0]) == texts[0] and calls == [1]
    cleaning = AnswerTokens(tokenizer, [stop])
    assert not cleaning.joins and spans_of(tokenizer, samples[2], stop, cleaning)[0] == texts[2]  # rows decoded


def test_token_pieces_are_decoded_once_per_predictor_and_give_the_same_spans(loaded, monkeypatch):
    """The pieces an :class:`AnswerTokens` has seen are kept: a second answer built of the same tokens
    decodes none of them again, and the spans are the ones measured without the memo."""
    tokenizer = loaded[1].tokenizer
    first = '{"category":"Games > Chess","attributes":{"piece_count":12}}'
    second = '{"category":"Games > Chess","attributes":{"piece_count":12,"brand":"Pokémon"}}'
    stop = stop_ids(tokenizer)[0]
    answers = AnswerTokens(tokenizer, [stop])
    decoded_alone = []
    original = type(tokenizer).batch_decode

    def counting(self, sequences, **kwargs):
        if all(len(s) == 1 for s in sequences):  # the pieces' call (the prefix fallback passes longer ones)
            decoded_alone.extend(s[0] for s in sequences)
        return original(self, sequences, **kwargs)

    monkeypatch.setattr(type(tokenizer), "batch_decode", counting)
    for text in (first, second):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert spans_of(tokenizer, ids, stop, answers) == plain_spans(tokenizer, ids)
    first_ids = set(tokenizer(first, add_special_tokens=False)["input_ids"])
    learned = set(np.flatnonzero(answers.lengths >= 0).tolist())
    assert len(decoded_alone) == len(set(decoded_alone)) == len(learned)  # each piece decoded once, ever
    assert first_ids <= learned and not first_ids & set(decoded_alone[len(first_ids):])


def test_a_value_reads_the_tokens_that_overlap_it():
    """``TokenSpans.logprob`` (two binary searches) sums exactly the tokens that overlap a character range,
    zero-width tokens (special ones decode to nothing) inside it included, for every range of a random
    tiling of a text."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        widths = rng.choice([0, 1, 1, 2, 3, 5], size=int(rng.integers(1, 30)))
        ends = np.cumsum(widths)
        spans = [(int(e - w), int(e), float(lp)) for e, w, lp in zip(ends, widths, rng.uniform(-3, 0, len(widths)))]
        tokens = TokenSpans.of(spans)
        assert list(tokens) == spans and TokenSpans.of(tokens) is tokens
        for lo in range(int(ends[-1]) + 1):
            for hi in range(lo + 1, int(ends[-1]) + 2):
                brute = sum(lp for a, b, lp in spans if a < hi and b > lo)
                assert tokens.logprob(lo, hi) == pytest.approx(brute, abs=1e-9)
                # with the step that ends the value: the tokens from hi up to the first that covers a character
                inside = [i for i, (a, b, _) in enumerate(spans) if a < hi and b > lo]
                end = []
                if inside and spans[inside[-1]][1] <= hi:
                    for i in range(inside[-1] + 1, len(spans)):
                        end.append(spans[i][2])
                        if spans[i][1] > hi:
                            break
                assert tokens.logprob(lo, hi, with_end=True) == pytest.approx(brute + sum(end), abs=1e-9)
