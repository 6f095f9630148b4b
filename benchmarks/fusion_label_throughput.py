"""What labelling costs with a fusion model folder (the default recipe's), and what bf16 encoders change.

Each run is a fresh ``mmllm label`` process over the same rows, as a user runs it: the rows/s it
prints, and its records against the float32 run's (category, attributes, confidence). Two dumps:

* a title-level dump (default: the first ``--rows`` of ``examples/amazon_uk_toys_10k``): a listing
  without a description reads the same tokens in its title and text views, so the encoder runs once
  per row (each distinct token sequence once: ``Featurizer._text_features``);
* the Amazon dev rows (titles, descriptions, seller tables): two sequences per row.

For each it also counts the token sequences the two views make and the distinct ones the encoder
runs, and runs the encoders as trained (``float32``) and under bf16 autocast (``--encoder-precision
bfloat16``), ``--runs`` times each, alternately.

    python benchmarks/fusion_label_throughput.py [--model runs/make-run/fusion] [--rows 2000] [--runs 1]

Needs a fusion model folder (``make run`` writes one). Prints a table and writes
benchmarks/results/fusion_label_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("float32", "bfloat16")


def label(dump: Path, model: Path, out: Path, rows: int | None, precision: str) -> float:
    """One ``mmllm label`` process; the rows/s its summary line says."""
    limit = ["--limit", str(rows)] if rows else []
    done = subprocess.run([sys.executable, "-m", "mmllm", "label", str(dump), "--model", str(model), "--out", str(out),
                           "--quiet", "--encoder-precision", precision, *limit],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mmllm label failed ({done.returncode}):\n{done.stderr[-2000:]}")
    found = re.search(r"([\d,.]+) rows/s", done.stdout)
    if found is None:
        raise SystemExit(f"no rows/s in mmllm label's summary:\n{done.stdout[-2000:]}")
    return float(found.group(1).replace(",", ""))


def agreement(reference: Path, other: Path) -> dict[str, float]:
    """How many records of ``other`` answer as ``reference``'s, and how far their confidences move."""
    first = {r["id"]: r for r in map(json.loads, reference.read_text().splitlines())}
    second = [json.loads(line) for line in other.read_text().splitlines()]
    return {"rows": len(second),
            "same_category": sum(r["category"] == first[r["id"]]["category"] for r in second),
            "same_attributes": sum(r["attributes"] == first[r["id"]]["attributes"] for r in second),
            "max_confidence_change": round(max(abs(r["confidence"] - first[r["id"]]["confidence"]) for r in second), 4)}


def sequences(dump: Path, model: Path, rows: int | None) -> dict[str, int]:
    """The token sequences the listings' views make (title, and title + description), and the distinct
    ones among them (what the encoder runs)."""
    from mmllm import model_dir
    from mmllm.catalog import load_listings
    from mmllm.predictor import model_kind

    predictor = model_dir.load(str(model))
    if model_kind(predictor) != "fusion":
        raise SystemExit(f"{model} is a {model_kind(predictor)} model folder; this benchmark takes a fusion one")
    featurizer = predictor.featurizer
    listings = load_listings(dump)[:rows] if rows else load_listings(dump)
    views = ("text", "title") if featurizer.cfg.title_view else ("text",)
    made = [tuple(ids) for view in views for ids in featurizer.encoders.token_ids(listings, view)]
    return {"listings": len(listings), "sequences": len(made), "distinct": len(set(made))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "make-run" / "fusion", help="a fusion model folder")
    p.add_argument("--title-dump", type=Path, default=ROOT / "examples" / "amazon_uk_toys_10k" / "listings.jsonl.gz")
    p.add_argument("--dev", type=Path, default=ROOT / "examples" / "amazon_uk_toys" / "dev.jsonl")
    p.add_argument("--rows", type=int, default=2000, help="rows of the title-level dump")
    p.add_argument("--runs", type=int, default=1, help="runs of each precision, alternately")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fusion_label_throughput.json")
    args = p.parse_args()
    if not (args.model / "fusion.json").is_file():
        raise SystemExit(f"{args.model}: no fusion model folder there (make run writes runs/make-run/fusion)")
    results = []
    with tempfile.TemporaryDirectory() as work:
        for name, dump, rows in (("title-level", args.title_dump, args.rows), ("dev", args.dev, None)):
            entry = {"dump": name, "path": str(dump), **sequences(dump, args.model, rows), "rows_per_s": {}}
            for run in range(args.runs):
                for precision in PRECISIONS:
                    out = Path(work) / f"{name}_{precision}_{run}.jsonl"
                    speed = label(dump, args.model, out, rows, precision)
                    entry["rows_per_s"].setdefault(precision, []).append(speed)
                    print(f"{name}, {precision}, run {run + 1}: {speed:.1f} rows/s", flush=True)
            entry["bfloat16_against_float32"] = agreement(Path(work) / f"{name}_float32_0.jsonl",
                                                          Path(work) / f"{name}_bfloat16_0.jsonl")
            results.append(entry)
    print()
    print(f"{'dump':<12} {'listings':>8} {'sequences':>9} {'encoded':>7} {'float32 rows/s':>15} "
          f"{'bfloat16 rows/s':>16} {'same category':>14} {'same attributes':>16} {'confidence moved':>17}")
    for e in results:
        speeds = {p: " / ".join(f"{v:.1f}" for v in e["rows_per_s"][p]) for p in PRECISIONS}
        a = e["bfloat16_against_float32"]
        print(f"{e['dump']:<12} {e['listings']:>8,} {e['sequences']:>9,} {e['distinct']:>7,} {speeds['float32']:>15} "
              f"{speeds['bfloat16']:>16} {a['same_category']:>9}/{a['rows']:<4} {a['same_attributes']:>11}/{a['rows']:<4} "
              f"{'<= ' + str(a['max_confidence_change']):>17}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
