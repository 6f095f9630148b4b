"""Similar-product search: metrics against hand computation, pooling under both paddings, index /
query / evaluate through the `mmllm` command, a fine-tuned (LoRA) model folder, bad rows."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmllm.catalog import load_listings
from mmllm.cli import main as mmllm
from mmllm.collator import encode_prompts, load_listing_images
from mmllm.images import ImagePolicy
from mmllm.prompts import build_messages
from mmllm.models.heads import decoder, pool
from mmllm.predictor import embed_in_batches
from mmllm.search import SearchIndex, capped_recall_at_k, load_model, ndcg_at_k, recall_at_k

from listings import write_catalog


def search(*argv: str) -> int:
    return mmllm(["search", *map(str, argv)])


def query_json(capsys, *argv: str) -> list[dict]:
    capsys.readouterr()
    assert search("query", *argv, "--json") == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------- metrics
@pytest.mark.parametrize("relevance, n_relevant, k, recall, capped, ndcg", [
    ([False, False, False], 0, 3, 0.0, 0.0, 0.0),                  # nothing relevant exists
    ([True, True, True], 3, 3, 1.0, 1.0, 1.0),                     # all relevant, ideal order
    ([False, False, True, False, False], 1, 5, 1.0, 1.0, 0.5),     # 1/log2(4) over an ideal of 1
    ([False, False, True, False, False], 1, 2, 0.0, 0.0, 0.0),     # rank 3 is past K=2
    ([True, False, True], 4, 3, 1.0, 2 / 3, 1.5 / (1 + 1 / math.log2(3) + 0.5)),
    ([False, True], 5, 10, 1.0, 1 / 5, (1 / math.log2(3)) / sum(1 / math.log2(r + 2) for r in range(5))),
])
def test_recall_and_ndcg_match_hand_computation(relevance, n_relevant, k, recall, capped, ndcg):
    assert recall_at_k(relevance, n_relevant, k) == pytest.approx(recall)
    assert capped_recall_at_k(relevance, n_relevant, k) == pytest.approx(capped)
    assert ndcg_at_k(relevance, n_relevant, k) == pytest.approx(ndcg)


# ---------------------------------------------------------------------- pooling
def test_pooling_picks_the_last_real_token_and_the_masked_mean():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # row 0: 0..3, row 1: 4..7
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    hidden_nan = hidden.clone()
    hidden_nan[0, 0] = float("nan")  # a padded position may hold NaN: it must not leak
    assert pool(hidden_nan, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden_nan, left, "mean").flatten().tolist() == [2.5, 5.5]
    assert pool(hidden, right, "mean").flatten().tolist() == [0.5, 5.5]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    """12 labelled listings in 4 categories; every 4th is text-only (tests/listings.py)."""
    return write_catalog(tmp_path_factory.mktemp("catalog"), n=12)


@pytest.fixture(scope="module")
def bundle(catalog, tiny_checkpoint):
    """The tiny Qwen2-VL zero-shot: model, processor, schema, template."""
    return load_model(str(tiny_checkpoint("qwen2_vl")), schema=catalog.parent / "schema.yaml", template=None)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_embeddings_equal_one_by_one_under_left_and_right_padding(bundle, catalog, padding_side):
    listings = load_listings(catalog)[:5]  # images and text-only rows: very different lengths
    policy = ImagePolicy(root=catalog.parent)
    images = [load_listing_images(listing, policy, 4) for listing in listings]

    def encode(rows: list, pictures: list) -> dict:
        texts = [bundle.processor.apply_chat_template(build_messages(r, bundle.schema, bundle.template, n_images=len(p)),
                                                      tokenize=False, add_generation_prompt=True)
                 for r, p in zip(rows, pictures)]
        flat = [image for p in pictures for image in p]
        return dict(bundle.processor(text=texts, images=flat or None, padding=True, padding_side=padding_side,
                                     return_tensors="pt"))

    batch = encode(listings, images)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    singles = [encode([r], [p]) for r, p in zip(listings, images)]
    with torch.no_grad():
        hidden = decoder(bundle.model)(**batch).last_hidden_state  # [B, T, H]
        alone = [decoder(bundle.model)(**one).last_hidden_state for one in singles]
        # the backbone's last hidden state is the full model's hidden_states[-1] (without the logits)
        full = bundle.model(**batch, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(hidden, full, atol=1e-6)
    for pooling in ("last", "mean"):
        together = pool(hidden, batch["attention_mask"], pooling)
        one_by_one = torch.cat([pool(h, one["attention_mask"], pooling) for h, one in zip(alone, singles)])
        torch.testing.assert_close(together, one_by_one, atol=2e-5, rtol=1e-4)
    if padding_side == "left":  # the library path (encode_prompts, left padded): the same, normalized
        assert torch.equal(encode_prompts(bundle.processor, listings, bundle.schema, bundle.template, images)["input_ids"],
                           batch["input_ids"])
        bundle.batch_size = 3
        vectors = embed_in_batches(bundle, listings, policy, pooling="mean")
        expected = torch.nn.functional.normalize(pool(hidden, batch["attention_mask"], "mean"), dim=-1)
        np.testing.assert_allclose(vectors, expected.numpy(), atol=2e-5)
        np.testing.assert_allclose(bundle.embed_encoded(batch, "last"),
                                   torch.nn.functional.normalize(torch.cat([h[:, -1] for h in alone]), dim=-1).numpy(),
                                   atol=2e-5)


# ---------------------------------------------------------------------- the index
@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_index_saves_loads_and_answers_identically(tmp_path, index_type):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 24)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"v{i}" for i in range(300)]
    index = SearchIndex.build(vectors, ids, {"model": "none", "pooling": "last"}, index_type)
    scores, found = index.search(vectors[:20], 5)
    assert [row[0] for row in found] == ids[:20] and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    exact = np.argsort(-(vectors[:20] @ vectors.T), axis=1)[:, :5]
    assert np.mean([set(f) == {ids[j] for j in e} for f, e in zip(found, exact)]) >= (1.0 if index_type == "flat" else 0.9)

    index.save(tmp_path / "ix")
    assert {p.name for p in (tmp_path / "ix").iterdir()} == {"index.faiss", "ids.jsonl", "meta.json"}
    loaded = SearchIndex.load(tmp_path / "ix")
    assert loaded.meta["index_type"] == index_type and loaded.meta["count"] == 300 and loaded.meta["dim"] == 24
    scores2, found2 = loaded.search(vectors[:20], 5)
    assert found2 == found and np.array_equal(scores2, scores)
    assert np.allclose(loaded.vector("v7"), vectors[7])
    with pytest.raises(ValueError, match="dims"):
        loaded.search(np.ones((1, 8), np.float32), 3)


@pytest.fixture(scope="module")
def index_dir(catalog, tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "ix"
    code = search("index", "--model", tiny_checkpoint("qwen2_vl"), "--catalog", catalog,
                  "--schema", catalog.parent / "schema.yaml", "--out", out, "--batch-size", "4", "--quiet")
    assert code == 0
    return out


def test_an_indexed_listing_finds_itself_by_id_and_by_its_json(index_dir, catalog, capsys):
    meta = json.loads((index_dir / "meta.json").read_text())
    assert meta["count"] == 12 and meta["dim"] == 64 and meta["pooling"] == "last" and meta["index_type"] == "flat"
    records = [json.loads(line) for line in (index_dir / "ids.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"item-{i}" for i in range(12)] and records[0]["category"] == "Games > Chess"

    hits = query_json(capsys, index_dir, "--id", "item-1", "-k", "4")
    assert [h["rank"] for h in hits] == [1, 2, 3, 4] and hits[0]["id"] == "item-1"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5) and hits[0]["title"] == "Blue toy number 1"
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))

    row = json.loads(catalog.read_text().splitlines()[1])  # item-1, with its picture
    (catalog.parent / "q.json").write_text(json.dumps(row))
    hits = query_json(capsys, index_dir, "--listing", catalog.parent / "q.json", "-k", "3")
    assert hits[0]["id"] == "item-1" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_text_and_image_queries_return_k_results(index_dir, catalog, capsys):
    hits = query_json(capsys, index_dir, "--text", "red wooden chess set", "-k", "5")
    assert len(hits) == 5 and len({h["id"] for h in hits}) == 5
    hits = query_json(capsys, index_dir, "--image", catalog.parent / "img" / "2.png", "-k", "3")
    assert len(hits) == 3 and all(-1.0 <= h["score"] <= 1.0001 for h in hits)
    assert search("query", index_dir, "--id", "item-0", "-k", "50") == 0  # k past the size: all 12, as a table
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["rank", "score", "id"] and len(table) == 13


def test_query_errors_name_the_id_and_the_file(index_dir, tmp_path, capsys):
    assert search("query", index_dir, "--id", "nope") == 2
    assert "'nope' is not in the index" in capsys.readouterr().err
    assert search("query", tmp_path, "--id", "item-1") == 2
    assert f"{tmp_path}: not a search index" in capsys.readouterr().err
    (tmp_path / "fake.png").write_bytes(b"not an image")
    assert search("query", index_dir, "--image", tmp_path / "fake.png") == 2
    assert "fake.png" in capsys.readouterr().err


def test_evaluate_reports_recall_and_ndcg_in_range(index_dir, capsys):
    capsys.readouterr()
    assert search("evaluate", index_dir, "--k", "1", "3", "5", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["queries"] == 12 and result["skipped"] == 0 and result["k"] == [1, 3, 5] and result["level"] == "full"
    for k in (1, 3, 5):
        for name in ("recall", "capped_recall", "ndcg"):
            assert 0.0 <= result[f"{name}@{k}"] <= 1.0
    assert result["recall@1"] <= result["recall@3"] <= result["recall@5"]
    assert search("evaluate", index_dir, "--level", "1") == 0
    out = capsys.readouterr().out
    assert "12 queries" in out and "NDCG@K" in out and len(out.splitlines()) == 5


# ---------------------------------------------------------------------- bad rows, model folders
def test_a_bad_image_row_is_indexed_text_only_and_a_bad_row_is_skipped(tmp_path, tiny_checkpoint, capsys, caplog):
    catalog = write_catalog(tmp_path / "data", n=4)
    rows = [{"id": "broken", "title": "Kite with a lost picture", "images": ["img/missing.png"]},
            {"id": "twin", "title": "Kite with a lost picture"},  # the same prompt without any image
            {"id": "untitled", "images": []}]
    with open(catalog, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write("{not json\n")
    capsys.readouterr()
    assert search("index", "--model", tiny_checkpoint("qwen2_vl"), "--catalog", catalog, "--schema",
                  catalog.parent / "schema.yaml", "--out", tmp_path / "ix", "--quiet") == 0
    captured = capsys.readouterr()
    assert "catalog.jsonl line 7 (id 'untitled'): title: missing" in captured.err
    assert "catalog.jsonl line 8: not valid JSON" in captured.err
    assert "indexed 6 listings (2 bad rows skipped)" in captured.out
    assert any("(id 'broken'): image dropped" in r.getMessage() for r in caplog.records)
    hits = query_json(capsys, tmp_path / "ix", "--id", "broken", "-k", "2")
    assert {h["id"] for h in hits} == {"broken", "twin"} and hits[1]["score"] == pytest.approx(1.0, abs=1e-5)
    assert search("index", "--model", "x", "--catalog", catalog, "--out", tmp_path / "ix") == 2  # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_a_lora_model_folder_indexes_with_its_own_schema_and_hnsw(tmp_path, catalog, index_dir, tiny_checkpoint, capsys):
    from mmllm.model_dir import SCHEMA_FILE, write_meta
    from mmllm.models.generative import LoraSettings, ModelConfig, attach_lora, load_base_model, load_processor
    from mmllm.prompts import PromptTemplate
    from mmllm.schema import LabelSchema

    base = str(tiny_checkpoint("qwen2_vl"))
    model = attach_lora(load_base_model(ModelConfig(base=base)), LoraSettings(rank=4))
    torch.manual_seed(0)
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # B starts at zero (a no-op adapter); make it change the vectors
            weight.data.normal_(0, 0.5)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    load_processor(base).save_pretrained(folder)
    PromptTemplate.load("listing_v1").save_to(folder)
    LabelSchema.from_yaml(catalog.parent / "schema.yaml").to_yaml(folder / SCHEMA_FILE)
    write_meta(folder, kind="generative-lora", base_model=base, template="listing_v1", model={"max_images": 4})

    out = tmp_path / "ix"
    assert search("index", "--model", folder, "--catalog", catalog, "--out", out, "--index-type", "hnsw",
                  "--pooling", "mean", "--quiet") == 0
    loaded, zero_shot = SearchIndex.load(out), SearchIndex.load(index_dir)
    assert loaded.meta["index_type"] == "hnsw" and loaded.meta["pooling"] == "mean" and len(loaded) == 12
    assert not np.allclose(loaded.vector("item-1"), zero_shot.vector("item-1"), atol=1e-3)
    hits = query_json(capsys, out, "--text", "Blue toy number 1", "-k", "4")  # embedded by the folder's model
    assert len(hits) == 4
    assert query_json(capsys, out, "--id", "item-5", "-k", "1")[0]["id"] == "item-5"

    # the folder moved: its files are the same, so the index knows it (no warning); retrained in place: refused
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    assert search("query", out, "--model", moved, "--text", "Blue toy number 1", "-k", "2", "--json") == 0
    assert "warning" not in capsys.readouterr().err
    (folder / "mmllm_model.json").write_text((folder / "mmllm_model.json").read_text().replace("listing_v1", "listing_v1 "))
    assert search("query", out, "--text", "Blue toy number 1") == 2
    assert f"the model folder {folder.resolve()} is not the one the index was built with" in capsys.readouterr().err
    assert search("query", out, "--id", "item-5", "-k", "1") == 0  # a stored vector needs no model


def test_an_image_query_needs_a_model_that_reads_images(index_dir, catalog, capsys, monkeypatch):
    """A text-only model (the CPU fusion recipe's) answered an image query from its placeholder title alone,
    the same ranking for every picture."""
    import mmllm.search as search_module

    real = search_module.load_model

    def text_only(*args, **kwargs):
        bundle = real(*args, **kwargs)
        bundle.max_images = 0
        return bundle

    monkeypatch.setattr(search_module, "load_model", text_only)
    assert search("query", index_dir, "--image", catalog.parent / "img" / "2.png", "-k", "3") == 2
    assert "reads no images, so an image query would be answered from nothing" in capsys.readouterr().err


def test_an_index_folder_never_writes_over_the_schema_or_a_users_files(tmp_path, tiny_checkpoint, capsys):
    """`--out` beside the inputs: the schema there (label_schema.yaml, a name the index writes) is refused
    before the model loads; a folder holding a file of the index's names that no index wrote is refused too."""
    catalog = write_catalog(tmp_path / "data", n=4)
    schema = catalog.parent / "label_schema.yaml"
    schema.write_bytes((catalog.parent / "schema.yaml").read_bytes())
    before = schema.read_bytes()
    assert search("index", "--model", tiny_checkpoint("qwen2_vl"), "--catalog", catalog, "--schema", schema,
                  "--out", catalog.parent, "--quiet") == 2
    assert f"would write over the input {schema}" in capsys.readouterr().err and schema.read_bytes() == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "ids.jsonl").write_text("my ids\n")
    assert search("index", "--model", tiny_checkpoint("qwen2_vl"), "--catalog", catalog, "--schema",
                  catalog.parent / "schema.yaml", "--out", mine, "--quiet") == 2
    assert "holds ids.jsonl, which the index would write over" in capsys.readouterr().err
    assert (mine / "ids.jsonl").read_text() == "my ids\n"
    # a user's own meta.json is not an index's: refused, even with --overwrite (it was replaced)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "meta.json").write_text("{}")
    assert search("index", "--model", tiny_checkpoint("qwen2_vl"), "--catalog", catalog, "--schema",
                  catalog.parent / "schema.yaml", "--out", theirs, "--overwrite", "--quiet") == 2
    assert "holds meta.json, which the index would write over" in capsys.readouterr().err
    assert (theirs / "meta.json").read_text() == "{}"


