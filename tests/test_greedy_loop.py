"""mmllm's own greedy decoding loop (#16, mmllm.models.greedy_loop): the answers, token spans and
log-probabilities of ``generate`` to the bit, for every family, with and without pictures, the
prefix cache, the grammar, padding; the token budget and finished rows as ``generate`` handles them;
models the loop does not serve keep ``generate``."""

from __future__ import annotations


import pytest
import torch
from transformers import AutoModelForImageTextToText

from mmllm.images import ImagePolicy
from mmllm.models.generative import GenerativePredictor, LoraSettings, attach_lora, load_processor
from mmllm.models.greedy_loop import decoding_step
from mmllm.predictor import encoded_batches
from mmllm.prompts import PromptTemplate

from listings import small_schema



@pytest.fixture
def generate_calls(monkeypatch) -> list[int]:
    """The ``max_new_tokens`` of every ``generate`` call (the loop asks it for the first token only)."""
    calls: list[int] = []
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("max_new_tokens"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return calls


def scored(predictor: GenerativePredictor, rows, policy: ImagePolicy, own: bool) -> list:
    predictor.own_loop = own
    return [(text, list(spans)) for _, enc in encoded_batches(predictor, rows, policy)
            for text, spans in predictor.generate_scored(enc)]


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_loop_answers_as_generate_to_the_bit(arch, loaded, padded_catalog, generate_calls):
    model, processor = loaded(arch)
    path, rows = padded_catalog
    policy = ImagePolicy(root=path.parent)
    cases = [("listing_v2", True, True), ("listing_v2", False, True), ("listing_v1", True, False)]
    for template, prefix, constrained in cases:
        predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load(template),
                                        max_new_tokens=12, batch_size=3, constrained=constrained, prefix_cache=prefix)
        generate_calls.clear()
        ours = scored(predictor, rows, policy, own=True)
        assert generate_calls == [1, 1]  # two batches: generate prefills and picks the first token, no more
        theirs = scored(predictor, rows, policy, own=False)
        assert generate_calls[2:] == [generate_calls[2]] * 2 and generate_calls[2] > 1
        assert ours == theirs  # texts, and every token's span and log-probability, exactly
        if constrained:
            assert all(predictor.schema.parse(text).ok for text, _ in ours)
        else:
            assert len({text for text, _ in ours}) > 1  # rows with and without pictures answer differently

def test_the_budget_one_row_and_a_lora_model_as_generate(tiny_checkpoint, loaded, padded_catalog):
    model, processor = loaded("qwen2_vl")
    path, rows = padded_catalog
    policy = ImagePolicy(root=path.parent)
    for budget, batch in ((1, 3), (2, 3), (5, 1)):  # batch 1: no padding, no mask at all
        predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v2"),
                                        max_new_tokens=budget, batch_size=batch)
        ours = scored(predictor, rows[:3], policy, own=True)
        assert ours == scored(predictor, rows[:3], policy, own=False)
        assert all(len(spans) <= budget for _, spans in ours)
        assert any(len(spans) == budget for _, spans in ours)
    folder = tiny_checkpoint("qwen2_5_vl")
    lora = attach_lora(AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32),
                       LoraSettings(rank=4, dropout=0.0)).eval()
    with torch.no_grad():  # a non-zero adapter: the loop must run the LoRA layers, not the base weights
        for name, weight in lora.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)
    assert decoding_step(lora) is not None
    predictor = GenerativePredictor(lora, load_processor(folder), small_schema(), PromptTemplate.load("listing_v2"),
                                    max_new_tokens=10, batch_size=3)
    assert scored(predictor, rows, policy, own=True) == scored(predictor, rows, policy, own=False)


