"""benchmarks/reference_check.py: the recipe trained on a hash split, its held-out rows ordered by the answer's
own probability and by the reference check, the same answers both ways."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT, benchmark_module


def test_scores_read_the_curve_of_the_confidence_given():
    check = benchmark_module("reference_check")
    correct = [True, True, False, True, False, False, True, False]
    good = check.scores([0.9, 0.8, 0.1, 0.7, 0.2, 0.3, 0.6, 0.05], correct, 0.9)  # every right answer first
    bad = check.scores([0.1, 0.2, 0.9, 0.3, 0.8, 0.7, 0.15, 0.6], correct, 0.9)  # every wrong answer first
    assert good["at_50"] == 1.0 and good["kept_at_target"] == 0.5 and good["accuracy_at_target"] == 1.0
    assert bad["at_50"] == 0.0 and bad["kept_at_target"] == 0.0 and bad["accuracy_at_target"] is None
    lines = check.table([{"split": "0", "rows": 8, "accuracy": 0.5, "own": bad, "check": good}] * 2, 0.9)
    assert "0.000 -> 1.000" in lines[1] and "0% -> 50%" in lines[1] and lines[-1].startswith(" mean")


@pytest.mark.slow
def test_one_split_trains_labels_and_writes_both_orders(tmp_path):
    """The Amazon dev rows split 80 / 20, the recipe's reference rows the training file's: the held-out rows'
    answers are scored once, ordered two ways, and the JSON says how many reference rows the model read."""
    out = tmp_path / "reference_check.json"
    train = ROOT / "examples/amazon_uk_toys/train.jsonl"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "reference_check.py"), "--catalog",
         str(ROOT / "examples/amazon_uk_toys/dev.jsonl"), "--splits", "1", "--out", str(out), "--set",
         "anchor.epochs=1", "train.epochs=2", "fusion.max_text_tokens=32", "grounding.enabled=false",
         "vote.weights=equal", "lexicon.enabled=false", f"anchor.reference=[{train}]"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    dev = [json.loads(line) for line in (ROOT / "examples/amazon_uk_toys/dev.jsonl").open()]
    assert 0 < run["rows"] < len(dev) and 0 <= run["accuracy"] <= 1
    # every training-file row is read, but one whose title is a dev row's (the split's training or held-out rows)
    titles = {" ".join(r["title"].lower().split()) for r in dev}
    reference = [json.loads(line) for line in train.open()]
    expected = [r for r in reference if " ".join(r["title"].lower().split()) not in titles]
    assert run["reference_rows"] == len(expected) and len(expected) < len(reference)
    for side in ("own", "check"):
        assert 0 <= run[side]["at_50"] <= 1 and 0 <= run[side]["kept_at_target"] <= 1
    assert "at 50%: own -> check" in done.stdout and f"wrote {out}" in done.stdout