def test_a_damaged_index_is_named_by_its_file_and_the_image_root_is_kept(index_dir, catalog, tmp_path, capsys):
    assert json.loads((index_dir / "meta.json").read_text())["image_root"] == str(catalog.parent.resolve())
    for name, content, says in (("index.faiss", b"not an index", "index.faiss: cannot be read"),
                                ("meta.json", b"[]", "meta.json: cannot be read (not an object with a count)"),
                                ("ids.jsonl", b'{"title": "no id"}\n', "ids.jsonl: cannot be read (a line is not a record")):
        broken = tmp_path / name
        shutil.copytree(index_dir, broken)
        (broken / name).write_bytes(content)
        assert search("query", broken, "--id", "x") == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err


# ---------------------------------------------------------------------- long builds
def test_an_interrupted_build_keeps_its_vectors_and_resume_embeds_only_the_rest(tmp_path, catalog, tiny_checkpoint,
                                                                                 monkeypatch, capsys):
    """A Ctrl-C lost the whole build (every vector was in memory until the one save at the end). The vectors now
    go to OUT/.partial in chunks as they are computed; --resume embeds only the listings not kept there, and the
    index is the one an uninterrupted build writes."""
    import mmllm.search as search_module

    args = ("--model", tiny_checkpoint("qwen2_vl"), "--catalog", catalog, "--schema", catalog.parent / "schema.yaml",
            "--batch-size", "2", "--quiet")
    assert search("index", *args, "--out", tmp_path / "whole") == 0
    monkeypatch.setattr(search_module, "CHUNK_ROWS", 4)
    real, embedded = search_module.embed_in_batches, []

    def embed(bundle, listings, policy, pooling):
        if len(embedded) == 5:  # the sixth batch: Ctrl-C
            raise KeyboardInterrupt
        embedded.append([x.id for x in listings])
        return real(bundle, listings, policy, pooling)

    monkeypatch.setattr(search_module, "embed_in_batches", embed)
    capsys.readouterr()
    assert search("index", *args, "--out", tmp_path / "ix") == 130
    assert "interrupted: 10 listings embedded and kept in" in capsys.readouterr().err
    assert not (tmp_path / "ix" / "meta.json").exists() and len(list((tmp_path / "ix" / ".partial").glob("chunk-*.jsonl"))) == 3
    assert search("index", *args, "--out", tmp_path / "ix") == 2  # not silently started over
    assert "holds an interrupted build: pass --resume" in capsys.readouterr().err
    assert search("index", *args, "--pooling", "mean", "--out", tmp_path / "ix", "--resume") == 2
    assert "made with other pooling" in capsys.readouterr().err

    embedded.clear()
    monkeypatch.setattr(search_module, "embed_in_batches", lambda *a: embedded.append([x.id for x in a[1]]) or real(*a))
    assert search("index", *args, "--out", tmp_path / "ix", "--resume") == 0
    assert sum(embedded, []) == ["item-10", "item-11"]  # only what the interrupted build had not embedded
    assert "resumed: 10 listings were embedded before, 2 now" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == [".index.lock", ".index.swap", "ids.jsonl", "index.faiss",
                                                              "label_schema.yaml", "meta.json", "prompt_template.yaml"]
    whole, resumed = SearchIndex.load(tmp_path / "whole"), SearchIndex.load(tmp_path / "ix")
    assert [r["id"] for r in resumed.records] == [r["id"] for r in whole.records] == [f"item-{i}" for i in range(12)]
    np.testing.assert_allclose(np.stack([resumed.vector(f"item-{i}") for i in range(12)]),
                               np.stack([whole.vector(f"item-{i}") for i in range(12)]), atol=1e-5)


