"""One round of human review, end to end: what N reviewed rows of a new catalog buy, against a bag of words.

A team has a model trained on its labelled rows and a catalog it has not seen. It labels the catalog,
people review N rows (the review queue's first N, least confident first, or N rows at random), the
reviewed rows go into ``data.train`` and the recipe is retrained. This measures that loop:

1. the labelled catalog is split by a hash of the id into a **pool** (the dump the team labels and
   reviews) and a **test** half that is never reviewed (``--test-percent``, default 50);
2. the base model (``--base-model``, or the recipe trained here on ``--train`` with each seed) labels the
   pool, the test half and ``--dev``;
3. for every N in ``--rows`` and order in ``--orders``, N pool rows become reviewed rows: the catalog's
   gold label stands in for the reviewer's decision, written as the review desk writes its corrections
   file (the row, its gold ``label``, and ``review``: accepted or corrected, against which prediction);
4. the recipe (``--config`` plus ``--set``) is retrained with ``data.train=[--train, the reviewed rows]``,
   nothing else changed, and labels the test half and dev, and dev again under ``--train``'s category
   shares (``mmllm label --class-prior``: what the old catalog gets back when it is labelled as its own);
   for a random sample, also the base model with no retraining, labelling the test half under the
   sample's category shares (what knowing the catalog's shares alone is worth);
5. TF-IDF + logistic regression (C = 10, ``versus_bag_of_words.bag_of_words``) is fitted on exactly the
   same rows, and the two are compared on the test half: accuracy / macro-F1 of the category, and the
   exact McNemar test of the rows only one side gets right. Dev says what the retraining costs the
   catalog the model was built for.

Every step writes its result into ``--work`` and is skipped when that result is there, so an interrupted
run is continued by the same command (a model folder is written under ``NAME.partial`` and renamed when
its training finished; labels are resumed with ``mmllm label --resume``). ``--work`` remembers the
inputs and settings it was made with and refuses others. The category only: the reviewer stand-in knows
no more than the catalog's gold, which for a title-level dump is the category.

    python benchmarks/review_rounds.py --catalog examples/amazon_uk_toys_10k/listings.jsonl.gz \\
        [--train examples/amazon_uk_toys/train.jsonl] [--dev examples/amazon_uk_toys/dev.jsonl] \\
        [--schema examples/toys_schema.yaml] [--base-model M] [--rows 250 1000] \\
        [--orders queue random] [--seeds 0] [--set fusion.prior_correction=1 ...] [--work runs/review_rounds]

The models it trains read no reference rows (``anchor.reference=[]``: the default recipe's are this very
catalog, whose gold would order the review queue); a ``--base-model`` whose reference is the catalog is refused.
Catalog rows whose gold category is not in the schema are left out (counted). Photos: the pool and test
rows are labelled with ``--image-root`` the catalog's folder; a recipe with an image encoder reads the
reviewed rows' photos from ``data.image_root`` (give it with ``--set``). Prints a table and writes
benchmarks/results/review_rounds.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from versus_bag_of_words import bag_of_words, hash_split, mcnemar, read_rows, scores  # noqa: E402

ORDERS = ("queue", "random")
REVIEWER = "the catalog's gold (benchmarks/review_rounds.py)"


# ---------------------------------------------------------------------- choosing and writing the reviewed rows
def random_order(rows: list[dict]) -> list[dict]:
    """The rows in the order of a salted hash of their id: a random sample, the same on every machine."""
    return sorted(rows, key=lambda r: hashlib.sha256(f"review:{r['id']}".encode()).hexdigest())


def choose(pool: list[dict], records: dict[str, dict], n: int, order: str) -> list[dict]:
    """The ``n`` pool rows a reviewer sees: the review queue's first (least confident first, as ``mmllm
    label --review-below`` orders it) or ``n`` at random."""
    from mmllm.labelling.review import queue_order

    if order == "queue":
        missing = [str(r["id"]) for r in pool if str(r["id"]) not in records]
        if missing:
            raise SystemExit(f"the pool's labels have no record for {len(missing)} rows (first: id {missing[0]})")
        ranked = sorted(pool, key=lambda r: queue_order(records[str(r["id"])]))
    elif order == "random":
        ranked = random_order(pool)
    else:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if n > len(ranked):
        raise SystemExit(f"--rows {n} is more than the pool's {len(ranked)} rows")
    return ranked[:n]


def reviewed_row(row: dict, record: dict) -> dict:
    """A pool row as the review desk saves it: the listing, its gold label, and the decision against
    the base model's prediction (``mmllm.labelling.review.Corrections``' format)."""
    gold = row["label"]["category"]
    keep = {k: row[k] for k in ("id", "title", "description", "attributes", "images") if k in row}
    return {**keep, "label": {"category": gold},
            "review": {"decision": "accepted" if record.get("category") == gold else "corrected",
                       "reviewer": REVIEWER,
                       "predicted": {k: record.get(k) for k in ("category", "attributes", "confidence")},
                       "labels_source": record.get("source"), "labels_line": record.get("line")}}


# ---------------------------------------------------------------------- the work folder
def reference_files(model: Path) -> set[Path]:
    """The catalogs a fusion model folder checks its answers against (``anchor.reference``), resolved from the
    project folder as the recipe read them; none for another kind or an older folder."""
    try:
        anchor = json.loads((model / "fusion.json").read_text())["anchor"] or {}
    except (OSError, ValueError, KeyError):
        return set()
    if not anchor.get("reference_size"):
        return set()
    return {(ROOT / p).resolve() if not Path(p).is_absolute() else Path(p).resolve() for p in anchor.get("reference", [])}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_rows(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def open_work(work: Path, settings: dict[str, Any]) -> None:
    """``work`` new, or made by this script with the same inputs and settings."""
    manifest = work / "review_rounds.json"
    if work.exists() and any(work.iterdir()):
        try:
            made = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise SystemExit(f"--work {work} is not empty and was not made by review_rounds.py; choose another") from None
        if made != settings:
            changed = sorted(k for k in set(made) | set(settings) if made.get(k) != settings.get(k))
            raise SystemExit(f"--work {work} was made with other {', '.join(changed)}; choose another --work "
                             "(or give the same inputs and settings to continue it)")
        return
    work.mkdir(parents=True, exist_ok=True)
    write_atomic(manifest, json.dumps(settings, indent=1) + "\n")


def label(model: Path, dump: Path, out: Path, image_root: Path | None = None,
          class_prior: Path | None = None) -> dict[str, dict]:
    """``mmllm label`` of ``dump`` into ``out`` (resumed where an earlier run stopped); its records by id.
    ``class_prior``: a labelled catalog whose category shares the answers follow (``--class-prior``)."""
    from mmllm.label import main as mmllm_label
    from mmllm.labelling.output import read_records

    argv = [str(dump), "--model", str(model), "--out", str(out)]  # with its progress line (rows/s, ETA)
    if image_root is not None:
        argv += ["--image-root", str(image_root)]
    if class_prior is not None:
        argv += ["--class-prior", str(class_prior)]
    if out.exists():
        argv.append("--resume")
    if mmllm_label(argv) != 0:
        raise SystemExit(f"labelling {dump} with {model} failed (see above); run the same command to continue")
    records, _ = read_records(out, "labels")
    return {str(r.get("id")): r for r in records}


def train(config: str, overrides: list[str], train_files: list[Path], out: Path) -> float:
    """The recipe trained into ``out`` (written as ``out.partial`` and renamed when done); its seconds."""
    from mmllm.finetune import finetune, load_recipe_config

    if out.is_dir():
        return float(json.loads((out / "review_rounds_train.json").read_text())["wall_s"])
    for stale in out.parent.glob(f"labels_*_{out.name.removeprefix('model_')}.jsonl*"):
        stale.unlink()  # labels of an earlier model of this name (its training was cut short and starts again)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        print(f"  {out.name}: an interrupted training is started again", flush=True)
        shutil.rmtree(partial)
    listed = ",".join(str(f) for f in train_files)
    cfg = load_recipe_config(config, [*overrides, f"data.train=[{listed}]", f"train.output_dir={partial}"])
    start = time.perf_counter()
    finetune(cfg)
    wall = round(time.perf_counter() - start, 1)
    write_atomic(partial / "review_rounds_train.json", json.dumps({"wall_s": wall}) + "\n")
    os.replace(partial, out)
    return wall


# ---------------------------------------------------------------------- scoring
def category_scores(rows: list[dict], records: dict[str, dict]) -> dict[str, float]:
    return scores([r["label"]["category"] for r in rows], [records[str(r["id"])].get("category") for r in rows],
                  "category")


def bow_answers(work: Path, train_rows: list[dict], test: list[dict]) -> dict[str, Any]:
    """TF-IDF + LR (C = 10) fitted on ``train_rows``, its test answers by id; kept in ``work`` under the
    training rows' ids (the same reviewed rows, from another seed or order, are fitted once)."""
    ids = hashlib.sha256("\n".join(sorted(str(r["id"]) for r in train_rows)).encode()).hexdigest()[:16]
    path = work / f"bag_of_words_{ids}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    fit = bag_of_words(train_rows, test, ["category"], quick=True)["category"]
    result = {"accuracy": fit["accuracy"], "macro_f1": fit["macro_f1"],
              "answers": {str(r["id"]): a for r, a in zip(test, fit["answers"])}}
    write_atomic(path, json.dumps(result) + "\n")
    return result


