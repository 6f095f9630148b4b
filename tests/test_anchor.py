"""The name-anchored text encoder (mmllm/models/fusion/anchor.py): tuning, the members' votes, the
neighbour memory, and the model folder that carries the tuned encoder."""

from __future__ import annotations

import json

import pytest
import torch

from mmllm.models import fusion
from mmllm.models.fusion.anchor import (Anchor, AnchorConfig, TuningTask, class_starts, fingerprint, lr_factor,
                                        memory_sample, native_bf16, tune_encoder, tuned_store, tuning_precision)

from helpers import ROOT

CLASSES = ["Jigsaws & Puzzles > Jigsaws", "Games > Board Games", "Sports Toys & Outdoor > Kites",
           "Arts & Crafts > Colouring Pens & Markers"]
# the titles never name their category: tuning has to learn the mapping, the names only start it
TITLES = [("Ravensburger 1000 piece picture of a harbour at dusk", 0), ("500 pc landscape of alpine lakes", 0),
          ("Family strategy race around the world with dice and cards", 1), ("Trivia night edition, 2-6 players", 1),
          ("Delta stunt flyer with 30 m line and tail", 2), ("Rainbow octopus flyer for the beach, ripstop nylon", 2),
          ("Felt tips, 24 washable colours", 3), ("Fine liners pack, bright shades", 3)]


@pytest.fixture(scope="module")
def minilm():
    return fusion.Encoders("minilm", "none", 64, use_text=True, use_image=False)


def test_tuning_learns_the_rows_and_keeps_an_unseen_category_at_its_name(minilm):
    import copy

    encoders = copy.deepcopy(minilm)
    names = [fusion.category_name(c) for c in CLASSES] + [fusion.category_name("Dolls & Accessories > Doll Houses")]
    titles, targets = [t for t, _ in TITLES], [y for _, y in TITLES]
    before = fingerprint(encoders.text)
    frozen = encoders.sentence_vectors(names)
    counted = []

    class Count:
        def update(self, n):
            counted.append(n)

    cfg = AnchorConfig(epochs=8, lr=1e-4, class_lr=1e-2, batch_size=4)
    vectors, scale = tune_encoder(encoders, titles, targets, names, cfg, seed=0, progress=Count())
    assert sum(counted) == 8 * len(titles) and vectors.shape == (5, encoders.text_dim)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert fingerprint(encoders.text) != before and fingerprint(minilm.text) == before  # tuned in place, a copy here
    with torch.no_grad():
        z = torch.nn.functional.normalize(torch.stack([
            encoders.sentence_vectors([t])[0] for t in titles]), dim=-1)
    assert (z @ vectors.T).argmax(-1).tolist() == targets  # every training title lands on its category
    # the category without rows only ever got pushed away as a negative: still nearest its own name
    assert int((vectors[4] @ frozen.T).argmax()) == 4 and float(vectors[4] @ frozen[4]) > 0.6
    # deterministic for a seed
    again, _ = tune_encoder(copy.deepcopy(minilm), titles, targets, names, cfg, seed=0)
    assert torch.allclose(again, vectors, atol=1e-5)


# titles a reader of the names places at once: four a category, the fifth category has none
PLAIN = [("Ravensburger jigsaw puzzle, 1000 pieces", 0), ("Wooden jigsaw for children, 24 pieces", 0),
         ("Jigsaw puzzle of a map of the world", 0), ("3D jigsaw puzzle globe", 0),
         ("Monopoly board game, classic edition", 1), ("Chess and draughts board game set", 1),
         ("Scrabble word board game", 1), ("Cluedo mystery board game", 1),
         ("Stunt kite with 30 m line", 2), ("Rainbow octopus kite for the beach", 2),
         ("Delta kite for children", 2), ("Box kite, ripstop nylon", 2),
         ("Felt tip pens, 24 washable colours", 3), ("Fine liner markers for colouring", 3),
         ("Colouring pens set in a tin", 3), ("Brush markers, bright shades", 3)]

SKUS = [f"SKU-{n:08X}" for n in (0x3F9A21C0, 0x11B2C3D4, 0x9E8D7C6B, 0x5A4B3C2D, 0x77E1F0A9, 0x0C0FFEE0, 0x2B3C4D5E,
                                 0x6F7A8B9C, 0x13572468, 0x86420975, 0xABCDEF01, 0x10FEDCBA, 0x55AA55AA, 0x0F1E2D3C,
                                 0x4B5A6978, 0xC3D2E1F0)]


def starts(*args, **kwargs):
    """``class_starts``' vectors and line."""
    start = class_starts(*args, **kwargs)
    return start.vectors, start.why


