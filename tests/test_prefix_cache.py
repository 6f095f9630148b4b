"""The shared prompt prefix encoded once and reused by every batch (#16): the prefix a template
shares, the batch layout, and answers identical to the plain path for every family, with and without
images, constrained or not, one row or several, and under LoRA; and the static decoding cache (the
one a GPU compiles), with and without the prefix, against the growing one."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from mmllm.catalog import Listing
from mmllm.collator import load_listing_images
from mmllm.images import ImagePolicy
from mmllm.models import cuda_graphs
from mmllm.models.generative import GROWING_ROOM, GenerativePredictor, LoraSettings, attach_lora, load_processor
from mmllm.models.growing_cache import GrowingLayer
from mmllm.models.prefix_cache import PrefixCache, shared_prefix_ids
from mmllm.predictor import encoded_batches
from mmllm.prompts import PromptTemplate, build_messages

from listings import small_schema


@pytest.fixture
def served(monkeypatch) -> list[bool]:
    """Whether :meth:`PrefixCache.lay_out` served each batch it was asked for."""
    calls: list[bool] = []
    original = PrefixCache.lay_out

    def spy(self, enc, *args):
        out = original(self, enc, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(PrefixCache, "lay_out", spy)
    return calls


def _answers(predictor: GenerativePredictor, rows, policy: ImagePolicy, batch_size: int, cached: bool) -> list[str]:
    predictor.prefix_cache, predictor.batch_size = cached, batch_size
    return predictor.generate(rows, policy)


def test_listing_v2_shares_the_instructions_and_the_schema_listing_v1_only_its_system_text(loaded):
    _, processor = loaded("qwen2_vl")
    schema = small_schema()
    v1 = processor.tokenizer.decode(shared_prefix_ids(processor, schema, PromptTemplate.load("listing_v1")))
    v2 = processor.tokenizer.decode(shared_prefix_ids(processor, schema, PromptTemplate.load("listing_v2")))
    for prefix in (v1, v2):
        assert prefix.endswith("<|im_start|>user\n")
        assert "<|vision_start|>" not in prefix and "Title:" not in prefix
    assert "Taxonomy:" not in v1 and "Games > Chess" not in v1
    assert "- Games > Chess | Card Games" in v2 and "- piece_count (integer): pieces in the box" in v2


def test_every_rendered_prompt_starts_with_the_prefix(loaded, padded_catalog):
    _, processor = loaded("qwen2_5_vl")
    _, rows = padded_catalog
    schema, template = small_schema(), PromptTemplate.load("listing_v2")
    prefix = shared_prefix_ids(processor, schema, template)
    for listing in rows:
        text = processor.apply_chat_template(build_messages(listing, schema, template, n_images=len(listing.images)),
                                             tokenize=False, add_generation_prompt=True)
        assert processor.tokenizer(text, add_special_tokens=False)["input_ids"][: len(prefix)] == prefix


def test_the_layout_moves_each_rows_padding_behind_the_prefix():
    cache = PrefixCache(torch.tensor([7, 8]), [(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))], "cache")
    enc = {"input_ids": torch.tensor([[0, 0, 7, 8, 5], [7, 8, 1, 2, 3]]),
           "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}
    laid = cache.lay_out(enc)
    assert laid["input_ids"].tolist() == [[7, 8, 0, 0, 5], [7, 8, 1, 2, 3]]
    assert laid["attention_mask"].tolist() == [[1, 1, 0, 0, 1], [1, 1, 1, 1, 1]]
    assert laid["cache"].get_seq_length() == 2 and laid["cache"].layers[0].keys.shape == (2, 1, 2, 4)


@pytest.mark.parametrize("enc", [
    {"input_ids": torch.tensor([[7, 8, 5, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])},  # right padding
    {"input_ids": torch.tensor([[7, 9, 5]]), "attention_mask": torch.tensor([[1, 1, 1]])},  # another start
    {"input_ids": torch.tensor([[0, 7, 8]]), "attention_mask": torch.tensor([[0, 1, 1]])},  # nothing after it
    {"input_ids": torch.tensor([[7, 8, 5]]), "attention_mask": torch.tensor([[1, 1, 1]]), "extra": torch.ones(1, 3)},
])
def test_a_batch_the_layout_cannot_serve_takes_the_plain_path(enc):
    cache = PrefixCache(torch.tensor([7, 8]), [(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))], "cache")
    assert cache.lay_out(enc) is None


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("constrained", [False, True])
def test_cached_answers_equal_the_plain_paths(arch, constrained, loaded, padded_catalog, served):
    model, processor = loaded(arch)
    path, rows = padded_catalog
    policy = ImagePolicy(root=path.parent)
    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v2"),
                                    max_new_tokens=16, constrained=constrained)
    for batch_size in (1, 4):  # batches of one, then of four rows with and without pictures (padded)
        plain = _answers(predictor, rows, policy, batch_size, cached=False)
        assert _answers(predictor, rows, policy, batch_size, cached=True) == plain
    assert served == [True] * (6 + 2)
    assert any(len(r.images) for r in rows) and any(not r.images for r in rows)


def test_a_batch_is_laid_out_where_it_is_encoded(loaded, padded_catalog, monkeypatch):
    """With the prefix cache on, ``encode`` (the labelling engine's workers) lays the tokens out behind the
    prefix, and generating from that batch lays out nothing; the dict it is reads the processor's own
    tensors, and a plain copy of it is laid out when it is generated, to the same answers."""
    import numpy as np

    from mmllm.collator import encode_prompts
    from mmllm.models import prefix_cache
    from mmllm.models.prefix_cache import PromptBatch

    model, processor = loaded("qwen2_vl")
    path, rows = padded_catalog
    rows = rows[:4]
    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v2"),
                                    max_new_tokens=12, constrained=True)
    images = [load_listing_images(r, ImagePolicy(root=path.parent), 4) for r in rows]
    enc = predictor.encode(rows, images)
    plain = encode_prompts(processor, rows, predictor.schema, predictor.template, images)
    assert isinstance(enc, PromptBatch) and enc.keys() == plain.keys()
    assert all(torch.equal(enc[k], plain[k]) for k in plain)
    n = len(enc.prefix)
    assert n == len(shared_prefix_ids(processor, predictor.schema, predictor.template))
    laid = enc.laid_out
    assert (laid["input_ids"][:, :n] == torch.from_numpy(enc.prefix)).all() and laid["attention_mask"][:, :n].all()
    assert bool((plain["attention_mask"] == 0).any())  # rows were padded: the layout moved something
    for row in range(len(rows)):  # each row keeps its real tokens, in order
        keep = laid["attention_mask"][row].bool()
        assert torch.equal(laid["input_ids"][row][keep], plain["input_ids"][row][plain["attention_mask"][row].bool()])
    calls = []
    original = prefix_cache.lay_out_tokens
    monkeypatch.setattr(prefix_cache, "lay_out_tokens", lambda *a: calls.append(1) or original(*a))
    answers = predictor.generate_scored(enc)
    assert not calls
    assert predictor.generate_scored(dict(enc)) == answers and calls == [1]
    predictor.prefix_cache = False
    assert not isinstance(predictor.encode(rows, images), PromptBatch)
    uncached = predictor.generate_scored(plain)  # the same answers, scores to float rounding
    assert [text for text, _ in uncached] == [text for text, _ in answers]
    assert [[(a, b) for a, b, _ in spans] for _, spans in uncached] == [[(a, b) for a, b, _ in spans] for _, spans in answers]
    assert np.allclose([lp for _, spans in uncached for *_, lp in spans], [lp for _, spans in answers for *_, lp in spans],
                       atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_a_static_cache_gives_the_growing_caches_answers(arch, loaded, padded_catalog, monkeypatch):
    from transformers import StaticCache

    model, processor = loaded(arch)
    path, rows = padded_catalog
    policy = ImagePolicy(root=path.parent)
    caches: list[tuple[str, int | None]] = []  # the cache each generate call decoded into, and its length
    needed: list[int] = []  # each call's prompt (pictures' tokens included) plus its budget
    growing_room: list[tuple[int, int] | None] = []  # a growing cache's room, and what it should be
    original = type(model).generate

    def spy(self, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        caches.append((type(cache).__name__, cache.layers[0].max_cache_len if isinstance(cache, StaticCache) else None))
        budget = predictor.max_new_tokens  # generate is asked for the first token only where mmllm's loop decodes
        growing_room.append((cache.layers[0].capacity, kwargs["input_ids"].shape[1] + min(budget, GROWING_ROOM))
                            if isinstance(cache.layers[0], GrowingLayer) else None)
        needed.append(kwargs["input_ids"].shape[1] + budget)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v2"),
                                    max_new_tokens=16, batch_size=4)

    def scored() -> list:  # per row: the answer, and each token's span and log-probability
        return [row for _, enc in encoded_batches(predictor, rows, policy) for row in predictor.generate_scored(enc)]

    for prefix in (False, True):
        predictor.prefix_cache, predictor.static_cache = prefix, False
        growing = scored()
        predictor.static_cache = True
        static = scored()
        assert [text for text, _ in static] == [text for text, _ in growing]
        for (_, a), (_, b) in zip(static, growing):
            assert [span[:2] for span in a] == [span[:2] for span in b]
            assert [span[2] for span in a] == pytest.approx([span[2] for span in b], abs=1e-5)
    assert len({text for text, _ in growing}) > 1  # rows with and without pictures answer differently
    # the growing path hands over a cache that grows in place, with room for the prompt and the budget
    # (with the prefix: holding it already); the static path a StaticCache
    assert [name for name, _ in caches] == ["DynamicCache", "DynamicCache", "StaticCache", "StaticCache",
                                            "DynamicCache", "DynamicCache", "StaticCache", "StaticCache"]
    # (its room: the prompt and at most GROWING_ROOM answer tokens, whatever the grammar's bound)
    assert [name == "DynamicCache" for name, _ in caches] == [room is not None for room in growing_room]
    assert all(room == want for room, want in filter(None, growing_room))
    # rounded up to 256 tokens, and never shorter than an earlier batch's (the growing calls count: they
    # are the same batches); pictures make some batches longer than others
    expected, longest = [], 0
    for (name, _), need in zip(caches, needed):
        longest = max(longest, -(-need // 256) * 256) if name == "StaticCache" else longest
        if name == "StaticCache":
            expected.append(longest)
    assert [n for _, n in caches if n is not None] == expected and all(n >= need for n, need in zip(expected, needed))


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_cache_that_grows_in_place_answers_as_generates_own(arch, loaded, padded_catalog, monkeypatch):
    """Each decoding step written into the cache in place (mmllm.models.growing_cache) gives the
    answers, spans and log-probabilities of generate's own cache (a torch.cat a step), to the bit, with
    and without the prefix cache."""
    import mmllm.models.generative as generative

    model, processor = loaded(arch)
    path, rows = padded_catalog
    policy = ImagePolicy(root=path.parent)
    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v2"),
                                    max_new_tokens=16, batch_size=4)

    def scored() -> list:
        return [row for _, enc in encoded_batches(predictor, rows, policy) for row in predictor.generate_scored(enc)]

    for prefix in (False, True):
        predictor.prefix_cache = prefix
        in_place = scored()
        with monkeypatch.context() as m:
            m.setattr(generative, "growing_cache", lambda model, capacity: None)  # generate makes its own
            appended = scored()
        assert [text for text, _ in in_place] == [text for text, _ in appended]
        assert [list(spans) for _, spans in in_place] == [list(spans) for _, spans in appended]


def test_the_static_length_is_rounded_up_and_never_shrinks(loaded):
    model, processor = loaded("qwen2_vl")
    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v2"))
    assert [predictor._static_cache_len(prompt, 16) for prompt in (240, 241, 100, 600, 300)] == [256, 512, 512, 768, 768]


def test_each_way_of_compiling_a_static_cache_reaches_generate_and_only_there(loaded, padded_catalog, monkeypatch, caplog):
    from mmllm.models.decoding import greedy_config
    from mmllm.predictor import OptionError, configure

    model, processor = loaded("qwen2_vl")
    ways = {way: greedy_config(model, [1], 0, way) for way in (None, "cudagraphs", "inductor", "eager")}
    assert [(c.compile_config.backend, c.compile_config.mode) for c in (ways["cudagraphs"], ways["inductor"])] == [
        (cuda_graphs.cudagraphs, "default"), ("inductor", "reduce-overhead")]  # cudagraphs takes no mode: "default" passes none
    assert ways["eager"].disable_compile and ways["eager"].compile_config is None
    assert ways[None].compile_config is None and not ways[None].disable_compile  # unset: False or None
    with pytest.raises(ValueError, match="one of cudagraphs, inductor, eager"):
        greedy_config(model, [1], 0, "max-autotune")
    with pytest.raises(ValueError, match="static_compile 'fast'"):
        GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v2"), static_compile="fast")

    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v2"),
                                    max_new_tokens=4, batch_size=3)
    with pytest.raises(OptionError, match="--static-compile True: one of cudagraphs, inductor, eager"):
        configure(predictor, source="m", static_cache=True)  # the way, not a flag: refused before any batch
    assert not predictor.static_cache
    configure(predictor, source="m", static_cache="inductor")
    assert predictor.static_cache and predictor.static_compile == "inductor"
    seen, original = [], type(model).generate

    def spy(self, *args, **kwargs):  # the config generate reads: the model's own, swapped for the call
        seen.append((self.generation_config.compile_config, self.generation_config.disable_compile))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    path, rows = padded_catalog
    predictor.generate(rows[:3], ImagePolicy(root=path.parent))
    # on a CPU nothing is compiled, so nothing is said to generate (a compile setting there only draws a warning)
    assert [(config, bool(off)) for config, off in seen] == [(None, False)] and "compile_config" not in caplog.text


def test_a_static_cache_that_fails_to_compile_falls_back_to_the_growing_one(loaded, padded_catalog, monkeypatch, caplog):
    from torch._dynamo.exc import TorchRuntimeError
    from transformers import StaticCache

    model, processor = loaded("qwen2_vl")
    path, rows = padded_catalog
    policy = ImagePolicy(root=path.parent)
    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v2"),
                                    max_new_tokens=8, batch_size=3, prefix_cache=False)
    growing = predictor.generate(rows, policy)
    original, calls = type(model).generate, []

    def failing_compile(self, *args, **kwargs):
        static = isinstance(kwargs.get("cache", kwargs.get("past_key_values")), StaticCache)
        calls.append(static)
        if static:
            raise TorchRuntimeError("backend='inductor' raised: no C compiler")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", failing_compile)
    predictor.static_cache = True
    assert predictor.generate(rows, policy) == growing
    assert calls == [True, False, False]  # one failure, then the growing cache for every batch
    assert not predictor.static_cache and "compiling the decoding step failed" in caplog.text

    def other_error(self, *args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(type(model), "generate", other_error)
    predictor.static_cache = True
    with pytest.raises(RuntimeError, match="out of memory"):  # anything else is the batch's own failure
        predictor.generate(rows, policy)


def test_listing_v1_shares_its_system_text_with_the_same_answers(loaded, padded_catalog, served):
    model, processor = loaded("qwen2_5_vl")
    path, rows = padded_catalog
    policy = ImagePolicy(root=path.parent)
    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v1"),
                                    max_new_tokens=12)
    assert _answers(predictor, rows, policy, 3, cached=True) == _answers(predictor, rows, policy, 3, cached=False)
    assert served == [True, True]


def test_the_prefix_is_encoded_once_per_template_and_model(loaded, padded_catalog, monkeypatch):
    model, processor = loaded("qwen2_vl")
    path, rows = padded_catalog
    policy = ImagePolicy(root=path.parent)
    built = []
    original = PrefixCache.build.__func__
    monkeypatch.setattr(PrefixCache, "build", classmethod(lambda cls, m, ids: built.append(len(ids)) or original(cls, m, ids)))
    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v2"),
                                    max_new_tokens=4, batch_size=2)
    predictor.generate(rows, policy)
    assert len(built) == 1  # three batches, one encoding
    predictor.template = PromptTemplate.load("listing_compact_v1")
    predictor.generate(rows[:2], policy)
    assert len(built) == 2 and built[1] < built[0]


def test_a_lora_model_gets_the_same_answers_from_the_cache(tiny_checkpoint, padded_catalog, served):
    folder = tiny_checkpoint("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    model = attach_lora(model, LoraSettings(rank=4, dropout=0.0)).eval()
    with torch.no_grad():  # a non-zero adapter, so the prefix's keys and values depend on it
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)
    path, rows = padded_catalog
    policy = ImagePolicy(root=path.parent)
    predictor = GenerativePredictor(model, load_processor(folder), small_schema(), PromptTemplate.load("listing_v2"),
                                    max_new_tokens=12)
    assert _answers(predictor, rows, policy, 3, cached=True) == _answers(predictor, rows, policy, 3, cached=False)
    assert served == [True, True]


def test_encoded_batches_of_another_layout_are_answered_on_the_plain_path(loaded, padded_catalog, served):
    model, processor = loaded("qwen2_vl")
    path, rows = padded_catalog
    policy = ImagePolicy(root=path.parent)
    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v2"),
                                    max_new_tokens=8)
    images = [load_listing_images(r, policy, 4) for r in rows[:2]]
    texts = [processor.apply_chat_template(build_messages(r, predictor.schema, predictor.template, n_images=len(i)),
                                           tokenize=False, add_generation_prompt=True) for r, i in zip(rows[:2], images)]
    other = processor(text=texts, images=[i for row in images for i in row] or None, padding=True,
                      padding_side="right", return_tensors="pt")
    assert predictor.generate_encoded(dict(other))  # right-padded: refused by the layout, answered anyway
    assert served == [False]


def test_placeholders_in_the_system_text_are_filled_and_checked(tmp_path):
    listing = Listing("x", "Red kite", "Flies.", {"Pieces": "1"})
    messages = build_messages(listing, small_schema(), PromptTemplate.load("listing_v2"), n_images=0)
    system = messages[0]["content"][0]["text"]
    assert "$categories" not in system and "- Outdoor > Kites" in system
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: bad\nsystem: 'Pick from $taxonomy'\nuser: 'Title: $title'\n")
    with pytest.raises(ValueError, match=r"system: unknown placeholder\(s\) \['taxonomy'\]"):
        PromptTemplate.load(bad)


def test_both_caches_decode_on_a_gpu_without_cudnns_attention_and_nothing_changes_elsewhere():
    from mmllm.models.decoding import decoding_kernels

    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    assert cudnn  # PyTorch's default: the test below would show nothing otherwise
    with decoding_kernels(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn
    with decoding_kernels(torch.device("cuda", 0)):  # entering it needs no GPU: it sets SDPA's flags
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn


@pytest.mark.parametrize("prefix", [False, True])
def test_batches_of_one_shape_reuse_one_static_cache_emptied_with_the_growing_caches_answers(loaded, padded_catalog,
                                                                                             monkeypatch, prefix):
    model, processor = loaded("qwen2_vl")
    path, rows = padded_catalog
    policy = ImagePolicy(root=path.parent)
    text_rows = [r for r in rows if not r.images] * 2  # 6 rows without pictures: batches of one shape
    predictor = GenerativePredictor(model, processor, small_schema(), PromptTemplate.load("listing_v2"),
                                    max_new_tokens=12, batch_size=3, prefix_cache=prefix)
    growing = predictor.generate(text_rows, policy)
    caches, original = [], type(model).generate

    def spy(self, *args, **kwargs):
        caches.append(kwargs.get("cache", kwargs.get("past_key_values")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    predictor.static_cache = True
    assert predictor.generate(text_rows, policy) == growing  # the second batch decodes in the first one's cache
    assert len(caches) == 2 and caches[0] is caches[1]
    predictor.batch_size = 2  # another shape: another cache
    assert predictor.generate(text_rows, policy) == growing and caches[2] is not caches[0] and caches[3] is caches[2]
