"""Fault injection for `mmllm label`: hostile but realistic inputs never lose, corrupt or
duplicate the user's data (issue: labelling never loses a user's data).

Each test asserts the exact outcome: the exit code, the message, the input files byte-identical
after the run, and exactly one ``--out`` line per input id.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from mmllm.label import main
from mmllm.schema import LabelSchema

from helpers import ROOT
from listings import SMALL_SCHEMA


def write_dump(folder: Path, n: int, name: str = "dump.jsonl", start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"r{i}", "title": f"Toy {i} " + "wooden " * (i % 5), "attributes": {"Pieces": str(i)}}
            for i in range(start, start + n)]
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    LabelSchema.from_dict(SMALL_SCHEMA).to_yaml(folder / "schema.yaml")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ids(path: Path) -> list[str]:
    return sorted(r["id"] for r in read(path))


def label(dump: Path | list[Path], out: Path, model: Path, *extra: str) -> int:
    dumps = dump if isinstance(dump, list) else [dump]
    return main([*map(str, dumps), "--model", str(model), "--schema", str(dumps[0].parent / "schema.yaml"),
                 "--out", str(out), "--quiet", *extra])


def cli(dump: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mmllm.label", str(dump), "--model", str(model), "--schema",
            str(dump.parent / "schema.yaml"), "--out", str(out), "--quiet", *extra]


@pytest.fixture
def model(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen2_vl")


# ---------------------------------------------------------------------- 1-3: paths the labeller writes
def test_1_out_is_the_input_dump_with_resume_is_refused_and_the_dump_is_untouched(tmp_path, model, capsys):
    dump = write_dump(tmp_path / "d", 6)
    before = dump.read_bytes()
    assert label(dump, dump, model, "--resume") == 2
    err = capsys.readouterr().err
    assert f"error: --out {dump} would write over the input {dump}" in err and "Traceback" not in err
    assert dump.read_bytes() == before
    assert not (tmp_path / "d" / "dump.jsonl.lock").exists() and not (tmp_path / "d" / "dump.jsonl.job.json").exists()


def test_2_errors_is_the_input_dump_is_refused(tmp_path, model, capsys):
    dump = write_dump(tmp_path / "d", 6)
    before = dump.read_bytes()
    assert label(dump, tmp_path / "out.jsonl", model, "--errors", str(dump)) == 2
    assert f"error: --errors {dump} would write over the input {dump}" in capsys.readouterr().err
    assert dump.read_bytes() == before and not (tmp_path / "out.jsonl").exists()


def test_3_errors_equal_to_out_is_refused(tmp_path, model, capsys):
    dump = write_dump(tmp_path / "d", 6)
    out = tmp_path / "out.jsonl"
    assert label(dump, out, model, "--errors", str(out)) == 2
    assert f"error: --out and --errors are the same file ({out})" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("how", ["symlink", "hardlink", "sidecar"])
def test_a_path_that_reaches_the_input_another_way_is_refused(tmp_path, model, capsys, how):
    dump = write_dump(tmp_path / "d", 6)
    before = dump.read_bytes()
    out = tmp_path / "out.jsonl"
    if how == "symlink":
        out.symlink_to(dump)
    elif how == "hardlink":
        os.link(dump, out)
    else:  # --out's manifest sidecar would land on the input
        out = tmp_path / "d" / "dump"
        dump.rename(tmp_path / "d" / "dump.job.json")
        dump = tmp_path / "d" / "dump.job.json"
    assert label(dump, out, model, "--resume") == 2
    err = capsys.readouterr().err
    assert "would write over the input" in err and str(dump) in err
    assert dump.read_bytes() == before


# ---------------------------------------------------------------------- 4: resume by identity
def test_4_resume_with_an_edited_input_is_refused_then_continues_by_id_when_asked(tmp_path, model, capsys):
    dump = write_dump(tmp_path / "d", 8)
    out = tmp_path / "out.jsonl"
    assert label(dump, out, model, "--limit", "4") == 0
    assert ids(out) == ["r0", "r1", "r2", "r3"]
    # the dump is re-exported: two new rows at the top shift every position
    lines = dump.read_text().splitlines(keepends=True)
    extra = [json.dumps({"id": f"new{i}", "title": f"New toy {i}"}) + "\n" for i in range(2)]
    dump.write_text("".join(extra + lines))
    edited, out_before = dump.read_bytes(), out.read_bytes()
    assert label(dump, out, model, "--resume") == 2
    err = capsys.readouterr().err
    assert f"--out {out} was written by another job: input dump.jsonl changed:" in err
    assert "--resume-changed" in err
    assert out.read_bytes() == out_before and dump.read_bytes() == edited
    assert label(dump, out, model, "--resume", "--resume-changed") == 0
    assert "resuming despite: input dump.jsonl changed" in capsys.readouterr().err
    assert ids(out) == sorted(["new0", "new1"] + [f"r{i}" for i in range(8)])  # one line per id, none lost


def test_4_another_dump_with_the_same_file_name_is_refused(tmp_path, model, capsys):
    first = write_dump(tmp_path / "a", 5)
    other = write_dump(tmp_path / "b", 5, start=100)
    out = tmp_path / "out.jsonl"
    assert label(first, out, model, "--limit", "2") == 0
    assert label(other, out, model, "--resume") == 2
    err = capsys.readouterr().err
    assert f"input dump.jsonl is another file: was {first.resolve()}, now {other.resolve()}" in err
    assert ids(out) == ["r0", "r1"]


def test_4_resume_with_other_pictures_or_answer_budget_is_refused(tmp_path, model, capsys):
    """The image folder, remote images, the pixel budget and the token budget change what a row answers:
    a resume under others would mix two jobs' records in one file."""
    dump = write_dump(tmp_path / "d", 5)
    out = tmp_path / "out.jsonl"
    assert label(dump, out, model, "--limit", "2") == 0
    for option in (["--image-root", str(tmp_path / "elsewhere")], ["--max-pixels", "3136"],
                   ["--max-new-tokens", "64"], ["--allow-remote"]):
        assert label(dump, out, model, "--resume", *option) == 2
        assert "was written by another job" in capsys.readouterr().err
    assert ids(out) == ["r0", "r1"]
    assert label(dump, out, model, "--resume") == 0  # the first job's own settings continue it
    assert ids(out) == [f"r{i}" for i in range(5)]


