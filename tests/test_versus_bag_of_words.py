"""benchmarks/versus_bag_of_words.py's baseline file: `make run` fits the bag of words in the background
while the recipe trains and the last step reads it; a file from other rows or labels is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT, benchmark_module


def _module():
    return benchmark_module("versus_bag_of_words")


def test_a_baseline_is_read_only_for_the_rows_labels_and_search_it_was_fitted_on(tmp_path):
    versus = _module()
    train = [{"id": "a", "title": "red kite", "label": {"category": "Kites"}},
             {"id": "b", "title": "1000 piece jigsaw", "label": {"category": "Jigsaws"}}]
    dev = [{"id": "c", "title": "delta kite", "label": {"category": "Kites"}}]
    fingerprint = versus.rows_fingerprint(train, dev, ["category"], True)
    path = tmp_path / "bow.json"
    path.write_text(json.dumps({"rows_sha256": fingerprint, "bag_of_words": {"category": {"accuracy": 1.0}},
                                "bag_of_words_published": {}}))
    assert versus.read_baseline(path, fingerprint) == ({"category": {"accuracy": 1.0}}, {})
    changed = [dict(dev[0], title="delta kite, 30 m line")]
    for other in (versus.rows_fingerprint(train, changed, ["category"], True),  # a dev row's text
                  versus.rows_fingerprint(train, dev, ["category", "brand"], True),  # the labels
                  versus.rows_fingerprint(train, dev, ["category"], False)):  # C searched by CV, not fixed
        assert other != fingerprint
        with pytest.raises(SystemExit, match="fitted on other rows, labels or C search"):
            versus.read_baseline(path, other)
    with pytest.raises(SystemExit, match=r"cannot read the bag-of-words baseline .*--skip-recipe"):
        versus.read_baseline(tmp_path / "missing.json", fingerprint)


def test_a_labels_file_is_scored_by_its_best_values_and_by_what_it_publishes(tmp_path):
    versus = _module()
    dev = [{"id": str(i), "title": f"toy {i}", "label": {"category": "Kites", "attributes": {"brand": gold}}}
           for i, gold in enumerate(["Acme", "Acme", "Zed", None, None])]
    # 0: published Acme (right); 1: withheld, its top value Acme (right, best value only);
    # 2: published Acme (wrong); 3: published Zed where the gold is null (invented); 4: withheld
    answers = [("Acme", []), (None, [{"value": None}, {"value": "Acme"}]), ("Acme", []), ("Zed", []),
               (None, [{"value": "Zed"}])]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "category": "Kites", "attributes": {"brand": a},
                                        "attribute_top_k": {"brand": top}}) + "\n"
                            for i, (a, top) in enumerate(answers)))
    run = versus.from_labels(path, dev, ["category", "brand"])
    assert run["scores"]["brand"] == {"accuracy": pytest.approx(2 / 3, abs=1e-4), "rows": 3,  # 0, 1 of 0, 1, 2
                                      "answers": ["Acme", "Acme", "Acme", "Zed", "Zed"]}  # the best values, dev order
    # published: 3 answers, 1 right: precision 1/3; 3 gold values, 1 found: recall 1/3
    assert run["grounded"]["brand"] == {"precision": pytest.approx(1 / 3, abs=1e-4),
                                        "recall": pytest.approx(1 / 3, abs=1e-4), "f1": pytest.approx(1 / 3, abs=1e-4)}
    with pytest.raises(SystemExit, match="no record for 1 dev rows"):
        versus.from_labels(path, dev + [{"id": "9", "label": {"category": "Kites"}}], ["category"])


def test_a_labels_file_that_repeats_an_id_is_scored_by_its_first_answer(tmp_path, capsys):
    """As `mmllm evaluate` reads it: `mmllm label` writes a repeated input id's row as a read error after
    the labelled one, and a later record never replaces the first answer."""
    versus = _module()
    dev = [{"id": "0", "title": "kite", "label": {"category": "Kites"}},
           {"id": "1", "title": "jigsaw", "label": {"category": "Jigsaws"}}]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "0", "category": "Kites", "attributes": {}, "status": "ok"},
        {"id": "1", "category": "Jigsaws", "attributes": {}, "status": "ok"},
        {"id": "1", "status": "error", "stage": "read", "error": "id '1' repeats line 2"},
        {"id": "0", "category": "Jigsaws", "attributes": {}, "status": "ok"}]))
    run = versus.from_labels(path, dev, ["category"])
    assert run["scores"]["category"]["answers"] == ["Kites", "Jigsaws"]
    assert run["scores"]["category"]["accuracy"] == 1.0
    warnings = capsys.readouterr().err
    assert "labels.jsonl line 3 (id '1'): a second prediction for this id" in warnings
    assert "labels.jsonl line 4 (id '0'): a second prediction for this id" in warnings


def test_the_paired_comparison_counts_the_rows_only_one_side_gets_right():
    versus = _module()
    gold = ["A", "A", "B", "B", "C", None, "A", "B"]
    ours = ["A", "A", "B", "X", "C", "A", "A", "B"]  # right on 0, 1, 2, 4, 6, 7 (row 5 has no gold)
    theirs = ["a", "X", "X", "B", "X", "A", "X", "X"]  # right on 0 (an attribute: case folded) and 3
    test = versus.mcnemar(gold, ours, theirs, "brand")
    # only ours: 1, 2, 4, 6, 7 (5 rows); only theirs: 3 (1 row); 6 discordant rows, P(<= 1 of 6) = 7/64, two-sided
    assert test == {"rows": 7, "only_recipe": 5, "only_bag_of_words": 1, "p_value": round(14 / 64, 6)}
    assert versus.mcnemar(gold, ours, ours, "brand")["p_value"] == 1.0  # no discordant row: nothing to tell them apart
    lopsided = versus.mcnemar(["A"] * 12, ["A"] * 12, ["X"] * 12, "brand")
    assert lopsided["only_recipe"] == 12 and lopsided["p_value"] == round(2 / 2 ** 12, 6)
    assert versus.paired_table([{"seed": 1, "scores": {"category": {"answers": ["A"] * 12}}}],
                               {"category": {"answers": {str(i): "X" for i in range(12)}}},
                               [{"id": str(i), "label": {"category": "A"}} for i in range(12)],
                               ["category"])[-1] == "recipe, seed 1: category: +12 / -0, p < 0.001"

    # the category is counted as category_metrics counts it, exactly: their "a" on row 0 is wrong there
    assert versus.mcnemar(gold, ours, theirs, "category")["only_recipe"] == 6
    dev = [{"id": str(i), "label": {"category": "Kites", "attributes": {"brand": g}}} for i, g in enumerate(gold)]
    run = {"seed": 0, "scores": {"brand": {"answers": ours}}}
    baseline = {"brand": {"answers": {str(i): a for i, a in enumerate(theirs)}}}
    lines = versus.paired_table([run], baseline, dev, ["brand"])
    assert run["paired"]["brand"]["only_recipe"] == 5
    assert lines[-1] == "recipe, seed 0: brand: +5 / -1, p = 0.219"
    old_file = {"brand": {"accuracy": 0.5}}  # a baseline file from before the answers were kept
    assert "keeps no answers" in versus.paired_table([run], old_file, dev, ["brand"])[0]


def test_the_hash_split_is_stable_and_a_salt_draws_another_split_of_the_same_rows():
    versus = _module()
    rows = [{"id": f"row{i}", "title": f"listing {i}"} for i in range(2000)]
    train, dev = versus.hash_split(rows, 20)
    assert len(train) + len(dev) == 2000 and {r["id"] for r in train}.isdisjoint(r["id"] for r in dev)
    assert 330 < len(dev) < 470  # about a fifth
    again = versus.hash_split(list(reversed(rows)), 20)[1]
    assert {r["id"] for r in again} == {r["id"] for r in dev}  # by the id alone, not the order
    salted = versus.hash_split(rows, 20, "#1")[1]
    assert 330 < len(salted) < 470
    overlap = len({r["id"] for r in salted} & {r["id"] for r in dev})
    assert overlap < 0.4 * len(dev)  # another draw: about a fifth of dev again, by chance
    # the salt follows the id: the same split as rows whose ids carry it
    renamed = versus.hash_split([{**r, "id": r["id"] + "#1"} for r in rows], 20)[1]
    assert [r["id"] for r in renamed] == [r["id"] + "#1" for r in salted]


def test_a_split_salt_without_a_catalog_is_refused(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "a", "title": "kite", "label": {"category": "Kites"}}\n')
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "versus_bag_of_words.py"), "--train", str(rows),
                           "--dev", str(rows), "--split-salt", "#1", "--out", str(tmp_path / "out.json")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--split-salt draws another split of a --catalog" in done.stderr
    assert not (tmp_path / "out.json").exists()


def test_rows_mmllm_refuses_leave_both_sides_and_category_only_gold_is_not_counted(capsys):
    """A dev row the catalog contract refuses (an empty title here) is left out before any training (the recipe
    never labels it, and the run ended in a KeyError after training); a category-only label has unknown
    attributes, so an answer there is not an invented value."""
    versus = _module()
    rows = [{"id": "a", "title": "kite", "label": {"category": "Kites"}}, {"id": "b", "title": "", "label": {}},
            {"id": "c", "title": "x" * 2000, "label": {"category": "Kites"}}]
    assert [r["id"] for r in versus.usable(rows, "dev")] == ["a"]
    # a repeated id: the first row counts (as mmllm's reader keeps it), the next is named and left out of both
    twice = [{"id": "a", "title": "kite", "label": {"category": "Kites"}},
             {"id": "a", "title": "puppet", "label": {"category": "Puppets"}}]
    assert [r["title"] for r in versus.usable(twice, "dev")] == ["kite"]
    assert "left out: dev line 2 (id 'a'): id: repeats line 1" in capsys.readouterr().err
    assert versus.gold_attributes({"category": "Kites"}) is None
    assert versus.gold_attributes({"category": "Kites", "attributes": {}}) == {}
    scores = versus.published_scores([None, {"brand": "LEGO"}], [{"brand": "LEGO"}, {"brand": "LEGO"}], ["brand"])
    assert scores == {"brand": {"precision": 1.0, "recall": 1.0, "f1": 1.0}}


def test_a_split_with_an_empty_side_is_refused_before_anything_is_fitted(tmp_path):
    catalog = tmp_path / "rows.jsonl"
    catalog.write_text('{"id": "a", "title": "kite", "label": {"category": "Kites"}}\n')
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "versus_bag_of_words.py"), "--catalog",
                           str(catalog), "--skip-recipe", "--set", "train.epochs=2", "--set", "anchor.epochs=1",
                           "--out", str(tmp_path / "out.json")], capture_output=True, text=True)
    assert done.returncode == 1 and "0 training and 1 dev rows: both sides need rows" in done.stderr, done.stderr


def _versus(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "versus_bag_of_words.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def _kites(path, n=12):
    path.write_text("".join(json.dumps({"id": f"r{i}", "title": f"{'delta kite' if i % 2 else 'jigsaw puzzle'} {i}",
                                        "label": {"category": "Kites" if i % 2 else "Jigsaws"}}) + "\n"
                            for i in range(n)))
    return path


def test_paths_are_read_from_where_the_user_runs_it_and_an_input_is_never_written(tmp_path):
    catalog = _kites(tmp_path / "rows.jsonl", 40)
    before = catalog.read_bytes()
    # relative paths are the user's folder's (the script runs the recipe in the project folder)
    done = _versus("--catalog", "rows.jsonl", "--skip-recipe", "--quick", "--out", "out.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["train_rows"] + written["dev_rows"] == 40 and written["dev_rows"] > 0
    # --out may not be an input: the catalog stays as it was
    done = _versus("--catalog", "rows.jsonl", "--skip-recipe", "--quick", "--out", "rows.jsonl", cwd=tmp_path)
    assert done.returncode == 2 and "--out" in done.stderr and "would write over the input" in done.stderr
    assert catalog.read_bytes() == before


def test_bad_input_is_named_before_anything_is_fitted(tmp_path):
    catalog = _kites(tmp_path / "rows.jsonl", 40)
    done = _versus("--catalog", catalog, "--skip-recipe", "--only", "categroy", "--out", tmp_path / "o.json")
    assert done.returncode == 1 and "--only categroy: not a label of schema 'drafted'; its labels: category" in done.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text(catalog.read_text() + '{"id": "x", "title": "kite\n')
    done = _versus("--catalog", broken, "--skip-recipe", "--out", tmp_path / "o.json")
    assert done.returncode == 1 and f"{broken} line 41: not valid JSON" in done.stderr, done.stderr
    no_id = tmp_path / "no_id.jsonl"
    no_id.write_text(catalog.read_text() + '{"title": "kite", "label": {"category": "Kites"}}\n')
    done = _versus("--catalog", no_id, "--skip-recipe", "--quick", "--out", tmp_path / "o.json")
    assert done.returncode == 0, done.stderr  # was a KeyError: the split hashed a missing id
    assert "left out: no_id.jsonl line 41: id: missing" in done.stderr
    written = json.loads((tmp_path / "o.json").read_text())
    assert written["train_rows"] + written["dev_rows"] == 40  # the 40 rows with an id


def test_a_labels_file_is_scored_by_the_models_own_values_as_a_training_run_is():
    """A labels file's attributes are grounded (the seller table may state the value): the best value is the
    model's distribution, which a training run of the same folder scores, so both paths give the same number."""
    versus = _module()
    grounded = {"attributes": {"brand": "Zed"},  # the table's value, published over the model's
                "attribute_top_k": {"brand": [{"value": None, "score": 0.5}, {"value": "Acme", "score": 0.3},
                                              {"value": "Zed", "score": 0.2}]}}
    assert versus.best_value(grounded, "brand") == "Acme"
    assert versus.best_value({"attributes": {"brand": "Zed"}}, "brand") == "Zed"  # no distribution: the answer
    assert versus.best_value({"attributes": {"brand": None}, "attribute_top_k": {"brand": [{"value": None}]}},
                             "brand") is None