def compare(test: list[dict], ours: dict[str, dict], theirs: dict[str, Any]) -> dict[str, Any]:
    gold = [r["label"]["category"] for r in test]
    return mcnemar(gold, [ours[str(r["id"])].get("category") for r in test],
                   [theirs["answers"][str(r["id"])] for r in test], "category")


def mean_row(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("test_accuracy", "test_macro_f1", "bow_accuracy", "bow_macro_f1", "dev_accuracy", "dev_old_shares")
    return {k: round(sum(r[k] for r in runs) / len(runs), 4) for k in keys}


def table(runs: list[dict[str, Any]]) -> list[str]:
    header = (f"{'rows reviewed':<22} | {'seed':>4} | {'recipe, test':>13} | {'TF-IDF + LR':>13} | "
              f"{'only recipe / only BoW, p':>27} | {'dev':>6} | {'dev, old shares':>15} | {'corrected':>9}")
    lines = [header, "-" * len(header)]
    for r in runs:
        p = r["paired"]
        pv = "p < 0.001" if p["p_value"] < 0.001 else f"p = {p['p_value']:.3f}"
        corrected = f"{r['corrected']}/{r['rows']}" if r["rows"] else ""
        lines.append(f"{r['variant']:<22} | {r['seed']:>4} | {r['test_accuracy']:.3f} / {r['test_macro_f1']:.3f} | "
                     f"{r['bow_accuracy']:.3f} / {r['bow_macro_f1']:.3f} | "
                     f"{'+' + str(p['only_recipe']) + ' / -' + str(p['only_bag_of_words']) + ', ' + pv:>27} | "
                     f"{r['dev_accuracy']:.3f} | {r['dev_old_shares']:>15.3f} | {corrected:>9}")
    seeds = sorted({r["seed"] for r in runs})
    if len(seeds) > 1:
        for variant in dict.fromkeys(r["variant"] for r in runs):
            m = mean_row([r for r in runs if r["variant"] == variant])
            lines.append(f"{variant + ', mean':<22} | {len(seeds):>4} | {m['test_accuracy']:.3f} / {m['test_macro_f1']:.3f} | "
                         f"{m['bow_accuracy']:.3f} / {m['bow_macro_f1']:.3f} | {'':>27} | {m['dev_accuracy']:.3f} | "
                         f"{m['dev_old_shares']:>15.3f} | {'':>9}")
    return lines


# ---------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--catalog", type=Path, required=True, help="the new catalog, labelled (its gold stands in for review)")
    p.add_argument("--train", type=Path, default=ROOT / "examples" / "amazon_uk_toys" / "train.jsonl")
    p.add_argument("--dev", type=Path, default=ROOT / "examples" / "amazon_uk_toys" / "dev.jsonl")
    p.add_argument("--schema", type=Path, help="label schema (default: the recipe config's data.schema)")
    p.add_argument("--config", default=str(ROOT / "finetune" / "fusion_minilm_cpu.yaml"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides, for every training")
    p.add_argument("--base-model", type=Path, help="the model folder that labels the pool (default: the recipe "
                                                   "trained here on --train, once per seed)")
    p.add_argument("--rows", nargs="+", type=int, default=[250, 1000], help="how many pool rows are reviewed")
    p.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--test-percent", type=int, default=50)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "review_rounds")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "review_rounds.json")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.rows):
        p.error("--rows must be positive")
    if not 0 < args.test_percent < 100:
        p.error("--test-percent must be between 1 and 99")

    import logging

    logging.basicConfig(level=logging.WARNING)
    from mmllm.finetune import load_recipe_config
    from mmllm.labelling.output import fingerprint
    from mmllm.schema import LabelSchema

    for name in ("catalog", "train", "dev"):
        if not getattr(args, name).is_file():
            p.error(f"--{name} {getattr(args, name)}: no such file")
    if args.base_model is not None and not args.base_model.is_dir():
        p.error(f"--base-model {args.base_model}: no such model folder")
    recipe = load_recipe_config(args.config, args.set)
    schema_path = args.schema or Path(recipe.data.schema)
    if args.base_model is not None:
        checked = reference_files(args.base_model)
        if args.catalog.resolve() in checked:
            p.error(f"--base-model {args.base_model} checks its answers against {args.catalog} (anchor.reference): the "
                    "queue would be ordered by the catalog's own gold; train the base model with anchor.reference=[]")
    if not schema_path.is_absolute() and not schema_path.exists():
        schema_path = ROOT / schema_path  # a recipe's paths are the project folder's (its configs are run from there)
    schema = LabelSchema.from_yaml(schema_path)
    work = args.work.resolve()
    settings = {"catalog_sha256": file_sha(args.catalog), "train_sha256": file_sha(args.train),
                "dev_sha256": file_sha(args.dev), "schema_sha256": file_sha(schema_path),
                "config": str(args.config), "config_sha256": file_sha(Path(args.config)), "set": args.set,
                "base_model": str(args.base_model.resolve()) if args.base_model else None,
                # its files too: a base model retrained in the same folder labels otherwise than the pool's labels say
                "base_model_sha256": fingerprint(args.base_model)["sha256"] if args.base_model else None,
                "test_percent": args.test_percent}
    open_work(work, settings)

    rows = [r for r in read_rows(args.catalog) if (r.get("label") or {}).get("category")]
    known = set(schema.categories)
    outside = [r for r in rows if r["label"]["category"] not in known]
    rows = [r for r in rows if r["label"]["category"] in known]
    pool, test = hash_split(rows, args.test_percent)  # the test half: the ids that hash below the share
    pool_path, test_path = work / "pool.jsonl", work / "test.jsonl"
    for path, part in ((pool_path, pool), (test_path, test)):
        if not path.exists():
            write_rows(path, part)
    too_many = [n for n in args.rows if n > len(pool)]
    if too_many:  # before anything is labelled or trained
        raise SystemExit(f"--rows {too_many[0]} is more than the pool's {len(pool)} rows")
    train_rows, dev = read_rows(args.train), read_rows(args.dev)
    print(f"{args.catalog}: {len(pool):,} pool rows, {len(test):,} test rows"
          + (f" ({len(outside):,} with a category outside schema '{schema.name}' left out)" if outside else "")
          + f"; {len(train_rows):,} training rows, {len(dev):,} dev rows", flush=True)
    image_root = args.catalog.resolve().parent
    # the recipe's reference rows (anchor.reference, the default's: this very catalog) would hand the models the
    # gold of the rows under review: the team has not labelled the new catalog (a --set may name other rows)
    no_reference = ["anchor.reference=[]"] if hasattr(recipe, "anchor") else []
    common = [*no_reference, *args.set, f"data.dev={args.dev.resolve()}", f"data.schema={Path(schema_path).resolve()}"]
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        overrides = [*common, f"train.seed={seed}"]
        if args.base_model:
            base, base_wall = args.base_model.resolve(), None
        else:
            base = work / f"model_none_s{seed}"
            print(f"seed {seed}: training the base model on {len(train_rows):,} rows", flush=True)
            base_wall = train(args.config, overrides, [args.train.resolve()], base)
        tag = "base" if args.base_model else f"none_s{seed}"
        pool_records = label(base, pool_path, work / f"labels_pool_{tag}.jsonl", image_root)
        variants = [("none", 0, None)] + [(f"{order} {n}", n, order) for n in args.rows for order in args.orders]
        for variant, n, order in variants:
            name = f"{variant.replace(' ', '')}_s{seed}"
            if order is None:
                model, wall, reviewed, extra = base, base_wall, [], []
            else:
                chosen = choose(pool, pool_records, n, order)
                reviewed = [reviewed_row(r, pool_records[str(r["id"])]) for r in chosen]
                reviewed_path = work / f"reviewed_{name}.jsonl"
                if not reviewed_path.exists():
                    write_rows(reviewed_path, reviewed)
                model = work / f"model_{name}"
                print(f"seed {seed}, {variant} reviewed rows "
                      f"({sum(r['review']['decision'] == 'corrected' for r in reviewed)} corrected): retraining",
                      flush=True)
                wall = train(args.config, overrides, [args.train.resolve(), reviewed_path], model)
                extra = reviewed  # what reviewed_path holds: the same pool labels choose the same rows
            label_tag = tag if order is None else name
            ours = label(model, test_path, work / f"labels_test_{label_tag}.jsonl", image_root)
            on_dev = label(model, args.dev, work / f"labels_dev_{label_tag}.jsonl")
            # the old catalog labelled under its own category shares (the base model was trained on them)
            old_shares = on_dev if order is None else label(
                model, args.dev, work / f"labels_dev_old_shares_{label_tag}.jsonl", class_prior=args.train.resolve())
            theirs = bow_answers(work, train_rows + extra, test)
            mine = category_scores(test, ours)
            run = {"variant": variant, "seed": seed, "rows": n, "order": order,
                   "corrected": sum(r["review"]["decision"] == "corrected" for r in reviewed),
                   "test_accuracy": mine["accuracy"], "test_macro_f1": mine["macro_f1"],
                   "bow_accuracy": theirs["accuracy"], "bow_macro_f1": theirs["macro_f1"],
                   "paired": compare(test, ours, theirs), "dev_accuracy": category_scores(dev, on_dev)["accuracy"],
                   "dev_old_shares": category_scores(dev, old_shares)["accuracy"], "train_s": wall}
            if order == "random":  # no retraining: the base model under the shares of the random sample
                shares = label(base, test_path, work / f"labels_test_shares_{variant.replace(' ', '')}_{tag}.jsonl",
                               image_root, class_prior=reviewed_path)
                before = bow_answers(work, train_rows, test)
                run["shares_only"] = {**category_scores(test, shares), "bow_accuracy": before["accuracy"],
                                      "paired": compare(test, shares, before)}
            runs.append(run)
            print("  " + table([run])[-1], flush=True)
    lines = table(runs)
    print(f"\ncategory on the {len(test):,} test rows (never reviewed): accuracy / macro-F1; TF-IDF + LR (C = 10) on "
          "the same training rows; paired: the rows only one side gets right, exact McNemar p; dev: the recipe's "
          "accuracy on --dev, and under --train's category shares (mmllm label --class-prior); corrected: reviewed "
          "rows whose base prediction was wrong")
    print("\n".join(lines))
    shares_lines = []
    for r in runs:
        if "shares_only" in r:
            so, p = r["shares_only"], r["shares_only"]["paired"]
            pv = "p < 0.001" if p["p_value"] < 0.001 else f"p = {p['p_value']:.3f}"
            seed = "" if args.base_model else f", seed {r['seed']}"  # one base model: the same line for every seed
            shares_lines.append(f"no retraining{seed}: the base model under the category shares of the {r['rows']} "
                                f"random reviewed rows (mmllm label --class-prior): {so['accuracy']:.3f} / "
                                f"{so['macro_f1']:.3f} on the test rows; TF-IDF + LR on --train {so['bow_accuracy']:.3f}; "
                                f"+{p['only_recipe']} / -{p['only_bag_of_words']}, {pv}")
    for line in dict.fromkeys(shares_lines):
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps({"catalog": str(args.catalog), "train": str(args.train), "dev": str(args.dev),
                                       "pool_rows": len(pool), "test_rows": len(test), "outside_schema": len(outside),
                                       "settings": settings, "runs": runs, "table": lines}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