def test_4_resume_with_another_model_is_refused(tmp_path, model, tiny_checkpoint, capsys):
    dump = write_dump(tmp_path / "d", 5)
    out = tmp_path / "out.jsonl"
    assert label(dump, out, model, "--limit", "2") == 0
    assert label(dump, out, tiny_checkpoint("qwen2_5_vl"), "--resume") == 2
    assert "model was " in capsys.readouterr().err
    assert ids(out) == ["r0", "r1"]


def test_resume_refuses_an_out_that_is_not_a_label_output_before_cutting_anything(tmp_path, model, capsys):
    dump = write_dump(tmp_path / "d", 4)
    out = tmp_path / "notes.jsonl"
    out.write_text('{"my": "own data"}\n{"half": ')  # the user's file, with no newline at the end
    before = out.read_bytes()
    assert label(dump, out, model, "--resume") == 2
    assert f"--out {out} line 1 is not a label record" in capsys.readouterr().err
    assert out.read_bytes() == before


@pytest.mark.parametrize("flag", ["--out", "--errors", "--review-out"])
def test_a_users_one_line_file_without_a_final_newline_is_refused_not_cut(tmp_path, model, capsys, flag):
    """``json.dump`` writes one line and no newline: that is a user's file, not a record torn by a kill."""
    dump = write_dump(tmp_path / "d", 3)
    mine = tmp_path / "settings.json"
    mine.write_text('{"my": "settings", "written_by": "json.dump"}')
    before = mine.read_bytes()
    out = mine if flag == "--out" else tmp_path / "out.jsonl"
    extra = {"--out": ["--resume"], "--errors": ["--errors", str(mine), "--resume"],
             "--review-out": ["--review-out", str(mine), "--review-below", "1"]}[flag]
    assert label(dump, out, model, *extra) == 2
    assert f"{flag} {mine}" in capsys.readouterr().err
    assert mine.read_bytes() == before