def test_a_csv_catalog_is_read_through_mmllms_reader(tmp_path, capsys):
    versus = _module()
    path = tmp_path / "shop.csv"
    path.write_text('id,title,label\na,Red kite,"{""category"": ""Kites""}"\nb,,"{""category"": ""Kites""}"\n'
                    'c,Blue kite,\n', encoding="utf-8")
    rows = versus.read_rows(path)
    assert [(r["id"], r["title"], (r.get("label") or {}).get("category")) for r in rows] == [
        ("a", "Red kite", "Kites"), ("c", "Blue kite", None)]
    assert "left out: shop.csv line 3 (id 'b'): title" in capsys.readouterr().err


def test_several_training_catalogs_are_read_as_one_and_rows_outside_the_schema_leave_both_sides(tmp_path):
    """--train takes several catalogs (a shop's rows and a larger catalog beside them, as the big-catalog recipe
    trains): a repeated id counts once (its first row, named), and a training row whose category the schema does
    not have is left out, as the recipe leaves it out, so both sides train on the same rows."""
    first = _kites(tmp_path / "shop.jsonl", 20)
    more = tmp_path / "more.jsonl"
    more.write_text("".join(json.dumps({"id": f"m{i}", "title": f"stunt kite {i}", "label": {"category": "Kites"}}) + "\n"
                            for i in range(6))
                    + json.dumps({"id": "r3", "title": "repeated id", "label": {"category": "Jigsaws"}}) + "\n"
                    + json.dumps({"id": "x1", "title": "a doll", "label": {"category": "Dolls"}}) + "\n")
    schema = tmp_path / "schema.yaml"
    schema.write_text("name: kites\ntaxonomy: [Kites, Jigsaws]\nattributes: []\n")
    dev = _kites(tmp_path / "dev.jsonl", 6)
    done = _versus("--train", first, more, "--dev", dev, "--schema", schema, "--skip-recipe", "--quick",
                   "--out", tmp_path / "o.json")
    assert done.returncode == 0, done.stderr
    assert "left out: more.jsonl (id 'r3'): id: already a training row of shop.jsonl" in done.stderr
    assert "left out: 1 training rows whose category is not in schema 'kites' (first: id 'x1', 'Dolls')" in done.stderr
    written = json.loads((tmp_path / "o.json").read_text())
    assert (written["train_rows"], written["dev_rows"]) == (20 + 6, 6)
    # one file alone: its 20 rows (the fingerprint of the rows differs, so a baseline of one is not read for the other)
    done = _versus("--train", first, "--dev", dev, "--schema", schema, "--skip-recipe", "--quick",
                   "--out", tmp_path / "one.json")
    assert done.returncode == 0 and json.loads((tmp_path / "one.json").read_text())["train_rows"] == 20
    assert json.loads((tmp_path / "one.json").read_text())["rows_sha256"] != written["rows_sha256"]


