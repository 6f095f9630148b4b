"""Evaluation metrics against hand computations, the bootstrap, the comparison and the report."""

import json
from pathlib import Path

import pytest
from PIL import Image

from mmllm.evaluate import align, main
from mmllm.evidence import values_match
from mmllm.metrics import attribute_metrics, bootstrap, category_metrics, evaluate_rows, hierarchical_prf, top_k_accuracy

GOLD = [("r1", "A > B", {"piece_count": 10}), ("r2", "A > C", {"piece_count": 5}),
        ("r3", "D > E", {}), ("r4", "D > E", {"piece_count": 7})]
PRED = [{"id": "r1", "category": "A > B", "attributes": {"piece_count": 10}, "status": "ok"},
        {"id": "r2", "category": "A > B", "attributes": {"piece_count": 6}, "status": "ok"},
        {"id": "r3", "category": "D > E", "attributes": {"piece_count": 3}, "status": "ok"},
        {"id": "r4", "status": "error", "stage": "image", "error": "missing"},
        {"id": "stray", "category": "A > B", "attributes": {}, "status": "ok"}]


def write(tmp_path: Path, preds=PRED, gold=GOLD, name="pred.jsonl"):
    gold_path = tmp_path / "gold.jsonl"
    gold_path.write_text("".join(json.dumps({"id": i, "title": f"title {i}", "label": {"category": c, "attributes": a}}) + "\n"
                                 for i, c, a in gold))
    pred_path = tmp_path / name
    pred_path.write_text("".join(json.dumps(p) + "\n" for p in preds))
    return pred_path, gold_path