def test_a_record_torn_by_a_kill_is_still_cut_and_relabelled(tmp_path, model):
    dump = write_dump(tmp_path / "d", 4)
    out = tmp_path / "out.jsonl"
    assert label(dump, out, model, "--limit", "2") == 0
    with open(out, "ab") as f:
        f.write(b'{"id": "r2", "status": "o')  # the write a kill interrupted
    assert label(dump, out, model, "--resume") == 0
    assert ids(out) == ["r0", "r1", "r2", "r3"]


def test_an_id_repeated_in_another_dump_is_a_read_error_and_resume_loses_no_row(tmp_path, model):
    """Two shop exports that both hold r0..r2: one record per input row, whether the run is whole or resumed."""
    a, b = write_dump(tmp_path / "d", 3, "shop_a.jsonl"), write_dump(tmp_path / "d", 3, "shop_b.jsonl")
    out = tmp_path / "out.jsonl"
    assert label([a, b], out, model, "--limit", "3") == 0  # stops after the first dump, as an interruption would
    assert label([a, b], out, model, "--resume") == 1
    records = read(out)
    assert sorted((r["source"], r["status"]) for r in records) == [("shop_a.jsonl", "ok")] * 3 + [("shop_b.jsonl", "error")] * 3
    repeats = [r for r in records if r["source"] == "shop_b.jsonl"]
    assert {r["stage"] for r in repeats} == {"read"}
    assert "duplicate id, first seen at line 1 of shop_a.jsonl" in repeats[0]["error"]


def test_an_id_that_no_utf8_file_can_hold_fails_its_row_only(tmp_path, model):
    """A Latin-1 CSV id (its byte decoded as a surrogate) and a JSON lone-surrogate escape."""
    folder = tmp_path / "d"
    write_dump(folder, 1)
    csv_dump = folder / "shop.csv"
    csv_dump.write_bytes(b"id,title\ncaf\xe9-1,Wooden train\nr2,Jigsaw puzzle\n")
    jsonl_dump = folder / "more.jsonl"
    jsonl_dump.write_text('{"id": "a\\ud800", "title": "Doll"}\n{"id": "r3", "title": "Kite \\ud83d"}\n'
                          '{"id": "r4", "title": "Yo-yo"}\n')
    out = tmp_path / "out.jsonl"
    assert label([csv_dump, jsonl_dump], out, model) == 1
    records = read(out)
    assert len(records) == 5 and sorted(r["id"] for r in records if r["status"] == "ok") == ["r2", "r4"]
    failed = [r for r in records if r["status"] == "error"]
    assert [(r["source"], r["line"], r["stage"]) for r in failed] == [("shop.csv", 2, "read"), ("more.jsonl", 1, "read"),
                                                                      ("more.jsonl", 2, "read")]
    assert failed[0]["id"] is None and "id: contains text that is not valid UTF-8" in failed[0]["error"]
    assert "title: contains text that is not valid UTF-8" in failed[2]["error"]
    assert label([csv_dump, jsonl_dump], out, model, "--resume") == 0 and len(read(out)) == 5


def test_an_errors_file_of_another_run_is_refused_on_resume(tmp_path, model, capsys):
    folder = tmp_path / "d"
    dump = write_dump(folder, 2)
    with open(dump, "a") as f:
        f.write('{"title": "no id"}\n')
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    assert label(dump, out, model, "--errors", str(errors)) == 1
    out.unlink()  # starting over, the old errors file left behind
    before = errors.read_bytes()
    assert label(dump, out, model, "--errors", str(errors), "--resume") == 2
    assert "holds 1 record(s) but --out" in capsys.readouterr().err
    assert errors.read_bytes() == before