def test_overwrite_keeps_the_old_index_whole_until_the_new_one_is_written(tmp_path, catalog, tiny_checkpoint,
                                                                          monkeypatch, capsys):
    """--overwrite wrote index.faiss, ids.jsonl and meta.json over the old ones in place: a failure on the way
    (a full disk) left new vectors under the old meta.json, queries answering noise without an error."""
    import mmllm.search as search_module

    args = ("--model", tiny_checkpoint("qwen2_vl"), "--catalog", catalog, "--schema", catalog.parent / "schema.yaml",
            "--out", tmp_path / "ix", "--quiet")
    assert search("index", *args) == 0
    before = {name: (tmp_path / "ix" / name).read_bytes() for name in ("index.faiss", "ids.jsonl", "meta.json")}

    def full_disk(self, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(search_module.SearchIndex, "save", full_disk)
    capsys.readouterr()
    assert search("index", *args, "--pooling", "mean", "--overwrite") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {name: (tmp_path / "ix" / name).read_bytes() for name in before} == before  # the old index, whole
    hits = query_json(capsys, tmp_path / "ix", "--id", "item-1", "-k", "1")
    assert hits[0]["id"] == "item-1" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    monkeypatch.undo()
    assert search("index", *args, "--pooling", "mean", "--overwrite", "--resume") == 0  # its vectors were kept
    assert json.loads((tmp_path / "ix" / "meta.json").read_text())["pooling"] == "mean"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]


