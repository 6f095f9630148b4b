"""Grounded attributes: per-attribute precision / recall / F1 of a model folder's own answers and of
the grounded answers (evidence + learned choice, :mod:`mmllm.grounding`), on the dev split.

Three columns per attribute:

* ``model``: the heads' own answers (``grounded=False``);
* ``grounded``: the folder's ``grounding.json`` as trained (its stage B and thresholds were fitted on
  these dev rows, so this is in-sample for the thresholds); with ``--z`` refitted on all of dev with
  that Wilson width;
* ``held-out``: the choice refitted on one half of dev and scored on the other (twice, 2-fold), the
  honest estimate for listings the thresholds never saw.

Plus the table-stated check: rows whose seller table states the attribute (its first declared key,
and any declared key), and how often the grounded value equals the gold there (null == null counts).

    python benchmarks/grounded_attributes.py [--model runs/make-run/fusion]
        [--train examples/amazon_uk_toys/train.jsonl] [--dev examples/amazon_uk_toys/dev.jsonl]

Prints a table and writes benchmarks/results/grounded_attributes.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mmllm import model_dir  # noqa: E402
from mmllm.catalog import Listing, iter_catalog  # noqa: E402
from mmllm.metrics import attribute_metrics  # noqa: E402
from mmllm.evidence import values_match, table_candidates, table_key  # noqa: E402
from mmllm.grounding import Grounder, GroundingConfig, fit_grounder  # noqa: E402
from mmllm.images import ImagePolicy  # noqa: E402
from mmllm.predictor import predict_in_batches  # noqa: E402


def rows(path: str) -> list[Listing]:
    return [r for r in iter_catalog(path) if isinstance(r, Listing)]


def table_stated(dev: list[Listing], predicted: list[dict], schema) -> dict[str, dict[str, float]]:
    out = {}
    for spec in schema.attributes:
        if spec.evidence is None or not spec.evidence.table:
            continue
        first = table_key(spec.evidence.table[0].key)
        counts = {"first_key_rows": 0, "first_key_equal": 0, "any_key_rows": 0, "any_key_equal": 0}
        for row, attrs in zip(dev, predicted):
            found = table_candidates(row.attributes or {}, spec)
            if not found and not any(table_key(k) == first for k in row.attributes or {}):
                continue
            gold = (row.label or {}).get("attributes", {}).get(spec.name)
            value = attrs.get(spec.name)
            equal = (gold is None and value is None) or (gold is not None and value is not None and values_match(value, gold))
            counts["any_key_rows"] += 1
            counts["any_key_equal"] += equal
            if any(table_key(k) == first for k in row.attributes or {}):
                counts["first_key_rows"] += 1
                counts["first_key_equal"] += equal
        counts["first_key_rate"] = round(counts["first_key_equal"] / max(counts["first_key_rows"], 1), 4)
        counts["any_key_rate"] = round(counts["any_key_equal"] / max(counts["any_key_rows"], 1), 4)
        out[spec.name] = counts
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/make-run/fusion")
    ap.add_argument("--train", default="examples/amazon_uk_toys/train.jsonl")
    ap.add_argument("--dev", default="examples/amazon_uk_toys/dev.jsonl")
    ap.add_argument("--z", type=float, help="refit the dev-fitted part (all of dev, and the halves) with this Wilson "
                                            "width instead of using the folder's grounding.json")
    ap.add_argument("--out", default=str(HERE / "results" / "grounded_attributes.json"))
    args = ap.parse_args()

    predictor = model_dir.load(args.model, device="cpu", grounded=False)
    schema = predictor.schema
    grounder = Grounder.load(args.model, schema)
    if grounder is None:
        print(f"{args.model} has no grounding.json: train it with the grounding: section enabled", file=sys.stderr)
        return 2
    train, dev = rows(args.train), rows(args.dev)
    records = predict_in_batches(predictor, dev, ImagePolicy())
    cfg = GroundingConfig(precision=grounder.precision, **({} if args.z is None else {"z": args.z}))
    if args.z is not None:
        grounder, _ = fit_grounder(schema, train, dev, records, cfg, sorted(grounder.untrained))
    gold = [(r.label or {}).get("attributes") or {} for r in dev]
    names = [a.name for a in schema.attributes if a.name not in grounder.untrained]
    grounded = [grounder.ground(r, rec)["attributes"] for r, rec in zip(dev, records)]
    held_out: list[dict | None] = [None] * len(dev)
    halves = np.array_split(np.random.default_rng(0).permutation(len(dev)), 2)
    for fit_on, score_on in ((0, 1), (1, 0)):
        refit, _ = fit_grounder(schema, train, [dev[i] for i in halves[fit_on]], [records[i] for i in halves[fit_on]],
                                cfg, sorted(grounder.untrained))
        for i in halves[score_on]:
            held_out[i] = refit.ground(dev[i], records[i])["attributes"]
    results = {name: attribute_metrics(gold, [rec["attributes"] for rec in records] if name == "model" else preds,
                                       names, 0.0)
               for name, preds in (("model", None), ("grounded", grounded), ("held-out", held_out))}
    stated = table_stated(dev, grounded, schema)

    print(f"{'attribute':<20} {'gold':>5} | {'model P/R/F1':>17} | {'grounded P/R/F1':>17} | {'held-out P/R/F1':>17} | "
          f"{'table-stated = gold':>20}")
    for name in names:
        cells = [results[k]["per_attribute"][name] for k in ("model", "grounded", "held-out")]
        st = stated.get(name, {})
        print(f"{name:<20} {cells[0]['gold_values']:>5} | " + " | ".join(
            f"{c['precision']:.2f}/{c['recall']:.2f}/{c['f1']:.2f}".rjust(17) for c in cells) +
            f" | {st.get('first_key_equal', 0):>3}/{st.get('first_key_rows', 0):<3} ({st.get('first_key_rate', 0):.3f})")
    print(f"{'micro':<20} {'':>5} | " + " | ".join(
        f"{results[k]['micro_precision']:.2f}/{results[k]['micro_recall']:.2f}/{results[k]['micro_f1']:.2f}".rjust(17)
        for k in ("model", "grounded", "held-out")))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "dev": args.dev, "z": args.z, "rows": len(dev), "results": results,
                               "table_stated": stated}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