def test_class_vectors_start_at_meaningful_names_and_imprint_codes(minilm, monkeypatch):
    """anchor.start: auto keeps the names where they place the training titles better than chance (answers
    independent of the category; 3 standard errors), and imprints where the taxonomy is codes and the titles
    tell the categories apart (not where they are SKUs): each class vector starts at
    the mean of its titles' vectors, a category without rows at its name. The tuning starts where it is told,
    and the tuning cache keeps the starts apart (names keeps the key it had before the setting)."""
    names = [fusion.category_name(c) for c in CLASSES] + [fusion.category_name("Dolls & Accessories > Doll Houses")]
    codes = ["C117", "C342", "C205", "C968", "C451"]
    titles, targets = [t for t, _ in PLAIN], [y for _, y in PLAIN]
    frozen_names, frozen_codes = minilm.sentence_vectors(names), minilm.sentence_vectors(codes)
    frozen_titles = torch.nn.functional.normalize(minilm.sentence_vectors(titles), dim=-1)

    start, line = starts(minilm, titles, targets, names, AnchorConfig(start="auto"))
    assert line.startswith("the category names (the names alone place") and "above" in line and "not above" not in line
    assert torch.allclose(start, torch.nn.functional.normalize(frozen_names, dim=-1), atol=1e-5)
    start, line = starts(minilm, titles, targets, codes, AnchorConfig(start="auto"))
    assert line.startswith("the mean of each category's training titles (imprinted, 1 without rows at their names; "
                           "the names alone place 0.")
    assert "not above" in line and not minilm.text.training
    for k in range(4):
        mean = torch.nn.functional.normalize(frozen_titles[4 * k:4 * k + 4].mean(0), dim=0)
        assert torch.allclose(start[k], mean, atol=1e-4)
    assert torch.allclose(start[4], torch.nn.functional.normalize(frozen_codes[4], dim=-1), atol=1e-5)
    assert "their titles' own means (each title left out) place 1.000" in line  # the codes' titles do say it
    # titles that are SKUs say nothing either: nothing to imprint, the names stay
    kept, line = starts(minilm, SKUS, targets, codes, AnchorConfig(start="auto"))
    assert line.startswith("the category names (the names alone place") and line.endswith(")")
    assert "their titles' own means (each title left out) place" in line and line.count("not above") == 2
    assert torch.allclose(kept, torch.nn.functional.normalize(frozen_codes, dim=-1), atol=1e-5)
    # forced either way
    forced, line = starts(minilm, titles, targets, names, AnchorConfig(start="imprint", reads="title"))
    assert torch.allclose(forced[:4], start[:4], atol=1e-5) and line.endswith("(imprinted, 1 without rows at their names)")
    plain, line = starts(minilm, titles, targets, codes, AnchorConfig(start="names", reads="title"))
    assert line == "the category names" and torch.allclose(plain, torch.nn.functional.normalize(frozen_codes, dim=-1),
                                                           atol=1e-5)
    # on a large catalog a seeded sample is read: CHECK_ROWS titles for the check, IMPRINT_ROWS a category
    import random

    from mmllm.models.fusion import anchor as anchor_module

    monkeypatch.setattr(anchor_module, "CHECK_ROWS", 8)
    monkeypatch.setattr(anchor_module, "IMPRINT_ROWS", 2)
    assert "of 8 training titles" in starts(minilm, titles, targets, codes, AnchorConfig(start="auto"))[1]
    capped, _ = starts(minilm, titles, targets, codes, AnchorConfig(start="imprint"))
    order = list(range(len(titles)))
    random.Random(0).shuffle(order)
    for k in range(4):
        two = [i for i in order if targets[i] == k][:2]
        assert torch.allclose(capped[k], torch.nn.functional.normalize(frozen_titles[two].sum(0), dim=0), atol=1e-4)
    monkeypatch.undo()
    # the tuning starts there: with a class learning rate of ~0 the imprinted vectors stay where they began
    import copy

    cfg = AnchorConfig(epochs=1, lr=1e-9, class_lr=1e-9, batch_size=8, start="imprint")
    vectors, _ = tune_encoder(copy.deepcopy(minilm), titles, targets, codes, cfg, seed=0, start=start)
    assert torch.allclose(vectors, start, atol=1e-4)
    key = lambda **kw: tuned_store(ROOT, "minilm", titles, targets, codes, AnchorConfig(epochs=2, **kw), 0)
    assert len({key(start="names"), key(start="auto"), key(start="imprint")}) == 3
    assert key(start="names") == key(start="names")
    with pytest.raises(ValueError, match="anchor.start must be names, imprint or auto"):
        AnchorConfig(start="prototypes")


def test_titles_that_say_nothing_are_read_with_their_descriptions(minilm):
    """anchor.reads: auto tunes on the titles unless neither the names nor the titles' own means place them
    better than chance (SKUs), and title + description do: then on those, with the text view's token limit,
    and the tuning cache keys them apart (a tuning on the titles keeps its key)."""
    names = [fusion.category_name(c) for c in CLASSES]
    plain, targets = [t for t, _ in PLAIN], [y for _, y in PLAIN]
    texts = [f"{sku}\n{words}" for sku, words in zip(SKUS, plain)]
    read = class_starts(minilm, SKUS, targets, names, AnchorConfig(), texts=texts, text_tokens=96)
    assert (read.view, read.max_tokens, read.texts) == ("text", 96, texts)
    assert read.why.startswith("the category names (the names alone place") and "of 16 training texts" in read.why
    assert "), read from title + description: the titles say nothing (the names alone place" in read.why
    assert "their titles' own means (each title left out) place" in read.why
    assert torch.allclose(read.vectors, torch.nn.functional.normalize(minilm.sentence_vectors(names), dim=-1),
                          atol=1e-5)
    # titles that say what they are stay what is read; so do SKUs without a description, and any with reads: title
    for titles, given, cfg in ((plain, [f"{t}\nMore words." for t in plain], AnchorConfig()),
                               (SKUS, [f"{sku}\n" for sku in SKUS], AnchorConfig()),
                               (SKUS, texts, AnchorConfig(reads="title"))):
        kept = class_starts(minilm, titles, targets, names, cfg, texts=given, text_tokens=96)
        assert (kept.view, kept.max_tokens, kept.texts) == ("title", cfg.max_title_tokens, titles)
    # half the titles SKUs: the names place the plain half, and clearly more of title + description: those
    many = [(f"{sku}-{k}" if i % 2 else t, y) for k in range(4) for i, ((t, y), sku) in enumerate(zip(PLAIN, SKUS))]
    described = [f"{t}\n{words}" for (t, _), (words, _) in zip(many, PLAIN * 4)]
    mixed = class_starts(minilm, [t for t, _ in many], [y for _, y in many], names, AnchorConfig(), texts=described,
                         text_tokens=96)
    assert (mixed.view, mixed.texts, mixed.titles_say_nothing) == ("text", described, False)
    assert "read from title + description: the names place +0." in mixed.why and "more of them than of the titles" \
        in mixed.why and "of 64 training titles" in mixed.why
    assert read.titles_say_nothing  # (the SKUs above)
    # forced: the texts, and with a taxonomy of codes their own means imprint
    codes = ["C117", "C342", "C205", "C968"]
    forced = class_starts(minilm, plain, targets, codes, AnchorConfig(reads="text"), texts=texts, text_tokens=96)
    assert (forced.view, forced.texts) == ("text", texts)
    assert forced.why.startswith("the mean of each category's training texts (imprinted, 0 without rows")
    frozen = torch.nn.functional.normalize(minilm.sentence_vectors(texts[:4]), dim=-1)
    assert torch.allclose(forced.vectors[0], torch.nn.functional.normalize(frozen.mean(0), dim=0), atol=1e-4)
    # the cache: the texts and their limit are the key where they are read
    key = lambda start: tuned_store(ROOT, "minilm", SKUS, targets, names, AnchorConfig(epochs=2), 0, reads=start)
    titled = class_starts(minilm, SKUS, targets, names, AnchorConfig(reads="title"), texts=texts, text_tokens=96)
    assert key(titled) == key(None) != key(read)
    assert key(read) != tuned_store(ROOT, "minilm", SKUS, targets, names, AnchorConfig(epochs=2), 0,
                                    reads=class_starts(minilm, SKUS, targets, names, AnchorConfig(), texts=texts,
                                                       text_tokens=64))
    with pytest.raises(ValueError, match="anchor.reads must be title, text or auto"):
        AnchorConfig(reads="description")