def test_a_query_with_another_schema_template_or_model_is_refused(index_dir, catalog, tmp_path, tiny_checkpoint, capsys):
    """Such a query was embedded another way and compared with the catalog's vectors: noise, exit 0."""
    import yaml

    schema = yaml.safe_load((catalog.parent / "schema.yaml").read_text())
    schema["taxonomy"] = list(reversed(schema["taxonomy"]))[:-1] + ["Other > Thing"]
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(schema))
    capsys.readouterr()
    assert search("query", index_dir, "--text", "kite", "--schema", tmp_path / "other.yaml") == 2
    assert "is not the schema" in capsys.readouterr().err
    assert search("query", index_dir, "--text", "kite", "--schema", index_dir / "label_schema.yaml") == 0  # its own copy
    capsys.readouterr()
    other = tmp_path / "other_model"
    shutil.copytree(tiny_checkpoint("qwen2_vl"), other)
    (other / "config.json").write_text((other / "config.json").read_text().replace("{", '{"mmllm_note": 1,', 1))
    assert search("query", index_dir, "--text", "kite", "--model", other) == 2  # a folder: its files compared
    assert "is not the one the index was built with" in capsys.readouterr().err
    by_name = tmp_path / "by_name"  # an index built from a hub id keeps no fingerprint: it was a warning, exit 0
    shutil.copytree(index_dir, by_name)
    meta = json.loads((by_name / "meta.json").read_text())
    (by_name / "meta.json").write_text(json.dumps({**meta, "model": "some-org/some-vlm", "model_sha256": None}))
    assert search("query", by_name, "--text", "kite", "--model", other) == 2
    assert "built with some-org/some-vlm" in capsys.readouterr().err


