"""Training faults and untrained fields.

Bad inputs to ``python -m mmllm.finetune`` exit 2 with one line naming the config key or file,
before a model is built and without touching the output folder. A field no training row states
is recorded with 0 rows in the model folder's meta file, and every variant answers null for it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mmllm.recipes import generate
from mmllm.catalog import load_listings
from mmllm.finetune import finetune, load_recipe_config, main
from mmllm.images import ImagePolicy
from listings import load_model_dir

from helpers import ROOT
from listings import write_catalog

TINY = ROOT / "finetune" / "tiny_cpu.yaml"
TINY_CLASSIFY = ROOT / "finetune" / "tiny_cpu_classify.yaml"
FUSION = ROOT / "finetune" / "fusion_minilm_cpu.yaml"


@pytest.fixture(autouse=True)
def tiny_cache(tmp_path_factory, monkeypatch):
    """`tiny:ARCH` checkpoints are built once per test session, in a temporary cache."""
    monkeypatch.setenv("MMLLM_CACHE", str(tmp_path_factory.getbasetemp() / "mmllm-cache"))


# ---------------------------------------------------------------------- faults
@pytest.fixture
def earlier_run(tmp_path):
    """An output folder holding a stopped run (a finished checkpoint, metrics): resumable."""
    out = tmp_path / "out"
    ckpt = out / "checkpoints" / "step-00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text('{"step": 4}\n')
    (ckpt / "trainable.safetensors").write_bytes(b"\x00\x01weights")
    (out / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n{"step": 6, "loss": 0.4}\n')
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_model(*args, **kwargs):
    raise AssertionError("a model was built for a run that must stop on its inputs")


def _fails(capsys, monkeypatch, args: list[str], config: Path = TINY) -> str:
    """Run the command line; it must exit 2 with exactly one error line, before building a model."""
    monkeypatch.setattr(generate, "load_base_model", _no_model)  # the generate and classify recipes' backbone
    monkeypatch.setattr(generate, "load_processor", _no_model)
    assert main(["--config", str(config), *args]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _run_args(catalog: Path, out: Path, **extra: object) -> list[str]:
    base = {"data.train": catalog, "data.dev": "null", "data.schema": catalog.parent / "schema.yaml",
            "train.output_dir": out, "train.resume": "true"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.parametrize("value", ["null", ""])
def test_unset_train_file_names_data_train(tmp_path, earlier_run, capsys, monkeypatch, value):
    catalog = write_catalog(tmp_path / "data", n=4)
    before = _snapshot(earlier_run)
    line = _fails(capsys, monkeypatch, _run_args(catalog, earlier_run, **{"data.train": value}))
    assert line == (f"error: {TINY}: data.train is not set: give the labelled catalog to train on (data.train=PATH, "
                    "or data.train=[A, B] for several)")
    assert _snapshot(earlier_run) == before


def test_missing_train_file_names_key_and_path(tmp_path, earlier_run, capsys, monkeypatch):
    catalog = write_catalog(tmp_path / "data", n=4)
    missing = tmp_path / "data" / "no_such_train.jsonl"
    before = _snapshot(earlier_run)
    line = _fails(capsys, monkeypatch, _run_args(catalog, earlier_run, **{"data.train": missing}))
    assert line == f"error: data.train: {missing} does not exist; give a labelled catalog (data.train=PATH)"
    assert _snapshot(earlier_run) == before


def test_train_file_without_usable_rows_names_key_and_file(tmp_path, earlier_run, capsys, monkeypatch):
    catalog = write_catalog(tmp_path / "data", n=4)
    unlabelled = tmp_path / "data" / "unlabelled.jsonl"
    rows = [json.loads(line) for line in catalog.read_text().splitlines()]
    unlabelled.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "label"}) + "\n" for r in rows)
                          + "{not json\n")
    before = _snapshot(earlier_run)
    line = _fails(capsys, monkeypatch, _run_args(catalog, earlier_run, **{"data.train": unlabelled}))
    assert line.startswith(f"error: data.train: {unlabelled} has no usable labelled rows (5 skipped; first: ")
    assert "(id 'item-0'): no label to train on" in line and "mmllm catalog validate --schema" in line
    assert _snapshot(earlier_run) == before
    empty = tmp_path / "data" / "empty.jsonl"
    empty.write_text("")
    assert _fails(capsys, monkeypatch, _run_args(catalog, earlier_run, **{"data.train": empty})) == (
        f"error: data.train: {empty} holds no rows")
    assert _snapshot(earlier_run) == before


def test_non_empty_output_folder_is_left_alone(tmp_path, earlier_run, capsys, monkeypatch):
    catalog = write_catalog(tmp_path / "data", n=4)
    before = _snapshot(earlier_run)
    line = _fails(capsys, monkeypatch, _run_args(catalog, earlier_run, **{"train.resume": "false"}))
    assert line == (f"error: train.output_dir: {earlier_run} is not empty; pass train.resume=true to continue it, "
                    "or another train.output_dir")
    assert _snapshot(earlier_run) == before
    # resuming a folder that holds no finished checkpoint is refused as early
    fresh = tmp_path / "fresh"
    line = _fails(capsys, monkeypatch, _run_args(catalog, fresh))
    assert line == (f"error: train.output_dir: train.resume=true but {fresh / 'checkpoints'} holds no finished "
                    "checkpoint; drop train.resume to start a new run")
    assert not fresh.exists()


@pytest.mark.parametrize("value, shown", [("nan", "nan"), ("0", "0.0"), ("-1e-4", "-0.0001"), ("inf", "inf")])
def test_bad_learning_rate_names_train_lr(tmp_path, earlier_run, capsys, monkeypatch, value, shown):
    catalog = write_catalog(tmp_path / "data", n=4)
    before = _snapshot(earlier_run)
    line = _fails(capsys, monkeypatch, _run_args(catalog, earlier_run, **{"train.lr": value}))
    assert line == f"error: {TINY}: train.lr must be a positive number (e.g. 2e-4), got {shown}"
    assert _snapshot(earlier_run) == before


@pytest.mark.parametrize("config, key, value, message", [
    (TINY, "train.epochs", 0, "train.epochs must be >= 1, got 0"),
    (TINY, "train.max_steps", 0, "train.max_steps must be >= 1 (or null to use train.epochs), got 0"),
    (TINY, "train.batch_size", -2, "train.batch_size must be >= 1, got -2"),
    (TINY, "train.grad_accum", 0, "train.grad_accum must be >= 1, got 0"),
    (TINY, "train.weight_decay", "nan", "train.weight_decay must be a number >= 0, got nan"),
    (TINY, "train.max_grad_norm", -1, "train.max_grad_norm must be a number >= 0, got -1.0"),
    (TINY, "train.warmup_ratio", "nan", "train.warmup_ratio must be in [0, 1), got nan"),
    (TINY, "train.keep_checkpoints", 0, "train.keep_checkpoints must be >= 1, got 0"),
    (TINY, "train.save_every", -1, "train.save_every must be >= 0, got -1"),
    (TINY, "data.max_train_rows", 0, "data.max_train_rows must be >= 1 (or null for all rows), got 0"),
    (TINY, "eval.batch_size", 0, "eval.batch_size must be >= 1, got 0"),
    (TINY_CLASSIFY, "classify.label_smoothing", "nan", "classify.label_smoothing must be in [0, 1), got nan"),
    (TINY_CLASSIFY, "eval.loss_rows", -1, "eval.loss_rows must be >= 1, got -1 (for no dev rows, set data.dev=null)"),
    (FUSION, "eval.loss_rows", 0, "eval.loss_rows must be >= 1, got 0 (for no dev rows, set data.dev=null)"),
    (FUSION, "heads.label_smoothing", "nan", "heads.label_smoothing must be in [0, 1), got nan"),
    (FUSION, "heads.bins", 0, "heads.bins must be >= 1, got 0"),
    (TINY, "lora.dropout", 1.5, "lora.dropout must be in [0, 1), got 1.5"),
    (TINY, "lora.alpha", "nan", "lora.alpha must be a finite number > 0, got nan"),
    (TINY, "lora.target", "(", "lora.target is not a regular expression (missing ), unterminated subpattern at "
                               "position 0): '('"),
    (TINY, "train.seed", -1, "train.seed must be >= 0, got -1"),
    (TINY, "augment.image_flip", 2, "augment.image_flip must be a number in [0, 1], got 2.0"),
    (FUSION, "model.max_images", -1, "model.max_images must be >= 0"),
    (FUSION, "fusion.hidden", 0, "fusion.hidden must be >= 1, got 0"),
    (FUSION, "fusion.modalities", "[text, audio]", "fusion.modalities must be a non-empty subset of "
                                                   "['text', 'image', 'attributes'], got ['text', 'audio']"),
])
def test_bad_numeric_settings_name_their_key(tmp_path, earlier_run, capsys, monkeypatch, config, key, value, message):
    catalog = write_catalog(tmp_path / "data", n=4)
    before = _snapshot(earlier_run)
    line = _fails(capsys, monkeypatch, _run_args(catalog, earlier_run, **{key: value}), config)
    assert line == f"error: {config}: {message}"
    assert _snapshot(earlier_run) == before


def test_a_run_stopped_before_its_first_checkpoint_starts_again_in_its_folder(tmp_path, capsys):
    """Stopped while it encoded, tuned or took its first steps, a run leaves its log, its feature cache and torn
    checkpoint folders: nothing to resume. It said "resume", which refused the folder, and a plain rerun refused
    it as not empty. The same command (with train.resume or without) now starts again there, the cache kept."""
    catalog = write_catalog(tmp_path / "data", n=4)
    for resume in ("false", "true"):
        out = tmp_path / f"out-{resume}"
        (out / "feature_cache" / "ab").mkdir(parents=True)
        (out / "feature_cache" / "ab" / "ab12.safetensors").write_bytes(b"cached")
        (out / "checkpoints" / ".tmp-step-00000001").mkdir(parents=True)  # killed while it saved its first
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
        (out / "training.lock").write_text("")  # mmllm started it
        args = _run_args(catalog, out, **{"train.resume": resume, "train.max_steps": 2, "train.log_every": 1,
                                                 "data.dev": "null"})
        assert main(["--config", str(TINY), *args]) == 0
        assert "the run there stopped before its first checkpoint; starting it again (its cached features are " \
               "read again)" in capsys.readouterr().out
        assert (out / "feature_cache" / "ab" / "ab12.safetensors").read_bytes() == b"cached"
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2] and 9.0 not in [json.loads(x).get("loss") for x in (out / "metrics.jsonl").open()]
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
        assert not (out / "training.lock").exists()  # a finished folder needs no lock
    # anything else in the folder is somebody's: left alone, as before
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (mixed / "training.lock").write_text("")
    (mixed / "notes.txt").write_text("mine\n")
    assert main(["--config", str(TINY), *_run_args(catalog, mixed, **{"train.resume": "false"})]) == 2
    assert "is not empty; pass train.resume=true" in capsys.readouterr().err
    assert sorted(p.name for p in mixed.iterdir()) == ["metrics.jsonl", "notes.txt", "training.lock"]
    # the same names, but no lock says mmllm made them (another project's weights and log): the user decides
    theirs = tmp_path / "theirs"
    (theirs / "checkpoints").mkdir(parents=True)
    (theirs / "checkpoints" / "step-3.pt").write_bytes(b"their weights")
    (theirs / "metrics.jsonl").write_text('{"epoch": 3, "acc": 0.91}\n')
    before = _snapshot(theirs)
    for resume in ("false", "true"):
        assert main(["--config", str(TINY), *_run_args(catalog, theirs, **{"train.resume": resume})]) == 2
        assert (f"{theirs} holds what a run leaves before its first checkpoint (nothing to resume), but no "
                f"training.lock says mmllm started it: delete {theirs}") in capsys.readouterr().err
    assert _snapshot(theirs) == before


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_trains(tmp_path, capsys):
    """The same command started twice: the second took the first's folder for one that stopped before its first
    checkpoint and deleted its log, then both trained into it."""
    import fcntl
    import os

    catalog = write_catalog(tmp_path / "data", n=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    fd = os.open(out / "training.lock", os.O_WRONLY | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first run, still training
    try:
        for resume in ("false", "true"):
            assert main(["--config", str(TINY), *_run_args(catalog, out, **{"train.resume": resume})]) == 2
            assert capsys.readouterr().err.strip() == (f"error: train.output_dir: another run is training into {out} "
                                                       "(it holds training.lock); wait for it to end, or pass another "
                                                       "train.output_dir")
        assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    finally:
        os.close(fd)
    assert main(["--config", str(TINY), *_run_args(catalog, out, **{"train.resume": "false", "train.max_steps": 1})]) == 0


def test_a_run_that_fails_in_process_lets_go_of_its_folder(tmp_path, capsys, monkeypatch):
    """A notebook's run that raised (an out-of-memory error) kept training.lock until the kernel ended: every
    other run into the folder was refused as "another run is training"."""
    import fcntl
    import os

    catalog = write_catalog(tmp_path / "data", n=4)
    out = tmp_path / "out"

    def out_of_memory(*a, **k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(generate, "build_backbone", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["--config", str(TINY), *_run_args(catalog, out, **{"train.resume": "false"})])
    fd = os.open(out / "training.lock", os.O_WRONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process's run would get it: nobody holds it
    finally:
        os.close(fd)


def test_what_a_ctrl_c_outside_the_steps_advises_works(tmp_path, capsys, monkeypatch):
    """A Ctrl-C while a run writes its folder, or before its first checkpoint, says how to go on, and that works."""
    from mmllm import model_dir
    from mmllm.label import main as label

    catalog = write_catalog(tmp_path / "data", n=4)
    out = tmp_path / "out"
    args = ["--config", str(TINY), *_run_args(catalog, out, **{"train.resume": "false", "train.max_steps": 2,
                                                               "data.dev": "null"})]

    def stopped(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # before anything was built
        patch.setattr(generate, "build_backbone", stopped)
        assert main(args) == 130
    assert capsys.readouterr().err.strip().endswith(f"{out} holds no checkpoint yet; rerun the same command to "
                                                    "start again")
    assert main(args) == 0
    # asked for more steps, a finished folder is stopped after its weights are replaced, before the rest:
    # labelling refuses it (the weights and the calibration would disagree) until the resume finishes it
    more = ["--config", str(TINY), *_run_args(catalog, out, **{"train.max_steps": 4, "data.dev": "null"})]
    with monkeypatch.context() as patch:
        patch.setattr(model_dir, "write_folder", stopped)
        assert main(more) == 130
    err = capsys.readouterr().err
    assert err.strip().endswith(f"{out} is not a finished model folder; rerun the same command with "
                                "train.resume=true to go on from its last checkpoint (step-00000004)")
    labels = tmp_path / "labels.jsonl"
    assert label([str(catalog), "--model", str(out), "--out", str(labels), "--quiet"]) == 2
    assert "training stopped before it finished writing this folder" in capsys.readouterr().err
    assert main(more) == 0
    assert json.loads((out / "mmllm_model.json").read_text())["training"]["steps"] == 4
    assert label([str(catalog), "--model", str(out), "--out", str(labels), "--quiet"]) == 0


def test_an_unfinished_folder_is_refused_and_resume_finishes_it(tmp_path, capsys):
    """A run stopped while its model folder is written (after the last step) leaves a folder labelling
    refuses; the last step's checkpoint (saved even with save_every 0) lets the same command finish it."""
    from mmllm.label import main as label

    catalog = write_catalog(tmp_path / "data", n=4)
    out = tmp_path / "out"
    args = ["--config", str(TINY), *_run_args(catalog, out, **{"train.resume": "false", "train.max_steps": 3,
                                                               "train.save_every": 0, "data.dev": catalog,
                                                               "eval.generate_rows": 2, "eval.loss_rows": 2})]
    assert main(args) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003"]
    (out / "training_unfinished.txt").write_text("stopped\n")  # as a kill during calibration leaves it
    labels = tmp_path / "labels.jsonl"
    assert label([str(catalog), "--model", str(out), "--out", str(labels), "--quiet"]) == 2
    assert "training stopped before it finished writing this folder" in capsys.readouterr().err
    wall = json.loads((out / "mmllm_model.json").read_text())["training"]["wall_s"]
    steps_s = json.loads((out / "checkpoints" / "step-00000003" / "state.json").read_text())["trained_s"]
    assert main([*args, "train.resume=true"]) == 0
    assert not (out / "training_unfinished.txt").exists()
    assert label([str(catalog), "--model", str(out), "--out", str(labels), "--quiet"]) == 0
    # the final evaluation once (it was written twice), and the training time the steps took (it was 0.0)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(bool(r.get("final")) for r in records) == 1
    # the steps' time, carried in the checkpoint (taken before its write, so at most the first run's total);
    # the card rounds to 2 decimals what the checkpoint keeps to 3
    resumed = json.loads((out / "mmllm_model.json").read_text())["training"]["wall_s"]
    assert 0 < steps_s - 0.005 <= resumed <= wall