def test_the_anchor_reads_first_the_view_its_vectors_were_tuned_on(minilm):
    """The names member scores the anchor's first view: the title where the tuning read titles, the text where
    it read title + description (forced: the title view kept second); where auto found that the titles say
    nothing, no title view at all. A forced imprint embeds as it did without the check (the same vectors)."""
    import copy
    from types import SimpleNamespace

    from mmllm.catalog import Listing
    from mmllm.recipes.fusion import FusionRecipeConfig, _tune

    def listings(titles):
        return [Listing(id=str(i), title=t, description=f"{words}, more words about it.",
                        label={"category": CLASSES[y]}) for i, (t, (words, y)) in enumerate(zip(titles, PLAIN))]

    plain, skus = listings([t for t, _ in PLAIN]), listings(SKUS)
    for rows, reads, views in ((plain, "auto", ["title", "text"]), (plain, "text", ["text", "title"]),
                               (skus, "auto", ["text"]), (skus, "title", ["title", "text"])):
        setup = SimpleNamespace(train_rows=rows, schema=None, accelerator=SimpleNamespace(is_main_process=True))
        cfg = FusionRecipeConfig(anchor=AnchorConfig(reads=reads, epochs=1, batch_size=8))
        anchor, _ = _tune(setup, copy.deepcopy(minilm), CLASSES, cfg, None, {})
        assert anchor.views == views, (reads, views)
    titles, targets = [t for t, _ in PLAIN], [y for _, y in PLAIN]
    checked = class_starts(minilm, titles, targets, CLASSES, AnchorConfig(start="imprint"))
    unchecked = class_starts(minilm, titles, targets, CLASSES, AnchorConfig(start="imprint", reads="title"))
    assert torch.equal(checked.vectors, unchecked.vectors) and "the names alone place" in checked.why


def test_bf16_tuning_learns_the_rows_with_float32_weights_and_keys_apart(minilm):
    """anchor.precision: bfloat16 runs the tuning's forward passes under bf16 autocast: the encoder's
    weights stay float32 and learn the rows all the same, the result differs from float32's, and the
    tuning cache keeps the two apart (float32, the default, keeps the key it had without the setting)."""
    import copy

    names = [fusion.category_name(c) for c in CLASSES]
    titles, targets = [t for t, _ in TITLES], [y for _, y in TITLES]
    results = {}
    for precision in ("float32", "bfloat16"):
        encoders = copy.deepcopy(minilm)
        cfg = AnchorConfig(epochs=8, lr=1e-4, class_lr=1e-2, batch_size=4, precision=precision)
        vectors, _ = tune_encoder(encoders, titles, targets, names, cfg, seed=0)
        assert all(p.dtype == torch.float32 for p in encoders.text.parameters()) and vectors.dtype == torch.float32
        with torch.no_grad():
            z = torch.nn.functional.normalize(torch.stack([encoders.sentence_vectors([t])[0] for t in titles]), dim=-1)
        assert (z @ vectors.T).argmax(-1).tolist() == targets
        results[precision] = vectors
    assert not torch.equal(results["float32"], results["bfloat16"])
    key = lambda **kw: tuned_store(ROOT, "minilm", titles, targets, names, AnchorConfig(epochs=2, **kw), 0)
    assert key(precision="float32") == key() != key(precision="bfloat16")
    # the optimizer the device tunes with: fused on a CPU (the key of stores tuned before), not on a GPU
    on = lambda device: tuned_store(ROOT, "minilm", titles, targets, names, AnchorConfig(epochs=2), 0,
                                    device=torch.device(device))
    assert on("cpu") == key() != on("cuda")
    with pytest.raises(ValueError, match="anchor.precision"):
        AnchorConfig(precision="float16")
    # auto: the precision this machine computes natively, and the key of the precision it resolves to
    resolved = tuning_precision(AnchorConfig(precision="auto"), torch.device("cpu"))
    assert resolved == ("bfloat16" if native_bf16(torch.device("cpu")) else "float32")
    assert key(precision="auto") == key(precision=resolved)


@pytest.mark.parametrize("cpuinfo, native", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n", True),
    ("flags\t\t: fpu sse2 avx2 avx512f amx_bf16\n", True),
    ("flags\t\t: fpu sse2 avx2 avx512f avx512bw\n", False),       # AVX-512 without BF16: emulated, slower
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm with the BF16 extension
    ("Features\t: fp asimd crc32\n", False),
    ("", False),
])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(cpuinfo, native):
    assert native_bf16(torch.device("cpu"), cpuinfo) is native
    assert native_bf16(torch.device("meta"), cpuinfo) is False


