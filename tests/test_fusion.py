"""The fusion model: modules, masking, attention weights, feature cache, save -> load, schema."""

from __future__ import annotations

import json

import pytest
import torch

from mmllm.catalog import Listing
from mmllm.models import fusion, heads
from mmllm.schema import LabelSchema

from helpers import ROOT, TOYS_SCHEMA, reload_in_fresh_process

H = 16


def _inputs(b: int = 3, present: tuple[bool, ...] = (True, True, True)):
    torch.manual_seed(0)
    tokens = [torch.randn(b, t, H) for t in (5, 4, 3)]
    masks = [torch.ones(b, t, dtype=torch.long) * int(p) for t, p in zip((5, 4, 3), present)]
    return tokens, masks


@pytest.mark.parametrize("method", ["concat", "attention", "coattention"])
def test_fusion_shapes_and_missing_modalities(method):
    module = fusion.FUSIONS[method](3, H, 0.0)
    module.eval()
    tokens, masks = _inputs()
    masks[1][0] = 0  # row 0 has no image
    out, weights = module(tokens, masks)
    assert out.shape == (3, module.out_dim) and torch.isfinite(out).all()
    # a missing modality's features must not matter
    changed = [t.clone() for t in tokens]
    changed[1][0] = 1000.0
    out2, _ = module(changed, masks)
    assert torch.allclose(out[0], out2[0], atol=1e-5)
    if method == "attention":
        assert weights.shape == (3, 3)
        assert torch.allclose(weights.sum(-1), torch.ones(3))
        assert weights[0, 1] == 0
    # only one modality present: still finite
    tokens, masks = _inputs(present=(True, False, False))
    out, _ = module(tokens, masks)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("informative", [0, 1])