def test_a_build_never_touches_a_partial_folder_it_did_not_write_and_resumes_only_the_same_prompt(
        tmp_path, catalog, tiny_checkpoint, monkeypatch, capsys):
    """A `.partial` folder of the user's beside the index was deleted by a new build; a --resume with another
    schema mixed two prompts' vectors in one index; a chunk written twice (a Ctrl-C just after its rename)
    stopped every later --resume at "already in the index"."""
    import yaml

    import mmllm.search as search_module

    args = ("--model", tiny_checkpoint("qwen2_vl"), "--catalog", catalog, "--batch-size", "4", "--quiet")
    mine = tmp_path / "ix" / ".partial"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert search("index", *args, "--schema", catalog.parent / "schema.yaml", "--out", tmp_path / "ix") == 2
    assert "is not a build of `mmllm search index`" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "mine"

    monkeypatch.setattr(search_module, "CHUNK_ROWS", 4)
    real, calls = search_module.embed_in_batches, []

    def embed(bundle, listings, policy, pooling):
        calls.append(len(listings))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(bundle, listings, policy, pooling)

    monkeypatch.setattr(search_module, "embed_in_batches", embed)
    assert search("index", *args, "--schema", catalog.parent / "schema.yaml", "--out", tmp_path / "new") == 130
    staging = tmp_path / "new" / ".partial"
    other = yaml.safe_load((catalog.parent / "schema.yaml").read_text())
    other["taxonomy"] = other["taxonomy"] + ["Other > Thing"]
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    assert search("index", *args, "--schema", tmp_path / "other.yaml", "--out", tmp_path / "new", "--resume") == 2
    assert "made with other schema_sha256" in capsys.readouterr().err
    for suffix in (".npy", ".jsonl"):  # the first chunk again, as a Ctrl-C after its rename wrote it
        (staging / f"chunk-000009{suffix}").write_bytes((staging / f"chunk-000001{suffix}").read_bytes())
    monkeypatch.setattr(search_module, "embed_in_batches", real)
    assert search("index", *args, "--schema", catalog.parent / "schema.yaml", "--out", tmp_path / "new", "--resume") == 0
    assert [r["id"] for r in SearchIndex.load(tmp_path / "new").records] == [f"item-{i}" for i in range(12)]


