"""`mmllm label` on every model kind - LoRA adapter, merged model, classification heads, fusion and
a base checkpoint (zero-shot) - through the one loader (`mmllm.model_dir.load`) and the one
Predictor protocol; options a kind does not take are refused with a message, not a traceback."""

from __future__ import annotations

import json

import pytest

from mmllm.cli import main as mmllm
from mmllm.confidence import Calibration
from mmllm.model_dir import read_meta
from mmllm.schema import LabelSchema

from helpers import ROOT
from listings import toy_row, write_catalog

KINDS = ["generative-lora", "generative-merged", "classifier", "fusion", "base checkpoint"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_checkpoint):
    """One small folder of each kind, trained through `mmllm finetune` on the same 8 listings."""
    work = tmp_path_factory.mktemp("kinds")
    env = pytest.MonkeyPatch()  # a module fixture runs before the per-test mmllm_cache one: the same folder here
    env.setenv("MMLLM_CACHE", str(tmp_path_factory.getbasetemp() / "mmllm-cache"))
    catalog = write_catalog(work / "data", n=8)
    data = [f"data.train={catalog}", f"data.dev={catalog}", f"data.schema={catalog.parent / 'schema.yaml'}",
            "train.max_steps=2", "train.batch_size=4", "train.save_every=0"]
    folders = {"generative-lora": work / "lora", "classifier": work / "classifier", "fusion": work / "fusion"}
    for kind, config, extra in (
        ("generative-lora", "tiny_cpu.yaml", ["model.base=tiny:qwen2_vl", "data.max_train_rows=null"]),
        ("classifier", "tiny_cpu_classify.yaml", ["model.base=tiny:qwen2_vl", "data.max_train_rows=null"]),
        ("fusion", "fusion_minilm_cpu.yaml", ["fusion.max_text_tokens=32", "fusion.hidden=16",
                                               "fusion.lexical_buckets=256", "fusion.attr_buckets=64"]),
    ):
        code = mmllm(["finetune", "--config", str(ROOT / "finetune" / config), *data, *extra,
                      f"train.output_dir={folders[kind]}"])
        assert code == 0, kind
    folders["generative-merged"] = work / "merged"
    assert mmllm(["finetune", "merge", str(folders["generative-lora"]), str(folders["generative-merged"])]) == 0
    folders["base checkpoint"] = tiny_checkpoint("qwen2_vl")
    yield catalog, folders
    env.undo()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_mmllm_label_runs_on_every_model_kind(trained, tmp_path, capsys, kind):
    catalog, folders = trained
    model = folders[kind]
    out = tmp_path / "labels.jsonl"
    schema_args = ["--schema", str(catalog.parent / "schema.yaml")] if kind == "base checkpoint" else []
    assert mmllm(["label", str(catalog), "--model", str(model), "--out", str(out), "--batch-size", "3", "--quiet",
                  *schema_args]) == 0
    assert "8 rows: 8 ok, 0 invalid, 0 failed" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(f"item-{i}" for i in range(8))
    schema = LabelSchema.from_yaml(catalog.parent / "schema.yaml")
    for record in records:
        assert record["status"] == "ok"
        assert schema.validate({"category": record["category"], "attributes": record["attributes"]}).ok, record
    if kind != "base checkpoint":
        assert read_meta(model)["kind"] == kind
    # every kind scores its answer: the heads' calibrated probability, a generative model's category path
    # probability under the grammar (Platt-calibrated on dev in a trained folder)
    assert all(0 < r["confidence"] <= 1 for r in records)
    if kind in ("classifier", "fusion"):
        assert all(r["top_k"][0]["category"] == r["category"] for r in records)
    if kind != "base checkpoint":  # and every trained folder holds its dev calibration and risk-coverage curve
        calibration = Calibration.load(model)
        assert calibration.method == ("platt" if kind.startswith("generative") else "temperature")
        assert calibration.curve.rows == 8 and calibration.curve.coverage[-1] == 1.0
        if kind.startswith("generative"):  # the 8 dev answers, right and wrong, fitted the category's map
            assert calibration.category.rows == 8 and not calibration.category.identity
    if kind == "fusion":
        assert all(set(r["modality_weights"]) == {"text", "attributes"} for r in records)
    if kind != "base checkpoint":  # every trained kind's folder has its grounding: the seller's "Pieces" is published
        assert (model / "grounding.json").is_file()
        for record in records:
            i = int(record["id"].split("-")[1])
            evidence = record["evidence"]["piece_count"]
            assert record["attributes"]["piece_count"] == 10 + i
            assert (evidence["source"], evidence["key"], evidence["text"]) == ("table", "Pieces", str(10 + i))
            assert 0.9 <= evidence["confidence"] <= 1 and record["attribute_confidence"]["piece_count"] == evidence[
                "confidence"]
            assert record["attributes"]["material"] is None or record["evidence"].get("material")
        # the model's own answers (--ungrounded): where one contradicts the seller's table, the grounded
        # record keeps it as a conflict (a generative model's constrained answer included)
        own_out = tmp_path / "own.jsonl"
        assert mmllm(["label", str(catalog), "--model", str(model), "--out", str(own_out), "--quiet", "--ungrounded"]) == 0
        own = {r["id"]: r for r in map(json.loads, own_out.read_text().splitlines())}
        assert all("evidence" not in r for r in own.values())
        disagreed = 0
        for record in records:
            said = own[record["id"]]["attributes"]["piece_count"]
            if said is not None and said != record["attributes"]["piece_count"]:
                disagreed += 1
                assert any({"value": said, "source": "model"}.items() <= c.items()
                           for c in record["conflicts"]["piece_count"])
        # the tiny LoRA and classifier models answer other piece counts than the table, so the check above
        # ran; the fusion model learns the seller's counts on this catalog and agrees (its conflicts:
        # tests/test_grounding.py, which gives the grounder a disagreeing answer)
        assert disagreed > 0 or kind == "fusion", kind
    else:  # a base checkpoint has no folder to hold a fitted choice: the model's own answers
        assert all("evidence" not in r for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("kind, flags, message", [
    ("fusion", ["--min-pixels", "1000"],
     "error: --min-pixels / --max-pixels: {model} is a fusion model and does not take image pixel bounds"),
    ("fusion", ["--max-new-tokens", "64"], "error: --max-new-tokens: {model} is a fusion model and does not take "
                                           "the generation budget"),
    ("classifier", ["--no-constrained"], "error: --no-constrained: {model} is a classifier model and does not take "
                                         "schema-constrained decoding"),
    ("fusion", ["--static-cache"], "error: --static-cache: {model} is a fusion model and does not take a static "
                                   "decoding cache"),
    ("generative-lora", ["--encoder-precision", "bfloat16"], "error: --encoder-precision: {model} is a generative "
                                                             "model and does not take a lower precision for its encoders"),
    ("generative-lora", ["--class-prior", "uniform"], "error: --class-prior: {model} is a generative model and does "
                                                      "not take another catalog's category shares"),
])
def test_an_option_the_model_does_not_take_is_refused_with_a_message(trained, tmp_path, capsys, kind, flags, message):
    catalog, folders = trained
    out = tmp_path / "labels.jsonl"
    code = mmllm(["label", str(catalog), "--model", str(folders[kind]), "--out", str(out), "--quiet", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message.format(model=folders[kind]) in err and "Traceback" not in err
    assert not out.exists() and not out.with_name(out.name + ".job.json").exists()  # nothing labelled, nothing left


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classifier", "fusion"])
def test_class_prior_moves_each_answer_by_bayes_rule(trained, tmp_path, capsys, kind):
    """--class-prior CATALOG: every row's category distribution is the one without it, times the ratio of
    the catalog's smoothed gold shares to the folder's training shares (kept in mmllm_model.json),
    renormalized; the answers move towards the catalog's common category; a resume under other shares and
    a catalog with no category of the taxonomy are refused."""
    catalog, folders = trained
    model = folders[kind]
    schema = LabelSchema.from_yaml(catalog.parent / "schema.yaml")
    counts = read_meta(model)["category_counts"]
    assert counts == {c: 2 for c in schema.categories}  # the 8 training rows, 2 per category

    def kites(folder, i):  # 5 kites and 1 chess set: shares (5+1)/10, (1+1)/10, 1/10, 1/10
        row = toy_row()(folder, i)
        return {**row, "label": {**row["label"], "category": "Games > Chess" if i == 0 else "Outdoor > Kites"}}

    prior = write_catalog(tmp_path / "prior", 6, kites)
    answers = {}
    for name, flags in (("as_trained", []), ("kites", ["--class-prior", str(prior)])):
        out = tmp_path / f"{name}.jsonl"
        assert mmllm(["label", str(catalog), "--model", str(model), "--out", str(out), "--quiet", *flags]) == 0
        answers[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert "follow the gold category shares of 6 rows of catalog.jsonl" in capsys.readouterr().err
    target = {"Games > Chess": 0.2, "Outdoor > Kites": 0.6, "Games > Card Games": 0.1, "Vehicles > Cars": 0.1}
    for before, after in zip(answers["as_trained"], answers["kites"]):
        assert before["id"] == after["id"] and len(before["top_k"]) == 4  # every category: the whole distribution
        moved = {t["category"]: t["score"] * target[t["category"]] / 0.25 for t in before["top_k"]}
        total = sum(moved.values())
        expected = {c: v / total for c, v in moved.items()}
        got = {t["category"]: t["score"] for t in after["top_k"]}
        assert got == pytest.approx(expected, abs=2e-5)
        assert after["category"] == max(expected, key=expected.get)
        assert after["confidence"] == pytest.approx(max(expected.values()), abs=2e-5)
        was = {t["category"]: t["score"] for t in before["top_k"]}["Outdoor > Kites"]
        assert got["Outdoor > Kites"] > was or was < 1e-3 or was > 0.999  # the favoured share gains where it can
    kite_answers = [sum(r["category"] == "Outdoor > Kites" for r in answers[n]) for n in ("as_trained", "kites")]
    assert kite_answers[1] >= kite_answers[0]

    code = mmllm(["label", str(catalog), "--model", str(model), "--out", str(tmp_path / "kites.jsonl"), "--quiet",
                  "--resume", "--class-prior", "uniform"])
    assert code == 2 and "class_prior" in capsys.readouterr().err

    def elsewhere(folder, i):
        row = toy_row()(folder, i)
        return {**row, "label": {**row["label"], "category": "Garden > Spades"}}

    other = write_catalog(tmp_path / "other", 3, elsewhere)
    out = tmp_path / "other.jsonl"
    code = mmllm(["label", str(catalog), "--model", str(model), "--out", str(out), "--quiet", "--class-prior", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and f"--class-prior {other}: no row has a gold category of this model's taxonomy" in err
    assert "3 outside it" in err and not out.exists()


@pytest.mark.slow
def test_a_fusion_model_labels_with_bf16_encoders(trained, tmp_path, capsys):
    """--encoder-precision bfloat16 runs the fusion model's encoders under bf16 autocast: every row is
    labelled, the scores move a little, and a resume at another precision is refused."""
    catalog, folders = trained
    records = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / f"{precision}.jsonl"
        assert mmllm(["label", str(catalog), "--model", str(folders["fusion"]), "--out", str(out), "--quiet",
                      "--encoder-precision", precision]) == 0
        records[precision] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in records["bfloat16"]] == ["ok"] * 8
    pairs = list(zip(records["float32"], records["bfloat16"]))
    assert all(a["id"] == b["id"] and abs(a["confidence"] - b["confidence"]) < 0.05 for a, b in pairs)
    def scores(record):  # every number the encoders' outputs reach, to the 6 digits a record keeps
        return [record["confidence"], *(t["score"] for t in record["top_k"]),
                *record.get("attribute_applies", {}).values(), *record.get("modality_weights", {}).values()]

    # the encoders did run in bf16 (a category the model is sure of reads 1.0 at either precision: the
    # whole record is compared)
    assert any(scores(a) != scores(b) for a, b in pairs)
    capsys.readouterr()
    code = mmllm(["label", str(catalog), "--model", str(folders["fusion"]), "--out", str(tmp_path / "float32.jsonl"),
                  "--quiet", "--resume", "--encoder-precision", "bfloat16"])
    assert code == 2 and "encoder_precision was None, now 'bfloat16'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_static_decoding_cache_labels_as_the_growing_one_does(trained, tmp_path):
    catalog, folders = trained
    records = {}
    for flags in ([], ["--static-cache"]):
        out = tmp_path / f"labels{len(flags)}.jsonl"
        assert mmllm(["label", str(catalog), "--model", str(folders["generative-lora"]), "--out", str(out), "--quiet",
                      "--batch-size", "3", *flags]) == 0
        records[bool(flags)] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records[True]) == len(records[False]) > 3
    for static, growing in zip(records[True], records[False]):
        assert static["id"] == growing["id"] and static["category"] == growing["category"]
        assert static["attributes"] == growing["attributes"]
        assert static["confidence"] == pytest.approx(growing["confidence"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["generative-lora", "fusion"])
def test_review_queue_from_a_target_accuracy_and_the_curve_in_evaluate(trained, tmp_path, capsys, kind):
    catalog, folders = trained
    model, out = folders[kind], tmp_path / "labels.jsonl"
    point = Calibration.load(model).threshold_for(0.5)
    assert point is not None  # the dev rows are the training rows here: some share reaches 0.5
    code = mmllm(["label", str(catalog), "--model", str(model), "--out", str(out), "--quiet",
                  "--review-target-accuracy", "0.5"])
    captured = capsys.readouterr()
    assert code == 0 and f"keep rows with confidence >= {point.threshold:.6g}" in captured.err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    low = [r for r in records if r["confidence"] < point.threshold]
    assert all(r["review"] is (r["confidence"] < point.threshold) for r in records)
    queue = [json.loads(line) for line in (tmp_path / "labels.review.jsonl").read_text().splitlines()]
    assert [r["id"] for r in queue] == [r["id"] for r in sorted(low, key=lambda r: r["confidence"])]
    assert f"review queue: {len(low)} rows" in captured.out
    report = tmp_path / "report"
    assert mmllm(["evaluate", "--pred", str(out), "--gold", str(catalog), "--report", str(report),
                  "--bootstrap", "20", "--target-accuracy", "0.5"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())["metrics"]["selective"]
    assert metrics["scored"] == 8 and (report / "risk_coverage.png").stat().st_size > 0
    assert "## Selective prediction" in (report / "report.md").read_text()