def test_attention_weights_follow_the_informative_modality(informative):
    """Only one modality carries the label (the text in one run, the image in the other): after
    training, that one gets most of the weight."""
    torch.manual_seed(0)
    n = 256
    y = torch.randint(0, 2, (n,))
    tokens = [torch.randn(n, 2, H) for _ in range(3)]
    tokens[informative][:, :, 0] += (y.float() * 2 - 1).unsqueeze(-1) * 3
    masks = [torch.ones(n, 2, dtype=torch.long) for _ in range(3)]
    module = fusion.AttentionFusion(3, H, 0.0)
    head = torch.nn.Linear(H, 2)
    opt = torch.optim.Adam([*module.parameters(), *head.parameters()], lr=0.01)
    for _ in range(200):
        out, _ = module(tokens, masks)
        loss = torch.nn.functional.cross_entropy(head(out), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, weights = module(tokens, masks)
    assert torch.allclose(weights.sum(-1), torch.ones(n), atol=1e-5)
    assert weights.mean(0)[informative] > 0.6, weights.mean(0)


def test_attribute_tokens_by_value_type():
    table = {"Pieces": "1,000 pcs", "Batteries Included": "No", "Remote": True, "Brand": "Hasbro",
             "Colour": ["red", "blue"], "Item model number": "B7407AS0", "age": 3}
    names, values, feats = fusion.attribute_tokens(table, 64, 10)
    assert len(names) == 8 and all(0 < v < 64 for v in names)  # the list gives two tokens
    log1000 = torch.log1p(torch.tensor(1000.0)).item()
    assert feats[0][:2] == pytest.approx([log1000, 1.0]) and values[0] == 0  # a number, no value bucket
    assert feats[1] == [0.0, 0.0, 0.0, 1.0] and feats[2] == [0.0, 0.0, 1.0, 1.0]  # yes/no and a real bool
    assert values[3] > 0 and feats[3] == [0.0, 0.0, 0.0, 0.0]  # a short word value: its own bucket
    assert values[4] > 0 and values[5] > 0 and values[4] != values[5]  # each list item a token
    assert values[6] == 0  # a code is not memorized as a category
    assert values[7] == 0 and feats[7][:2] == pytest.approx([torch.log1p(torch.tensor(3.0)).item(), 1.0])
    assert fusion.attribute_tokens({}, 64, 10) == ([], [], [])
    assert fusion.attribute_tokens({"Brand": "Hasbro"}, 64, 10)[1][0] == values[3]  # stable across calls
    assert len(fusion.attribute_tokens({f"k{i}": i for i in range(50)}, 64, 10)[0]) == 10  # bounded


def test_lexical_features_are_normalized_and_stable():
    row = Listing(id="a", title="Wooden Train Set", description="A wooden train.", attributes={"Brand": "Brio"})
    ids, weights = fusion.lexical_features(row, 1024)
    assert ids == sorted(set(ids)) and all(0 < i < 1024 for i in ids)
    assert sum(w * w for w in weights) == pytest.approx(1.0)
    assert fusion.lexical_features(row, 1024) == (ids, weights)
    other = Listing(id="b", title="Plush Bear", description="", attributes={})
    assert not set(fusion.lexical_features(other, 1024)[0]) & set(ids[:3])


def _listings():
    return [Listing(id=f"r{i}", title=f"Wooden puzzle {i}", description="A toy" * i,
                    attributes={"pieces": i * 10} if i % 2 else {}) for i in range(5)]


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def test_cached_features_equal_fresh(tmp_path, tiny_vit):
    from PIL import Image

    cfg = fusion.FusionConfig(image_encoder=tiny_vit, max_text_tokens=32)
    enc = fusion.Encoders(cfg.text_encoder, cfg.image_encoder, cfg.max_text_tokens).eval()
    rows = _listings()
    images = [[Image.new("RGB", (40, 30), (i * 40, 0, 0))] if i % 2 == 0 else [] for i in range(5)]
    fresh = fusion.Featurizer(enc, cfg, fusion.FeatureCache(None))(rows, images)
    fusion.Featurizer(enc, cfg, fusion.FeatureCache(tmp_path))(rows, images)  # fills the disk cache
    disk = fusion.FeatureCache(tmp_path)
    cached = fusion.Featurizer(enc, cfg, disk)(rows, images)
    assert disk.misses == 0 and disk.hits == 15  # text, title and image views of 5 rows
    for key in ("text_tokens", "image_tokens"):
        assert torch.allclose(fresh[key], cached[key], atol=2e-2)  # fp16 on disk
    assert torch.equal(fresh["image_mask"].sum(1) > 0, torch.tensor([True, False, True, False, True]))
    # the whole model on these features, every method
    specs = heads.head_specs(LabelSchema.from_yaml(TOYS_SCHEMA), [])
    for method in fusion.FUSIONS:
        model = fusion.FusionModel(fusion.FusionConfig(method=method, hidden=H), specs, enc.text_dim, enc.image_dim).eval()
        logits = model(**cached)
        assert logits["category"].shape == (5, len(specs[0].classes))


def test_a_damaged_feature_file_is_a_miss_and_files_are_written_whole(tmp_path, caplog):
    """A feature file cut short (a run killed mid-write, a full disk) stopped every later run on the shared
    cache with a safetensors traceback; it is now a miss, recomputed, and files are written by rename."""
    from mmllm.models.fusion.encoders import FeatureCache

    cache = FeatureCache(tmp_path)
    cache.put("ab" + "0" * 62, torch.ones(3, 4))
    path = tmp_path / "ab" / ("ab" + "0" * 62 + ".safetensors")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    fresh = FeatureCache(tmp_path)
    assert torch.equal(fresh.get("ab" + "0" * 62), torch.ones(3, 4)) and fresh.hits == 1
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    damaged = FeatureCache(tmp_path)
    assert damaged.get("ab" + "0" * 62) is None and damaged.misses == 1 and not path.exists()
    assert "is damaged" in caplog.text


def test_each_distinct_token_sequence_is_encoded_once():
    """A listing without a description reads the same tokens in its title and text views, and a dump
    repeats titles: the text encoder sees each distinct sequence once, and every row's features are
    those of encoding its views one by one."""
    cfg = fusion.FusionConfig(image_encoder="none", max_text_tokens=32, modalities=["text"])
    enc = fusion.Encoders(cfg.text_encoder, cfg.image_encoder, cfg.max_text_tokens).eval()
    rows = [Listing(id="a", title="Wooden puzzle", description=""),
            Listing(id="b", title="Wooden puzzle", description=""),  # another row, the same words
            Listing(id="c", title="Wooden puzzle", description="Twenty pieces of beech, ages 3 and up"),
            Listing(id="d", title="Rocking horse " * 30, description="")]  # title view cut at 32 tokens, text too
    seen = []
    encode = enc.text_tokens
    enc.text_tokens = lambda ids, mask: seen.extend(int(m.sum()) for m in mask) or encode(ids, mask)
    batch = fusion.Featurizer(enc, cfg, fusion.FeatureCache(None))(rows, [[] for _ in rows])
    # "Wooden puzzle" (rows a, b: both views; row c's title), row c's text, row d's cut title (both views)
    assert sorted(seen) == sorted([len(enc.token_ids(rows[:1], "title")[0]), len(enc.token_ids(rows[2:3], "text")[0]), 32])
    for view in ("text", "title"):
        ids = enc.tokenize(rows, view)
        mask = ids[f"{view}_attention_mask"]
        with torch.no_grad():
            alone = encode(ids[f"{view}_input_ids"], mask)
        expected = torch.stack([alone[i, : int(m.sum())].mean(0) for i, m in enumerate(mask)])
        assert torch.allclose(batch[f"{view}_tokens"][:, 0], expected, atol=1e-5)


def test_bf16_encoder_features_stay_apart_from_the_trained_ones(tmp_path):
    """Labelling's --encoder-precision bfloat16: the encoder runs under bf16 autocast (features close to
    float32's, not equal), and its features never enter or leave a cache as the float32 ones."""
    cfg = fusion.FusionConfig(image_encoder="none", max_text_tokens=32, modalities=["text"])
    enc = fusion.Encoders(cfg.text_encoder, cfg.image_encoder, cfg.max_text_tokens).eval()
    rows = _listings()
    cache = fusion.FeatureCache(tmp_path)
    full = fusion.Featurizer(enc, cfg, cache)(rows, [[] for _ in rows])
    half = fusion.Featurizer(enc, cfg, cache, precision="bfloat16")(rows, [[] for _ in rows])
    assert cache.misses == 20 and cache.hits == 0  # 5 rows x 2 views, at each precision
    close = torch.nn.functional.cosine_similarity(full["text_tokens"][:, 0], half["text_tokens"][:, 0], dim=-1)
    assert (close > 0.99).all() and not torch.equal(full["text_tokens"], half["text_tokens"])


@pytest.mark.slow
def test_train_save_load_in_new_process(tmp_path):
    from mmllm.finetune import finetune, load_recipe_config

    out = tmp_path / "model"
    cfg = load_recipe_config(ROOT / "finetune" / "fusion_minilm_cpu.yaml",
                             [f"train.output_dir={out}", "data.max_train_rows=64", "data.max_dev_rows=16",
                              "train.epochs=2", "train.batch_size=16", "fusion.max_text_tokens=64", "eval.loss_rows=16",
                              "anchor.reference=[]"])  # the 8,173 reference rows: tests/test_anchor.py reads fewer
    summary = finetune(cfg)
    assert summary["steps"] == 8 and "category_acc" in summary
    meta = json.loads((out / "mmllm_model.json").read_text())
    assert meta["kind"] == "fusion"
    for name in ("fusion.safetensors", "fusion.json", "label_schema.yaml", "README.md", "training_curves.png"):
        assert (out / name).is_file(), name
    from mmllm.catalog import iter_catalog
    from mmllm.images import ImagePolicy
    from listings import load_model_dir

    rows = [r for r in iter_catalog(str(ROOT / "examples/amazon_uk_toys/dev.jsonl"))][:8]
    predictor = load_model_dir(out, device="cpu")
    here = predictor.predict(rows, ImagePolicy(root=ROOT))
    assert [r["id"] for r in here] == [r.id for r in rows] and len(rows) == 8
    schema = LabelSchema.from_yaml(out / "label_schema.yaml")
    for record in here:
        answer = {"category": record["category"], "attributes": record["attributes"]}
        assert record["status"] == "ok" and schema.validate(answer).ok
        assert abs(sum(record["modality_weights"].values()) - 1) < 1e-3 and len(record["top_k"]) == 5
    # search reads the fused representation: unit vectors, batch-independent
    from mmllm.predictor import embed_in_batches

    vectors = embed_in_batches(predictor, rows, ImagePolicy(root=ROOT))
    assert vectors.shape == (8, predictor.model.fusion.out_dim)
    assert abs(float((vectors ** 2).sum(1).min()) - 1) < 1e-4
    assert abs(embed_in_batches(predictor, rows[:1], ImagePolicy(root=ROOT))[0] - vectors[0]).max() < 1e-4
    there = reload_in_fresh_process(out, ROOT / "examples/amazon_uk_toys/dev.jsonl", image_root=ROOT, limit=8,
                                    device="cpu")
    assert there == json.loads(json.dumps(here))


@pytest.mark.slow
def test_a_loaded_folder_reads_as_many_photos_as_training_did(tmp_path, tiny_vit, capsys):
    """model.max_images=1: load_fusion read 4 photos a listing whatever the recipe had trained (and fitted
    calibration and grounding) on."""
    from PIL import Image

    from mmllm.finetune import finetune, load_recipe_config
    from mmllm.images import ImagePolicy
    from listings import load_model_dir, picture, toy_row, write_catalog

    base = toy_row(0)

    def row(folder, i):
        return {**base(folder, i), "images": [picture(folder, f"{i}-{k}.png", Image.new(
            "RGB", (32, 32), ((i * 40 + k * 90) % 255, 20 * k, 100))) for k in range(4)]}

    train = write_catalog(tmp_path / "data", 24, row, name="train.jsonl")
    dev = write_catalog(tmp_path / "data", 6, row, name="dev.jsonl", start=24)
    out = tmp_path / "model"
    finetune(load_recipe_config(ROOT / "finetune" / "fusion_minilm_cpu.yaml", [
        f"data.train={train}", f"data.dev={dev}", f"data.schema={tmp_path / 'data' / 'schema.yaml'}",
        f"train.output_dir={out}", f"fusion.image_encoder={tiny_vit}", "model.max_images=1", "train.epochs=2",
        "anchor.epochs=0", "lexicon.enabled=false", "vote.weights=equal", "fusion.max_text_tokens=32"]))
    # the default recipe's reference rows need the anchor's neighbours: without an anchor, said, not read
    assert "anchor.reference: not read (no anchor: anchor.epochs is 0" in capsys.readouterr().out
    predictor = load_model_dir(out, device="cpu", grounded=False)
    assert predictor.max_images == 1
    from mmllm.catalog import load_listings

    rows = load_listings(dev)
    loaded = predictor.predict(rows, ImagePolicy(root=dev.parent))
    predictor.max_images = 4
    four = predictor.predict(rows, ImagePolicy(root=dev.parent))
    assert [r["confidence"] for r in loaded] != [r["confidence"] for r in four]  # the photos count


def _zero_heads(model: fusion.FusionModel) -> None:
    """Every head's weights and bias at zero: what remains of the logits is the name priors."""
    for head in model.heads.values():
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)