def test_a_ctrl_c_during_the_last_step_stops_before_the_folder_is_written(tmp_path, capsys, monkeypatch):
    """It was dropped: the run went on through the final evaluation, the folder, calibration and grounding
    (minutes on a real model), and the next Ctrl-C counted as a first. Now it checkpoints the last step and
    stops; the resume writes the folder."""
    import os
    import signal

    real, calls = generate.causal_lm_loss, []

    def stopped_in_the_last_step(model, batch):
        calls.append(1)
        if len(calls) == 5:  # train.max_steps=3, train.grad_accum=2: the last step's first micro-batch
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, batch)

    catalog = write_catalog(tmp_path / "data", n=4)
    out = tmp_path / "out"
    args = ["--config", str(TINY), *_run_args(catalog, out, **{"train.max_steps": 3, "train.save_every": 0})]
    with monkeypatch.context() as patch:
        patch.setattr(generate, "causal_lm_loss", stopped_in_the_last_step)
        assert main([*args, "train.resume=false"]) == 130
    assert "stopped at step 3; continue with train.resume=true" in capsys.readouterr().out
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003"]
    assert not (out / "mmllm_model.json").exists()
    assert main(args) == 0
    assert json.loads((out / "mmllm_model.json").read_text())["training"]["steps"] == 3
    assert not (out / "training_unfinished.txt").exists()