def test_folds_partition_the_rows_by_the_same_hash():
    versus = _module()
    rows = [{"id": f"row{i}", "title": f"listing {i}"} for i in range(1000)]
    devs = [versus.fold_split(rows, 5, k)[1] for k in range(5)]
    ids = [r["id"] for dev in devs for r in dev]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every row is dev exactly once
    assert all(140 < len(dev) < 260 for dev in devs)
    train, dev = versus.fold_split(rows, 5, 2)
    assert {r["id"] for r in train} == {r["id"] for r in rows} - {r["id"] for r in dev}
    assert [r["id"] for r in devs[0]] == [r["id"] for r in versus.hash_split(rows, 20)[1]]  # fold 0 of 5
    salted = [r["id"] for r in versus.fold_split(rows, 5, 0, "#1")[1]]
    assert salted == [r["id"] for r in versus.hash_split(rows, 20, "#1")[1]] and salted != [r["id"] for r in devs[0]]
    three = [versus.fold_split(rows, 3, k)[1] for k in range(3)]
    assert sum(map(len, three)) == 1000 and min(map(len, three)) > 250


def test_folds_are_pooled_row_by_row_and_their_paired_counts_add_up():
    """Each fold's dev rows are other rows: pooled, every row is scored once and the rows only one side gets
    right add up over the folds, so one test over all of them has K times the rows of one split."""
    versus = _module()

    def fold(ids, gold, ours, theirs, labels=("category", "brand")):
        dev = [{"id": i, "label": {"category": c, "attributes": {"brand": b}}} for i, (c, b) in zip(ids, gold)]
        runs = [{"seed": 0, "scores": {n: {"answers": [o[j] for o in ours]} for j, n in enumerate(("category", "brand"))
                                       if n in labels}}]
        bow = {n: {"answers": {i: t[j] for i, t in zip(ids, theirs)}} for j, n in enumerate(("category", "brand"))
               if n in labels}
        return {"labels": list(labels), "dev": dev, "recipe": runs, "bag_of_words": bow}

    first = fold(["a", "b", "c"], [("Kites", "Acme"), ("Jigsaws", None), ("Kites", "Zed")],
                 [("Kites", "Acme"), ("Jigsaws", "Acme"), ("Jigsaws", "Zed")],  # ours: 2 / 3 categories, 2 / 2 brands
                 [("Jigsaws", "Acme"), ("Jigsaws", "Zed"), ("Kites", "Acme")])  # theirs: 2 / 3, 1 / 2
    second = fold(["d", "e"], [("Kites", "Acme"), ("Jigsaws", "Acme")],
                  [("Kites", "Zed"), ("Kites", "Acme")], [("Kites", "Acme"), ("Kites", "Zed")])
    summary = versus.pooled([first, second])
    assert summary["rows"] == 5 and summary["labels"] == ["category", "brand"]
    assert summary["bag_of_words"]["category"]["accuracy"] == pytest.approx(3 / 5)  # b, c, d
    assert summary["recipe"][0]["scores"]["category"]["accuracy"] == pytest.approx(3 / 5)  # a, b, d
    assert summary["recipe"][0]["scores"]["brand"] == {"accuracy": 0.75, "rows": 4}  # a, c, e of a, c, d, e
    assert summary["bag_of_words"]["brand"] == {"accuracy": 0.5, "rows": 4}  # a, d
    tests = summary["recipe"][0]["paired"]
    assert (tests["category"]["only_recipe"], tests["category"]["only_bag_of_words"]) == (1, 1)  # a / c
    assert (tests["brand"]["only_recipe"], tests["brand"]["only_bag_of_words"]) == (2, 1)  # c, e / d
    assert summary["paired"][-1] == "recipe, seed 0: category: +1 / -1, p = 1.000; brand: +2 / -1, p = 1.000"
    # a label one fold's drafted schema lacks is named, not pooled
    third = fold(["f"], [("Kites", None)], [("Kites", None)], [("Kites", None)], labels=("category",))
    summary = versus.pooled([first, second, third])
    assert summary["labels"] == ["category"] and summary["labels_not_in_every_fold"] == ["brand"]
    assert summary["rows"] == 6