def test_models_the_loop_does_not_serve_keep_generate(loaded, padded_catalog, generate_calls):
    model, processor = loaded("qwen2_vl", "eager")  # the eager kernel takes an additive float mask: not built here
    assert decoding_step(model) is None
    sdpa, _ = loaded("qwen2_vl", "sdpa")
    assert decoding_step(sdpa) is not None
    path, rows = padded_catalog
    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v2"),
                                    max_new_tokens=6, batch_size=3)
    predictor.generate(rows[:3], ImagePolicy(root=path.parent))
    assert generate_calls == [6]


class StopAt:
    """A logits processor that makes row r take the stop id at its ``steps[r]``-th token (0: never)."""

    def __init__(self, steps: list[int], stop: int) -> None:
        self.steps, self.stop, self.calls = steps, stop, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        for row, step in enumerate(self.steps):
            if step == self.calls:
                scores[row] = float("-inf")
                scores[row, self.stop] = 0.0
        return scores


def test_rows_that_finish_early_are_padded_and_the_loop_ends_with_the_last(loaded, padded_catalog):
    from mmllm.models.decoding import greedy_generation
    from mmllm.models.greedy_loop import greedy_decode
    from mmllm.models.prefix_cache import cache_argument

    model, processor = loaded("qwen2_5_vl")
    path, rows = padded_catalog
    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v2"),
                                    batch_size=3, prefix_cache=False)
    enc = next(enc for _, enc in encoded_batches(predictor, rows[:3], ImagePolicy(root=path.parent)))
    stops, pad = predictor._stops, processor.tokenizer.pad_token_id
    arg = cache_argument(model)

    def run(own: bool, steps: list[int], budget: int) -> torch.Tensor:
        cache = predictor._growing_cache(enc["input_ids"].shape[1] + budget)
        processors = [StopAt(steps, stops[0])]
        with torch.no_grad(), greedy_generation(model, stops, pad):
            if own:
                return greedy_decode(model, decoding_step(model), dict(enc), cache, arg, processors, stops, pad, budget)
            return model.generate(**enc, **{arg: cache}, max_new_tokens=budget, logits_processor=processors)

    prompt = enc["input_ids"].shape[1]
    for steps, budget, length in (([2, 5, 3], 9, 5), ([1, 1, 1], 9, 1), ([4, 0, 2], 6, 6), ([0, 0, 0], 4, 4)):
        ours, theirs = run(True, steps, budget), run(False, steps, budget)
        assert torch.equal(ours, theirs)
        new = ours[:, prompt:]
        assert new.shape[1] == length  # the loop stops when the last row finishes, or at the budget
        for row, step in enumerate(steps):
            if step:
                assert new[row, step - 1] == stops[0] and (new[row, step:] == pad).all()


def test_a_loop_that_fails_on_its_first_batch_hands_the_job_to_generate(loaded, padded_catalog, monkeypatch, caplog):
    from mmllm.models import greedy_loop

    model, processor = loaded("qwen2_vl")
    path, rows = padded_catalog
    policy = ImagePolicy(root=path.parent)
    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v2"),
                                    max_new_tokens=8, batch_size=3)
    expected = scored(predictor, rows, policy, own=False)
    predictor.own_loop = True

    def incompatible(self, *args, **kwargs):
        raise TypeError("forward() got an unexpected keyword argument 'cache'")

    with monkeypatch.context() as m:
        m.setattr(greedy_loop.DecodingStep, "forward", incompatible)
        got = [(text, list(spans)) for _, enc in encoded_batches(predictor, rows, policy)
               for text, spans in predictor.generate_scored(enc)]
    assert got == expected and not predictor.own_loop
    assert "decoding with generate from now on" in caplog.text and "unexpected keyword argument" in caplog.text
    predictor.own_loop = True  # once a batch has passed, a failure is the model's: raised
    scored(predictor, rows[:3], policy, own=True)
    with monkeypatch.context() as m:
        m.setattr(greedy_loop.DecodingStep, "forward", incompatible)
        with pytest.raises(TypeError, match="unexpected keyword"):
            scored(predictor, rows[:3], policy, own=True)
