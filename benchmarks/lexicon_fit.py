"""What the lexical member's fit costs, over all n-gram weights and in the rows' span, and that both land
on the same model.

``fit_lexicon`` (mmllm/models/fusion/lexicon.py) fits one regression per softmax head of a catalog's
training rows. A fit of few rows over many n-grams x classes runs in the span of its rows
(``bag_of_words._minimize``: the same problem over N x C numbers instead of V x C); this script fits
the same heads both ways, each loss, and prints the seconds and how far apart the two models are (the
largest difference of a probability on the training rows, and the share of rows whose most probable class
differs). It writes a JSON of the table.

    python benchmarks/lexicon_fit.py                       # the shipped Amazon UK training split
    python benchmarks/lexicon_fit.py --train T.jsonl --schema S.yaml --losses logistic
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from mmllm import bag_of_words  # noqa: E402
from mmllm.catalog import Listing, iter_catalog  # noqa: E402
from mmllm.models import heads as heads_mod  # noqa: E402
from mmllm.models.fusion.lexicon import LexiconConfig, fit_lexicon  # noqa: E402
from mmllm.schema import LabelSchema  # noqa: E402


def training_heads(train: Path, schema_path: Path) -> tuple[list[Listing], dict[str, torch.Tensor],
                                                             list[tuple[str, int]], set[str]]:
    """The training rows the recipe would read (their category in the schema), the targets of the softmax
    heads and which of them abstain, as the fusion recipe builds them."""
    schema = LabelSchema.from_yaml(schema_path)
    rows = [r for r in iter_catalog(str(train)) if isinstance(r, Listing) and r.label
            and schema.canonical_category(str(r.label.get("category"))) is not None]
    if not rows:
        raise SystemExit(f"error: {train}: no labelled row whose category is in schema {schema_path}")
    specs = heads_mod.head_specs(schema, [r.label for r in rows], 32, True)
    targets = heads_mod.encode_targets(specs, [r.label for r in rows], schema)
    softmax = [(sp.name, len(sp.classes)) for sp in specs if sp.kind == "softmax" and sp.classes]
    return rows, targets, softmax, {sp.name for sp in specs if sp.abstains}


def fit(x: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor], targets: dict[str, torch.Tensor],
        softmax: list[tuple[str, int]], abstaining: set[str], cfg: LexiconConfig,
        row_space: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Seconds of one ``fit_lexicon`` over ``x`` and its distributions on the rows (``batch``: their padded
    n-gram ids and weights); ``row_space=False`` keeps every fit over all n-gram weights."""
    kept = bag_of_words.ROW_SPACE_ROWS
    bag_of_words.ROW_SPACE_ROWS = kept if row_space else 0
    try:
        start = time.perf_counter()
        lexicon, _ = fit_lexicon(x, targets, softmax, cfg, seed=0, say=lambda text: None, abstaining=abstaining)
        seconds = time.perf_counter() - start
    finally:
        bag_of_words.ROW_SPACE_ROWS = kept
    with torch.no_grad():
        logits = lexicon(*batch)
    return seconds, {n: (z.exp() if n in lexicon.hurdle else torch.softmax(z, -1)) for n, z in logits.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, default=ROOT / "examples" / "amazon_uk_toys" / "train.jsonl")
    p.add_argument("--schema", type=Path, default=ROOT / "examples" / "toys_schema.yaml")
    p.add_argument("--losses", nargs="+", default=["logistic", "squared_hinge"],
                   choices=["logistic", "squared_hinge"])
    p.add_argument("--folds", type=int, default=2, help="lexicon.folds with squared_hinge (its temperature)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lexicon_fit.json")
    args = p.parse_args()

    rows, targets, softmax, abstaining = training_heads(args.train, args.schema)
    vectorizer = bag_of_words.Vectorizer.fit(rows, LexiconConfig(enabled=True))
    x, batch = vectorizer.matrix(rows), vectorizer.batch(rows)
    print(f"{args.train}: {x.shape[0]:,} rows x {x.shape[1]:,} n-grams; heads: "
          + ", ".join(f"{n} ({c})" for n, c in softmax))
    results = []
    print(f"{'loss':<28} | {'all n-grams, s':>14} | {'rows span, s':>12} | {'speed-up':>8} | {'max |dp|':>8} | "
          f"{'argmax differs':>14}")
    for loss in args.losses:
        cfg = LexiconConfig(enabled=True, loss=loss, folds=args.folds if loss == "squared_hinge" else 3)
        primal_s, primal = fit(x, batch, targets, softmax, abstaining, cfg, row_space=False)
        span_s, span = fit(x, batch, targets, softmax, abstaining, cfg, row_space=True)
        gap = max(float((primal[n] - span[n]).abs().max()) for n in primal)
        differs = max(float((primal[n].argmax(-1) != span[n].argmax(-1)).float().mean()) for n in primal)
        name = loss + (f" ({args.folds} folds)" if loss == "squared_hinge" else "")
        print(f"{name:<28} | {primal_s:>14.1f} | {span_s:>12.1f} | {primal_s / span_s:>7.1f}x | {gap:>8.4f} | "
              f"{differs:>13.2%}")
        results.append({"loss": loss, "folds": cfg.folds, "all_ngrams_s": round(primal_s, 2),
                        "row_space_s": round(span_s, 2), "max_probability_difference": gap,
                        "argmax_differs": differs})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"train": str(args.train), "rows": x.shape[0], "ngrams": x.shape[1],
                                    "heads": softmax, "torch_threads": torch.get_num_threads(),
                                    "results": results}, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