def test_a_second_build_into_one_folder_is_refused_and_a_load_never_sees_a_swap_half_way(
        tmp_path, catalog, tiny_checkpoint, monkeypatch, capsys):
    """Two builds into one --out mixed their catalogs' vectors under one meta.json (the second removed the first's
    staging folder, and the first indexed every chunk there); a load during a rebuild's swap found no meta.json."""
    import fcntl
    import os

    out = tmp_path / "ix"
    args = ("--model", tiny_checkpoint("qwen2_vl"), "--catalog", catalog, "--schema", catalog.parent / "schema.yaml",
            "--out", out, "--quiet")
    assert search("index", *args) == 0
    before = {name: (out / name).read_bytes() for name in ("index.faiss", "ids.jsonl", "meta.json")}
    fd = os.open(out / ".index.lock", os.O_WRONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another build, running
    try:
        assert search("index", *args, "--overwrite") == 2
        assert f"{out} is being built into by another `mmllm search index` (it holds .index.lock)" \
            in capsys.readouterr().err
    finally:
        os.close(fd)
    assert {name: (out / name).read_bytes() for name in before} == before and not (out / ".partial").exists()
    # while a rebuild moves its files in, a load (a shared lock on .index.swap) waits: it reads old or new
    blocked, real = [], os.replace

    def probing(src, dst, *a, **k):
        if Path(dst).parent == out:
            probe = os.open(out / ".index.swap", os.O_RDONLY)
            try:
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
                blocked.append(False)
            except BlockingIOError:
                blocked.append(True)
            finally:
                os.close(probe)
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", probing)
    assert search("index", *args, "--overwrite", "--pooling", "mean") == 0
    monkeypatch.undo()
    assert blocked and all(blocked)
    assert json.loads((out / "meta.json").read_text())["pooling"] == "mean"
    hits = query_json(capsys, out, "--id", "item-1", "-k", "1")
    assert hits[0]["id"] == "item-1"
