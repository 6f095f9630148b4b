"""The recipe against a bag of words, side by side, on any labelled catalog.

TF-IDF (word 1-2 grams and character 3-5 grams of the title, description and seller table) +
logistic regression, its inverse regularization C chosen by 3-fold cross-validation on the
training rows, one model per label (the category and every enum / boolean attribute), against the
recipe (default ``finetune/fusion_minilm_cpu.yaml``) trained on the same rows, for each seed:
category accuracy and macro-F1, and accuracy on every enum / boolean attribute over the rows with a
gold value, from each side's best value (the model's own answer, or where its head abstains its most
probable stated value, ``best_value``, read from the model's distribution in a labels file too: the
bag of words is trained on those rows only and never abstains). Then what each side would publish, precision / recall / F1 over every row, gold nulls
counting as invented (the recipe's grounded answers, abstaining where unsure). And whether a difference
is more than the rows' noise: per label and seed, the rows only one side gets right and the exact
two-sided McNemar p-value of that split (a binomial test on those rows; the rows both get right or both
get wrong say nothing about which side is better). A user checks the claim on their own data:

    python benchmarks/versus_bag_of_words.py --train my_train.jsonl --dev my_dev.jsonl --schema my.yaml
    python benchmarks/versus_bag_of_words.py --catalog my_labelled.jsonl [--dev-percent 20]   # hash split by id
        [--split-salt 1]   # another split of the same rows: repeat the comparison over a few
        [--config finetune/fusion_minilm_cpu.yaml] [--seeds 0 1 2] [--set KEY=VALUE ...]
    python benchmarks/versus_bag_of_words.py --catalog my_labelled.jsonl --folds 5
        # cross-validation: every row is dev once, both sides trained on the other folds, one paired test over all
    python benchmarks/versus_bag_of_words.py --train T --dev D --labels labels.jsonl --only category --quick
        # a labels file written by `mmllm label` stands for the recipe (what `make run` prints)

With ``--catalog`` the rows are split by a hash of their id (stable across runs and machines); a
missing ``--schema`` is drafted from the training rows by ``mmllm schema infer``'s function (with
``--folds``, from each fold's own training rows). One split of a few hundred rows leaves a difference of a
few rows inside its noise; ``--folds K`` scores K times as many rows (all of them), each by models that
did not train on it, and its pooled paired test counts the rows one side alone gets right over all folds. Rows
mmllm's row contract refuses are named and left out of both sides; a category-only label's attributes
are unknown and left out of the published scores.
Prints a table and writes benchmarks/results/versus_bag_of_words.json.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file, gzipped or not; a line that is not JSON is named by file and line. Any
    other catalog format mmllm reads (CSV / TSV, Parquet, a saved dataset) goes through its reader: a row
    it refuses is named and left out there."""
    name = path.name.lower()
    if not name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".json")):
        from mmllm.catalog import CatalogError, CatalogReader, RowError

        rows = []
        try:
            for row in CatalogReader(path):
                if isinstance(row, RowError):
                    print(f"left out: {row}", file=sys.stderr)
                else:
                    rows.append(row.to_dict())
        except (CatalogError, OSError) as exc:
            raise SystemExit(f"error: cannot read {path}: {exc}") from None
        return rows
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise SystemExit(f"error: cannot read {path}: {exc}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"error: {path} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    return rows


def usable(rows: list[dict], part: str) -> list[dict]:
    """The rows mmllm reads (its row contract: an id, a title, sizes within bounds, ...); the others are
    named and left out of both sides, which are then scored on the same rows."""
    from mmllm.catalog import RowError, parse_row

    kept, first = [], {}
    for number, row in enumerate(rows, 1):
        checked = parse_row(row, source=part, line=number)
        if isinstance(checked, RowError):
            print(f"left out: {checked}", file=sys.stderr)
        elif checked.id in first:  # as mmllm's reader: the first row of an id counts, answers are keyed by id
            print(f"left out: {part} line {number} (id {checked.id!r}): id: repeats line {first[checked.id]}",
                  file=sys.stderr)
        else:
            first[checked.id] = number
            kept.append(row)
    return kept


def training_rows(paths: list[Path]) -> list[dict]:
    """The rows of one or more training catalogs, read as one: each file's refused rows named by it, and a row
    whose id an earlier file already gave left out by name (as within a file, the first row of an id counts).
    Their pictures resolve in the first file's folder (a row of a later file with pictures is refused there)."""
    rows: list[dict] = []
    seen: dict[str, str] = {}
    for path in paths:
        for row in usable(read_rows(path), path.name):
            if str(row["id"]) in seen:
                print(f"left out: {path.name} (id {row['id']!r}): id: already a training row of {seen[str(row['id'])]}",
                      file=sys.stderr)
                continue
            if path.parent != paths[0].parent and row.get("images"):
                raise SystemExit(f"error: {path} (id {row['id']!r}) has pictures and is not in the folder of "
                                 f"{paths[0]}: their relative paths need one folder; put the files side by side")
            seen[str(row["id"])] = path.name
            rows.append(row)
    return rows


def _bucket(row: dict, salt: str = "") -> int:
    """The row's bucket of 100, from a hash of its id (followed by ``salt``): the same on every machine."""
    return int(hashlib.sha256(f"{row['id']}{salt}".encode()).hexdigest()[:8], 16) % 100


def hash_split(rows: list[dict], dev_percent: int, salt: str = "") -> tuple[list[dict], list[dict]]:
    """Rows whose id (followed by ``salt``) hashes below ``dev_percent`` (of 100) go to dev: the same split
    on every machine; another ``salt`` draws another split of the same rows."""
    dev = [r for r in rows if _bucket(r, salt) < dev_percent]
    chosen = {id(r) for r in dev}
    return [r for r in rows if id(r) not in chosen], dev


def fold_split(rows: list[dict], folds: int, fold: int, salt: str = "") -> tuple[list[dict], list[dict]]:
    """Fold ``fold`` (0-based) of ``folds`` by the same hash: every row is in exactly one fold's dev, and
    fold 0 of 5 (printed as fold 1 of 5) is ``hash_split(rows, 20, salt)``'s dev (the buckets below 20)."""
    dev = [r for r in rows if _bucket(r, salt) * folds // 100 == fold]
    chosen = {id(r) for r in dev}
    return [r for r in rows if id(r) not in chosen], dev


def listing_text(row: dict) -> str:
    table = " ".join(f"{k} {v}" for k, v in (row.get("attributes") or {}).items())
    return " ".join([row.get("title") or "", row.get("description") or "", table])


def targets(schema: Any) -> list[str]:
    """The labels both sides predict: the category and every enum / boolean attribute."""
    return ["category"] + [a.name for a in schema.attributes if a.type in ("enum", "boolean")]


def gold_of(row: dict, name: str) -> Any:
    label = row.get("label") or {}
    return label.get("category") if name == "category" else (label.get("attributes") or {}).get(name)


def same(answer: Any, gold: Any, name: str) -> bool:
    """An answer equals the gold: the category exactly (as ``category_metrics`` counts it), an attribute
    case folded ("Lego" is LEGO)."""
    return answer == gold if name == "category" else str(answer).casefold() == str(gold).casefold()


def scores(gold: list[Any], pred: list[Any], name: str) -> dict[str, float]:
    from mmllm.metrics import category_metrics

    pairs = [(g, p) for g, p in zip(gold, pred) if g is not None]
    if name == "category":
        metrics = category_metrics([g for g, _ in pairs], [p for _, p in pairs])
        return {"accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4), "rows": len(pairs)}
    right = sum(same(p, g, name) for g, p in pairs)
    return {"accuracy": round(right / max(len(pairs), 1), 4), "rows": len(pairs)}


def from_labels(path: Path, dev: list[dict], names: list[str]) -> dict[str, Any]:
    """The model side read from a labels file (``mmllm label`` output) instead of a training run, read as
    ``mmllm evaluate`` reads it: of two records for an id the first counts (a later read error never
    replaces an answer), and each line it cannot use is named on stderr."""
    from mmllm.evaluate import read_predictions

    warnings: list[str] = []
    records = read_predictions(path, warnings)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    missing = [str(r["id"]) for r in dev if str(r["id"]) not in records]
    if missing:
        raise SystemExit(f"{path}: no record for {len(missing)} dev rows (first: id {missing[0]})")
    attribute_names = [n for n in names if n != "category"]
    published = published_scores([gold_attributes(r.get("label")) for r in dev],
                                 [records[str(r["id"])].get("attributes") or {} for r in dev], attribute_names)
    return {"seed": str(path), "scores": answer_scores(records, dev, names), "grounded": published}


def gold_attributes(label: dict | None) -> dict | None:
    """A row's gold attributes; None for a category-only label (its attributes unknown: left out of the
    published scores, as ``mmllm evaluate`` leaves them out, not counted as "not stated")."""
    attributes = (label or {}).get("attributes")
    return attributes if isinstance(attributes, dict) else None


def published_scores(gold: list[dict | None], answered: list[dict], names: list[str]) -> dict[str, dict[str, float]]:
    """Precision / recall / F1 of the values a side publishes, over every dev row (an answer where the
    gold is null is invented), per attribute in ``names``."""
    if not names:
        return {}
    from mmllm.metrics import attribute_metrics

    metrics = attribute_metrics(gold, answered, names, 0.0)
    return {n: {k: round(v[k], 4) for k in ("precision", "recall", "f1")} for n, v in metrics["per_attribute"].items()}


def best_value(record: dict, name: str) -> Any:
    """The model's best value of an attribute: the most probable stated value of its own distribution
    (``attribute_top_k``: its answer, or where it abstained the value it would give), else the record's
    answer. The bag of words, trained on the rows with a value, never abstains: this asks both sides the
    same question (which value?); the published table scores abstention. A labels file's ``attributes``
    are grounded (a value the seller table states may replace the model's), so the distribution is read
    first: a labels file and a training run of the same folder score the same values."""
    top = (record.get("attribute_top_k") or {}).get(name)
    if top:
        return next((option["value"] for option in top if option.get("value") is not None), None)
    return (record.get("attributes") or {}).get(name)


def answer_scores(records: dict[str, dict], dev: list[dict], names: list[str]) -> dict[str, dict[str, float]]:
    """Per label, the scores of a model's records (by row id) against the dev rows' gold, and the answers
    themselves in dev order (``answers``, for the paired comparison)."""
    result = {}
    for name in names:
        got = [(records[str(r["id"])].get("category") if name == "category"
                else best_value(records[str(r["id"])], name)) for r in dev]
        result[name] = {**scores([gold_of(r, name) for r in dev], got, name), "answers": got}
    return result


def mcnemar(gold: list[Any], ours: list[Any], theirs: list[Any], name: str) -> dict[str, Any]:
    """The paired comparison of two sides' answers on the rows with a gold value: how many rows only
    ``ours`` gets right, how many only ``theirs``, and the exact two-sided McNemar p-value of that split
    (under "neither side is better" each such row is a fair coin)."""
    pairs = [(same(a, g, name), same(b, g, name)) for g, a, b in zip(gold, ours, theirs) if g is not None]
    only_ours = sum(a and not b for a, b in pairs)
    only_theirs = sum(b and not a for a, b in pairs)
    n, k = only_ours + only_theirs, min(only_ours, only_theirs)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"rows": len(pairs), "only_recipe": only_ours, "only_bag_of_words": only_theirs, "p_value": round(p, 6)}


def bag_of_words(train: list[dict], dev: list[dict], names: list[str], quick: bool = False) -> dict[str, dict[str, float]]:
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, min_df=2)
    train_text, dev_text = [listing_text(r) for r in train], [listing_text(r) for r in dev]
    x_train = hstack([words.fit_transform(train_text), chars.fit_transform(train_text)]).tocsr()
    x_dev = hstack([words.transform(dev_text), chars.transform(dev_text)]).tocsr()
    out = {}
    for name in names:
        keep = [i for i, r in enumerate(train) if gold_of(r, name) is not None]
        y = [str(gold_of(train[i], name)) for i in keep]
        if len(set(y)) < 2:
            out[name] = scores([gold_of(r, name) for r in dev], [y[0] if y else None] * len(dev), name)
            out[name]["answers"] = [y[0] if y else None] * len(dev)
            continue
        folds = max(2, min(3, min(y.count(c) for c in set(y))))
        search = GridSearchCV(LogisticRegression(max_iter=3000), {"C": [1.0, 10.0, 100.0]}, cv=folds,
                              scoring="accuracy") if folds >= 2 and len(keep) >= 30 and not quick else None
        model = (search or LogisticRegression(C=10.0, max_iter=3000)).fit(x_train[keep], y)
        pred = model.predict(x_dev)
        answers = [_typed(p, name, train) for p in pred]
        out[name] = {**scores([gold_of(r, name) for r in dev], answers, name), "answers": answers}
        if search is not None:
            out[name]["C"] = search.best_params_["C"]
    return out


def _typed(text: str, name: str, train: list[dict]) -> Any:
    """Back from the string class to the gold's type (booleans)."""
    for r in train:
        g = gold_of(r, name)
        if g is not None and str(g) == text:
            return g
    return text


def recipe(train_path: Path, dev_path: Path, schema_path: Path, config: str, seed: int, extra: list[str],
           out: Path, names: list[str], dev: list[dict], image_root: Path) -> dict[str, Any]:
    """Train the recipe on the split (written to a work folder: its rows' image paths resolve in
    ``image_root``, the folder of the catalog they came from) and score its answers on dev."""
    from mmllm import model_dir
    from mmllm.catalog import Listing, iter_catalog
    from mmllm.finetune import finetune, load_recipe_config
    from mmllm.grounding import Grounder
    from mmllm.images import ImagePolicy
    from mmllm.schema import LabelSchema

    cfg = load_recipe_config(config, [f"data.train={train_path}", f"data.dev={dev_path}", f"data.schema={schema_path}",
                                      f"data.image_root={image_root}", f"train.output_dir={out}", f"train.seed={seed}",
                                      *extra])
    summary = finetune(cfg)
    rows = [r for r in iter_catalog(str(dev_path)) if isinstance(r, Listing)]
    # the model's own answers (it answers every row, as the bag of words does), then what grounding publishes
    own = model_dir.load(out, device="cpu", grounded=False).predict(rows, ImagePolicy(root=image_root))
    grounder = Grounder.load(out, LabelSchema.from_yaml(out / "label_schema.yaml"))
    published = [grounder.ground(row, p) for row, p in zip(rows, own)] if grounder else own
    result = answer_scores({str(p["id"]): p for p in own}, dev, names)
    grounded = published_scores([gold_attributes(r.label) for r in rows],
                                [p.get("attributes") or {} for p in published], [n for n in names if n != "category"])
    return {"seed": seed, "train_s": summary.get("wall_s"), "scores": result, "grounded": grounded}


def rows_fingerprint(train: list[dict], dev: list[dict], names: list[str], quick: bool) -> str:
    """What a bag-of-words result depends on: the rows (ids, texts, gold), the labels, the C search."""
    h = hashlib.sha256(json.dumps({"labels": names, "quick": quick}).encode())
    for part in (train, dev):
        for r in part:
            h.update(json.dumps([str(r["id"]), listing_text(r), r.get("label")], sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def read_baseline(path: Path, fingerprint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The bag of words' scores written by an earlier run on the same rows, labels and C search."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read the bag-of-words baseline ({e}); run this script with --skip-recipe "
                         f"--out {path} first")
    if data.get("rows_sha256") != fingerprint:
        raise SystemExit(f"{path}: its bag of words was fitted on other rows, labels or C search than these; "
                         "refit it (leave out --baseline)")
    return data["bag_of_words"], data.get("bag_of_words_published") or {}


def paired_table(runs: list[dict[str, Any]], baseline: dict[str, Any], dev: list[dict], names: list[str],
                 title: str | None = None) -> list[str]:
    """The paired comparison of every run with the bag of words, per label (``mcnemar``; also kept in each
    run as ``paired``); a baseline file written before the answers were kept says so."""
    if not runs:
        return []
    if not all(isinstance(baseline[n].get("answers"), dict) for n in names):
        return ["\npaired comparison: the baseline file keeps no answers (written by an older version); refit it"]
    lines = ["\npaired, rows only the recipe gets right / only TF-IDF + LR does, exact McNemar p (two-sided; "
             "p < 0.05: more than the rows' noise)"]
    for run in runs:
        run["paired"] = {}
        cells = []
        for n in names:
            theirs = [baseline[n]["answers"].get(str(r["id"])) for r in dev]
            test = mcnemar([gold_of(r, n) for r in dev], run["scores"][n]["answers"], theirs, n)
            run["paired"][n] = test
            p = "p < 0.001" if test["p_value"] < 0.001 else f"p = {test['p_value']:.3f}"
            cells.append(f"{n}: +{test['only_recipe']} / -{test['only_bag_of_words']}, {p}")
        lines.append(f"{title or 'recipe, seed ' + str(run['seed'])}: " + "; ".join(cells))
    return lines


def prepare(train: list[dict], dev: list[dict], args: argparse.Namespace, work: Path, fold: str = "") -> dict[str, Any]:
    """One split made ready before anything is fitted: its rows written to ``work``, the schema (given, or
    drafted from these training rows), the training rows outside it left out (named), ``--only`` checked
    against it, and the labels both sides predict."""
    from mmllm.schema import LabelSchema
    from mmllm.schema_infer import infer_schema

    work.mkdir(parents=True, exist_ok=True)
    train_path, dev_path = work / "train.jsonl", work / "dev.jsonl"
    for path, part in ((train_path, train), (dev_path, dev)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    if args.schema:
        schema_path = args.schema.resolve()
        schema = LabelSchema.from_yaml(schema_path)
    else:
        schema, _ = infer_schema([r["label"] for r in train], name="drafted", rows=train)
        schema_path = work / "schema.yaml"
        schema.to_yaml(schema_path)
    outside = [r for r in train if isinstance(gold_of(r, "category"), str)
               and schema.canonical_category(gold_of(r, "category")) is None]
    if outside:  # the recipe does not train on them (mmllm.finetune names them): nor does the bag of words
        print(f"left out: {len(outside)} training rows whose category is not in schema '{schema.name}' (first: id "
              f"{outside[0]['id']!r}, {gold_of(outside[0], 'category')!r})", file=sys.stderr)
        dropped = {id(r) for r in outside}
        train = [r for r in train if id(r) not in dropped]
    unknown = sorted(set(args.only or ()) - set(targets(schema)))
    if unknown:
        where = f" (drafted from {fold}'s training rows)" if fold and not args.schema else ""
        raise SystemExit(f"error: --only {' '.join(unknown)}: not a label of schema '{schema.name}'{where}; its "
                         f"labels: {', '.join(targets(schema))}")
    names = [n for n in targets(schema) if not args.only or n in args.only]
    return {"train": train, "dev": dev, "work": work, "train_path": train_path, "dev_path": dev_path,
            "schema_path": schema_path, "names": names}


def compare(split: dict[str, Any], args: argparse.Namespace, image_root: Path, heading: str = "") -> dict[str, Any]:
    """One prepared split (``prepare``): the bag of words, the recipe for each seed (or the labels file), the
    tables printed under ``heading``; returns what the JSON keeps, with the dev rows (``dev``) for pooling
    folds."""
    train, dev, names, work = split["train"], split["dev"], split["names"], split["work"]
    train_path, dev_path, schema_path = split["train_path"], split["dev_path"], split["schema_path"]
    if heading:
        print(f"\n== {heading}", flush=True)
    print(f"{len(train)} training rows, {len(dev)} dev rows; labels: {', '.join(names)}", flush=True)
    fingerprint = rows_fingerprint(train, dev, names, args.quick)
    attribute_names = [n for n in names if n != "category"]
    if args.baseline:
        baseline, baseline_published = read_baseline(args.baseline, fingerprint)
    else:
        baseline = bag_of_words(train, dev, names, args.quick)
        baseline_published: dict[str, dict[str, float]] = {}
    if attribute_names and not args.baseline:
        baseline_published = published_scores([gold_attributes(r.get("label")) for r in dev],
                                              [{n: baseline[n]["answers"][i] for n in attribute_names}
                                               for i in range(len(dev))], attribute_names)
    if not args.baseline:  # the answers by row id, for the paired comparison (a baseline file keeps them)
        for n in names:
            baseline[n]["answers"] = {str(r["id"]): a for r, a in zip(dev, baseline[n]["answers"])}
    runs = [from_labels(args.labels, dev, names)] if args.labels else [] if args.skip_recipe else [
        recipe(train_path, dev_path, schema_path, args.config, seed, args.set, work / f"seed{seed}", names, dev,
               image_root)
        for seed in args.seeds]
    lines = score_table(names, baseline, runs, args.quick, args.labels is not None)
    print("category: accuracy / macro-F1; attributes: accuracy on rows with a gold value (each side's best value)")
    print("\n".join(lines))
    paired_lines = paired_table(runs, baseline, dev, names, "the labels file" if args.labels else None)
    if paired_lines:
        print("\n".join(paired_lines))
    if attribute_names:  # what a catalog would publish: every row's answer, gold nulls count as invented
        print("\npublished attributes, precision / recall / F1 over every dev row (gold null: an answer is invented)")
        print(f"{'model':<24}" + "".join(f" | {n[:22]:>22}" for n in attribute_names))
        published_rows = [("TF-IDF + LR", baseline_published)] + [
            ("the labels file" if args.labels else f"recipe grounded, seed {r['seed']}", r["grounded"])
            for r in runs if r["grounded"]]
        for title, result in published_rows:
            cells = [f"{result[n]['precision']:.2f} / {result[n]['recall']:.2f} / {result[n]['f1']:.2f}"
                     for n in attribute_names]
            print(f"{title:<24}" + "".join(f" | {c:>22}" for c in cells))
    return {"train_rows": len(train), "dev_rows": len(dev), "labels": names, "rows_sha256": fingerprint,
            "bag_of_words": baseline, "bag_of_words_published": baseline_published, "recipe": runs, "table": lines,
            "paired": paired_lines, "dev": dev}


def score_table(names: list[str], baseline: dict[str, Any], runs: list[dict[str, Any]], quick: bool = False,
                from_labels_file: bool = False) -> list[str]:
    """The side-by-side table: the bag of words, each run, and their mean over several runs."""
    header = f"{'model':<22}" + "".join(f" | {n[:22]:>22}" for n in names)
    lines = [header, "-" * len(header)]

    def row(title: str, result: dict[str, dict[str, float]]) -> str:
        cells = []
        for n in names:
            s = result[n]
            cells.append(f"{s['accuracy']:.3f} / {s['macro_f1']:.3f}" if n == "category" else f"{s['accuracy']:.3f}")
        return f"{title:<22}" + "".join(f" | {c:>22}" for c in cells)

    lines.append(row("TF-IDF + LR" + (" (C=10)" if quick else ""), baseline))
    for run in runs:
        lines.append(row("the labels file" if from_labels_file else f"recipe, seed {run['seed']}", run["scores"]))
    if len(runs) > 1:
        mean = {n: {k: round(sum(r["scores"][n][k] for r in runs) / len(runs), 4)
                    for k in runs[0]["scores"][n] if k not in ("rows", "answers")} for n in names}
        lines.append(row(f"recipe, mean of {len(runs)}", mean))
    return lines


def pooled(folds: list[dict[str, Any]], quick: bool = False) -> dict[str, Any]:
    """Every fold's dev rows scored together, each row once: per label (those every fold has) and seed the
    scores of both sides over all the rows, and one paired test over all of them (the rows of different folds
    are different rows, so their paired counts add up)."""
    names = [n for n in folds[0]["labels"] if all(n in f["labels"] for f in folds)]
    left_out = sorted({n for f in folds for n in f["labels"]} - set(names))
    dev = [r for f in folds for r in f["dev"]]
    gold = {n: [gold_of(r, n) for r in dev] for n in names}
    theirs = {n: [f["bag_of_words"][n]["answers"].get(str(r["id"])) for f in folds for r in f["dev"]] for n in names}
    baseline = {n: {**scores(gold[n], theirs[n], n), "answers": dict(zip((str(r["id"]) for r in dev), theirs[n]))}
                for n in names}
    runs = []
    for i, run in enumerate(folds[0]["recipe"]):
        ours = {n: [a for f in folds for a in f["recipe"][i]["scores"][n]["answers"]] for n in names}
        runs.append({"seed": run["seed"], "scores": {n: {**scores(gold[n], ours[n], n), "answers": ours[n]}
                                                     for n in names}})
    lines = score_table(names, baseline, runs, quick)
    paired_lines = paired_table(runs, baseline, dev, names)
    for run in runs:  # the JSON keeps the scores and the test, not every answer twice
        for n in names:
            run["scores"][n].pop("answers")
    return {"rows": len(dev), "labels": names, "labels_not_in_every_fold": left_out,
            "bag_of_words": {n: {k: v for k, v in baseline[n].items() if k != "answers"} for n in names},
            "recipe": runs, "table": lines, "paired": paired_lines}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, nargs="+", help="the training rows: one catalog or several, read as one "
                                                         "(a repeated id counts once, its first row)")
    p.add_argument("--dev", type=Path)
    p.add_argument("--catalog", type=Path, help="one labelled catalog, split by a hash of the id")
    p.add_argument("--dev-percent", type=int, help="with --catalog: the share of rows (of 100) in dev (default 20)")
    p.add_argument("--split-salt", default="", metavar="TEXT",
                   help="with --catalog: hash the id followed by TEXT, another split of the same rows (repeated hold-out: "
                        "one dev split of ~170 rows can be lucky or unlucky for either side)")
    p.add_argument("--folds", type=int, metavar="K",
                   help="with --catalog: K-fold cross-validation by the same hash (instead of --dev-percent): each "
                        "fold's rows are dev once, both sides trained on the rest, then every row scored together "
                        "and one paired test over all of them (K times the rows of one split; fold 1 of 5 is the "
                        "--dev-percent 20 split)")
    p.add_argument("--schema", type=Path, help="label schema (default with --catalog: drafted from the training rows)")
    p.add_argument("--config", default=str(ROOT / "finetune" / "fusion_minilm_cpu.yaml"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra recipe overrides (repeatable)")
    p.add_argument("--skip-recipe", action="store_true", help="the bag of words only")
    p.add_argument("--labels", type=Path, help="a labels file for the dev rows (mmllm label): the model side, no training")
    p.add_argument("--only", nargs="+", metavar="LABEL", help="compare these labels only (e.g. category)")
    p.add_argument("--quick", action="store_true", help="TF-IDF + LR at C=10 (no cross-validated search of C)")
    p.add_argument("--baseline", type=Path, help="the bag of words' scores from an earlier run's JSON on the same rows "
                                                 "and labels (--skip-recipe, written while the recipe trained): read "
                                                 "instead of refitted")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "versus_bag_of_words.json")
    args = p.parse_args()
    if bool(args.catalog) == bool(args.train and args.dev):
        p.error("give --catalog, or --train and --dev")
    if args.split_salt and not args.catalog:
        p.error("--split-salt draws another split of a --catalog; --train and --dev are split already")
    if args.folds is not None:
        if not args.catalog:
            p.error("--folds splits a --catalog; --train and --dev are split already")
        if not 2 <= args.folds <= 100:
            p.error(f"--folds must be 2 to 100, got {args.folds}")
        if args.labels or args.baseline:
            p.error("--folds trains both sides on each fold: a --labels or --baseline file answers one split only")
        if args.dev_percent is not None:
            p.error("--folds cuts the rows into K folds of 1/K each: leave out --dev-percent")
    # every path as the user meant it (from where they ran it): the recipe then runs in the project folder
    for name in ("dev", "catalog", "schema", "labels", "baseline", "out"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    args.train = [path.resolve() for path in args.train or ()]
    if Path(args.config).exists():
        args.config = str(Path(args.config).resolve())
    from mmllm.output_paths import PathClash, check_writes

    try:
        check_writes([*args.train, args.dev, args.catalog, args.schema, args.labels, args.baseline, Path(args.config)],
                     {"--out": args.out})
    except PathClash as exc:
        p.error(str(exc))

    import logging

    logging.basicConfig(level=logging.WARNING)
    os.chdir(ROOT)
    if args.catalog:  # the row contract first: the split hashes each row's id
        rows = [r for r in usable(read_rows(args.catalog), args.catalog.name) if r.get("label")]
        splits = ([fold_split(rows, args.folds, k, args.split_salt) for k in range(args.folds)] if args.folds
                  else [hash_split(rows, 20 if args.dev_percent is None else args.dev_percent, args.split_salt)])
    else:
        splits = [(training_rows(args.train), usable(read_rows(args.dev), args.dev.name))]
    for k, (train, dev) in enumerate(splits):  # every split checked before anything is fitted
        if not train or not dev:
            where = f"fold {k + 1} of {args.folds}: " if args.folds else ""
            raise SystemExit(f"{where}{len(train)} training and {len(dev)} dev rows: both sides need rows; give more "
                             f"rows, {'fewer --folds' if args.folds else 'another --dev-percent'}, or --train and --dev")
    # the split is written to a work folder: its rows' pictures stay where the catalog's folder has them
    image_root = (args.catalog or args.train[0]).parent
    if not args.catalog and args.dev.parent != image_root and any(r.get("images") for r in splits[0][1]):
        raise SystemExit(f"error: {args.train[0]} and {args.dev} are in different folders and the dev rows have "
                         "pictures: their relative paths need one folder; put the two files side by side")
    with tempfile.TemporaryDirectory() as tmp:  # every split's schema and --only checked, then fitted
        headings = [f"fold {k + 1} of {args.folds}" if args.folds else "" for k in range(len(splits))]
        prepared = [prepare(train, dev, args, Path(tmp) / f"split{k + 1}", heading)
                    for k, ((train, dev), heading) in enumerate(zip(splits, headings))]
        results = [compare(split, args, image_root, heading) for split, heading in zip(prepared, headings)]
    summary = pooled(results, args.quick) if args.folds else None
    for result in results:  # the JSON names each split's dev rows by id
        result["dev_ids"] = [str(r["id"]) for r in result.pop("dev")]
    written: dict[str, Any] = {"config": args.config, "split_salt": args.split_salt}
    if summary is not None:
        print(f"\n== {args.folds} folds pooled: {summary['rows']} rows, each scored once (trained without it)")
        if summary["labels_not_in_every_fold"]:
            print("not pooled (not a label of every fold's drafted schema): "
                  + ", ".join(summary["labels_not_in_every_fold"]))
        print("\n".join(summary["table"] + summary["paired"]))
        written.update({"folds": args.folds, "pooled": summary, "per_fold": results})
    else:
        written.update(results[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(written, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
