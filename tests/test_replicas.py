"""``mmllm label --replicas N``: the loaded model forked into single-thread processes (mmllm.labelling.replicas).
The same records as one process, one record per row when a replica dies, nothing left running when the job
stops, and refused where a fork cannot work."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from pathlib import Path

import pytest
import torch

from mmllm.label import main
from mmllm.labelling.engine import LabelOptions, run_local
from mmllm.labelling.output import Output
from mmllm.labelling.replicas import ReplicaError

from listings import dump_row, write_catalog
from test_label import assert_same_records, label, read


class Reporting:
    """A predictor that answers with the process and torch threads it ran in; the rows named in ``exit_on``
    end their process (a replica killed mid-batch)."""

    schema, max_images, batch_size, light_encode = None, 0, 2, True

    def __init__(self, exit_on: tuple[str, ...] = ()) -> None:
        self.exit_on = exit_on

    def encode(self, listings, images):
        return listings

    def predict_encoded(self, encoded, raw=False):
        if any(listing.id in self.exit_on for listing in encoded):
            os._exit(7)
        return [{"category": None, "attributes": {}, "status": "ok", "pid": os.getpid(),
                 "threads": torch.get_num_threads()} for _ in encoded]


def run(tmp_path: Path, predictor, rows: int = 10, replicas: int = 2, name: str = "out.jsonl", **kwargs):
    path = write_catalog(tmp_path / "d", rows)
    out = tmp_path / name
    with Output(out, None, resume=False, inputs=[path]) as output:
        summary = run_local(predictor, [path], output, LabelOptions(batch_size=2, quiet=True, replicas=replicas),
                            **kwargs)
    return summary, read(out)


def test_the_generative_model_answers_the_same_in_replicas_as_in_one_process(tmp_path, tiny_checkpoint):
    folder = tmp_path / "d"
    dump = write_catalog(folder, 9, dump_row(images=True), name="dump.jsonl")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with dump.open("a") as f:
        f.write(json.dumps({"id": "corrupt-img", "title": "t", "images": ["broken.png"]}) + "\n")
    model = tiny_checkpoint("qwen2_vl")
    assert label(dump, tmp_path / "one.jsonl", model, "--batch-size", "2") == 1  # the broken picture fails its row
    assert label(dump, tmp_path / "two.jsonl", model, "--batch-size", "2", "--replicas", "2") == 1
    one = {r["id"]: r for r in read(tmp_path / "one.jsonl")}
    two = {r["id"]: r for r in read(tmp_path / "two.jsonl")}
    assert len(two) == len(read(tmp_path / "two.jsonl")) == 10  # one record per row, none twice
    assert_same_records(one, two)
    assert two["corrupt-img"]["stage"] == "image" and sum(r["status"] == "ok" for r in two.values()) == 9


def test_each_batch_runs_in_a_forked_single_thread_replica(tmp_path):
    summary, records = run(tmp_path, Reporting())
    ids = [json.loads(line)["id"] for line in (tmp_path / "d" / "catalog.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(ids) and len(ids) == 10
    assert summary.ok == 10 and summary.failed == 0
    assert {r["threads"] for r in records} == {1}
    pids = {r["pid"] for r in records}
    assert len(pids) == 2 and os.getpid() not in pids  # two replicas did the work, this process none of it
    assert multiprocessing.active_children() == []  # and they are gone at the end


def test_a_replica_that_dies_fails_only_its_batch(tmp_path):
    rows = [json.loads(line)["id"] for line in write_catalog(tmp_path / "ids", 10).read_text().splitlines()]
    summary, records = run(tmp_path, Reporting(exit_on=(rows[4],)))
    assert len(records) == 10 and len({r["id"] for r in records}) == 10
    failed = [r for r in records if r["status"] == "error"]
    assert rows[4] in {r["id"] for r in failed} and len(failed) == 2  # its batch: 10 rows make five batches of two
    for r in failed:
        assert r["stage"] == "model" and "exit code 7" in r["error"], r
    assert summary.ok == 10 - len(failed) and summary.failed == len(failed)
    assert multiprocessing.active_children() == []


def test_when_every_replica_dies_the_job_stops_and_keeps_what_it_wrote(tmp_path):
    rows = [json.loads(line)["id"] for line in write_catalog(tmp_path / "ids", 10).read_text().splitlines()]
    with pytest.raises(ReplicaError, match="every one of the 2 replicas stopped.*--resume"):
        run(tmp_path, Reporting(exit_on=tuple(rows)))
    records = read(tmp_path / "out.jsonl")
    assert records and all(r["stage"] == "model" and "exit code 7" in r["error"] for r in records)
    assert len({r["id"] for r in records}) == len(records) < 10
    assert multiprocessing.active_children() == []


def test_an_error_while_writing_ends_the_replicas(tmp_path):
    path = write_catalog(tmp_path / "d", 10)

    class Failing:
        written = 0

        def write(self, record):
            raise OSError("disk full")

        def is_done(self, row):
            return False

    with pytest.raises(OSError, match="disk full"):
        run_local(Reporting(), [path], Failing(), LabelOptions(batch_size=2, quiet=True, replicas=2))
    assert multiprocessing.active_children() == []


def test_replicas_are_refused_where_a_fork_cannot_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ReplicaError, match="CUDA is initialised.*--shard"):
        run(tmp_path, Reporting())
    assert read(tmp_path / "out.jsonl") == []  # refused before any row
    monkeypatch.undo()
    with pytest.raises(ValueError, match="cannot share a model lock"):
        run(tmp_path, Reporting(), name="locked.jsonl", model_lock=threading.Lock())
    with pytest.raises(ValueError, match="replicas must be a whole number >= 1"):
        LabelOptions(replicas=0)
    dump = write_catalog(tmp_path / "e", 2)
    assert main([str(dump), "--model", "unused", "--out", str(tmp_path / "r.jsonl"), "--engine", "ray",
                 "--replicas", "2"]) == 2
    assert "with --engine ray give --ray-actors" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_a_resumed_job_in_replicas_labels_each_remaining_row_once(tmp_path):
    path = write_catalog(tmp_path / "d", 10)
    out = tmp_path / "out.jsonl"
    with Output(out, None, resume=False, inputs=[path]) as output:
        first = run_local(Reporting(), [path], output, LabelOptions(batch_size=2, quiet=True, replicas=2, limit=4))
    assert first.ok == 4 and len(read(out)) == 4
    with Output(out, None, resume=True, inputs=[path]) as output:
        second = run_local(Reporting(), [path], output, LabelOptions(batch_size=2, quiet=True, replicas=2, resume=True))
    ids = [r["id"] for r in read(out)]
    assert second.ok == 6 and len(ids) == len(set(ids)) == 10
    assert set(ids[:4]) == {json.loads(line)["id"] for line in path.read_text().splitlines()[:4]}  # --limit's rows first


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_kill_9_of_the_job_ends_its_replicas_and_resume_gives_one_line_per_id(tmp_path, tiny_checkpoint):
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT

    dump = write_catalog(tmp_path / "d", 60, dump_row(), name="dump.jsonl")
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "mmllm.label", str(dump), "--model", str(tiny_checkpoint("qwen2_vl")), "--schema",
           str(dump.parent / "schema.yaml"), "--out", str(out), "--quiet", "--batch-size", "2", "--replicas", "2",
           "--resume"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 300  # guards against a hung child only; nothing asserts a duration
    while (not out.exists() or out.read_bytes().count(b"\n") < 6) and time.monotonic() < deadline:
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.02)
    replicas = children(proc.pid)
    assert len(replicas) == 2  # forked, and labelling
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    while any(map(running, replicas)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(map(running, replicas)), "a replica outlived its killed job"
    whole = [json.loads(line) for line in out.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")]
    assert 6 <= len(whole) < 60 and len({r["id"] for r in whole}) == len(whole)
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(r["id"] for r in read(out)) == sorted(f"r{i}" for i in range(60))