def test_a_loss_that_is_not_finite_stops_the_run_without_a_model(tmp_path, capsys, monkeypatch):
    real = generate.causal_lm_loss

    def exploding(model, batch):
        loss, count = real(model, batch)
        return loss * float("nan"), count

    monkeypatch.setattr(generate, "causal_lm_loss", exploding)
    catalog = write_catalog(tmp_path / "data", n=4)
    out = tmp_path / "out"
    assert main(["--config", str(TINY), *_run_args(catalog, out, **{"train.resume": "false",
                                                                     "train.max_steps": 2})]) == 1
    err = capsys.readouterr().err
    assert "error: step 1: the loss is nan (not a finite number)" in err and "Traceback" not in err
    assert not (out / "mmllm_model.json").exists()


def test_resuming_with_another_lora_rank_names_the_mismatch(tmp_path, capsys):
    catalog = write_catalog(tmp_path / "data", n=4)
    out = tmp_path / "out"
    args = ["--config", str(TINY), *_run_args(catalog, out, **{"train.max_steps": 4, "train.save_every": 2})]
    assert main([*args, "train.resume=false", "lora.rank=8", "train.max_steps=2"]) == 0
    assert main([*args, "lora.rank=4"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint does not match the model" in err and "resume with the run's own config" in err


def test_a_damaged_model_folder_names_the_file(tmp_path, capsys):
    """Labelling a folder whose meta file is torn, whose adapter is a pickle, or whose weights are cut short:
    one line naming the file, exit 2 (a pickle is never loaded)."""
    import shutil

    from mmllm.label import main as label

    catalog = write_catalog(tmp_path / "data", n=4)
    trained = tmp_path / "out"
    assert main(["--config", str(TINY), *_run_args(catalog, trained, **{"train.resume": "false",
                                                                         "train.max_steps": 2})]) == 0
    for damage, named in (("meta", "mmllm_model.json: not readable JSON"),
                          ("pickle", "adapter_model.safetensors: the weights are missing (adapter_model.bin are "
                                     "pickles, which mmllm never loads)"),
                          ("torn", "adapter_model.safetensors: not readable safetensors")):
        folder = tmp_path / damage
        shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoints"))
        weights = folder / "adapter_model.safetensors"
        if damage == "meta":
            (folder / "mmllm_model.json").write_text('{"kind": "generative-lo')
        elif damage == "pickle":
            torch.save({"w": torch.zeros(2)}, folder / "adapter_model.bin")
            weights.unlink()
        else:
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        assert label([str(catalog), "--model", str(folder), "--out", str(tmp_path / f"{damage}.jsonl"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, err


# ---------------------------------------------------------------------- untrained fields
def unlabelled_material(folder: Path, n: int = 8) -> Path:
    """The small catalog with every `material` label removed: only category and piece_count are taught."""
    catalog = write_catalog(folder, n=n)
    rows = [json.loads(line) for line in catalog.read_text().splitlines()]
    for row in rows:
        del row["label"]["attributes"]["material"]
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return catalog


def _force_material(predictor) -> None:
    """Push the untrained material head far above 0.5, so anything but the null rule would answer it."""
    head = predictor.model.heads["material"]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(10.0)


def _check_head_variant(out: Path, catalog: Path) -> None:
    meta = json.loads((out / "mmllm_model.json").read_text())
    assert meta["trained_fields"] == {"category": 8, "piece_count": 8, "material": 0}
    assert "answers null for it" in (out / "README.md").read_text()
    rows = load_listings(catalog)
    policy = ImagePolicy(root=catalog.parent)
    grounded = load_model_dir(out, device="cpu")  # the folder's grounding keeps the untrained attribute null too
    assert all(r["attributes"]["material"] is None and r["untrained"] == ["material"]
               for r in grounded.predict(rows, policy))
    predictor = load_model_dir(out, device="cpu", grounded=False)  # the heads' own answers
    assert predictor.untrained == ("material",)
    _force_material(predictor)
    records = predictor.predict(rows, policy)
    assert len(records) == 8
    for record in records:
        assert record["status"] == "ok" and record["untrained"] == ["material"]
        assert record["attributes"]["material"] is None
        assert record["attributes"]["piece_count"] is not None  # a trained head still answers
        assert record["category"] in predictor.schema.categories
    # the same weights without the rule answer the forced head: the null comes from the record
    assert all(r["attributes"]["material"] == ["wood", "plastic"] and "untrained" not in r
               for r in dataclasses.replace(predictor, untrained=()).predict(rows, policy))
    # a folder written before the record existed loads and answers as before
    del meta["trained_fields"]
    (out / "mmllm_model.json").write_text(json.dumps(meta))
    old = load_model_dir(out, device="cpu", grounded=False)
    assert old.untrained == ()
    _force_material(old)
    assert all(r["attributes"]["material"] == ["wood", "plastic"] and "untrained" not in r
               for r in old.predict(rows, policy))


def test_fusion_answers_null_for_an_attribute_without_training_rows(tmp_path):
    catalog = unlabelled_material(tmp_path / "data")
    out = tmp_path / "fusion"
    cfg = load_recipe_config(FUSION, [
        f"data.train={catalog}", f"data.dev={catalog}", f"data.schema={catalog.parent / 'schema.yaml'}",
        f"train.output_dir={out}", "train.epochs=2", "train.batch_size=4", "train.log_every=1",
        "fusion.max_text_tokens=32", "fusion.hidden=16", "fusion.lexical_buckets=256", "fusion.attr_buckets=64",
        "eval.loss_rows=8"])
    summary = finetune(cfg)
    assert summary["steps"] == 4 and "category_acc" in summary
    _check_head_variant(out, catalog)


def test_classifier_answers_null_for_an_attribute_without_training_rows(tmp_path):
    catalog = unlabelled_material(tmp_path / "data")
    out = tmp_path / "classifier"
    cfg = load_recipe_config(TINY_CLASSIFY, [
        f"data.train={catalog}", "data.dev=null", f"data.schema={catalog.parent / 'schema.yaml'}",
        f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=4", "train.save_every=0",
        "train.log_every=1"])
    assert finetune(cfg)["steps"] == 2
    _check_head_variant(out, catalog)


def test_generative_predictor_nulls_an_attribute_without_training_rows(tmp_path):
    catalog = unlabelled_material(tmp_path / "data", n=4)
    out = tmp_path / "generative"
    cfg = load_recipe_config(TINY, [
        f"data.train={catalog}", "data.dev=null", f"data.schema={catalog.parent / 'schema.yaml'}",
        f"train.output_dir={out}", "train.max_steps=1", "train.batch_size=2", "train.grad_accum=1",
        "train.save_every=0", "train.log_every=1", "data.max_train_rows=null"])
    assert finetune(cfg)["steps"] == 1
    meta = json.loads((out / "mmllm_model.json").read_text())
    assert meta["trained_fields"] == {"category": 4, "piece_count": 4, "material": 0}
    predictor = load_model_dir(out, device="cpu")
    assert predictor.untrained == ("material",)
    answer = '{"category": "Games > Chess", "attributes": {"piece_count": 12, "material": ["wood"]}}'
    assert predictor.record("x", answer) == {
        "id": "x", "category": "Games > Chess", "attributes": {"piece_count": 12, "material": None},
        "status": "ok", "untrained": ["material"]}
    broken = predictor.record("y", "not json")
    assert broken["status"] == "invalid" and broken["attributes"] == {} and broken["untrained"] == ["material"]
    # the shared interface: every record from the random model names the untrained attribute, never answers it
    rows = load_listings(catalog)
    from mmllm.collator import load_listing_images

    predictor.max_new_tokens = 16
    images = [load_listing_images(r, ImagePolicy(root=catalog.parent), predictor.max_images) for r in rows]
    records = predictor.predict_encoded(predictor.encode(rows, images))
    assert len(records) == 4
    assert all(r["untrained"] == ["material"] and r["attributes"].get("material") is None for r in records)
    # a folder written before the record existed answers as before
    del meta["trained_fields"]
    (out / "mmllm_model.json").write_text(json.dumps(meta))
    old = load_model_dir(out, device="cpu")
    assert old.untrained == ()
    assert old.record("x", answer) == {
        "id": "x", "category": "Games > Chess", "attributes": {"piece_count": 12, "material": ["wood"]}, "status": "ok"}


def test_a_resume_under_another_data_plan_or_with_more_trainable_weights_is_refused(tmp_path, capsys):
    """grad_accum or seed changed: the resumed steps read other rows, silently (the epoch went backwards, the
    adapter came out otherwise); lora.vision=true adds trainable weights the checkpoint lacks: a traceback."""
    catalog = write_catalog(tmp_path / "data", n=8)
    out = tmp_path / "out"
    args = ["--config", str(TINY), *_run_args(catalog, out, **{"train.max_steps": 4, "train.save_every": 2})]
    assert main([*args, "train.resume=false", "train.max_steps=2"]) == 0
    capsys.readouterr()
    assert main([*args, "train.grad_accum=1", "train.seed=7"]) == 2
    err = capsys.readouterr().err
    assert "the run was started with another data plan (" in err and "seed: 0 then, 7 now" in err, err
    assert "Traceback" not in err
    assert main([*args, "lora.vision=true"]) == 2
    err = capsys.readouterr().err
    assert "trainable weights it does not hold" in err and "Traceback" not in err
    # a metrics line left unfinished by a kill is dropped, not a traceback; and the run goes on to more steps
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "lo')
    assert main(args) == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == sorted({r["step"] for r in records if "loss" in r})


def test_the_rate_logged_is_the_one_the_step_took(tmp_path):
    """get_last_lr() after the scheduler's step is the next step's rate: the last line always showed 0."""
    catalog = write_catalog(tmp_path / "data", n=8)
    out = tmp_path / "out"
    assert main(["--config", str(TINY), *_run_args(catalog, out, **{
        "train.resume": "false", "train.max_steps": 4, "train.log_every": 1, "train.warmup_ratio": 0,
        "train.schedule": "linear", "train.lr": 0.002})]) == 0
    rates = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert rates == pytest.approx([0.002, 0.0015, 0.001, 0.0005])


def test_the_ctrl_c_handler_is_put_back_when_a_run_fails(tmp_path, monkeypatch, capsys):
    import signal

    real = generate.causal_lm_loss
    monkeypatch.setattr(generate, "causal_lm_loss", lambda model, batch: (real(model, batch)[0] * float("nan"), 1))
    before = signal.getsignal(signal.SIGINT)
    catalog = write_catalog(tmp_path / "data", n=4)
    assert main(["--config", str(TINY), *_run_args(catalog, tmp_path / "out", **{"train.resume": "false",
                                                                                  "train.max_steps": 2})]) == 1
    assert signal.getsignal(signal.SIGINT) is before


def test_no_dev_loss_rows_means_no_dev_loss_not_a_zero(tmp_path):
    catalog = write_catalog(tmp_path / "data", n=4)
    out = tmp_path / "out"
    assert main(["--config", str(TINY), *_run_args(catalog, out, **{
        "train.resume": "false", "train.max_steps": 2, "data.dev": catalog, "eval.loss_rows": 0,
        "eval.generate_rows": 2})]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any("eval_loss" in r for r in records) and any("json_valid" in r for r in records)
    card = (out / "README.md").read_text()
    assert "eval_loss" not in card and "| json_valid |" in card