def test_a_damaged_job_manifest_is_refused_on_resume(tmp_path, model, capsys):
    dump = write_dump(tmp_path / "d", 3)
    out = tmp_path / "out.jsonl"
    assert label(dump, out, model, "--limit", "1") == 0
    (tmp_path / "out.jsonl.job.json").write_text('{"format": "mmllm-la')
    assert label(dump, out, model, "--resume") == 2
    assert "the job manifest" in capsys.readouterr().err and len(read(out)) == 1


def test_the_review_queue_folder_is_made_and_a_queue_path_needs_a_threshold(tmp_path, model, capsys):
    dump = write_dump(tmp_path / "d", 3)
    queue = tmp_path / "queues" / "q.jsonl"
    assert label(dump, tmp_path / "a.jsonl", model, "--review-out", str(queue)) == 2
    assert "--review-out names the review queue: add --review-below" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()
    assert label(dump, tmp_path / "b.jsonl", model, "--review-out", str(queue), "--review-below", "1") == 0
    assert len(read(queue)) == 3


def test_an_interrupt_ends_with_one_line_and_resume_finishes(tmp_path, model, capsys, monkeypatch):
    import mmllm.label as label_module

    dump = write_dump(tmp_path / "d", 4)
    out = tmp_path / "out.jsonl"
    real = label_module.run_local

    def interrupted(predictor, dumps, output, opts):
        raise KeyboardInterrupt

    monkeypatch.setattr(label_module, "run_local", interrupted)
    assert label(dump, out, model) == 130
    assert "interrupted: 0 records were written this run" in capsys.readouterr().err
    monkeypatch.setattr(label_module, "run_local", real)
    assert label(dump, out, model, "--resume") == 0 and ids(out) == ["r0", "r1", "r2", "r3"]


# ---------------------------------------------------------------------- 5: one run per --out
def _holder(out: Path, dump: Path) -> subprocess.Popen:
    """Another process holding --out's lock until its stdin closes (it prints "locked" once it holds it)."""
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from mmllm.labelling.output import Output; "
         f"o = Output(Path({str(out)!r}), None, False, inputs=[Path({str(dump)!r})], manifest={{'inputs': []}}); "
         "print('locked', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def test_5_a_second_run_on_the_same_out_is_refused_naming_the_holder(tmp_path, model, capsys):
    dump = write_dump(tmp_path / "d", 4)
    out = tmp_path / "out.jsonl"
    holder = _holder(out, dump)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert label(dump, out, model, "--resume") == 2
        err = capsys.readouterr().err
        assert f"--out {out} is being written by another run (pid {holder.pid} on " in err
        assert out.read_bytes() == b""
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert label(dump, out, model, "--resume") == 0  # the lock went with its holder
    assert ids(out) == [f"r{i}" for i in range(4)]