def test_category_name_prior_ranks_named_categories_without_training():
    """With the heads at zero the category logits are the prior alone: a listing that says what it is
    lands on that category although no row was ever labelled with it; off, the prior is gone."""
    schema = LabelSchema.from_yaml(TOYS_SCHEMA)
    specs = heads.head_specs(schema, [])
    enc = fusion.Encoders("minilm", "none", 64, use_image=False).eval()
    assert fusion.category_name("Games > Chess") == "Chess (Games)"
    names = enc.sentence_vectors([fusion.category_name(c) for c in specs[0].classes])
    assert names.shape == (len(specs[0].classes), enc.text_dim)
    assert torch.allclose(names.norm(dim=-1), torch.ones(len(names)), atol=1e-5)
    cases = {"Wooden chess set with folding board and 32 pieces": "Games > Chess",
             "Harry Potter Hogwarts wand replica": "Characters & Brands > Harry Potter",
             "Plastic dinosaur figures, T-Rex and Triceratops": "Figures & Playsets > Dinosaurs",
             "3D puzzle of the Eiffel Tower, 80 foam pieces": "Jigsaws & Puzzles > 3-D Puzzles"}
    rows = [Listing(id=f"r{i}", title=t, description="") for i, t in enumerate(cases)]
    cfg = fusion.FusionConfig(modalities=["text"], lexical=False, hidden=H)
    batch = fusion.Featurizer(enc, cfg, fusion.FeatureCache(None))(rows, [[] for _ in rows])
    model = fusion.FusionModel(cfg, specs, enc.text_dim, 0, label_vectors=names).eval()
    _zero_heads(model)
    with torch.no_grad():
        top = model(**batch)["category"].argmax(-1).tolist()
    predicted = [specs[0].classes[i] for i in top]
    assert predicted == list(cases.values())
    assert "label_vectors" in model.state_dict() and "label_scale" in model.state_dict()
    off = fusion.FusionModel(fusion.FusionConfig(modalities=["text"], lexical=False, hidden=H, label_prior=False),
                             specs, enc.text_dim, 0).eval()
    assert "label_vectors" not in off.state_dict()
    _zero_heads(off)
    with torch.no_grad():
        assert torch.count_nonzero(off(**batch)["category"]) == 0  # nothing but the (zeroed) heads