def test_category_metrics_by_hand():
    gold = ["A > B", "A > C", "D > E", "D > E"]
    pred = ["A > B", "A > B", "D > E", None]
    m = category_metrics(gold, pred)
    assert m["accuracy"] == 0.5
    assert m["per_class"]["A > B"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert m["per_class"]["A > C"]["f1"] == 0.0 and m["per_class"]["D > E"]["recall"] == 0.5
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((2 / 3 * 1 + 0 + 2 / 3 * 2) / 4)
    assert m["per_level_accuracy"] == {1: 0.75, 2: 0.5}
    # ancestor sets: shared 2+1+2+0 = 5, predicted 2+2+2+0 = 6, relevant 8
    h = m["hierarchical"]
    assert h["precision"] == pytest.approx(5 / 6) and h["recall"] == pytest.approx(5 / 8)
    assert h["f1"] == pytest.approx(2 * (5 / 6) * (5 / 8) / (5 / 6 + 5 / 8))


def test_hierarchical_f1_is_mlperfs_product_catalogue_definition(tmp_path):
    """MLPerf Inference's product-catalogue task: per row, the longest common prefix of the " > " paths;
    precision = that length summed over rows / the predicted path lengths summed, recall = / the gold path
    lengths summed; an unparsable answer predicts nothing (0 shared, 0 predicted). By hand, on paths of
    different depths, through `mmllm evaluate` itself."""
    gold = [("r1", "A > B > C", {}), ("r2", "A > B > C", {}), ("r3", "A > D", {}), ("r4", "E", {}),
            ("r5", "E > F > G > H", {})]
    preds = [{"id": "r1", "category": "A > B > C", "attributes": {}, "status": "ok"},      # lcp 3, |p| 3, |g| 3
             {"id": "r2", "category": "A > X", "attributes": {}, "status": "ok"},          # lcp 1, |p| 2, |g| 3
             {"id": "r3", "category": "A > D > Z", "attributes": {}, "status": "ok"},      # lcp 2, |p| 3, |g| 2
             {"id": "r4", "category": "Q > R", "attributes": {}, "status": "ok"},          # lcp 0, |p| 2, |g| 1
             {"id": "r5", "status": "invalid", "raw": "{not json", "error": "invalid JSON"}]  # 0, 0, |g| 4
    lcp, predicted, relevant = 3 + 1 + 2 + 0 + 0, 3 + 2 + 3 + 2 + 0, 3 + 3 + 2 + 1 + 4
    precision, recall = lcp / predicted, lcp / relevant
    pred_path, gold_path = write(tmp_path, preds, gold)
    out = tmp_path / "report"
    assert main(["--pred", str(pred_path), "--gold", str(gold_path), "--report", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    h = metrics["category"]["hierarchical"]
    assert h["precision"] == pytest.approx(precision) and h["recall"] == pytest.approx(recall)
    assert h["f1"] == pytest.approx(2 * precision * recall / (precision + recall)) == metrics["hierarchical_f1"]
    assert metrics["category"]["per_level_accuracy"] == {"1": 3 / 5, "2": 2 / 4, "3": 1 / 3, "4": 0.0}
    assert "| 1 | 0.6000 |" in (out / "report.md").read_text()


def test_hierarchical_partial_credit_and_empty_predictions():
    assert hierarchical_prf(["A > B > C"], ["A > B > D"]) == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    assert hierarchical_prf(["A > B"], [None]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert hierarchical_prf(["A > B"], ["X > Y"])["f1"] == 0.0
    assert category_metrics(["A"], [None])["accuracy"] == 0.0


def test_attribute_metrics_by_hand():
    gold = [{"piece_count": 10}, {"piece_count": 5}, {}, {"piece_count": 7}]
    pred = [{"piece_count": 10}, {"piece_count": 6}, {"piece_count": 3}, {}]
    m = attribute_metrics(gold, pred, ["piece_count"], tolerance=0.0)["per_attribute"]["piece_count"]
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx(1 / 3)
    assert m["coverage"] == pytest.approx(2 / 3) and m["invented"] == 1.0 and m["gold_values"] == 3
    loose = attribute_metrics(gold, pred, ["piece_count"], tolerance=1.0)["per_attribute"]["piece_count"]
    assert loose["precision"] == pytest.approx(2 / 3) and loose["recall"] == pytest.approx(2 / 3)


def test_values_match_rules():
    assert values_match(["Wood", "plastic"], ["plastic", "wood"]) and not values_match(["wood"], ["wood", "metal"])
    assert values_match(3, 3.0) and not values_match(True, 1) and values_match(" Red", "red")
    assert values_match(2.6, 3, tolerance=0.5) and not values_match(2.4, 3, tolerance=0.5)


def test_top_k_accuracy():
    assert top_k_accuracy(["A", "B"], [["A", "C"], ["C", "D", "B"]], 1) == 0.5
    assert top_k_accuracy(["A", "B"], [["A", "C"], ["C", "D", "B"]], 3) == 1.0
    assert top_k_accuracy(["A"], [[]], 1) is None


def test_alignment_counts_errors_missing_and_stray_rows(tmp_path):
    pred, gold = write(tmp_path, preds=PRED[:3] + PRED[4:])  # r4 missing entirely
    rows = align(pred, gold, None)
    m = evaluate_rows(rows, ["piece_count"], 0.0)
    assert (m["missing_rows"], m["error_rows"], m["extra_predictions"]) == (1, 0, 1)
    assert m["category_accuracy"] == 0.5 and m["json_valid_rate"] == 1.0
    pred, gold = write(tmp_path, name="p2.jsonl")
    m = evaluate_rows(align(pred, gold, None), ["piece_count"], 0.0)
    assert (m["missing_rows"], m["error_rows"]) == (0, 1) and m["json_valid_rate"] == 0.75


def test_a_category_only_gold_row_scores_its_category_and_no_attribute(tmp_path):
    """r3's gold ``{}`` makes its predicted piece count an invented value; a gold row labelled for its
    category only (no ``attributes``) knows nothing of it: no false positive, no invention."""
    pred, gold = write(tmp_path, name="p1.jsonl")
    rows = align(pred, gold, None)
    stated = evaluate_rows(rows, ["piece_count"], 0.0)
    per = attribute_metrics(rows.gold_attributes, rows.pred_attributes, ["piece_count"], 0.0)["per_attribute"]["piece_count"]
    assert stated["attribute_micro_f1"] == pytest.approx(1 / 3) and per["invented"] == 1.0  # tp 1, fp 2, fn 2
    only = [(i, c, None if i == "r3" else a) for i, c, a in GOLD]
    pred, gold = write(tmp_path, gold=only, name="p2.jsonl")
    rows = align(pred, gold, None)
    assert rows.gold_attributes[rows.ids.index("r3")] is None
    unknown = evaluate_rows(rows, ["piece_count"], 0.0)
    assert unknown["attribute_micro_f1"] == pytest.approx(0.4)  # tp 1, fp 1, fn 2
    assert unknown["category_accuracy"] == stated["category_accuracy"] == 0.5  # r3 still counts for its category
    per = attribute_metrics(rows.gold_attributes, rows.pred_attributes, ["piece_count"], 0.0)["per_attribute"]["piece_count"]
    assert per["gold_values"] == 3 and per["invented"] == 0.0  # r1, r2, r4; no gold-absent row is left


def test_bootstrap_is_seeded_and_brackets_the_estimate(tmp_path):
    gold = [(f"r{i}", "A > B" if i % 3 else "C > D", {"piece_count": i}) for i in range(60)]
    preds = [{"id": f"r{i}", "category": "A > B", "attributes": {"piece_count": i if i % 2 else 0}, "status": "ok"}
             for i in range(60)]
    pred, gold_path = write(tmp_path, preds=preds, gold=gold)
    rows = align(pred, gold_path, None)
    point = evaluate_rows(rows, ["piece_count"], 0.0)
    a = bootstrap(rows, ["piece_count"], 0.0, samples=200, seed=3)
    assert a == bootstrap(rows, ["piece_count"], 0.0, samples=200, seed=3)
    assert a != bootstrap(rows, ["piece_count"], 0.0, samples=200, seed=4)
    for key, (lo, hi) in a.items():
        assert lo <= point[key] <= hi, key
    assert a["category_accuracy"][0] < point["category_accuracy"] < a["category_accuracy"][1]


def test_bootstrap_brackets_the_accuracy_at_each_coverage_and_pairs_it(tmp_path):
    """With confidences the bootstrap draws a curve per resample: intervals for the accuracy at 50 / 80 /
    100% coverage around the point estimate, a paired difference of zero against the same file, none
    against a file without confidences. 60 rows, 40 right, scored 0.9 (tied), two wrong rows above them
    at 0.95: the curve cannot split the ties, so 50% coverage keeps 42 rows at 40 / 42."""
    gold = [(f"r{i}", "A > B" if i % 3 else "C > D", {}) for i in range(60)]
    preds = [{"id": f"r{i}", "category": "A > B", "attributes": {}, "status": "ok",
              "confidence": 0.95 if i in (0, 3) else 0.9 if i % 3 else 0.1 + i / 1000} for i in range(60)]
    pred, gold_path = write(tmp_path, preds=preds, gold=gold)
    rows = align(pred, gold_path, None)
    at = bootstrap(rows, [], 0.0, samples=300, seed=1)["accuracy_at_coverage"]
    assert set(at) == {"50%", "80%", "100%"}
    for coverage, point in (("50%", 40 / 42), ("100%", 40 / 60)):  # the 0.9 ties keep 42 rows at 50%
        lo, hi = at[coverage]
        assert lo < point < hi, coverage
    assert at["50%"][0] > at["100%"][1]  # the top half is surely better than all rows here
    same = bootstrap(rows, [], 0.0, samples=50, seed=1, other=rows)["accuracy_at_coverage"]
    assert all(bounds == [0.0, 0.0] for bounds in same.values())
    bare, _ = write(tmp_path, preds=[{k: v for k, v in r.items() if k != "confidence"} for r in preds], gold=gold,
                    name="bare.jsonl")
    assert "accuracy_at_coverage" not in bootstrap(rows, [], 0.0, samples=20, seed=1, other=align(bare, gold_path, None))
    assert "accuracy_at_coverage" not in bootstrap(align(bare, gold_path, None), [], 0.0, samples=20, seed=1)

    flat = [{**r, "confidence": 0.5} for r in preds]  # one tie: every coverage keeps every row
    other, _ = write(tmp_path, preds=flat, gold=gold, name="flat.jsonl")
    report = tmp_path / "report"
    assert main(["--pred", str(pred), "--gold", str(gold_path), "--report", str(report), "--compare", str(other),
                 "--bootstrap", "200"]) == 0
    text = (report / "report.md").read_text()
    lo, hi = json.loads((report / "metrics.json").read_text())["intervals"]["accuracy_at_coverage"]["50%"]
    assert f"| 50% | {40 / 42:.4f} | [{lo:.4f}, {hi:.4f}] |" in text
    row = next(line for line in text.splitlines() if line.startswith("| accuracy at 50% coverage |"))
    assert row.startswith(f"| accuracy at 50% coverage | {40 / 42:.4f} | {40 / 60:.4f} | {40 / 42 - 40 / 60:+.4f} |")
    assert row.endswith("| this is better |")


def test_the_bootstrap_gives_what_rescoring_each_resample_gives():
    """The bootstrap weighs each row by how often a resample draws it (metrics._Tally) instead of
    re-scoring the resampled rows (15-23 minutes on 40,000 rows): on rows with every odd case (no gold
    category, no answer, an answer outside the gold's classes, tied and missing confidences, rows labelled
    for the category only, failed and missing predictions) both give the same intervals to the last bit,
    paired or not."""
    import random

    import numpy as np

    from mmllm.confidence import risk_coverage
    from mmllm.metrics import HEADLINE, Rows, selective_curve

    rng = random.Random(5)
    n = 90
    cats = ["A > B", "A > C", "D > E > F", "D > G", "H"]
    gold = [None if rng.random() < 0.1 else rng.choice(cats) for _ in range(n)]

    def draw() -> Rows:
        pred = [None if rng.random() < 0.1 else rng.choice(cats + ["Z > Q"]) if rng.random() < 0.5 else g
                for g in gold]
        gold_attrs = [None if rng.random() < 0.15 else {"pieces": rng.choice([None, 1, 2, 3])} for _ in range(n)]
        pred_attrs = [{"pieces": rng.choice([None, 1, 2, 3, 2.0])} for _ in range(n)]
        confidence = [None if rng.random() < 0.1 else rng.choice([0.2, 0.5, 0.5, 0.9]) if rng.random() < 0.3
                      else rng.random() for _ in range(n)]
        status = [rng.choice(["ok"] * 8 + ["invalid", "missing"]) for _ in range(n)]
        return Rows([f"r{i}" for i in range(n)], [""] * n, gold, pred, gold_attrs, pred_attrs, status,
                    [[] for _ in range(n)], confidence)

    def rescored(rows: Rows, other: Rows | None, samples: int, seed: int) -> dict:
        """The bootstrap as it was: each resample's rows scored again."""
        def subset(r: Rows, pick: list[int]) -> Rows:
            return Rows(*[[getattr(r, f)[i] for i in pick] for f in ("ids", "titles", "gold_category", "pred_category",
                          "gold_attributes", "pred_attributes", "status", "top_k", "confidence")])

        generator = np.random.default_rng(seed)
        draws = {k: [] for k in HEADLINE}
        at = {f"{c:.0%}": [] for c in (0.5, 0.8, 1.0)}
        for _ in range(samples):
            pick = generator.integers(0, n, n).tolist()
            subsets = [subset(r, pick) for r in (rows, other) if r is not None]
            a, *b = [evaluate_rows(s, ["pieces"], 0.0) for s in subsets]
            for key in HEADLINE:
                draws[key].append(a[key] - (b[0][key] if b else 0.0))
            curves = [selective_curve(s) for s in subsets]
            for c in (0.5, 0.8, 1.0):
                values = [curve.accuracy_at(c) for curve in curves]
                if None not in values:
                    at[f"{c:.0%}"].append(values[0] - (values[1] if len(values) > 1 else 0.0))
        out = {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in draws.items()}
        out["accuracy_at_coverage"] = {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
                                       for k, v in at.items() if v}
        return out

    rows, other = draw(), draw()
    assert bootstrap(rows, ["pieces"], 0.0, samples=150, seed=2) == rescored(rows, None, 150, 2)
    assert bootstrap(rows, ["pieces"], 0.0, samples=150, seed=2, other=other) == rescored(rows, other, 150, 2)
    # two integers past 2**53 are one float: one tie for the curve and the bootstrap alike
    assert risk_coverage([2 ** 53, 2 ** 53 + 1, 0.5], [True, False, True]).kept == [2, 3]
    big = Rows(rows.ids, rows.titles, rows.gold_category, rows.pred_category, rows.gold_attributes,
               rows.pred_attributes, rows.status, rows.top_k, [2 ** 53 + (i % 2) if i % 3 else c
                                                             for i, c in enumerate(rows.confidence)])
    assert bootstrap(big, ["pieces"], 0.0, samples=60, seed=4) == rescored(big, None, 60, 4)
    everyone = Rows(*[[g] * 3 for g in ("r", "", None, "A", None, {}, "ok", [], 0.5)])  # no gold category at all
    assert bootstrap(everyone, [], 0.0, samples=5)["category_accuracy"] == [0.0, 0.0]


def test_a_long_bootstrap_says_so_and_shows_its_progress(tmp_path, capsys, monkeypatch):
    """On 40,000 rows the 1,000 resamples took 15-23 minutes with no line on the terminal (now about 25 s;
    a million rows would take ten minutes): past SLOW_BOOTSTRAP it says so and shows its progress."""
    import mmllm.evaluate as evaluate_module

    gold = [(f"r{i}", ["A > B", "D > E"][i % 2], {}) for i in range(30)]
    preds = [{"id": f"r{i}", "category": "A > B", "attributes": {}, "status": "ok", "confidence": 0.5 + i / 100}
             for i in range(30)]
    pred, gold_path = write(tmp_path, preds=preds, gold=gold)
    assert main(["--pred", str(pred), "--gold", str(gold_path), "--report", str(tmp_path / "quick"),
                 "--bootstrap", "40"]) == 0
    assert "bootstrap" not in capsys.readouterr().err  # seconds: nothing to say
    monkeypatch.setattr(evaluate_module, "SLOW_BOOTSTRAP", 30 * 40)
    assert main(["--pred", str(pred), "--gold", str(gold_path), "--report", str(tmp_path / "slow"),
                 "--bootstrap", "40"]) == 0
    err = capsys.readouterr().err
    assert "bootstrap: 40 resamples of 30 rows (--bootstrap 200 for a quicker report" in err
    assert "bootstrap: 4/40 resamples" in err and "bootstrap: 40/40 resamples" in err, err  # every tenth
    quick, slow = (json.loads((tmp_path / f / "metrics.json").read_text())["intervals"] for f in ("quick", "slow"))
    assert quick == slow  # the same seeded resamples


def test_report_files_plots_and_comparison(tmp_path, capsys):
    gold = [(f"r{i}", ["A > B", "A > C", "D > E"][i % 3], {"piece_count": i}) for i in range(30)]
    good = [{"id": f"r{i}", "category": ["A > B", "A > C", "D > E"][i % 3], "attributes": {"piece_count": i},
             "status": "ok", "confidence": 0.9, "top_k": [{"category": "A > B", "score": 0.9}]} for i in range(30)]
    bad = [{"id": f"r{i}", "category": "A > B", "attributes": {}, "status": "ok"} for i in range(30)]
    pred, gold_path = write(tmp_path, preds=good, gold=gold)
    other, _ = write(tmp_path, preds=bad, gold=gold, name="other.jsonl")
    model = tmp_path / "model"
    model.mkdir()
    Image.new("RGB", (1100, 400), "white").save(model / "training_curves.png")
    report = tmp_path / "report"
    assert main(["--pred", str(pred), "--gold", str(gold_path), "--report", str(report), "--compare", str(other),
                 "--model", str(model), "--bootstrap", "200"]) == 0
    text = (report / "report.md").read_text()
    assert "| category_accuracy | 1.0000 |" in text and "this is better" in text
    printed = capsys.readouterr().out  # the verdict on the terminal too
    line = next(x for x in printed.splitlines() if x.startswith("category_accuracy") and "better" in x)
    assert line.split()[1] == f"{1 - 1 / 3:+.4f}" and line.endswith("this is better")
    assert "## The 20 worst errors" in text and "![confusion_matrix](confusion_matrix.png)" in text
    sizes = {name: Image.open(report / name).size for name in
             ("confusion_matrix.png", "per_class_f1.png", "calibration.png", "training_curves.png")}
    assert sizes == {"confusion_matrix.png": (1200, 1000), "per_class_f1.png": (1000, 900),
                     "calibration.png": (600, 600), "training_curves.png": (1100, 400)}
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["metrics"]["top_k_accuracy"]["1"] == pytest.approx(1 / 3)
    assert metrics["comparison"]["intervals"]["category_accuracy"][0] > 0


def test_the_report_never_writes_over_an_input_or_into_the_model_folder(tmp_path, capsys):
    pred, gold = write(tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    (model / "mmllm_model.json").write_text("{}")
    before = gold.read_bytes()
    assert main(["--pred", str(pred), "--gold", str(gold), "--report", str(gold)]) == 2
    assert f"--report {gold} is a file; give a folder path" in capsys.readouterr().err
    assert main(["--pred", str(pred), "--gold", str(gold), "--model", str(model), "--report", str(model)]) == 2
    assert "would write over the input" in capsys.readouterr().err
    assert gold.read_bytes() == before and sorted(p.name for p in model.iterdir()) == ["mmllm_model.json"]
    with pytest.raises(SystemExit):
        main(["--pred", str(pred), "--gold", str(gold), "--report", str(tmp_path / "r"), "--bootstrap", "0"])
    assert "argument --bootstrap: must be at least 1" in capsys.readouterr().err


def test_a_repeated_prediction_keeps_the_first_a_bom_is_read_and_no_shared_id_is_said(tmp_path):
    preds = [PRED[0], {**PRED[0], "category": "D > E"}, *PRED[1:3]]
    pred, gold = write(tmp_path, preds=preds)
    pred.write_bytes(b"\xef\xbb\xbf" + pred.read_bytes())  # an editor's byte-order mark
    rows = align(pred, gold, None)
    assert rows.pred_category[:3] == ["A > B", "A > B", "D > E"]
    assert any("line 2 (id 'r1'): a second prediction for this id (the first is at line 1)" in w for w in rows.warnings)
    stale = {"id": "r1", "status": "error", "stage": "read", "error": "title: missing", "source": "d", "line": 1}
    fixed, _ = write(tmp_path, preds=[stale, PRED[0]], name="fixed.jsonl")  # fixed and labelled again (--resume-changed)
    assert align(fixed, gold, None).pred_category[0] == "A > B"
    other, _ = write(tmp_path, preds=[{"id": "x", "category": "A > B", "status": "ok"}], name="other.jsonl")
    assert any("none of its 1 predictions is for an id of gold.jsonl" in w for w in align(other, gold, None).warnings)


def test_one_bad_gold_field_leaves_the_others_normalized(tmp_path):
    """A lower-case gold category beside an age the schema refuses: the category is still read through the
    schema (and matches the right answer); the age is compared as written, with a warning naming it."""
    from mmllm.schema import LabelSchema

    schema = LabelSchema.from_yaml(Path(__file__).resolve().parents[1] / "examples" / "toys_schema.yaml")
    category = schema.categories[0]
    gold = [("r1", category.lower(), {"min_age_years": 99}), ("r2", category.lower(), {})]
    preds = [{"id": i, "category": category, "attributes": {}, "status": "ok"} for i in ("r1", "r2")]
    pred, gold_path = write(tmp_path, preds=preds, gold=gold)
    rows = align(pred, gold_path, schema)
    assert rows.gold_category == [category, category]
    assert evaluate_rows(rows, list(schema.attribute_names), 0.0)["category_accuracy"] == 1.0
    assert any("(id 'r1'): label: attributes.min_age_years: 99 is outside" in w for w in rows.warnings)


def test_an_empty_predictions_file_says_so(tmp_path):
    pred, gold = write(tmp_path, preds=[])
    rows = align(pred, gold, None)
    assert any("holds no predictions; every row counts as missing" in w for w in rows.warnings)


def test_an_attribute_f1_over_nothing_is_shown_as_not_applicable(tmp_path, capsys):
    gold = [("r1", "A > B", {}), ("r2", "A > C", {})]
    preds = [{"id": i, "category": c, "attributes": {}, "status": "ok"} for i, c, _ in gold]
    pred, gold_path = write(tmp_path, preds=preds, gold=gold)
    assert main(["--pred", str(pred), "--gold", str(gold_path), "--report", str(tmp_path / "r"), "--bootstrap", "5"]) == 0
    out = capsys.readouterr().out
    assert "attribute_micro_f1          n/a  (no gold attribute value and no answer to score)" in out
    assert "| attribute_micro_f1 | n/a |" in (tmp_path / "r" / "report.md").read_text()
    assert "category_accuracy        1.0000" in out


def test_paths_top_k_and_unlabelled_rows_are_read_as_the_answer_is(tmp_path):
    """Without a schema a path's spacing is evened out for the exact match as the per-level and hierarchical
    scores split it ("A>B" is "A > B": accuracy 0.5 beside hierarchical F1 1.0 before); with one, top-k
    categories go through it as the answer does (top-1 0.0 beside accuracy 1.0 before); a prediction for a
    gold row without a label is not one "for an id not in the gold file"."""
    from mmllm.schema import LabelSchema

    gold = [("r1", "A > B", {}), ("r2", "A > C", {})]
    preds = [{"id": "r1", "category": "A>B", "attributes": {}, "status": "ok"},
             {"id": "r2", "category": "A >  C", "attributes": {}, "status": "ok"},
             {"id": "r3", "category": "A > B", "attributes": {}, "status": "ok"}]
    pred, gold_path = write(tmp_path, preds=preds, gold=gold)
    with gold_path.open("a") as f:
        f.write(json.dumps({"id": "r3", "title": "not labelled yet"}) + "\n")
    metrics = evaluate_rows(align(pred, gold_path, None), [], 0.0)
    assert metrics["category_accuracy"] == 1.0 and metrics["hierarchical_f1"] == 1.0
    assert metrics["extra_predictions"] == 0 and metrics["unlabelled_gold_rows"] == 1

    schema = LabelSchema.from_dict({"name": "s", "taxonomy": ["A > B", "A > C"], "attributes": {}})
    lower = [{"id": i, "category": c.lower(), "attributes": {}, "status": "ok",
              "top_k": [{"category": c.lower(), "score": 0.9}, {"category": "a > x", "score": 0.1}]}
             for i, c, _ in gold]
    pred, gold_path = write(tmp_path, preds=lower, gold=gold, name="lower.jsonl")
    rows = align(pred, gold_path, schema)
    assert rows.top_k == [["A > B", "a > x"], ["A > C", "a > x"]]  # outside the taxonomy: as written
    metrics = evaluate_rows(rows, [], 0.0)
    assert metrics["category_accuracy"] == 1.0 and metrics["top_k_accuracy"][1] == 1.0


def test_the_threshold_for_a_target_is_printed_as_it_is_applied(tmp_path, capsys):
    """Rounded to 3 or 4 digits the printed threshold could be above the one found (0.758 for 0.757958), and
    keeping the rows at or above the printed value missed the target."""
    gold = [(f"r{i}", "A > B", {}) for i in range(10)]
    preds = [{"id": f"r{i}", "category": "A > B" if i != 3 else "A > C", "attributes": {}, "status": "ok",
              "confidence": round(0.9 - i * 0.0142137, 6)} for i in range(10)]
    pred, gold_path = write(tmp_path, preds=preds, gold=gold)
    assert main(["--pred", str(pred), "--gold", str(gold_path), "--report", str(tmp_path / "r"), "--bootstrap", "5",
                 "--target-accuracy", "1.0"]) == 0
    out = capsys.readouterr().out
    assert f"keep rows with confidence >= {preds[2]['confidence']:.6g}:" in out  # 0.871573, not 0.8716
