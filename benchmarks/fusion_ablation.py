"""Fusion ablation: each fusion method x modality subset, same split, one table + JSON.

    python benchmarks/fusion_ablation.py [--config finetune/fusion_minilm_cpu.yaml] [--epochs 40]
        [--methods concat attention coattention] [--subsets text text+attributes all] [--seeds 0 1]
        [--set fusion.label_prior=false ...] [--out benchmarks/results/fusion_ablation.json]

Every run trains the fusion recipe (frozen encoders, one shared feature cache, so the text
encoder runs once) on data.train and scores data.dev with ``mmllm.evaluate``'s functions:
category accuracy and macro-F1, attribute micro-F1 of the heads' own answers and of the grounded
answers (the folder's ``grounding.json``: stated evidence + learned choice, mmllm/grounding.py), the
grounded precision and the grounded F1 of each attribute ("n/a" where no dev row has a gold value),
plus training seconds on this machine. The grounded thresholds were fitted on these dev rows;
``benchmarks/grounded_attributes.py`` gives the held-out estimate for one folder. With 172 dev rows one row is 0.6 points, so each cell is the mean over ``--seeds`` (the
spread is in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUBSETS = {"text": ["text"], "text+attributes": ["text", "attributes"], "all": ["text", "image", "attributes"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "finetune" / "fusion_minilm_cpu.yaml"))
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--methods", nargs="+", default=["concat", "attention", "coattention"])
    p.add_argument("--subsets", nargs="+", default=list(SUBSETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--cache-dir", default=str(ROOT / "runs" / "fusion_feature_cache"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every run (e.g. fusion.label_prior=false); named in the table")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fusion_ablation.json"))
    args = p.parse_args()
    # the paths as the user meant them (from where they ran it): the recipe then runs in the project folder
    args.out, args.cache_dir = str(Path(args.out).resolve()), str(Path(args.cache_dir).resolve())
    if Path(args.config).exists():
        args.config = str(Path(args.config).resolve())

    import logging

    logging.basicConfig(level=logging.WARNING)
    from mmllm.catalog import iter_catalog
    from mmllm.metrics import attribute_metrics, category_metrics
    from mmllm.grounding import Grounder
    from mmllm.finetune import finetune, load_recipe_config
    from mmllm.images import ImagePolicy
    from mmllm import model_dir
    from mmllm.recipes.common import policy_for
    from mmllm.schema import LabelSchema

    os.chdir(ROOT)
    results = []
    schema = LabelSchema.from_yaml(load_recipe_config(args.config).data.schema)
    names = [a.name for a in schema.attributes]
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for subset in args.subsets:
                runs = []
                for seed in args.seeds:
                    out = f"{tmp}/{method}_{subset}_{seed}"
                    overrides = [f"train.output_dir={out}", f"fusion.method={method}", f"train.seed={seed}",
                                 f"fusion.modalities=[{','.join(SUBSETS[subset])}]", f"fusion.cache_dir={args.cache_dir}"]
                    overrides += args.set
                    if args.epochs:
                        overrides.append(f"train.epochs={args.epochs}")
                    cfg = load_recipe_config(args.config, overrides)
                    summary = finetune(cfg)
                    rows = [r for r in iter_catalog(cfg.data.dev) if not hasattr(r, "stage")]
                    predictor = model_dir.load(out, device="cpu", grounded=False)
                    preds = predictor.predict(rows, policy_for(cfg.data.dev, ImagePolicy()))
                    grounder = Grounder.load(out, schema)
                    grounded = [grounder.ground(r, q) for r, q in zip(rows, preds)] if grounder else preds
                    gold = [schema.validate(r.label).value for r in rows]
                    cat = category_metrics([g["category"] for g in gold], [q["category"] for q in preds])
                    own = attribute_metrics([g["attributes"] for g in gold], [q["attributes"] for q in preds], names, 0.0)
                    attrs = attribute_metrics([g["attributes"] for g in gold], [q["attributes"] for q in grounded],
                                              names, 0.0)
                    runs.append({"seed": seed, "accuracy": cat["accuracy"], "macro_f1": cat["macro_f1"],
                                 "model_attribute_micro_f1": own["micro_f1"], "attribute_micro_f1": attrs["micro_f1"],
                                 "attribute_precision": attrs["micro_precision"], "train_s": summary["wall_s"],
                                 **{f"f1_{n}": attrs["per_attribute"][n]["f1"] for n in names}})
                    gold_values = {n: attrs["per_attribute"][n]["gold_values"] for n in names}
                record = {"method": method + "".join(f", {o}" for o in args.set), "modalities": subset, "runs": runs,
                          "gold_values": gold_values,
                          **{k: round(sum(r[k] for r in runs) / len(runs), 4) for k in runs[0] if k != "seed"}}
                results.append(record)
                print(json.dumps({k: v for k, v in record.items() if k not in ("runs", "gold_values")}), flush=True)
    short = [n.replace("_required", "_req").replace("_included", "_incl") for n in names]
    lines = ["| method | modalities | accuracy | macro-F1 | attr micro-F1 model | attr micro-F1 grounded | "
             "attr precision grounded | " + " | ".join(f"F1 {n}" for n in short) + " | train s |",
             "|---" * (8 + len(names)) + "|"]
    lines += [f"| {r['method']} | {r['modalities']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
              f"{r['model_attribute_micro_f1']:.3f} | {r['attribute_micro_f1']:.3f} | {r['attribute_precision']:.3f} | "
              + " | ".join(_f1_cell(r, n) for n in names)
              + f" | {r['train_s']:.0f} |" for r in results]
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": args.config, "seeds": args.seeds, "note": "image rows = text+attributes when "
                                          "image_encoder is none", "results": results, "table": lines}, indent=2) + "\n")
    return 0


def _f1_cell(record: dict, name: str) -> str:
    """An attribute no dev row states has no F1 to report (not a zero)."""
    return f"{record['f1_' + name]:.3f}" if record["gold_values"][name] else "n/a"


if __name__ == "__main__":
    sys.exit(main())