def test_prior_correction_is_the_balanced_posterior():
    """fusion.prior_correction: at prediction the category's log-probabilities lose tau x log(training share);
    training is untouched. By hand on a model whose heads see only the attribute modality."""
    cfg = fusion.FusionConfig(modalities=["attributes"], hidden=H, dropout=0.0, label_prior=False, lexical=False,
                              prior_correction=1.0, title_view=False, token_dropout=0.0, modality_dropout=0.0)
    specs = [heads.HeadSpec("category", "softmax", ["A", "B", "C"])]
    model = fusion.FusionModel(cfg, specs, text_dim=8, image_dim=0)
    model.set_prior([98, 1, 0])  # add-one smoothed: 99 / 102, 2 / 102, 1 / 102
    assert torch.allclose(model.log_prior.exp(), torch.tensor([99, 2, 1]) / 102.0)
    batch = {"attr_names": torch.tensor([[1, 2]]), "attr_values": torch.tensor([[3, 0]]),
             "attr_features": torch.zeros(1, 2, 4), "attr_mask": torch.ones(1, 2, dtype=torch.long)}
    model.train()
    raw = model(**batch)["category"]
    model.eval()
    adjusted = model(**batch)["category"]
    expected = torch.log_softmax(raw, -1) - torch.log(torch.tensor([99, 2, 1]) / 102.0)
    assert torch.allclose(adjusted, expected, atol=1e-5)
    # a row the heads find equally likely everywhere goes to the rarest category
    with torch.no_grad():
        model.heads["category"].weight.zero_()
        model.heads["category"].bias.zero_()
    assert int(model(**batch)["category"].argmax()) == 2
    with pytest.raises(ValueError, match="fusion.prior_correction must be >= 0"):
        fusion.FusionConfig(prior_correction=-1.0)