def test_5_a_hard_link_to_a_running_out_is_refused(tmp_path, model, capsys):
    """A hard link to a running job's --out is another name for the same file: its lock file was its own,
    so both runs wrote the file (and a resume could cut the holder's half-written last line). The file
    itself is locked now."""
    dump = write_dump(tmp_path / "d", 4)
    out, alias = tmp_path / "out.jsonl", tmp_path / "alias.jsonl"
    holder = _holder(out, dump)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with open(out, "ab") as f:  # the holder's line being written
            f.write(b'{"id": "r0", "sta')
        alias.hardlink_to(out)
        assert label(dump, alias, model, "--resume") == 2
        assert f"--out {alias} is being written by another run (the same file, or the same file under another name" \
            in capsys.readouterr().err
        assert out.read_bytes() == b'{"id": "r0", "sta'  # not cut
        assert not (tmp_path / "alias.jsonl.lock").exists() and not (tmp_path / "alias.jsonl.job.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_5_a_file_system_without_flock_does_not_refuse_the_run(tmp_path, model, monkeypatch):
    """NFS with no lock daemon answers flock with ENOLCK: the run was refused ("No locks available") and the
    descriptor leaked. The lock file guards the path there; the files are written as before."""
    import errno
    import fcntl

    real = fcntl.flock
    errors = tmp_path / "elsewhere" / "errors.jsonl"

    def no_locks(fd: int, how: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(errors):
            raise OSError(errno.ENOLCK, "No locks available")
        real(fd, how)

    monkeypatch.setattr(fcntl, "flock", no_locks)
    dump = write_dump(tmp_path / "d", 3)
    out = tmp_path / "out.jsonl"
    assert label(dump, out, model, "--errors", str(errors)) == 0
    assert ids(out) == ["r0", "r1", "r2"] and errors.exists()
    assert not [f for f in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{f}") == str(errors)]


def test_5_a_link_to_a_running_out_is_refused_and_a_refused_run_leaves_the_holders_files(tmp_path, model, capsys):
    """A symbolic link to a running job's --out had a lock of its own (named after the link): both runs wrote
    the file (1,960 records for 1,000 ids). And a run refused by the lock removed the files it had found
    missing before it tried the lock, which the holder had just made: the holder's lock, or its --out."""
    from mmllm.labelling.output import Output, OutputError

    dump = write_dump(tmp_path / "d", 4)
    out, link = tmp_path / "out.jsonl", tmp_path / "alias.jsonl"
    link.symlink_to(out)
    holder = _holder(out, dump)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert label(dump, link, model, "--resume") == 2
        assert "is being written by another run" in capsys.readouterr().err
        assert not (tmp_path / "alias.jsonl.lock").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert label(dump, link, model, "--resume") == 0 and ids(out) == [f"r{i}" for i in range(4)]

    # two runs starting at once: the other run makes --out and its lock between this run's look and its lock
    fresh = tmp_path / "fresh.jsonl"
    real_lock = Output._lock

    def beaten(self, lock_path):
        fresh.write_text("")  # the winner's new --out, and its lock, made meanwhile
        lock_path.write_text('{"pid": 1}')
        raise OutputError(f"--out {fresh} is being written by another run")

    Output._lock = beaten
    try:
        with pytest.raises(OutputError, match="being written by another run"):
            Output(fresh, tmp_path / "errors.jsonl", False, inputs=[dump], manifest={"inputs": []})
    finally:
        Output._lock = real_lock
    assert fresh.exists() and (tmp_path / "fresh.jsonl.lock").exists()  # the winner's files: not removed


# ---------------------------------------------------------------------- 6: the processor refuses one row
def test_6_a_row_the_processor_refuses_fails_its_row_only_and_resume_goes_on(tmp_path, model, capsys, monkeypatch):
    from mmllm.models.generative import GenerativePredictor

    real = GenerativePredictor.encode

    def encode(self, listings, images):  # the processor refusing one row of a batch (it raises for the whole batch)
        if any("refused" in listing.title for listing in listings):
            raise ValueError("the processor refused this row")
        return real(self, listings, images)

    monkeypatch.setattr(GenerativePredictor, "encode", encode)
    dump = write_dump(tmp_path / "d", 6)
    Image.new("RGB", (1, 400), "red").save(tmp_path / "d" / "thin.png")  # aspect 400: refused as an image first
    rows = read(dump)
    rows[2]["title"] = "A refused toy"
    rows[4]["images"] = ["thin.png"]
    dump.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    assert label(dump, out, model, "--errors", str(errors), "--batch-size", "3") == 1
    records = {r["id"]: r for r in read(out)}
    assert sorted(records) == [f"r{i}" for i in range(6)]
    assert records["r2"]["status"] == "error" and records["r2"]["stage"] == "encode"
    assert "the processor refused this row" in records["r2"]["error"]
    assert records["r4"]["status"] == "error" and records["r4"]["stage"] == "image" and "200 times" in records["r4"]["error"]
    assert all(records[f"r{i}"]["status"] == "ok" for i in (0, 1, 3, 5))
    assert sorted(r["id"] for r in read(errors)) == ["r2", "r4"]
    assert label(dump, out, model, "--errors", str(errors), "--resume") == 0
    assert "6 already done" in capsys.readouterr().out
    assert ids(out) == [f"r{i}" for i in range(6)]


def test_6_the_demo_batch_tab_labels_the_other_rows(tmp_path, model):
    from mmllm.demo import Demo
    from mmllm.label import load_predictor

    dump = write_dump(tmp_path / "d", 4)
    Image.new("RGB", (1, 400), "red").save(tmp_path / "d" / "thin.png")
    rows = read(dump)
    rows[1]["images"] = ["thin.png"]
    dump.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": "broken", "title": \n')
    predictor = load_predictor(str(model), schema=str(tmp_path / "d" / "schema.yaml"), template=None,
                               constrained=True, max_new_tokens=64, batch_size=4, min_pixels=None, max_pixels=None)
    demo = Demo(predictor, image_root=tmp_path / "d")
    view = demo.label_dump(str(dump))
    records = read(view.out_path)
    assert [(r["line"], r["status"], r.get("stage")) for r in sorted(records, key=lambda r: r["line"])] == [
        (1, "ok", None), (2, "error", "image"), (3, "ok", None), (4, "ok", None), (5, "error", "read")]
    assert view.summary.ok == 3 and view.summary.failed == 2


# ---------------------------------------------------------------------- 7: broken streams
def test_7_a_truncated_gz_labels_every_row_before_the_break_and_the_next_dump_goes_on(tmp_path, model, capsys):
    folder = tmp_path / "d"
    whole = write_dump(folder, 400, name="whole.jsonl")
    packed = gzip.compress(whole.read_bytes())
    broken = folder / "broken.jsonl.gz"
    broken.write_bytes(packed[: len(packed) * 2 // 3])
    after = write_dump(folder, 3, name="after.jsonl", start=1000)
    inputs = {p: p.read_bytes() for p in (broken, after)}
    out = tmp_path / "out.jsonl"
    assert label([broken, after], out, model, "--batch-size", "16") == 1
    records = read(out)
    reads = [r for r in records if r["status"] == "error"]
    assert len(reads) == 1 and reads[0]["stage"] == "read" and reads[0]["source"] == "broken.jsonl.gz"
    assert "broken.jsonl.gz" in reads[0]["error"]
    labelled = [r["id"] for r in records if r["source"] == "broken.jsonl.gz" and r["status"] == "ok"]
    n = len(labelled)
    assert 0 < n < 400 and sorted(labelled) == sorted(f"r{i}" for i in range(n))  # every row before the break
    assert reads[0]["line"] > n  # the break is after the last row it read
    assert sorted(r["id"] for r in records if r["source"] == "after.jsonl") == ["r1000", "r1001", "r1002"]
    assert all(p.read_bytes() == b for p, b in inputs.items())
    capsys.readouterr()
    assert label([broken, after], out, model, "--resume") == 0  # not stuck: the break is a row that is done
    assert len(read(out)) == len(records)


def test_7_a_corrupt_parquet_file_is_one_read_error_and_the_next_dump_goes_on(tmp_path, model):
    folder = tmp_path / "d"
    bad = folder / "bad.parquet"
    after = write_dump(folder, 3, name="after.jsonl")
    bad.write_bytes(b"PAR1" + os.urandom(2000) + b"PAR1")
    out = tmp_path / "out.jsonl"
    assert label([bad, after], out, model) == 1
    records = read(out)
    assert [(r["source"], r["status"], r.get("stage")) for r in records if r["status"] != "ok"] == [
        ("bad.parquet", "error", "read")]
    assert "bad.parquet" in [r for r in records if r["status"] != "ok"][0]["error"]
    assert sorted(r["id"] for r in records if r["status"] == "ok") == ["r0", "r1", "r2"]


# ---------------------------------------------------------------------- 8: arguments
@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "-2", "argument --batch-size: must be at least 1, got -2"),
    ("--batch-size", "0", "argument --batch-size: must be at least 1, got 0"),
    ("--workers", "0", "argument --workers: must be at least 1, got 0"),
    ("--limit", "-1", "argument --limit: must be at least 1, got -1"),
    ("--limit", "lots", "argument --limit: 'lots' is not a whole number"),
    ("--max-new-tokens", "0", "argument --max-new-tokens: must be at least 1, got 0"),
    ("--ray-gpus-per-actor", "nan", "argument --ray-gpus-per-actor: must be at least 0.0, got nan"),
])
def test_8_arguments_that_cannot_work_are_refused_before_anything_is_written(tmp_path, model, capsys, flag, value,
                                                                           message):
    dump = write_dump(tmp_path / "d", 3)
    with pytest.raises(SystemExit) as exit_info:
        label(dump, tmp_path / "out.jsonl", model, flag, value)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_8_pixel_bounds_the_wrong_way_round_and_an_unknown_dump_format(tmp_path, model, capsys):
    dump = write_dump(tmp_path / "d", 3)
    assert label(dump, tmp_path / "out.jsonl", model, "--min-pixels", "5000", "--max-pixels", "100") == 2
    assert "--min-pixels 5000 is larger than --max-pixels 100" in capsys.readouterr().err
    odd = tmp_path / "d" / "dump.xlsx"
    odd.write_bytes(b"PK")
    assert label(odd, tmp_path / "out.jsonl", model) == 2
    assert "unknown catalog format" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


# ---------------------------------------------------------------------- 9: disk full
def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_9_a_failed_write_ends_the_run_with_one_line_and_resume_repairs_both_files(tmp_path, model):
    dump = write_dump(tmp_path / "d", 40)
    rows = read(dump)
    for i in range(0, 40, 5):  # every fifth row fails: the errors file gets records too
        rows[i]["images"] = [f"missing-{i}.png"]
    dump.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = dump.read_bytes()
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    cmd = cli(dump, out, model, "--errors", str(errors), "--batch-size", "4")
    full = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          preexec_fn=_limit_file_size(6000))
    assert full.returncode == 1, full.stderr[-2000:]
    message = [line for line in full.stderr.splitlines() if "error" in line.lower()]  # not the loading bar
    assert len(message) == 1 and message[0].startswith(f"error: writing {out} failed: File too large")
    assert "--resume" in message[0] and "Traceback" not in full.stderr
    written = out.read_bytes()
    assert 0 < len(written) <= 6000 and written.endswith(b"\n")  # whole lines only: the torn one was cut back
    first = read(out)
    assert 0 < len(first) < 40
    bad_left = {f"r{i}" for i in range(0, 40, 5)} - {r["id"] for r in first}
    # a torn last line in --errors as well (a kill during its write), and a record it never got
    errors.write_bytes(b"".join(errors.read_bytes().splitlines(keepends=True)[:-1]) + b'{"id": "r3')
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert resumed.returncode == (1 if bad_left else 0), resumed.stderr[-2000:]  # 1: it met bad-image rows
    records = read(out)
    assert sorted(r["id"] for r in records) == sorted(f"r{i}" for i in range(40))
    failed = sorted(r["id"] for r in records if r["status"] != "ok")
    assert failed == sorted(f"r{i}" for i in range(0, 40, 5))
    assert sorted(r["id"] for r in read(errors)) == failed  # repaired: each failed row once
    assert dump.read_bytes() == before


def test_9_an_errors_file_on_a_full_device_stops_the_run_cleanly(tmp_path, model, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    dump = write_dump(tmp_path / "d", 3)
    rows = read(dump)
    rows[1]["images"] = ["missing.png"]
    dump.write_text("".join(json.dumps(r) + "\n" for r in rows))
    errors = tmp_path / "errors.jsonl"
    errors.symlink_to("/dev/full")
    assert label(dump, tmp_path / "out.jsonl", model, "--errors", str(errors)) == 1
    err = capsys.readouterr().err
    assert f"error: writing {errors} failed: No space left on device" in err


# ---------------------------------------------------------------------- kill -9, five times
@pytest.mark.slow
@pytest.mark.timeout(2400)  # its own guards allow a hung child 300 s per kill; a normal run takes a minute or two
def test_kill_9_at_random_points_five_times_then_resume_gives_one_line_per_id(tmp_path, model):
    dump = write_dump(tmp_path / "d", 150)
    before = dump.read_bytes()
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    cmd = cli(dump, out, model, "--errors", str(errors), "--batch-size", "4", "--resume")
    rng = random.Random(13)
    target = 0
    for kill in range(5):
        target += rng.randint(1, 20)  # lines to wait for (at most 100 of the 150)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.monotonic() + 300  # only a guard against a hung child; nothing asserts a duration
        while (not out.exists() or out.read_bytes().count(b"\n") < target) and time.monotonic() < deadline:
            assert proc.poll() is None, f"run {kill} ended before it could be killed"
            time.sleep(0.02)
        time.sleep(rng.random() * 0.2)  # a random moment, possibly mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        whole = [json.loads(line) for line in out.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")]
        assert len({r["id"] for r in whole}) == len(whole), f"a duplicate after kill {kill}"  # never, at any point
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(r["id"] for r in read(out)) == sorted(f"r{i}" for i in range(150))
    assert dump.read_bytes() == before and errors.read_bytes() == b""


def test_a_run_refused_by_its_model_or_options_leaves_no_files(tmp_path, model, capsys):
    """The output is opened (and checked) before the model loads; a refusal there left an empty --out, its lock
    and its manifest behind, though exit 2 says nothing was done."""
    dump = write_dump(tmp_path / "d", 3)
    out, errors = tmp_path / "o" / "labels.jsonl", tmp_path / "o" / "errors.jsonl"
    assert label(dump, out, model, "--errors", str(errors), "--class-prior", "uniform") == 2  # a generative model
    assert "error:" in capsys.readouterr().err
    assert not out.exists() and not errors.exists() and sorted(p.name for p in out.parent.iterdir()) == []
    # a resumed job keeps what it had: only the files this run created go
    assert label(dump, out, model) == 0
    before = out.read_bytes()
    assert label(dump, out, model, "--resume", "--class-prior", "uniform") == 2
    assert out.read_bytes() == before and out.with_name(out.name + ".job.json").exists()


def test_5_a_resume_keeps_the_ids_of_out_not_its_records(tmp_path):
    """A resume read every record of --out into memory (40,000 rows: +394 MB; a million: ~10 GB) to learn which
    ids were done; it now keeps each record's id (and the failures --errors lacks) while reading."""
    import tracemalloc

    from mmllm.labelling.output import Output

    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    padding = "x" * 2000  # a record's evidence, top-k, raw text
    lines = [json.dumps({"id": f"r{i}", "status": "ok" if i % 100 else "failed", "source": "d.jsonl",
                         "raw": padding}) + "\n" for i in range(3000)]
    out.write_text("".join(lines))
    tracemalloc.start()
    try:
        output = Output(out, errors, True, inputs=[], manifest=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert len(output.done) == 3000 and [r["id"] for r in output._missing_errors] == [f"r{i}" for i in range(0, 3000, 100)]
        assert peak < out.stat().st_size / 4, peak  # the 6 MB of records are not held (they were: ~3x the file)
    finally:
        output.close()
    assert ids(errors) == sorted(f"r{i}" for i in range(0, 3000, 100))  # the failures --errors lacked, written
