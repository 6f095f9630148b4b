"""Batch labelling: one line per row whatever happens, constrained output always valid, batching
and sharding change nothing. The fault cases (kill -9, disk full, path clashes) are in test_faults_label.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from mmllm.constrained import answer_grammar, max_answer_tokens
from mmllm.label import main
from mmllm.schema import LabelSchema

from helpers import TOYS_SCHEMA, require
from listings import dump_row, small_schema, write_catalog


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_records(a: dict, b: dict) -> None:
    """The same records, key by key; the answer scores may differ in their last float digits only
    (rows padded into other batches: different float summation order)."""
    scores = ("confidence", "attribute_confidence")
    assert {i: {k: v for k, v in r.items() if k not in scores} for i, r in a.items()} == \
           {i: {k: v for k, v in r.items() if k not in scores} for i, r in b.items()}
    for i, r in a.items():
        for key in scores:
            expected = b[i].get(key)
            assert r.get(key) == (expected if expected is None else pytest.approx(expected, rel=1e-3, abs=1e-9)), i


def label(dump: Path, out: Path, model: Path, *extra: str) -> int:
    return main([str(dump), "--model", str(model), "--schema", str(dump.parent / "schema.yaml"), "--out", str(out),
                 "--quiet", *extra])


def test_constrained_output_validates_for_every_row_of_an_untrained_model(tmp_path, tiny_checkpoint):
    dump = write_catalog(tmp_path / "d", 200, dump_row(images=True), name="dump.jsonl")
    out = tmp_path / "labels.jsonl"
    assert label(dump, out, tiny_checkpoint("qwen2_vl"), "--batch-size", "32") == 0
    records = read(out)
    assert sorted(r["id"] for r in records) == sorted(f"r{i}" for i in range(200))
    schema = small_schema()
    for r in records:
        assert r["status"] == "ok", r
        assert schema.validate({"category": r["category"], "attributes": r["attributes"]}).ok
    # the grammar only masks: greedy decoding still follows the model, so the answer depends on the listing
    assert len({r["category"] for r in records}) > 1


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_constrained_with_the_full_toy_schema(tmp_path, tiny_checkpoint, arch):
    dump = write_catalog(tmp_path / "d", 6, dump_row(images=True), name="dump.jsonl")
    (dump.parent / "schema.yaml").write_text(TOYS_SCHEMA.read_text())
    out = tmp_path / "labels.jsonl"
    assert label(dump, out, tiny_checkpoint(arch), "--batch-size", "3") == 0
    toys = LabelSchema.from_yaml(TOYS_SCHEMA)
    for r in read(out):
        assert r["status"] == "ok" and toys.validate({"category": r["category"], "attributes": r["attributes"]}).ok


def test_unconstrained_mode_reports_invalid_rows(tmp_path, tiny_checkpoint):
    dump = write_catalog(tmp_path / "d", 6, dump_row(), name="dump.jsonl")
    out, errors = tmp_path / "labels.jsonl", tmp_path / "errors.jsonl"
    code = label(dump, out, tiny_checkpoint("qwen2_vl"), "--no-constrained", "--max-new-tokens", "12", "--errors", str(errors))
    assert code == 0  # invalid answers are reported, not failures of the job
    records = read(out)
    assert len(records) == 6 and all(r["status"] == "invalid" for r in records)
    assert all(r["error"].startswith("answer: ") and "raw" in r for r in records)
    assert len(read(errors)) == 6


def test_bad_rows_and_bad_images_get_one_line_each_with_the_reason(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "d"
    dump = write_catalog(folder, 3, dump_row(), name="dump.jsonl")
    Image.new("RGB", (30, 30), "red").save(folder / "ok.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (30, 30), "blue").save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", folder / "link.png")
    lines = dump.read_text().splitlines() + [
        json.dumps({"title": "no id"}),
        json.dumps({"id": "empty-title", "title": ""}),
        json.dumps({"id": "r0", "title": "duplicate id"}),
        '{"id": "broken-json", "title": ',
        json.dumps({"id": "missing-img", "title": "t", "images": ["nope.png"]}),
        json.dumps({"id": "corrupt-img", "title": "t", "images": ["broken.png"]}),
        json.dumps({"id": "escape-img", "title": "t", "images": ["../outside.png"]}),
        json.dumps({"id": "symlink-img", "title": "t", "images": ["link.png"]}),
        json.dumps({"id": "good-img", "title": "t", "images": ["ok.png"]}),
    ]
    dump.write_text("\n".join(lines) + "\n")
    out, errors = tmp_path / "labels.jsonl", tmp_path / "errors.jsonl"
    assert label(dump, out, tiny_checkpoint("qwen2_vl"), "--errors", str(errors)) == 1
    records = read(out)
    assert len(records) == len(lines)
    by_line = {r["line"]: r for r in records}
    assert [by_line[n]["status"] for n in (1, 2, 3, 12)] == ["ok"] * 4
    expect = {4: ("read", "id: missing"), 5: ("read", "title: empty"), 6: ("read", "duplicate id"),
              7: ("read", "not valid JSON"), 8: ("image", "nope.png"), 9: ("image", "broken.png"),
              10: ("image", "../outside.png"), 11: ("image", "link.png")}
    for line, (stage, text) in expect.items():
        r = by_line[line]
        assert (r["status"], r["stage"]) == ("error", stage) and text in r["error"], r
    assert by_line[11]["id"] == "symlink-img" and "symlink" in by_line[11]["error"]
    assert len(read(errors)) == 8
    assert "12 rows: 4 ok, 0 invalid, 8 failed (image 4, read 4)" in capsys.readouterr().out


def test_batched_output_equals_one_by_one(tmp_path, tiny_checkpoint):
    dump = write_catalog(tmp_path / "d", 12, dump_row(images=True), name="dump.jsonl")
    model = tiny_checkpoint("qwen2_5_vl")
    assert label(dump, tmp_path / "b1.jsonl", model, "--batch-size", "1") == 0
    assert label(dump, tmp_path / "b8.jsonl", model, "--batch-size", "8") == 0
    one = {r["id"]: r for r in read(tmp_path / "b1.jsonl")}
    eight = {r["id"]: r for r in read(tmp_path / "b8.jsonl")}
    assert_same_records(one, eight)


def test_shards_split_the_rows_without_overlap(tmp_path, tiny_checkpoint, capsys):
    dump = write_catalog(tmp_path / "d", 10, dump_row(), name="dump.jsonl")
    model = tiny_checkpoint("qwen2_vl")
    for i in range(3):
        assert label(dump, tmp_path / f"s{i}.jsonl", model, "--shard", f"{i}/3") == 0
    ids = [r["id"] for i in range(3) for r in read(tmp_path / f"s{i}.jsonl")]
    assert sorted(ids) == sorted(f"r{i}" for i in range(10)) and len(ids) == 10
    assert sorted(r["id"] for r in read(tmp_path / "s1.jsonl")) == ["r1", "r4", "r7"]
    with pytest.raises(SystemExit) as exit_info:
        label(dump, tmp_path / "x.jsonl", model, "--shard", "3/3")
    assert exit_info.value.code == 2
    assert "argument --shard: '3/3': need 0 <= I < N" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_a_run_refused_for_a_users_existing_file_leaves_nothing_beside_it(tmp_path, tiny_checkpoint, capsys):
    dump = write_catalog(tmp_path / "d", 2, dump_row(), name="dump.jsonl")
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"mine": 1}\n')
    assert label(dump, notes, tiny_checkpoint("qwen2_vl")) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "notes.jsonl"]  # no notes.jsonl.lock, no manifest
    assert notes.read_text() == '{"mine": 1}\n'


def test_existing_output_needs_resume_and_limit_works(tmp_path, tiny_checkpoint, capsys):
    dump = write_catalog(tmp_path / "d", 10, dump_row(), name="dump.jsonl")
    out = tmp_path / "labels.jsonl"
    model = tiny_checkpoint("qwen2_vl")
    assert label(dump, out, model, "--limit", "4") == 0
    assert len(read(out)) == 4
    assert label(dump, out, model) == 2
    assert "pass --resume" in capsys.readouterr().err
    out.write_text(out.read_text() + '{"id": "r9", "status": "o')  # a kill in the middle of a write
    assert label(dump, out, model, "--resume") == 0
    records = read(out)
    assert sorted(r["id"] for r in records) == sorted(f"r{i}" for i in range(10))
    assert "4 already done" in capsys.readouterr().out


def test_grammar_bounds():
    schema = LabelSchema.from_yaml(TOYS_SCHEMA)
    grammar = answer_grammar(schema)
    assert grammar.startswith('root ::= "{\\"category\\":" category')
    assert max_answer_tokens(schema) >= len(schema.canonical_json(
        {"category": max(schema.categories, key=len), "attributes": {"piece_count": 100000, "min_age_years": 20.5,
                                                                       "material": ["cardboard", "silicone", "plastic"]}}))


@pytest.mark.slow
def test_ray_engine_gives_the_same_predictions_as_local(tmp_path, tiny_checkpoint, capsys):
    require("ray", "ray")
    dump = write_catalog(tmp_path / "d", 10, dump_row(images=True), name="dump.jsonl")
    dump.write_text(dump.read_text() + json.dumps({"id": "", "title": "no id"}) + "\n"
                    + json.dumps({"id": "bad-img", "title": "t", "images": ["../x.png"]}) + "\n")
    model = tiny_checkpoint("qwen2_vl")
    assert label(dump, tmp_path / "local.jsonl", model, "--batch-size", "4") == 1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    assert label(dump, tmp_path / "ray.jsonl", model, "--batch-size", "4", "--engine", "ray", "--ray-actors", "2") == 1
    local = {(r["source"], r["line"]): r for r in read(tmp_path / "local.jsonl")}
    ray_out = {(r["source"], r["line"]): r for r in read(tmp_path / "ray.jsonl")}
    assert len(ray_out) == len(local) == 12
    assert_same_records(ray_out, local)
    # an option the model refuses: one line and exit 2, as the local engine, and nothing left behind
    refused = tmp_path / "refused.jsonl"
    assert label(dump, refused, model, "--engine", "ray", "--ray-actors", "1", "--encoder-precision", "bfloat16") == 2
    assert "encoder" in capsys.readouterr().err
    assert not list(tmp_path.glob("refused.jsonl*"))


@pytest.mark.slow
def test_ray_engine_against_a_cluster_at_an_address(tmp_path, tiny_checkpoint, capsys):
    """A cluster started elsewhere (`ray start --head` in another folder), named by Ray's own RAY_ADDRESS, and
    the command given relative paths: the actors ran in the cluster's folder, where `--model ../m` named
    nothing, and RAY_ADDRESS made the local start fail; the records are the local engine's. An address nothing
    answers at is refused at once (Ray retried it for about 14 minutes), leaving no files."""
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile

    require("ray", "ray")
    dump = write_catalog(tmp_path / "d", 8, dump_row(), name="dump.jsonl")
    model = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("qwen2_vl"), model)
    assert label(dump, tmp_path / "local.jsonl", model, "--batch-size", "4") == 0
    with socket.socket() as probe:  # a port nothing listens at (the cluster's, before it starts)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nowhere = tmp_path / "nowhere.jsonl"
    assert label(dump, nowhere, model, "--engine", "ray", "--ray-address", f"127.0.0.1:{port}") == 2
    assert f"error: --ray-address 127.0.0.1:{port}: no Ray cluster answers there (Connection refused)" \
        in capsys.readouterr().err
    assert not list(tmp_path.glob("nowhere.jsonl*"))
    ray = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    (tmp_path / "head").mkdir()
    (tmp_path / "elsewhere").mkdir()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    try:
        subprocess.run([str(ray), "start", "--head", f"--port={port}", "--num-cpus=2", "--disable-usage-stats",
                        "--include-dashboard=false", f"--temp-dir={temp}"], cwd=tmp_path / "head", env=env,
                       check=True, capture_output=True, timeout=300)
        done = subprocess.run([sys.executable, "-m", "mmllm.label", "../d/dump.jsonl", "--model", "../m", "--schema",
                               "../d/schema.yaml", "--out", "ray.jsonl", "--batch-size", "4", "--engine", "ray"],
                              cwd=tmp_path / "elsewhere", env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                              capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run([str(ray), "stop", "--force"], env=env, capture_output=True, timeout=300)
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 rows: 8 ok" in done.stdout and "(summed over 2 replicas)" in done.stdout
    assert "model 0.0 s" not in done.stdout  # the actors' timings reach the summary
    local = {(r["source"], r["line"]): r for r in read(tmp_path / "local.jsonl")}
    assert_same_records({(r["source"], r["line"]): r for r in read(tmp_path / "elsewhere" / "ray.jsonl")}, local)


def test_review_flags_and_queue_and_what_is_refused(tmp_path, tiny_checkpoint, capsys):
    dump = write_catalog(tmp_path / "d", 6, dump_row(), name="dump.jsonl")
    model = tiny_checkpoint("qwen2_vl")
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"my": "notes"}\n')
    out = tmp_path / "labels.jsonl"
    # a user's file as the queue, or a target accuracy without a model folder: refused before anything is written
    assert label(dump, out, model, "--review-below", "0.5", "--review-out", str(mine)) == 2
    assert "not a review queue written by `mmllm label`" in capsys.readouterr().err
    assert mine.read_text() == '{"my": "notes"}\n' and not out.exists()
    assert label(dump, out, model, "--review-target-accuracy", "0.9") == 2
    assert "--review-target-accuracy needs a fine-tuned model folder" in capsys.readouterr().err
    assert not out.exists()
    # a zero-shot generative model's records carry their category path probability: half of them go to review
    assert label(dump, out, model, "--review-below", "1") == 0
    records = read(out)
    threshold = sorted(r["confidence"] for r in records)[3]
    out2 = tmp_path / "labels2.jsonl"
    assert label(dump, out2, model, "--review-below", str(threshold)) == 0
    flagged = [r for r in read(out2) if r["review"]]
    assert len(flagged) == 3 and all(r["confidence"] < threshold for r in flagged)
    assert all(r["review_reason"].startswith("confidence ") for r in flagged)
    queue = [json.loads(line) for line in (tmp_path / "labels2.review.jsonl").read_text().splitlines()]
    assert [r["id"] for r in queue] == [r["id"] for r in sorted(flagged, key=lambda r: r["confidence"])]
    # two runs started together with one --review-out: the later-ending one replaced the other's queue; now the
    # queue is held for the run, and the second is refused before it labels anything
    import fcntl

    shared = tmp_path / "shared.review.jsonl"
    fd = os.open(shared, os.O_WRONLY | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first run, labelling
    try:
        out3 = tmp_path / "labels3.jsonl"
        assert label(dump, out3, model, "--review-below", "1", "--review-out", str(shared)) == 2
        assert f"--review-out {shared} is being written by another run" in capsys.readouterr().err
        assert not list(tmp_path.glob("labels3.jsonl*")) and shared.read_text() == ""
    finally:
        os.close(fd)


def test_the_static_caches_compile_reaches_the_predictor_and_needs_the_static_cache(tmp_path, tiny_checkpoint, capsys,
                                                                                     monkeypatch):
    import mmllm.label as label_module

    dump = write_catalog(tmp_path / "d", 3, dump_row(), name="dump.jsonl")
    out = tmp_path / "labels.jsonl"
    assert label(dump, out, tiny_checkpoint("qwen2_vl"), "--static-compile", "inductor") == 2
    assert "--static-compile says how a static cache is compiled: add --static-cache" in capsys.readouterr().err
    assert not out.exists()
    loaded = []
    real = label_module.load_predictor

    def spy(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(label_module, "load_predictor", spy)
    for flags, way in ((["--static-cache"], "cudagraphs"), (["--static-cache", "--static-compile", "eager"], "eager")):
        out.unlink(missing_ok=True)
        assert label(dump, out, tiny_checkpoint("qwen2_vl"), "--max-new-tokens", "4", *flags) == 0
        assert (loaded[-1].static_cache, loaded[-1].static_compile) == (True, way)
        assert [r["status"] for r in read(out)] == ["ok"] * 3


def test_the_grammar_compiles_while_loading_and_a_machine_without_xgrammar_is_told_before_any_row(
        tmp_path, tiny_checkpoint, monkeypatch, capsys):
    import importlib.util

    from mmllm.label import load_predictor

    dump = write_catalog(tmp_path / "d", 3, dump_row(), name="dump.jsonl")
    model = str(tiny_checkpoint("qwen2_vl"))
    predictor = load_predictor(model, schema=str(dump.parent / "schema.yaml"))
    assert predictor.constrained and predictor._grammar is not None  # compiled before the first batch
    assert load_predictor(model, schema=str(dump.parent / "schema.yaml"), constrained=False)._grammar is None
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xgrammar" else find_spec(name, *a))
    out = tmp_path / "labels.jsonl"
    assert label(dump, out, tiny_checkpoint("qwen2_vl")) == 2  # the model or an option: nothing labelled
    err = capsys.readouterr().err
    assert "constrained decoding needs xgrammar" in err and "--no-constrained" in err
    assert not out.exists()  # nothing labelled, nothing left
    assert label(dump, out, tiny_checkpoint("qwen2_vl"), "--no-constrained", "--max-new-tokens", "4",
                 *(["--resume"] if out.exists() else [])) == 0
    assert len(read(out)) == 3


def test_a_model_path_that_is_no_model_says_so(tmp_path, capsys):
    """A training that failed leaves a folder with no meta file and no checkpoint config: not "a base checkpoint"."""
    from mmllm.label import main

    dump = tmp_path / "d.jsonl"
    dump.write_text('{"id": "a", "title": "Kite"}\n')
    stopped = tmp_path / "run"
    stopped.mkdir()
    (stopped / "metrics.jsonl").write_text("{}\n")
    for model, says in ((stopped, "not a model folder (no mmllm_model.json) nor a checkpoint (no config.json)"),
                        (tmp_path / "nowhere", "no such model folder")):
        assert main([str(dump), "--model", str(model), "--out", str(tmp_path / f"{model.name}.jsonl")]) == 2
        assert says in capsys.readouterr().err
