"""Does checking each answer against reference rows order the review queue better, on rows dev never chose?

The default recipe reads `anchor.reference` (labelled rows it does not train on: the 8,173 title-level
listings of `amazon_uk_toys_10k`) only for each answer's confidence (`mmllm.models.fusion.anchor.Anchor.check`).
Its effect was found on the 172 dev rows; this measures it on other held-out rows: for each of ``--splits``
hash splits of a labelled catalog (default: the Amazon UK train and dev rows together, 863), the recipe is
trained on the split's training rows (its temperatures fitted on the split's held-out rows, as ``data.dev``
is) and labels the held-out rows. The answers are the model's; two confidences order them:

- ``own``: the answer's calibrated probability in the distribution it was chosen from (the record's
  ``top_k[0].score``: what ``confidence`` is without reference rows);
- ``check``: the record's ``confidence``, its probability once the reference rows join the neighbours.

For each: accuracy of the most confident 50% and 80% of the rows, and the share kept at a target accuracy.
The answers are the same, so any difference is the order of the rows alone.

    python benchmarks/reference_check.py [--catalog A.jsonl [B.jsonl ...]] [--splits 3] [--dev-percent 20]
        [--seed 0] [--target-accuracy 0.9] [--config finetune/fusion_minilm_cpu.yaml] [--set KEY=VALUE ...]

Prints a table and writes benchmarks/results/reference_check.json. About 3 minutes a split on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from versus_bag_of_words import hash_split, training_rows  # noqa: E402


def scores(confidence: list[float | None], correct: list[bool], target: float) -> dict[str, Any]:
    """Accuracy at 50% / 80% coverage and the share kept at ``target`` (mmllm.confidence's curve)."""
    from mmllm.confidence import operating_point, risk_coverage

    curve = risk_coverage(confidence, correct)
    point = operating_point(curve, target)
    return {"at_50": curve.accuracy_at(0.5), "at_80": curve.accuracy_at(0.8),
            "kept_at_target": point.coverage if point else 0.0, "accuracy_at_target": point.accuracy if point else None}


def run_split(rows: list[dict], salt: str, args: argparse.Namespace, work: Path, image_root: Path) -> dict[str, Any]:
    from mmllm import model_dir
    from mmllm.catalog import Listing, iter_catalog
    from mmllm.images import ImagePolicy
    from mmllm.schema import LabelSchema

    train, held = hash_split(rows, args.dev_percent, salt)
    folder = work / f"split{salt or 0}"
    folder.mkdir()
    for name, part in (("train.jsonl", train), ("dev.jsonl", held)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    out = folder / "model"
    command = [sys.executable, "-m", "mmllm.finetune", "--config", args.config, f"data.train={folder / 'train.jsonl'}",
               f"data.dev={folder / 'dev.jsonl'}", f"data.schema={args.schema}", f"data.image_root={image_root}",
               f"train.output_dir={out}", f"train.seed={args.seed}", *args.set]
    print(f"split {salt or 0}: {len(train)} training rows, {len(held)} held out; training ...", flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    listings = [r for r in iter_catalog(str(folder / "dev.jsonl")) if isinstance(r, Listing)]
    records = model_dir.load(out, device="cpu", grounded=False).predict(listings, ImagePolicy(root=image_root))
    schema = LabelSchema.from_yaml(out / "label_schema.yaml")
    correct = [r.get("category") is not None and r["category"] == schema.canonical_category(str(row.label["category"]))
               for row, r in zip(listings, records)]
    own = [r["top_k"][0]["score"] if r.get("top_k") else None for r in records]
    check = [r.get("confidence") for r in records]
    return {"split": salt or "0", "rows": len(records), "accuracy": sum(correct) / len(correct),
            "own": scores(own, correct, args.target_accuracy), "check": scores(check, correct, args.target_accuracy),
            "reference_rows": json.loads((out / "fusion.json").read_text())["anchor"].get("reference_size", 0)}


def table(runs: list[dict[str, Any]], target: float) -> list[str]:
    def cell(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = [f"{'split':>5} {'rows':>5} {'accuracy':>8} | {'at 50%: own -> check':>22} | {'at 80%: own -> check':>22} | "
             f"kept at {target:g}: own -> check"]
    for r in runs:
        lines.append(f"{r['split']:>5} {r['rows']:>5} {r['accuracy']:>8.3f} | "
                     f"{cell(r['own']['at_50']):>10} -> {cell(r['check']['at_50']):<9} | "
                     f"{cell(r['own']['at_80']):>10} -> {cell(r['check']['at_80']):<9} | "
                     f"{r['own']['kept_at_target']:.0%} -> {r['check']['kept_at_target']:.0%}")
    if len(runs) > 1:
        def mean(side: str, key: str) -> float:
            return sum(r[side][key] or 0.0 for r in runs) / len(runs)

        lines.append(f"{'mean':>5} {'':>5} {sum(r['accuracy'] for r in runs) / len(runs):>8.3f} | "
                     f"{mean('own', 'at_50'):>10.3f} -> {mean('check', 'at_50'):<9.3f} | "
                     f"{mean('own', 'at_80'):>10.3f} -> {mean('check', 'at_80'):<9.3f} | "
                     f"{mean('own', 'kept_at_target'):.0%} -> {mean('check', 'kept_at_target'):.0%}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--catalog", type=Path, nargs="+", default=[ROOT / "examples/amazon_uk_toys/train.jsonl",
                                                                ROOT / "examples/amazon_uk_toys/dev.jsonl"],
                   help="labelled catalogs read as one and split by a hash of the id")
    p.add_argument("--schema", type=Path, default=ROOT / "examples/toys_schema.yaml")
    p.add_argument("--splits", type=int, default=3, help="hash splits (salts 0, 1, ...)")
    p.add_argument("--dev-percent", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-accuracy", type=float, default=0.9)
    p.add_argument("--config", default=str(ROOT / "finetune" / "fusion_minilm_cpu.yaml"))
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reference_check.json")
    args = p.parse_args(argv)
    if args.splits < 1 or not 0 < args.dev_percent < 100:
        p.error("--splits must be >= 1 and --dev-percent in (0, 100)")
    args.catalog = [c.resolve() for c in args.catalog]
    args.schema, args.out = args.schema.resolve(), args.out.resolve()
    if Path(args.config).exists():
        args.config = str(Path(args.config).resolve())
    rows = [r for r in training_rows(args.catalog) if r.get("label")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.splits):
            runs.append(run_split(rows, "" if i == 0 else str(i), args, Path(tmp), args.catalog[0].parent))
            print("\n".join(table(runs[-1:], args.target_accuracy)[1:]), flush=True)
    lines = table(runs, args.target_accuracy)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"catalog": [str(c) for c in args.catalog], "config": args.config, "set": args.set,
                                    "seed": args.seed, "target_accuracy": args.target_accuracy, "runs": runs},
                                   indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