def test_a_cross_validated_run_trains_each_fold_and_scores_every_row_once(tmp_path, capsys):
    catalog = _kites(tmp_path / "rows.jsonl", 60)
    done = _versus("--catalog", catalog, "--folds", "3", "--skip-recipe", "--quick", "--out", tmp_path / "cv.json")
    assert done.returncode == 0, done.stderr
    written = json.loads((tmp_path / "cv.json").read_text())
    assert written["folds"] == 3 and len(written["per_fold"]) == 3 and written["pooled"]["rows"] == 60
    dev_ids = [i for f in written["per_fold"] for i in f["dev_ids"]]
    assert sorted(dev_ids) == sorted(f"r{i}" for i in range(60))
    assert all(f["train_rows"] + f["dev_rows"] == 60 for f in written["per_fold"])
    right = sum(f["bag_of_words"]["category"]["accuracy"] * f["dev_rows"] for f in written["per_fold"])
    assert written["pooled"]["bag_of_words"]["category"]["accuracy"] == pytest.approx(right / 60, abs=1e-3)
    assert "== fold 3 of 3" in done.stdout and "== 3 folds pooled: 60 rows" in done.stdout
    for refused, message in ((["--folds", "1"], "--folds must be 2 to 100"),
                             (["--folds", "3", "--labels", catalog], "a --labels or --baseline file answers one split")):
        done = _versus("--catalog", catalog, *refused, "--out", tmp_path / "no.json")
        assert done.returncode == 2 and message in done.stderr, done.stderr
    done = _versus("--train", catalog, "--dev", catalog, "--folds", "3", "--out", tmp_path / "no.json")
    assert done.returncode == 2 and "--folds splits a --catalog" in done.stderr
    done = _versus("--catalog", catalog, "--folds", "3", "--dev-percent", "50", "--out", tmp_path / "no.json")
    assert done.returncode == 2 and "leave out --dev-percent" in done.stderr
    few = _kites(tmp_path / "few.jsonl", 3)
    versus = _module()
    empty = next(k for k in range(5) if not versus.fold_split(versus.read_rows(few), 5, k)[1])
    done = _versus("--catalog", few, "--folds", "5", "--skip-recipe", "--out", tmp_path / "no.json")
    assert done.returncode == 1, done.stderr
    assert f"fold {empty + 1} of 5: 3 training and 0 dev rows: both sides need rows; give more rows, fewer --folds" \
        in done.stderr  # numbered as the folds' headings number them
    assert not (tmp_path / "no.json").exists()