def test_linear_schedule_warms_up_then_decays_to_zero():
    constant = AnchorConfig(epochs=1)
    assert [lr_factor(constant, k, 20) for k in (0, 10, 19)] == [1.0, 1.0, 1.0]
    linear = AnchorConfig(epochs=1, schedule="linear", warmup=0.1)  # 2 warm-up steps of 20
    factors = [lr_factor(linear, k, 20) for k in range(20)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[2:] == pytest.approx([(20 - k) / 18 for k in range(2, 20)])  # 1.0 down to 1/18, then 0
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    no_warmup = AnchorConfig(epochs=1, schedule="linear", warmup=0.0)
    assert lr_factor(no_warmup, 0, 10) == 1.0 and lr_factor(no_warmup, 9, 10) == pytest.approx(0.1)


def test_averaging_keeps_the_mean_of_the_last_steps_weights(minilm):
    import copy

    names = [fusion.category_name(c) for c in CLASSES]
    titles, targets = [t for t, _ in TITLES], [y for _, y in TITLES]
    encoders = copy.deepcopy(minilm)
    weight = next(p for p in encoders.text.parameters() if p.requires_grad)
    seen = []

    class Snapshot:  # called after each step (and after the running mean is updated, before it is copied back)
        def update(self, n):
            seen.append(weight.detach().clone())

    cfg = AnchorConfig(epochs=2, lr=1e-4, class_lr=1e-2, batch_size=4, average=0.5)  # 4 steps, the last 2 averaged
    tune_encoder(encoders, titles, targets, names, cfg, seed=0, progress=Snapshot())
    assert len(seen) == 4 and not torch.equal(seen[2], seen[3])
    assert torch.allclose(weight, (seen[2] + seen[3]) / 2, atol=1e-7)
    plain = copy.deepcopy(minilm)
    tune_encoder(plain, titles, targets, names, AnchorConfig(epochs=2, lr=1e-4, class_lr=1e-2, batch_size=4), seed=0)
    last = next(p for p in plain.text.parameters() if p.requires_grad)
    assert torch.allclose(last, seen[3], atol=1e-6)  # the same path; without averaging the last step is kept
    # a stored tuning is keyed by its schedule and averaging; the defaults keep the keys stored before them
    key = lambda **kw: tuned_store(ROOT, "minilm", titles, targets, names, AnchorConfig(epochs=2, **kw), 0)
    assert len({key(), key(average=0.5), key(schedule="linear")}) == 3
    assert key() == key(warmup=0.3)  # the warm-up acts only under the linear schedule


# an enum attribute across the categories: the maker, named in none of the titles but in its value's name
MAKERS = ["Acme Toys", "Zenith Games"]
MAKER_OF = [0, 1, 1, -100, 0, 1, 0, -100]  # -100: the row states no maker


def test_attribute_tasks_are_learned_beside_the_category_and_change_nothing_at_weight_zero(minilm):
    import copy

    names = [fusion.category_name(c) for c in CLASSES]
    titles, targets = [t for t, _ in TITLES], [y for _, y in TITLES]
    task = TuningTask("maker", [f"{m} (maker)" for m in MAKERS], MAKER_OF)
    cfg = AnchorConfig(epochs=6, lr=1e-4, class_lr=1e-2, batch_size=4)
    plain, with_task_off = copy.deepcopy(minilm), copy.deepcopy(minilm)
    v_plain, s_plain = tune_encoder(plain, titles, targets, names, cfg, seed=0)
    v_off, s_off = tune_encoder(with_task_off, titles, targets, names, cfg, seed=0, tasks=[task])
    assert torch.equal(v_plain, v_off) and s_plain == s_off  # attribute_weight 0: the task is not trained
    assert fingerprint(plain.text) == fingerprint(with_task_off.text)

    def maker_margin(encoders):  # how far apart the two makers' titles sit, against titles of the other maker
        with torch.no_grad():
            z = torch.nn.functional.normalize(encoders.sentence_vectors(titles), dim=-1)
        known = [i for i, m in enumerate(MAKER_OF) if m >= 0]
        same = [float(z[i] @ z[j]) for i in known for j in known if i < j and MAKER_OF[i] == MAKER_OF[j]
                and targets[i] != targets[j]]
        other = [float(z[i] @ z[j]) for i in known for j in known if i < j and MAKER_OF[i] != MAKER_OF[j]
                 and targets[i] != targets[j]]
        return sum(same) / len(same) - sum(other) / len(other)

    tasked = copy.deepcopy(minilm)
    cfg_on = AnchorConfig(epochs=6, lr=1e-4, class_lr=1e-2, batch_size=4, attribute_weight=1.0)
    v_on, _ = tune_encoder(tasked, titles, targets, names, cfg_on, seed=0, tasks=[task])
    assert fingerprint(tasked.text) != fingerprint(plain.text)
    # the tuned titles of one maker move together across categories; the category is still learned
    assert maker_margin(tasked) > maker_margin(plain) + 0.02
    with torch.no_grad():
        z = torch.nn.functional.normalize(tasked.sentence_vectors(titles), dim=-1)
    assert (z @ v_on.T).argmax(-1).tolist() == targets
    # a stored tuning is keyed by its tasks only when they are trained
    key = lambda c, tasks: tuned_store(ROOT, "minilm", titles, targets, names, c, 0, tasks)
    assert key(cfg, [task]) == key(cfg, [])
    changed = TuningTask("maker", task.value_names, [0] * len(titles))
    assert len({key(cfg_on, []), key(cfg_on, [task]), key(cfg_on, [changed])}) == 3
    assert key(cfg_on, []) == key(cfg, [])
    with pytest.raises(ValueError, match="anchor.attribute_weight must be >= 0"):
        AnchorConfig(attribute_weight=-1.0)


def test_tuning_tasks_hold_out_the_rows_the_vote_scores():
    from types import SimpleNamespace

    from mmllm.finetune import load_recipe_config
    from mmllm.models.fusion.vote import holdout_split
    from mmllm.recipes.fusion import _tuning_tasks
    from mmllm.schema import LabelSchema

    schema = LabelSchema.from_dict({"name": "t", "taxonomy": ["A", "B"], "attributes": {
        "maker": {"type": "enum", "values": ["Acme", "Zenith"], "description": "who makes it"},
        "batteries": {"type": "boolean", "description": "needs batteries"}}})
    golds = ["Acme", "Zenith", None, "Other", "Zenith"] * 8
    rows = [SimpleNamespace(id=f"row{i}", label={"category": "A", "attributes": {"maker": g} if g else {}})
            for i, g in enumerate(golds)]
    cfg = load_recipe_config(ROOT / "finetune" / "fusion_minilm_cpu.yaml", ["anchor.attribute_weight=1.0"])
    (task,) = _tuning_tasks(schema, rows, cfg)  # the boolean is not a task: its value names mean nothing
    assert task.name == "maker" and task.value_names == ["Acme (maker)", "Zenith (maker)"]
    _, held = holdout_split([r.id for r in rows], cfg.vote.holdout)
    assert held and len(held) < len(rows)
    expected = [-100 if i in held or g not in ("Acme", "Zenith") else ["Acme", "Zenith"].index(g)
                for i, g in enumerate(golds)]
    assert task.targets == expected and any(t >= 0 for t in expected)
    cfg_equal = load_recipe_config(ROOT / "finetune" / "fusion_minilm_cpu.yaml",
                                   ["anchor.attribute_weight=1.0", "vote.weights=equal"])
    (every,) = _tuning_tasks(schema, rows, cfg_equal)  # no held-out fit: every row that states a maker is read
    assert sum(t >= 0 for t in every.targets) == sum(g in ("Acme", "Zenith") for g in golds)


def _anchor(members=("heads", "names", "neighbours"), k=2):
    cfg = AnchorConfig(epochs=1, members=list(members), neighbours=k, neighbour_temperature=0.05)
    anchor = Anchor(cfg, classes=3, dim=2, memory_rows=4, views=["title", "text"])
    anchor.class_vectors.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    anchor.scale.fill_(10.0)
    # memory rows: [title | text] unit vectors; two of class 2 near (0.6, 0.8), one of class 0, one of class 1
    rows = torch.tensor([[0.6, 0.8, 0.6, 0.8], [0.8, 0.6, 0.8, 0.6], [1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    anchor.memory.copy_(rows)
    anchor.memory_labels.copy_(torch.tensor([2, 2, 0, 1]))
    return anchor


def _views(title, text):
    one = torch.ones(1, 1, dtype=torch.long)
    return {"title": (torch.tensor([[title]]), one), "text": (torch.tensor([[text]]), one)}


def test_members_vote_and_mix_is_the_log_of_their_mean():
    anchor = _anchor()
    views = _views([0.7, 0.7], [0.7, 0.7])  # unnormalized on purpose: the anchor normalizes
    heads = torch.tensor([[0.0, 0.0, 0.0]])
    votes = anchor.members(heads, views)
    assert set(votes) == {"heads", "names", "neighbours"}
    for p in votes.values():
        assert torch.allclose(p.sum(-1), torch.ones(1), atol=1e-6)
    assert torch.allclose(votes["heads"], torch.full((1, 3), 1 / 3))
    # names: cos to (1,0) and (0,1) equal, (-1,0) far
    names = votes["names"][0].tolist()
    assert names[0] == pytest.approx(names[1], abs=1e-6) and names[2] < 1e-4
    # neighbours: the two nearest memory rows are both class 2
    assert votes["neighbours"][0].tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-6)
    mixed = anchor.mix(heads, views)
    mean = torch.stack(list(votes.values())).mean(0)
    assert torch.allclose(torch.softmax(mixed, -1), mean, atol=1e-6)
    only_heads = _anchor(members=("heads",)).mix(heads, views)
    assert torch.allclose(torch.softmax(only_heads, -1), votes["heads"], atol=1e-6)


def test_reference_rows_move_the_check_and_never_the_answer():
    """``Anchor.check``: the reference rows join the neighbours for the confidence only; the answer's mixture
    (``mix``) is the same with or without them, and a folder's settings say how many there are."""
    plain = _anchor()
    assert plain.check(torch.zeros(1, 3), _views([0.7, 0.7], [0.7, 0.7])) is None  # no reference rows
    assert "reference" not in plain.state_dict() and plain.settings()["reference_size"] == 0
    anchor = _anchor(k=3)
    anchor.reference = torch.tensor([[0.7071, 0.7071, 0.7071, 0.7071]] * 3, dtype=torch.float16)  # class 0, 3 rows
    anchor.reference_labels = torch.tensor([0, 0, 0])
    anchor.reference_keys = torch.tensor([11, 12, 13])
    views, heads = _views([0.7, 0.7], [0.7, 0.7]), torch.zeros(1, 3)
    assert torch.equal(anchor.mix(heads, views), _anchor(k=3).mix(heads, views))  # the answer ignores them
    check = torch.softmax(anchor.check(heads, views), -1)[0]
    mixed = torch.softmax(anchor.mix(heads, views), -1)[0]
    # the three nearest rows are now the reference rows (cosine 1): the neighbours vote class 0, not class 2
    assert check[0] > mixed[0] + 0.25 and check[2] < mixed[2] - 0.25
    assert check.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert anchor.settings()["reference_size"] == 3
    assert {"reference", "reference_labels", "reference_keys"} <= set(anchor.state_dict())
    # a row that is itself a reference row (its id among the reference keys) is not its own neighbour
    anchor.reference_keys = torch.tensor([11, 12, 13])
    same = torch.softmax(anchor.check(heads, views, keys=torch.tensor([99])), -1)[0]
    assert torch.allclose(same, check)  # another id: every reference row counts
    itself = torch.softmax(anchor.check(heads, views, keys=torch.tensor([12])), -1)[0]
    assert itself[0] < check[0] - 0.05  # one of the three class-0 rows left out: the vote for class 0 shrinks
    without = _anchor(members=("heads", "names"))
    without.reference, without.reference_labels = anchor.reference, anchor.reference_labels
    assert without.check(heads, views) is None  # no neighbours member: nothing reads them


def test_anchor_config_is_checked():
    with pytest.raises(ValueError, match="anchor.members must include heads"):
        AnchorConfig(members=["names"])
    with pytest.raises(ValueError, match="anchor.members"):
        AnchorConfig(members=["heads", "votes"])
    with pytest.raises(ValueError, match="anchor.epochs must be >= 0"):
        AnchorConfig(epochs=-1)
    with pytest.raises(ValueError, match="anchor.average must be in"):
        AnchorConfig(average=1.0)
    with pytest.raises(ValueError, match="anchor.warmup must be in"):
        AnchorConfig(warmup=-0.1)
    from mmllm.finetune import load_recipe_config

    with pytest.raises(ValueError, match="needs fusion.freeze: true"):
        load_recipe_config(ROOT / "finetune/fusion_minilm_cpu.yaml", ["fusion.freeze=false"])


def test_memory_sample_is_stratified_and_bounded():
    targets = [0] * 90 + [1] * 9 + [2]
    assert memory_sample(targets, 1000, seed=0) == list(range(100))
    kept = memory_sample(targets, 20, seed=0)
    assert len(kept) <= 20 and len(set(kept)) == len(kept)
    classes = [targets[i] for i in kept]
    assert classes.count(2) == 1 and classes.count(1) >= 1 and classes.count(0) >= 15
    assert kept == memory_sample(targets, 20, seed=0)
    assert len(kept) == 20  # the limit is used, not left short
    # the limit leaves room for every class: none is dropped (a proportional sample cut at the limit dropped
    # the classes seen last: 202 of 502 kept here, and class 2 of [0] * 10 + [1] + [2] at a limit of 3)
    three = [0] * 10 + [1] + [2]
    assert sorted(three[i] for i in memory_sample(three, 3, seed=0)) == [0, 1, 2]
    skewed = [0] * 1000 + [1] * 1000 + list(range(2, 502))
    kept = memory_sample(skewed, 1000, seed=0)
    assert len(kept) == 1000 and len({skewed[i] for i in kept}) == 502
    assert [skewed[i] for i in kept].count(0) == [skewed[i] for i in kept].count(1) == 250  # in proportion
    few = memory_sample(list(range(10)) * 3, 5, seed=0)  # more classes than the limit: one row each of five
    assert len(few) == 5 and len({i % 10 for i in few}) == 5


@pytest.mark.slow
def test_anchored_fusion_folder_carries_the_tuned_encoder(tmp_path, capsys):
    """The default recipe with the anchor: the tuned encoder is saved as safetensors in the folder,
    a fresh load predicts exactly what the trained model predicts, and the members vote. With a shared
    cache (fusion.cache_dir), a second run into another folder reads the tuning instead of redoing it."""
    from mmllm.catalog import iter_catalog
    from mmllm.finetune import finetune, load_recipe_config
    from mmllm.images import ImagePolicy
    from listings import load_model_dir

    out = tmp_path / "model"
    settings = ["data.max_train_rows=48", "data.max_dev_rows=12", "train.epochs=2", "train.batch_size=16",
                "fusion.max_text_tokens=48", "eval.loss_rows=12", "anchor.epochs=2", "grounding.enabled=false",
                f"fusion.cache_dir={tmp_path / 'cache'}", "lexicon.enabled=true", "vote.min_rows=3",
                # the reference rows: the training file's rows past the 48 trained on (the 48 are left out)
                f"anchor.reference=[{ROOT / 'examples/amazon_uk_toys/train.jsonl'}]"]
    cfg = load_recipe_config(ROOT / "finetune" / "fusion_minilm_cpu.yaml", [f"train.output_dir={out}", *settings])
    finetune(cfg)
    first = capsys.readouterr().out
    train_rows = list(iter_catalog(str(ROOT / "examples/amazon_uk_toys/train.jsonl")))
    assert f"reference rows: {len(train_rows) - 48} read for the answers' confidence (48 left out" in first
    assert "text encoder tuned on 48 titles x 2 epochs, the class vectors starting at the category names (the " \
           "names alone place" in first and "lexical member fitted" in first
    assert "vote: choosing the weights of heads, lexicon, neighbours on" in first
    assert not (out / "vote_holdout").exists()  # the side fit leaves nothing in the folder
    stores = [p for p in (tmp_path / "cache" / "tuned").iterdir()]
    assert len(stores) == 1 and {f.name for f in stores[0].iterdir()} == {"encoder.safetensors", "anchor.safetensors"}
    saved = json.loads((out / "fusion.json").read_text())
    assert saved["fusion"]["text_encoder"] == "text_encoder" and saved["anchor"]["memory_size"] == 48
    assert saved["anchor"]["members"] == ["heads", "names", "neighbours"]
    assert (out / "text_encoder" / "model.safetensors").is_file()
    # the lexical member: its vocabulary beside the weights, one regression per head that has two classes
    assert (out / "lexicon.json").is_file() and "category" in saved["lexicon"]
    assert not list((out / "text_encoder").glob("*.bin"))
    rows = list(iter_catalog(str(ROOT / "examples/amazon_uk_toys/dev.jsonl")))[:6]
    predictor = load_model_dir(out, device="cpu")
    inner = getattr(predictor, "inner", predictor)
    assert inner.model.anchor is not None and fingerprint(inner.featurizer.encoders.text) != fingerprint(
        fusion.Encoders("minilm", "none", 48, use_image=False).text)
    enc = inner.encode(rows, [[] for _ in rows])
    with torch.no_grad():
        views = inner.model.text_views(enc)
        votes = inner.model.anchor.members(torch.zeros(len(rows), len(inner.model.specs[0].classes)), views)
    assert set(votes) == {"heads", "names", "neighbours"}
    assert inner.model.lexicon is not None and "lexicon_ids" in enc  # it votes too (FusionModel.forward)
    lexical = inner.model.lexicon(enc["lexicon_ids"], enc["lexicon_weights"])
    assert lexical["category"].shape == (len(rows), len(inner.model.specs[0].classes))
    # the vote's per-head weights, chosen on held-out training rows, travel in fusion.json
    vote = saved["vote"]
    voting = [h["name"] for h in saved["heads"][1:] if h["kind"] == "softmax" and h["classes"]]
    assert vote["members"] == ["heads", "lexicon", "neighbours"] and vote["weights"]
    assert set(vote["weights"]) <= set(voting) and set(vote["held_out"]) == set(vote["weights"])
    for weights in vote["weights"].values():
        assert set(weights) == {"heads", "lexicon", "neighbours"} and sum(weights.values()) == pytest.approx(1.0)
    model = inner.model
    assert model.vote_weights == vote["weights"] and list(model.anchor.attribute_classes) == voting
    # the abstaining heads' lexical regressions are hurdles, and load as such
    assert saved["lexicon_hurdle"] and set(saved["lexicon_hurdle"]) <= set(voting)
    assert model.lexicon.hurdle == saved["lexicon_hurdle"]
    assert (model.anchor.memory_targets >= 0).all()  # every memory row has a class (or <not stated>) per head
    name = next(n for n in voting if n in model.lexicon.names)
    with torch.no_grad():  # all the weight on one member: the head answers that member's distribution
        lexical = torch.softmax(model.lexicon(enc["lexicon_ids"], enc["lexicon_weights"])[name].float(), -1)
        for member, expected in (("lexicon", lexical), ("heads", None)):
            model.vote_weights = {name: {"heads": 0.0, "lexicon": 0.0, "neighbours": 0.0, member: 1.0}}
            logits = model(**enc)
            if expected is None:  # the head itself, over the fused features (eval mode: no dropout)
                expected = torch.softmax(model.heads[name](model.fused(enc)).float(), -1)
            assert torch.allclose(torch.softmax(logits[name].float(), -1), expected, atol=1e-5)
        model.vote_weights = vote["weights"]
    records = predictor.predict(rows, ImagePolicy(root=ROOT))
    assert [r["id"] for r in records] == [r.id for r in rows] and rows
    assert all(r["status"] == "ok" for r in records)
    again = load_model_dir(out, device="cpu").predict(rows, ImagePolicy(root=ROOT))
    assert [r["top_k"] for r in again] == [r["top_k"] for r in records]
    assert [r["confidence"] for r in again] == [r["confidence"] for r in records]
    # the reference rows travel in the folder; each answer's confidence is its probability under the check
    assert saved["anchor"]["reference_size"] == len(train_rows) - 48 == model.anchor.reference.shape[0]
    assert saved["check_temperature"] > 0 and model.check_temperature == saved["check_temperature"]
    with torch.no_grad():
        logits = model(**enc)
    check = torch.softmax(logits["category_check"].float() / model.check_temperature, -1)
    classes = model.specs[0].classes
    assert [r["confidence"] for r in records] == [round(float(check[i, classes.index(r["category"])]), 6)
                                                  for i, r in enumerate(records)]
    assert [r["category"] for r in records] == [classes[i] for i in logits["category"].argmax(-1).tolist()]
    assert any(abs(r["confidence"] - r["top_k"][0]["score"]) > 1e-3 for r in records)  # not the answer's own
    # each reference vector sits beside its own label (encoded sorted by length, put back in the rows' order)
    dev_rows = list(iter_catalog(str(ROOT / "examples/amazon_uk_toys/dev.jsonl")))[:12]  # data.max_dev_rows
    titles = {" ".join(r.title.lower().split()) for r in dev_rows}
    some = [r for r in train_rows[48:] if " ".join(r.title.lower().split()) not in titles][::97]
    some_enc = inner.encode(some, [[] for _ in some])
    with torch.no_grad():
        vectors = Anchor.row_vectors(model.text_views(some_enc), model.anchor.views)
    sims = vectors @ model.anchor.reference.float().T / len(model.anchor.views)
    best, at = sims.max(-1)
    assert len(some) >= 5 and (best > 0.99).all()
    assert [classes[i] for i in model.anchor.reference_labels[at].tolist()] == [r.label["category"] for r in some]
    # labelling reference rows themselves: each leaves itself out of its own check (found by its id)
    assert "row_key" in some_enc
    with torch.no_grad():
        found = model(**some_enc)
        blind = model(**{k: v for k, v in some_enc.items() if k != "row_key"})
    answers = found["category"].argmax(-1)[:, None]
    kept = torch.softmax(found["category_check"].float() / model.check_temperature, -1).gather(1, answers)[:, 0]
    seen = torch.softmax(blind["category_check"].float() / model.check_temperature, -1).gather(1, answers)[:, 0]
    assert [r["confidence"] for r in predictor.predict(some, ImagePolicy(root=ROOT))] == [
        round(float(c), 6) for c in kept]
    assert (seen - kept).abs().max() > 1e-3  # its own label would have vouched for its answer
    # a folder written before the reference rows' ids were kept (2026-12-06) still loads; no row leaves itself out
    import shutil

    from safetensors.torch import load_file, save_file
    older = tmp_path / "older"
    shutil.copytree(out, older)
    state = load_file(str(older / "fusion.safetensors"))
    del state["anchor.reference_keys"]
    save_file(state, str(older / "fusion.safetensors"))
    assert [r["confidence"] for r in load_model_dir(older, device="cpu").predict(some, ImagePolicy(root=ROOT))] == [
        round(float(c), 6) for c in seen]
    # a rerun with the same data, tuning settings and seed (another head setting, another folder): read, not tuned
    capsys.readouterr()
    second = tmp_path / "second"
    finetune(load_recipe_config(ROOT / "finetune" / "fusion_minilm_cpu.yaml",
                                [f"train.output_dir={second}", *settings, "anchor.neighbours=5"]))
    captured = capsys.readouterr()
    assert "text encoder read from the tuning cache" in captured.out and "lexical member read from the cache" in captured.out
    assert "tune text encoder" not in captured.out + captured.err
    assert "encoder features: 0 computed" in captured.out  # the tuned weights are the same: so are their features
    reread = load_model_dir(second, device="cpu")
    assert fingerprint(getattr(reread, "inner", reread).featurizer.encoders.text) == fingerprint(
        inner.featurizer.encoders.text)
    # only the neighbours read the reference rows: without them the run says so and keeps none
    third = tmp_path / "third"
    finetune(load_recipe_config(ROOT / "finetune" / "fusion_minilm_cpu.yaml",
                                [f"train.output_dir={third}", *settings, "anchor.members=[heads,names]"]))
    assert "anchor.reference: not read (anchor.members has no neighbours" in capsys.readouterr().out
    assert json.loads((third / "fusion.json").read_text())["anchor"]["reference_size"] == 0


@pytest.mark.slow
def test_a_catalog_of_sku_titles_is_tuned_on_its_descriptions(tmp_path, capsys):
    """The default recipe on listings whose titles are SKUs: the tuning reads title + description (the titles
    say nothing; the descriptions do), the log says so, the model keeps no title view (the folder says so and
    loads that way), and a rerun reads that tuning from the cache."""
    from mmllm.catalog import iter_catalog
    from mmllm.finetune import finetune, load_recipe_config
    from mmllm.images import ImagePolicy
    from listings import load_model_dir

    rows = [json.loads(line) for line in (ROOT / "examples/amazon_uk_toys/train.jsonl").open(encoding="utf-8")]
    rows = [r for r in rows if r.get("description")][:60]
    for i, row in enumerate(rows):
        row["title"] = f"SKU-{0x3F9A21C0 + 7919 * i:08X}"
    (tmp_path / "sku.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    settings = [f"data.train={tmp_path / 'sku.jsonl'}", "data.max_train_rows=48", "data.max_dev_rows=12",
                "train.epochs=1", "train.batch_size=16", "fusion.max_text_tokens=48", "eval.loss_rows=12",
                "anchor.epochs=1", "grounding.enabled=false", f"fusion.cache_dir={tmp_path / 'cache'}",
                "anchor.reference=[]", "vote.weights=equal"]
    config = ROOT / "finetune" / "fusion_minilm_cpu.yaml"
    finetune(load_recipe_config(config, [f"train.output_dir={tmp_path / 'first'}", *settings]))
    first = capsys.readouterr().out
    line = next(x for x in first.splitlines() if x.startswith("text encoder tuned on"))
    assert line.startswith("text encoder tuned on 48 titles and descriptions x 1 epochs, the class vectors starting at "
                           "the category names (the names alone place ")
    assert " of 48 training texts" in line and "read from title + description: the titles say nothing (" in line
    assert "their titles' own means (each title left out) place" in line and line.count("not above") == 2
    assert "fusion.title_view: off, the titles say nothing" in first
    saved = json.loads((tmp_path / "first" / "fusion.json").read_text())
    assert saved["fusion"]["title_view"] is False and saved["anchor"]["views"] == ["text"]
    predictor = load_model_dir(tmp_path / "first", device="cpu")
    inner = getattr(predictor, "inner", predictor)
    assert inner.model.anchor.views == ["text"] and not inner.model.cfg.title_view
    dev = list(iter_catalog(str(ROOT / "examples/amazon_uk_toys/dev.jsonl")))[:4]
    encoded = inner.encode(dev, [[] for _ in dev])
    assert "text_tokens" in encoded and not [k for k in encoded if k.startswith("title")]
    assert [r["status"] for r in predictor.predict(dev, ImagePolicy(root=ROOT))] == ["ok"] * 4
    finetune(load_recipe_config(config, [f"train.output_dir={tmp_path / 'second'}", *settings]))
    second = capsys.readouterr().out
    assert "text encoder read from the tuning cache (tuned on 48 titles and descriptions)" in second
    assert "encoder features: 0 computed" in second  # the same tuned weights, so the same features
    assert len(list((tmp_path / "cache" / "tuned").iterdir())) == 1


def test_two_runs_sharing_the_cache_publish_one_entry_and_a_stopped_write_leaves_none(tmp_path):
    """Both staged a tuning (or a lexical fit) under one `<key>.partial` and renamed it onto the key: the second
    to finish crashed after all its work (OSError: Directory not empty) and left its part in the shared cache."""
    import pytest

    from mmllm.models.fusion.encoders import publish_folder

    store = tmp_path / "tuned" / "abc"

    def ours(folder):
        (folder / "weights").write_text("ours")
        publish_folder(store, lambda other: (other / "weights").write_text("theirs"))  # the other run, first

    publish_folder(store, ours)  # publishing the same key second: no error, the first copy kept
    assert (store / "weights").read_text() == "theirs"
    assert sorted(p.name for p in store.parent.iterdir()) == ["abc"]

    def stopped(folder):
        (folder / "weights").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_folder(tmp_path / "tuned" / "def", stopped)
    assert sorted(p.name for p in store.parent.iterdir()) == ["abc"]
    # a killed run's staging folder (hours old) goes when the key is published; a live writer's stays
    import os
    import time

    (store.parent / "ghi.partial-dead").mkdir()
    (store.parent / "ghi.partial-live").mkdir()
    hours_ago = time.time() - 7 * 3600
    os.utime(store.parent / "ghi.partial-dead", (hours_ago, hours_ago))
    publish_folder(store.parent / "ghi", lambda folder: (folder / "weights").write_text("x"))
    assert sorted(p.name for p in store.parent.iterdir()) == ["abc", "ghi", "ghi.partial-live"]
