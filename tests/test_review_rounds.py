"""benchmarks/review_rounds.py: which pool rows a reviewer sees, the rows it writes for data.train, and a
whole round on a tiny catalog - continued after an interruption without retraining or duplicate labels,
scored from the files it wrote, and refused on a work folder made with other settings."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import benchmark_module
from listings import SMALL_SCHEMA, toy_row, write_catalog


def _module():
    return benchmark_module("review_rounds")


def _pool(n: int) -> list[dict]:
    return [{"id": f"p{i}", "title": f"thing {i}", "label": {"category": "Outdoor > Kites"}} for i in range(n)]


def test_the_queue_is_least_confident_first_and_the_random_sample_does_not_depend_on_the_file_order():
    rounds = _module()
    pool = _pool(6)
    records = {f"p{i}": {"id": f"p{i}", "category": "Outdoor > Kites", "confidence": c, "source": "pool.jsonl",
                         "line": i + 1} for i, c in enumerate([0.9, 0.2, None, 0.5, 0.2, 0.99])}
    # no confidence first, then the least confident; a tie keeps the file's order (line)
    assert [r["id"] for r in rounds.choose(pool, records, 4, "queue")] == ["p2", "p1", "p4", "p3"]
    sample = [r["id"] for r in rounds.choose(pool, records, 3, "random")]
    assert sample == [r["id"] for r in rounds.choose(pool[::-1], records, 3, "random")]
    assert len(set(sample)) == 3
    with pytest.raises(SystemExit, match="--rows 7 is more than the pool's 6 rows"):
        rounds.choose(pool, records, 7, "random")
    del records["p3"]
    with pytest.raises(SystemExit, match="no record for 1 rows .*p3"):
        rounds.choose(pool, records, 2, "queue")


def test_a_reviewed_row_is_the_listing_its_gold_and_the_decision_against_the_prediction():
    rounds = _module()
    row = {"id": "p1", "title": "Delta kite", "description": "", "attributes": {"brand": "Acme"}, "images": [],
           "label": {"category": "Outdoor > Kites", "attributes": {"material": ["fabric"]}}, "extra": 1}
    right = rounds.reviewed_row(row, {"category": "Outdoor > Kites", "confidence": 0.4, "line": 3})
    wrong = rounds.reviewed_row(row, {"category": "Vehicles > Cars", "confidence": 0.3, "line": 4})
    assert right["review"]["decision"] == "accepted" and wrong["review"]["decision"] == "corrected"
    assert wrong["review"]["predicted"]["category"] == "Vehicles > Cars" and wrong["review"]["labels_line"] == 4
    # the reviewer stand-in knows the category only: no attribute is claimed (a null would train "not stated")
    assert wrong["label"] == {"category": "Outdoor > Kites"}
    assert {k: wrong[k] for k in ("id", "title", "attributes")} == {"id": "p1", "title": "Delta kite",
                                                                     "attributes": {"brand": "Acme"}}
    assert "extra" not in wrong


def test_a_work_folder_is_continued_only_with_its_own_settings(tmp_path):
    rounds = _module()
    work = tmp_path / "work"
    rounds.open_work(work, {"set": [], "test_percent": 50})
    (work / "pool.jsonl").write_text("{}\n")
    rounds.open_work(work, {"set": [], "test_percent": 50})  # the same: continued
    with pytest.raises(SystemExit, match="made with other set, test_percent"):
        rounds.open_work(work, {"set": ["fusion.prior_correction=1"], "test_percent": 40})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not empty and was not made by review_rounds.py"):
        rounds.open_work(mine, {"set": []})
    assert (mine / "notes.txt").read_text() == "keep" and len(list(mine.iterdir())) == 1


def test_inputs_are_checked_before_any_work_and_a_changed_base_model_is_refused(tmp_path, monkeypatch, capsys):
    rounds = _module()
    train = write_catalog(tmp_path / "train", 4, toy_row(0))
    catalog = write_catalog(tmp_path / "shop", 10, toy_row(0), name="listings.jsonl", start=10)
    base = tmp_path / "base"
    base.mkdir()
    (base / "mmllm_model.json").write_text("{}")  # not a model: labelling with it fails after the checks
    argv = ["--catalog", str(catalog), "--train", str(train), "--dev", str(train), "--base-model", str(base),
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out.json")]
    monkeypatch.chdir(tmp_path)  # away from the project: the recipe's relative data.schema is the project's
    with pytest.raises(SystemExit, match=r"--rows 1000 is more than the pool's \d+ rows"):
        rounds.main([*argv, "--rows", "1000"])  # before anything is labelled
    assert not list((tmp_path / "work").glob("labels_*"))
    with pytest.raises(SystemExit, match="labelling .* failed"):
        rounds.main([*argv, "--rows", "1"])
    (base / "mmllm_model.json").write_text('{"retrained": true}')  # the same folder, another model
    with pytest.raises(SystemExit, match="was made with other base_model_sha256"):
        rounds.main([*argv, "--rows", "1"])
    with pytest.raises(SystemExit):
        rounds.main([*argv[:7], str(tmp_path / "missing"), *argv[8:], "--rows", "1"])
    assert f"--base-model {tmp_path / 'missing'}: no such model folder" in capsys.readouterr().err
    # a base model that checks its answers against the catalog under review (anchor.reference) is refused
    checker = tmp_path / "checker"
    checker.mkdir()
    (checker / "fusion.json").write_text(json.dumps({"anchor": {"reference": [str(catalog)], "reference_size": 10}}))
    with pytest.raises(SystemExit):
        rounds.main([*argv[:7], str(checker), *argv[8:], "--rows", "1"])
    assert "checks its answers against" in capsys.readouterr().err and not (tmp_path / "work" / "model_base").exists()
    assert rounds.reference_files(base) == set()  # no fusion.json: nothing checked


WORDS = {"Games > Chess": "knight", "Games > Card Games": "deck", "Outdoor > Kites": "string",
         "Vehicles > Cars": "wheels"}


def _gadget(folder, i):
    """A catalog the training rows never saw: its words say the category, in a way only review can teach."""
    category = SMALL_SCHEMA["taxonomy"][i % 4]
    return {"id": f"g{i}", "title": f"Zorblax {WORDS[category]} gadget {i}", "description": "A curious thing.",
            "attributes": {}, "images": [], "label": {"category": category}}


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_round_end_to_end_is_scored_from_its_files_and_continued_without_retraining(tmp_path):
    rounds = _module()
    train = write_catalog(tmp_path / "train", 24, toy_row(0))
    dev = write_catalog(tmp_path / "dev", 8, toy_row(0), start=24)
    catalog = write_catalog(tmp_path / "shop", 40, _gadget, name="listings.jsonl")
    work, out = tmp_path / "work", tmp_path / "result.json"
    argv = ["--catalog", str(catalog), "--train", str(train), "--dev", str(dev),
            "--schema", str(train.parent / "schema.yaml"), "--rows", "6", "--orders", "queue", "random",
            "--seeds", "0", "--work", str(work), "--out", str(out),
            "--set", "fusion.max_text_tokens=32", "fusion.hidden=16", "fusion.attr_buckets=64", "train.save_every=0"]
    assert rounds.main(argv) == 0
    result = json.loads(out.read_text())
    pool, test = _lines(work / "pool.jsonl"), _lines(work / "test.jsonl")
    assert len(pool) + len(test) == 40 and result["pool_rows"] == len(pool) and result["test_rows"] == len(test)
    assert not {r["id"] for r in pool} & {r["id"] for r in test}
    assert [(r["variant"], r["rows"]) for r in result["runs"]] == [("none", 0), ("queue 6", 6), ("random 6", 6)]

    gold = {r["id"]: r["label"]["category"] for r in test}
    dev_gold = {r["id"]: r["label"]["category"] for r in _lines(dev)}
    for run, name in zip(result["runs"], ["none_s0", "queue6_s0", "random6_s0"]):
        labels = {r["id"]: r for r in _lines(work / f"labels_test_{name}.jsonl")}
        assert set(labels) == set(gold)  # every test row once
        right = sum(labels[i]["category"] == c for i, c in gold.items())
        assert run["test_accuracy"] == pytest.approx(right / len(gold), abs=1e-4)
        p = run["paired"]
        bow_right = right - p["only_recipe"] + p["only_bag_of_words"]
        assert run["bow_accuracy"] == pytest.approx(bow_right / len(gold), abs=1e-4)
        if run["order"]:
            reviewed = _lines(work / f"reviewed_{name}.jsonl")
            assert len(reviewed) == 6 and {r["id"] for r in reviewed} <= {r["id"] for r in pool}
            assert all(r["label"]["category"] == gold_ for r, gold_ in
                       zip(reviewed, [{x["id"]: x["label"]["category"] for x in pool}[r["id"]] for r in reviewed]))
            assert run["corrected"] == sum(r["review"]["decision"] == "corrected" for r in reviewed)
            meta = json.loads((work / f"model_{name}" / "mmllm_model.json").read_text())
            assert sum(meta["category_counts"].values()) == 24 + 6  # the old rows and the reviewed ones
            old = {r["id"]: r for r in _lines(work / f"labels_dev_old_shares_{name}.jsonl")}
            assert set(old) == set(dev_gold)
            assert run["dev_old_shares"] == pytest.approx(
                sum(old[i]["category"] == c for i, c in dev_gold.items()) / len(dev_gold), abs=1e-4)
            plain = {r["id"]: r for r in _lines(work / f"labels_dev_{name}.jsonl")}
            assert any(old[i]["confidence"] != plain[i]["confidence"] for i in dev_gold)  # the shares moved them
        else:
            assert run["dev_old_shares"] == run["dev_accuracy"]  # the base model answers under the old shares
        if run["order"] == "random":  # the base model, not retrained, under the sample's category shares
            shares = {r["id"]: r for r in _lines(work / "labels_test_shares_random6_none_s0.jsonl")}
            assert set(shares) == set(gold)
            assert run["shares_only"]["accuracy"] == pytest.approx(
                sum(shares[i]["category"] == c for i, c in gold.items()) / len(gold), abs=1e-4)
            plain = {r["id"]: r for r in _lines(work / "labels_test_none_s0.jsonl")}
            assert any(shares[i]["confidence"] != plain[i]["confidence"] for i in gold)
        else:
            assert "shares_only" not in run
    queue_ids = [r["id"] for r in _lines(work / "reviewed_queue6_s0.jsonl")]
    base = {r["id"]: r for r in _lines(work / "labels_pool_none_s0.jsonl")}
    confidences = sorted(r["confidence"] for r in base.values())
    assert sorted(base[i]["confidence"] for i in queue_ids) == confidences[:6]  # the least confident six

    # interrupted: labelling cut off half way (queue), a training cut off and started again (random);
    # the same command continues both
    cut = work / "labels_test_queue6_s0.jsonl"
    lines = cut.read_text().splitlines(keepends=True)
    cut.write_text("".join(lines[: len(lines) // 2]))
    stamp = (work / "model_queue6_s0" / "review_rounds_train.json").stat().st_mtime_ns
    shutil.copytree(work / "model_random6_s0", work / "model_random6_s0.partial")
    shutil.rmtree(work / "model_random6_s0")
    # its labels stay: they are an earlier model's, and the retraining removes them before it starts
    assert rounds.main(argv) == 0
    again = json.loads(out.read_text())
    assert (work / "model_queue6_s0" / "review_rounds_train.json").stat().st_mtime_ns == stamp  # not retrained
    assert (work / "model_random6_s0" / "mmllm_model.json").exists()
    assert not (work / "model_random6_s0.partial").exists()
    for name in ("none_s0", "queue6_s0", "random6_s0"):
        ids = [r["id"] for r in _lines(work / f"labels_test_{name}.jsonl")]
        assert sorted(ids) == sorted(gold)  # no row twice, none lost
    assert [r["test_accuracy"] for r in again["runs"][:2]] == [r["test_accuracy"] for r in result["runs"][:2]]

    with pytest.raises(SystemExit, match="made with other set"):
        rounds.main([*argv, "fusion.prior_correction=1"])