def test_a_label_one_folds_drafted_schema_lacks_is_refused_before_any_fold_is_fitted(tmp_path):
    """Each fold drafts its schema from its own training rows: an --only label that one of them lacks (every row
    stating it is that fold's dev) is named before the first fold is fitted, not after the others were."""
    versus = _module()
    rows = [{"id": f"r{i}", "title": f"{'delta kite' if i % 2 else 'jigsaw puzzle'} {i}",
             "label": {"category": "Kites" if i % 2 else "Jigsaws"}} for i in range(60)]
    last = {r["id"] for r in versus.fold_split(rows, 3, 2)[1]}
    for r in rows:
        if r["id"] in last and r["label"]["category"] == "Kites":
            r["label"]["attributes"] = {"wind": "strong" if int(r["id"][1:]) % 4 == 1 else "light"}
    catalog = tmp_path / "rare.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = _versus("--catalog", catalog, "--folds", "3", "--only", "category", "wind", "--skip-recipe", "--quick",
                   "--out", tmp_path / "rare.json")
    assert done.returncode == 1, done.stderr
    assert "--only wind: not a label of schema 'drafted' (drafted from fold 3 of 3's training rows)" in done.stderr
    assert "== fold 1 of 3" not in done.stdout  # nothing fitted
    assert not (tmp_path / "rare.json").exists()