def test_value_name_prior_ranks_named_values_without_training(tmp_path):
    """fusion.value_prior: with the heads at zero an enum / list head's logits are the prior alone, so the
    value a listing names wins although no row was labelled with it; "<not stated>" gets no prior; the
    vectors travel with the weights; off, there is none."""
    schema = LabelSchema.from_dict({
        "name": "shop", "taxonomy": ["Toys > Building", "Toys > Puzzles"],
        "attributes": {"brand": {"type": "enum", "values": ["LEGO", "Hasbro", "Ravensburger", "Crayola"]},
                       "skills": {"type": "list", "values": ["Fine Motor Skills", "Counting", "Reading"]},
                       "batteries_required": {"type": "boolean"}}})
    specs = heads.head_specs(schema, [], null_class=True)
    enc = fusion.Encoders("minilm", "none", 64, use_image=False).eval()
    cases = {"LEGO City police station building set": ("LEGO", "Fine Motor Skills"),
             "Ravensburger jigsaw puzzle that trains fine motor skills": ("Ravensburger", "Fine Motor Skills"),
             "Crayola washable markers for colouring and reading books": ("Crayola", "Reading"),
             "Hasbro counting game: count the numbers 1 to 10": ("Hasbro", "Counting")}
    rows = [Listing(id=f"r{i}", title=t, description="") for i, t in enumerate(cases)]
    values = fusion.value_name_vectors(schema, specs, enc)
    assert sorted(values) == ["brand", "skills"]  # a boolean's "True" / "False" carry no meaning
    assert values["brand"].shape == (5, enc.text_dim) and float(values["brand"][0].abs().sum()) == 0.0
    cfg = fusion.FusionConfig(modalities=["text"], lexical=False, hidden=H, label_prior=False, value_prior=True)
    batch = fusion.Featurizer(enc, cfg, fusion.FeatureCache(None))(rows, [[] for _ in rows])
    model = fusion.FusionModel(cfg, specs, enc.text_dim, 0, value_vectors=values).eval()
    _zero_heads(model)
    with torch.no_grad():
        out = model(**batch)
    brand = specs[1].classes
    assert torch.count_nonzero(out["brand"][:, 0]) == 0  # "<not stated>": no prior
    assert [brand[i] for i in out["brand"][:, 1:].argmax(-1).add(1).tolist()] == [b for b, _ in cases.values()]
    assert [specs[2].classes[i] for i in out["skills"].argmax(-1).tolist()] == [s for _, s in cases.values()]
    assert torch.count_nonzero(out["batteries_required"]) == 0
    model.save(tmp_path)
    assert json.loads((tmp_path / fusion.FUSION_CONFIG).read_text())["value_prior_heads"] == ["brand", "skills"]
    loaded = fusion.load_fusion(tmp_path, schema, device="cpu").model
    with torch.no_grad():
        again = loaded(**batch)
    for name in ("brand", "skills"):
        assert torch.allclose(again[name], out[name], atol=1e-5)
    off = fusion.FusionModel(fusion.FusionConfig(modalities=["text"], lexical=False, hidden=H, label_prior=False),
                             specs, enc.text_dim, 0, value_vectors=values)
    assert len(off.value_priors) == 0 and not any("value_priors" in k for k in off.state_dict())
