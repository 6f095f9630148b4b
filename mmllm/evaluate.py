"""Evaluate predictions against gold labels: metrics with confidence intervals, and a report.

    python -m mmllm.evaluate --pred labels.jsonl --gold dev.jsonl --report reports/dev [--schema S.yaml]
        [--model MODEL_DIR] [--compare other_labels.jsonl] [--tolerance 0.5]

Category: accuracy, macro-F1, weighted-F1, accuracy per taxonomy level, hierarchical F1 (credit
for the shared prefix of the ``" > "`` path: precision / recall over the path's ancestor sets,
Kiritchenko et al. 2006), top-k accuracy when predictions carry ranked ``top_k`` categories.
The hierarchical F1 is the one MLPerf Inference's product-catalogue task reports: per row the
longest common prefix of the two paths (= the shared ancestors), summed over rows, over the summed
predicted path lengths (precision) and gold path lengths (recall); an unparsable answer predicts
nothing and scores 0 (``tests/test_evaluate.py`` checks it by hand), so a figure sits beside theirs.
Attributes: per attribute precision, recall and F1 (numbers match within ``--tolerance``),
coverage (the model states a value where the gold has one) and invention (it states one where
the gold has none). JSON validity, error rows and rows missing from the predictions. Headline
numbers get seeded bootstrap 95% intervals; ``--compare`` bootstraps the paired difference.

Grounded attributes: when the schema declares ``evidence:``, each (row, attribute) is one of three
situations: the gold listing states the value (``extraction``: :func:`mmllm.evidence.candidates`
finds it), the gold knows it but the listing does not state it (``completion``), or the gold is null
(``unknown``: abstaining is right, an answer is invented). Every predicted value is also scored by
the source its record gives (``evidence[name].source``; ``unknown`` for records without one).

Bad input lines do not stop a run; each is a warning naming file, line, id and field. A
malformed prediction (a category that is not a string, attributes that are not an object) is
an invalid answer, so it scores as wrong; a gold row that cannot be scored is left out.

Selective prediction, when predictions carry a ``confidence``: the risk-coverage curve (the
accuracy of the rows kept when only the most confident share is kept, :mod:`mmllm.confidence`),
accuracy at 50% / 80% / 100% coverage with bootstrap intervals (each resample draws its own curve;
with ``--compare``, the paired difference), and with ``--target-accuracy A`` the lowest threshold
whose kept rows reach A ("keep rows with confidence >= t: 41% of them, accuracy 0.95 [CI]"). A row
without a confidence (missing, failed) is kept last and counts as wrong.

The report folder gets ``report.md``, ``metrics.json`` and PNG plots: the confusion matrix of the
most frequent categories, per-class F1, a reliability diagram and the risk-coverage curve when
predictions carry probabilities, and the training curves when ``--model`` points at a model folder.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmllm.catalog import CatalogReader, RowError, attributes_labelled
from mmllm.config import at_least
from mmllm.confidence import Curve, operating_point, risk_coverage
from mmllm.evidence import candidates, values_match
from mmllm.output_paths import PathClash, check_folder
from mmllm.schema import SEPARATOR, LabelSchema, clean_path

REPORT_FILES = ("report.md", "metrics.json", "confusion_matrix.png", "per_class_f1.png", "attribute_situations.png",
                "calibration.png", "risk_coverage.png", "training_curves.png")  # what --report's folder gets
HEADLINE = ("category_accuracy", "category_macro_f1", "hierarchical_f1", "attribute_micro_f1", "json_valid_rate")
SITUATIONS = ("extraction", "completion", "unknown")  # stated in the listing / known but not stated / gold null
SOURCES = ("table", "title", "description", "context", "model", "unknown")  # where a record says a predicted value came from


@dataclass
class Rows:
    """Gold and predictions aligned by id; a missing or failed prediction predicts nothing."""

    ids: list[str]
    titles: list[str]
    gold_category: list[str | None]
    pred_category: list[str | None]
    gold_attributes: list[dict[str, Any] | None]  # None: labelled for the category only (attributes unknown)
    pred_attributes: list[dict[str, Any]]
    status: list[str]  # ok / invalid / error / missing
    top_k: list[list[str]]
    confidence: list[float | None]
    extra_predictions: int = 0
    unlabelled: int = 0  # gold rows without a label: nothing to score their predictions against
    warnings: list[str] = field(default_factory=list)  # bad input lines, "file line N (id 'x'): field: problem"
    stated: list[dict[str, tuple[Any, ...]]] = field(default_factory=list)  # attribute -> the values the gold listing
                                                                          # states; [] without evidence
    sources: list[dict[str, str]] = field(default_factory=list)  # predicted attribute -> its evidence source


def declares_evidence(schema: LabelSchema | None) -> bool:
    return schema is not None and any(a.evidence is not None for a in schema.attributes)


def align(pred_path: Path, gold_source: Path, schema: LabelSchema | None) -> Rows:
    rows = Rows([], [], [], [], [], [], [], [], [])
    grounded = declares_evidence(schema)
    preds = read_predictions(pred_path, rows.warnings)
    seen = set()
    reader = CatalogReader(gold_source)
    for row in reader:
        if isinstance(row, RowError):
            if row.id is not None:
                seen.add(row.id)  # a prediction for a gold row left out is not a stray one
            rows.warnings.append(f"{row}; gold row left out")
            continue
        seen.add(row.id)  # a prediction for it is not a stray one, labelled or not
        if row.label is None:
            rows.unlabelled += 1
            continue
        where = f"{row.source} {reader.unit} {row.line} (id {row.id!r})"
        gold = _normalize(row.label, schema, rows.warnings, f"{where}: label")
        if gold["category"] is None and not any(v is not None for v in gold["attributes"].values()):
            rows.warnings.append(f"{where}: label: neither a category nor attributes; gold row left out")
            continue
        if gold["category"] is None:
            rows.warnings.append(f"{where}: label.category: missing; row left out of the category metrics")
        record = preds.get(row.id)
        status = "missing" if record is None else record.get("status", "ok")
        pred = _normalize(record, schema) if record is not None and status == "ok" else {"category": None, "attributes": {}}
        rows.ids.append(row.id)
        rows.titles.append(row.title)
        rows.gold_category.append(gold["category"])
        rows.pred_category.append(pred["category"])
        rows.gold_attributes.append({k: v for k, v in gold["attributes"].items() if v is not None}
                                    if attributes_labelled(row.label) else None)
        predicted = {k: v for k, v in pred["attributes"].items() if v is not None}
        rows.pred_attributes.append(predicted)
        evidence = record.get("evidence") if status == "ok" else None
        rows.sources.append({k: _source(evidence, k) for k in predicted})
        if grounded:
            rows.stated.append({k: tuple(c.value for c in found) for k, found in candidates(row, schema).items() if found})
        rows.status.append(status)
        ranked = [_ranked(c["category"] if isinstance(c, dict) else c, schema) for c in (record or {}).get("top_k", [])]
        rows.top_k.append(ranked)
        rows.confidence.append((record or {}).get("confidence") if status == "ok" else None)
    rows.extra_predictions = len(set(preds) - seen)
    if not preds:
        rows.warnings.append(f"{pred_path}: holds no predictions; every row counts as missing (did the labelling run?)")
    elif rows.extra_predictions == len(preds):
        rows.warnings.append(f"{pred_path}: none of its {len(preds):,} predictions is for an id of {gold_source.name}; "
                             "every row counts as missing: check --pred and --gold")
    if not rows.ids:
        first = f"; {len(rows.warnings)} input problem(s), the first: {rows.warnings[0]}" if rows.warnings else ""
        raise ValueError(f"{gold_source}: no labelled rows to evaluate against{first}")
    return rows


def read_predictions(path: Path, warnings: list[str]) -> dict[str, dict[str, Any]]:
    """Predictions by id. A line that cannot be read is skipped and one that is malformed becomes
    an invalid answer, each with a warning: one bad line must not hide the scores of the rest."""
    preds: dict[str, dict[str, Any]] = {}
    first_line: dict[str, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (an editor's save)
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                warnings.append(f"{where}: not valid UTF-8 (byte 0x{line[exc.start]:02x} at offset {exc.start}); line skipped")
                continue
            except json.JSONDecodeError as exc:
                warnings.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); line skipped")
                continue
            if not isinstance(record, dict):
                warnings.append(f"{where}: expected a JSON object, got {_shown(record)}; line skipped")
                continue
            if record.get("id") is None:
                continue  # error records of rows that never parsed: no gold row to score them against
            record_id = str(record["id"])
            problem = _prediction_problem(record)
            if problem is not None:
                field_name, message = problem
                status = "error" if record.get("status") == "error" else "invalid"  # an error row stays one
                warnings.append(f"{where} (id {record_id!r}): {field_name}: {message}; counted as an {status} answer")
                record = {"id": record_id, "status": status, "error": f"{field_name}: {message}"}
            if record_id in preds:
                # The first answer counts, unless it is a read error and this one is not: `mmllm label` writes a
                # repeated input id's row as a read error after the labelled one, and a row fixed and labelled
                # again (--resume-changed) after its old read error.
                if _read_error(preds[record_id]) and not _read_error(record):
                    warnings.append(f"{where} (id {record_id!r}): a second record for this id; it is kept over the "
                                    f"read error at line {first_line[record_id]}")
                    preds[record_id], first_line[record_id] = record, number
                else:
                    warnings.append(f"{where} (id {record_id!r}): a second prediction for this id (the first is at "
                                    f"line {first_line[record_id]}); the first is kept")
                continue
            preds[record_id], first_line[record_id] = record, number
    return preds


def _ranked(category: Any, schema: LabelSchema | None) -> Any:
    """A top-k category spelled as the answer's is (through the schema when given, else as written)."""
    canonical = schema.canonical_category(category) if schema is not None and isinstance(category, str) else None
    return canonical or _path(category)


def _read_error(record: dict[str, Any]) -> bool:
    return record.get("status") == "error" and record.get("stage") == "read"


def _prediction_problem(record: dict[str, Any]) -> tuple[str, str] | None:
    """The first field of a prediction record that metrics cannot use, as (field, message)."""
    status = record.get("status", "ok")
    if status not in ("ok", "invalid", "error"):
        return "status", f"expected 'ok', 'invalid' or 'error', got {_shown(status)}"
    category, attributes = record.get("category"), record.get("attributes")
    if status == "ok" and category is not None and not isinstance(category, str):
        return "category", f"expected a taxonomy path string, got {_shown(category)}"
    if status == "ok" and attributes is not None and not isinstance(attributes, Mapping):
        return "attributes", f"expected an object of name -> value, got {_shown(attributes)}"
    top_k = record.get("top_k", [])
    if not isinstance(top_k, list) or not all(isinstance(c.get("category") if isinstance(c, dict) else c, str) for c in top_k):
        return "top_k", f"expected a list of categories or {{'category': ...}} objects, got {_shown(top_k)}"
    confidence = record.get("confidence")
    if confidence is not None and (isinstance(confidence, bool) or not isinstance(confidence, (int, float))
                                   or not math.isfinite(confidence)):
        return "confidence", f"expected a number, got {_shown(confidence)}"
    return None


def schema_fit_warnings(rows: Rows, schema: LabelSchema, schema_path: Path, gold_source: Path) -> list[str]:
    """Warn when the schema fits none of the gold: every score would be 0 for a reason that is no model's fault."""
    out = []
    categories = {c for c in rows.gold_category if c is not None}
    if categories and not any(schema.canonical_category(c) for c in categories):
        out.append(f"{schema_path}: none of the {len(categories)} gold categories of {gold_source.name} is in its "
                   f"taxonomy (e.g. {sorted(categories)[0]!r}); category scores mean nothing, check --schema")
    names = {k for attrs in rows.gold_attributes for k in attrs or {}}
    if names and not names & set(schema.attribute_names):
        out.append(f"{schema_path}: none of the gold attribute names of {gold_source.name} ({', '.join(sorted(names)[:5])}) "
                   f"is in it ({', '.join(schema.attribute_names) or 'none'}); attribute scores mean nothing, check --schema")
    return out


def _source(evidence: Any, name: str) -> str:
    """The record's source for one value; ``unknown`` for records from before evidence, or garbled ones."""
    entry = evidence.get(name) if isinstance(evidence, Mapping) else None
    source = entry.get("source") if isinstance(entry, Mapping) else None
    return source if source in SOURCES else "unknown"


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _normalize(label: dict[str, Any], schema: LabelSchema | None, warnings: list[str] | None = None,
               where: str = "") -> dict[str, Any]:
    """Through the schema when given (same spelling as predictions), else as written. A field the schema
    refuses is compared as written, with a warning naming it: one bad field must not leave the row's other
    fields unnormalized (a gold category spelled in lower case would then miss every right answer)."""
    answer = {"category": _path(label.get("category")), "attributes": label.get("attributes") or {}}
    if schema is None:
        return answer
    result = schema.validate(answer, require_category=False)
    if result.ok:
        return result.value

    def alone(field_name: str, part: dict[str, Any]) -> dict[str, Any] | None:
        """One field through the schema, or None (named in a warning unless the schema just does not know it:
        its fit to the whole file is said once, by schema_fit_warnings)."""
        one = schema.validate(part, require_category=False)
        named = [e.message for e in one.errors if e.code not in ("not_in_taxonomy", "unknown_key")]
        if named and warnings is not None:
            warnings.append(f"{where}: {field_name}: {'; '.join(named)}; compared as written")
        return one.value if one.ok else None

    category = alone("category", {"category": answer["category"], "attributes": {}})
    out: dict[str, Any] = {"category": category["category"] if category else answer["category"], "attributes": {}}
    for name, value in answer["attributes"].items():
        read = alone(f"attributes.{name}", {"category": None, "attributes": {name: value}})
        out["attributes"][name] = read["attributes"].get(name) if read else value
    return out


# ---------------------------------------------------------------------- metrics
def category_metrics(gold: Sequence[str | None], pred: Sequence[str | None]) -> dict[str, Any]:
    pairs = [(g, p) for g, p in zip(gold, pred) if g is not None]
    correct = [g == p for g, p in pairs]
    classes = sorted({g for g, _ in pairs} | {p for _, p in pairs if p is not None})
    tps = Counter(g for g, p in pairs if g == p)
    fps = Counter(p for g, p in pairs if p is not None and g != p)
    fns = Counter(g for g, p in pairs if g != p)
    per_class = {}
    for c in classes:  # counted once above: the bootstrap calls this a thousand times
        tp, fp, fn = tps[c], fps[c], fns[c]
        per_class[c] = {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "f1": _f1(tp, fp, fn),
                        "support": tp + fn}
    support = sum(v["support"] for v in per_class.values())
    levels = max((len(g.split(SEPARATOR)) for g, _ in pairs), default=0)  # 0 when no gold row has a category
    per_level = {}
    for level in range(1, levels + 1):
        at = [(g, p) for g, p in pairs if len(g.split(SEPARATOR)) >= level]
        per_level[level] = _ratio(sum(_prefix(g, level) == _prefix(p, level) for g, p in at if p), len(at))
    return {
        "accuracy": _ratio(sum(correct), len(pairs)),
        "macro_f1": float(np.mean([v["f1"] for v in per_class.values()])) if per_class else 0.0,
        "weighted_f1": sum(v["f1"] * v["support"] for v in per_class.values()) / support if support else 0.0,
        "per_level_accuracy": per_level,
        "hierarchical": hierarchical_prf(gold, pred),
        "per_class": per_class,
    }


def hierarchical_prf(gold: Sequence[str | None], pred: Sequence[str | None]) -> dict[str, float]:
    """Precision / recall / F1 over ancestor sets: "A > B" vs "A > C" shares {"A"} (1 of 2). Micro-summed over
    rows, which is MLPerf's product-catalogue hierarchical F1 (longest common prefix / path lengths)."""
    shared = predicted = relevant = 0
    for g, p in zip(gold, pred):
        if g is None:
            continue
        g_set, p_set = _ancestors(g), _ancestors(p) if p else set()
        shared += len(g_set & p_set)
        predicted += len(p_set)
        relevant += len(g_set)
    precision, recall = _ratio(shared, predicted), _ratio(shared, relevant)
    return {"precision": precision, "recall": recall, "f1": _harmonic(precision, recall)}


def top_k_accuracy(gold: Sequence[str | None], ranked: Sequence[list[str]], k: int) -> float | None:
    rows = [(g, r) for g, r in zip(gold, ranked) if g is not None]
    if not any(r for _, r in rows):
        return None
    return _ratio(sum(g in r[:k] for g, r in rows), len(rows))


def attribute_metrics(gold: Sequence[dict], pred: Sequence[dict], names: Sequence[str], tolerance: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    total = Counter()
    for name in names:
        c = Counter()
        for g_attrs, p_attrs in zip(gold, pred):
            if g_attrs is None:
                continue  # attributes unknown: neither right nor wrong
            g, p = g_attrs.get(name), p_attrs.get(name)
            if g is not None and p is not None and values_match(p, g, tolerance):
                c["tp"] += 1
            else:
                c["fp"] += p is not None
                c["fn"] += g is not None
            c["gold"] += g is not None
            c["stated"] += g is not None and p is not None
            c["gold_absent"] += g is None
            c["invented"] += g is None and p is not None
        total.update(c)
        out[name] = {"precision": _ratio(c["tp"], c["tp"] + c["fp"]), "recall": _ratio(c["tp"], c["tp"] + c["fn"]),
                     "f1": _f1(c["tp"], c["fp"], c["fn"]), "coverage": _ratio(c["stated"], c["gold"]),
                     "invented": _ratio(c["invented"], c["gold_absent"]), "gold_values": c["gold"]}
    return {"per_attribute": out, "micro_f1": _f1(total["tp"], total["fp"], total["fn"]),
            "scored": total["tp"] + total["fp"] + total["fn"],  # 0: no gold value and no answer (the F1 means nothing)
            "micro_precision": _ratio(total["tp"], total["tp"] + total["fp"]),
            "micro_recall": _ratio(total["tp"], total["tp"] + total["fn"])}


def situation_metrics(rows: Rows, names: Sequence[str], tolerance: float) -> dict[str, Any]:
    """Per attribute and situation (extraction / completion / unknown), and their micro totals. A row is an
    extraction where the listing states the gold value; a listing that states only another value (its
    table says 2.5 years where the gold says 6) does not state the gold's: a completion."""
    counts = {name: {s: Counter() for s in SITUATIONS} for name in names}
    for g_attrs, p_attrs, stated in zip(rows.gold_attributes, rows.pred_attributes, rows.stated):
        if g_attrs is None:
            continue
        for name in names:
            g, p = g_attrs.get(name), p_attrs.get(name)
            says = g is not None and any(values_match(v, g, tolerance) for v in stated.get(name, ()))
            c = counts[name]["unknown" if g is None else "extraction" if says else "completion"]
            c["rows"] += 1
            c["answered"] += p is not None
            c["correct"] += g is not None and p is not None and values_match(p, g, tolerance)
            c["abstained"] += g is None and p is None
    total = {s: sum((counts[name][s] for name in names), Counter()) for s in SITUATIONS}
    return {"per_attribute": {name: {s: _situation_scores(s, c) for s, c in by.items()} for name, by in counts.items()},
            "total": {s: _situation_scores(s, c) for s, c in total.items()}}


def _situation_scores(situation: str, c: Counter) -> dict[str, Any]:
    """Rates are None where nothing divides them: no rows, no answers, no gold values (``unknown``)."""
    precision = _share(c["correct"], c["answered"])
    recall = _share(c["correct"], 0 if situation == "unknown" else c["rows"])
    out = {"rows": c["rows"], "answered": c["answered"], "correct": c["correct"],
           "accuracy": _share(c["correct"] + c["abstained"], c["rows"]), "precision": precision, "recall": recall,
           "f1": None if precision is None or recall is None else _harmonic(precision, recall)}
    if situation == "unknown":
        out["invented"] = _share(c["answered"], c["rows"])
    return out


def source_metrics(rows: Rows, names: Sequence[str], tolerance: float) -> dict[str, Any]:
    """Every non-null predicted value by its evidence source: correct, wrong, or invented (gold null)."""
    counts: dict[str, dict[str, Counter]] = {name: {} for name in names}
    sources = rows.sources or [{}] * len(rows.ids)  # Rows built by hand carry none: all unknown
    for g_attrs, p_attrs, where in zip(rows.gold_attributes, rows.pred_attributes, sources):
        if g_attrs is None:
            continue
        for name in names:
            g, p = g_attrs.get(name), p_attrs.get(name)
            if p is None:
                continue
            c = counts[name].setdefault(where.get(name, "unknown"), Counter())
            c["answered"] += 1
            c["invented" if g is None else "correct" if values_match(p, g, tolerance) else "wrong"] += 1
    total = {s: sum((by.get(s, Counter()) for by in counts.values()), Counter()) for s in SOURCES}
    return {"per_attribute": {name: {s: _source_scores(by[s]) for s in SOURCES if s in by} for name, by in counts.items()},
            "total": {s: _source_scores(c) for s, c in total.items()}}


def _source_scores(c: Counter) -> dict[str, Any]:
    return {**{k: c[k] for k in ("answered", "correct", "wrong", "invented")},
            "precision": _share(c["correct"], c["answered"])}


def evaluate_rows(rows: Rows, attribute_names: Sequence[str], tolerance: float) -> dict[str, Any]:
    category = category_metrics(rows.gold_category, rows.pred_category)
    attributes = attribute_metrics(rows.gold_attributes, rows.pred_attributes, attribute_names, tolerance)
    status = Counter(rows.status)
    predicted = len(rows.status) - status["missing"]
    return {
        "rows": len(rows.ids),
        "category_accuracy": category["accuracy"], "category_macro_f1": category["macro_f1"],
        "category_weighted_f1": category["weighted_f1"], "hierarchical_f1": category["hierarchical"]["f1"],
        "attribute_micro_f1": attributes["micro_f1"],
        "attribute_values_scored": attributes["scored"],
        "json_valid_rate": _ratio(status["ok"], predicted),
        "error_rows": status["error"], "invalid_rows": status["invalid"], "missing_rows": status["missing"],
        "extra_predictions": rows.extra_predictions, "unlabelled_gold_rows": rows.unlabelled,
        "top_k_accuracy": {k: top_k_accuracy(rows.gold_category, rows.top_k, k) for k in (1, 3, 5)},
        "category": category, "attributes": attributes,
    }


COVERAGES = (0.5, 0.8, 1.0)


def selective_metrics(rows: Rows, targets: Sequence[float] = ()) -> dict[str, Any] | None:
    """The risk-coverage curve of the category over the labelled rows, the accuracy at
    :data:`COVERAGES` and an operating point per target accuracy; ``None`` when no prediction has a
    confidence."""
    if not scored(rows):
        return None
    curve = selective_curve(rows)
    points = {}
    for target in targets:
        point = operating_point(curve, target)
        points[f"{target:g}"] = None if point is None else {
            "threshold": point.threshold, "coverage": round(point.coverage, 4), "accuracy": round(point.accuracy, 4),
            "kept": point.kept, "ci": [round(point.low, 4), round(point.high, 4)], "sentence": point.sentence()}
    return {"rows": curve.rows, "scored": sum(c is not None for c, g in zip(rows.confidence, rows.gold_category) if g is not None),
            "accuracy_at_coverage": {f"{c:.0%}": round(curve.accuracy_at(c), 4) for c in COVERAGES},
            "area_under_curve": round(curve.area(), 4), "targets": points}


def scored(rows: Rows) -> bool:
    """Whether any labelled row's prediction carries a confidence (else there is no curve to draw)."""
    return any(c is not None for c, g in zip(rows.confidence, rows.gold_category) if g is not None)


def selective_curve(rows: Rows) -> Curve:
    keep = [i for i, g in enumerate(rows.gold_category) if g is not None]
    return risk_coverage([rows.confidence[i] for i in keep],
                         [rows.pred_category[i] == rows.gold_category[i] for i in keep])


def bootstrap(rows: Rows, attribute_names: Sequence[str], tolerance: float, *, samples: int = 1000, seed: int = 0,
              other: Rows | None = None) -> dict[str, Any]:
    """Seeded percentile bootstrap over rows for the headline metrics (paired when ``other`` is given).

    Where the predictions (both files, when paired) carry a confidence, the accuracy at each of
    :data:`COVERAGES` too, under ``"accuracy_at_coverage"``: each resample draws its own curve, so the
    interval holds the rows' noise and where the share's boundary falls among them."""
    rng = np.random.default_rng(seed)
    n = len(rows.ids)
    draws: dict[str, list[float]] = {k: [] for k in HEADLINE}
    given = [r for r in (rows, other) if r is not None]
    at_coverage: dict[str, list[float]] = {f"{c:.0%}": [] for c in COVERAGES} if all(map(scored, given)) else {}
    for _ in range(samples):
        idx = rng.integers(0, n, n)
        subsets = [_subset(r, idx) for r in given]
        a, *b = [evaluate_rows(subset, attribute_names, tolerance) for subset in subsets]
        for key in HEADLINE:
            draws[key].append(a[key] - (b[0][key] if b else 0.0))
        if at_coverage:
            curves = [selective_curve(subset) for subset in subsets]
            for c in COVERAGES:
                values = [curve.accuracy_at(c) for curve in curves]
                if None not in values:  # a resample without gold categories has no curve
                    at_coverage[f"{c:.0%}"].append(values[0] - (values[1] if len(values) > 1 else 0.0))
    intervals: dict[str, Any] = {key: _percentiles(v) for key, v in draws.items()}
    if at_coverage:
        intervals["accuracy_at_coverage"] = {key: _percentiles(v) for key, v in at_coverage.items() if v}
    return intervals


def _percentiles(values: Sequence[float]) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def _subset(rows: Rows, idx: np.ndarray) -> Rows:
    pick = idx.tolist()
    return Rows(*[[getattr(rows, name)[i] for i in pick] for name in
                  ("ids", "titles", "gold_category", "pred_category", "gold_attributes", "pred_attributes",
                   "status", "top_k", "confidence")], extra_predictions=rows.extra_predictions)


# ---------------------------------------------------------------------- report
def write_report(out: Path, metrics: dict[str, Any], intervals: dict[str, Any], rows: Rows,
                 model_dir: Path | None, comparison: dict[str, Any] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plots = [plot_confusion(rows, out / "confusion_matrix.png"), plot_per_class_f1(metrics, out / "per_class_f1.png")]
    situations, sources = metrics.get("attribute_situations"), metrics.get("attribute_sources")
    if situations:  # shown in its own section
        plot_situations(situations, out / "attribute_situations.png")
    if any(c is not None for c in rows.confidence):
        plots.append(plot_calibration(rows, out / "calibration.png"))
    selective = metrics.get("selective")
    if selective:  # shown in its own section
        plot_risk_coverage(selective_curve(rows), selective, out / "risk_coverage.png")
    if model_dir is not None and (Path(model_dir) / "training_curves.png").exists():
        shutil.copyfile(Path(model_dir) / "training_curves.png", out / "training_curves.png")
        plots.append("training_curves.png")
    lines = ["# Evaluation report", "", f"{metrics['rows']} labelled rows; {metrics['missing_rows']} missing from the "
             f"predictions, {metrics['error_rows']} error rows, {metrics['invalid_rows']} invalid answers, "
             f"{metrics['extra_predictions']} predictions for ids not in the gold file"
             + (f"; {metrics['unlabelled_gold_rows']} gold rows without a label, not scored." if
                metrics.get("unlabelled_gold_rows") else "."), "",
             "| metric | value | 95% CI |", "|---|---|---|"]
    for key in HEADLINE:
        lo, hi = intervals[key]
        lines.append(f"| {key} | {metrics[key]:.4f} | [{lo:.4f}, {hi:.4f}] |" if not _unscored(metrics, key)
                     else f"| {key} | n/a | no gold attribute value and no answer to score |")
    lines.append(f"| category_weighted_f1 | {metrics['category_weighted_f1']:.4f} | |")
    for k, v in metrics["top_k_accuracy"].items():
        if v is not None:
            lines.append(f"| top-{k} accuracy | {v:.4f} | |")
    if comparison:
        lines += ["", f"## Comparison with `{comparison['other']}`", "", "| metric | this | other | difference | 95% CI of difference | verdict |",
                  "|---|---|---|---|---|---|"]
        for key in HEADLINE:
            lo, hi = comparison["intervals"][key]
            diff = metrics[key] - comparison["metrics"][key]
            verdict = "this is better" if lo > 0 else "other is better" if hi < 0 else "no clear difference"
            lines.append(f"| {key} | {metrics[key]:.4f} | {comparison['metrics'][key]:.4f} | {diff:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {verdict} |")
        theirs = comparison.get("accuracy_at_coverage") or {}
        for c, (lo, hi) in (comparison["intervals"].get("accuracy_at_coverage", {}) if theirs else {}).items():
            mine, other = metrics["selective"]["accuracy_at_coverage"][c], theirs[c]
            verdict = "this is better" if lo > 0 else "other is better" if hi < 0 else "no clear difference"
            lines.append(f"| accuracy at {c} coverage | {mine:.4f} | {other:.4f} | {mine - other:+.4f} | "
                         f"[{lo:+.4f}, {hi:+.4f}] | {verdict} |")
    levels = metrics["category"]["per_level_accuracy"]
    lines += ["", "## Category accuracy per taxonomy level", "", "| level | accuracy |", "|---|---|",
              *(f"| {level} | {acc:.4f} |" for level, acc in levels.items())]
    if selective:
        lines += ["", "## Selective prediction", "", f"Rows sorted by the confidence of their category; keeping only the "
                  f"most confident share (coverage) keeps this accuracy. {selective['scored']} of {selective['rows']} "
                  "labelled rows carry a confidence (the others are kept last).", "",
                  "| coverage | accuracy | 95% CI |", "|---|---|---|",
                  *(f"| {c} | {a:.4f} | {_interval(intervals.get('accuracy_at_coverage', {}).get(c))} |"
                    for c, a in selective["accuracy_at_coverage"].items()),
                  f"| area under the curve | {selective['area_under_curve']:.4f} | |"]
        for target, point in selective["targets"].items():
            lines += ["", f"Target accuracy {target}: " + (point["sentence"] if point else "no share of the rows reaches it.")]
        lines += ["", "![risk_coverage](risk_coverage.png)"]
    lines += ["", "## Attributes", "", "| attribute | precision | recall | F1 | coverage | invented | gold values |",
              "|---|---|---|---|---|---|---|"]
    for name, m in metrics["attributes"]["per_attribute"].items():
        lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['coverage']:.3f} | "
                     f"{m['invented']:.3f} | {m['gold_values']} |")
    lines += ["", "## Attributes: stated, completed, unknown", ""]
    if situations:
        lines += ["Extraction: the listing states the gold value (title, description or seller table); completion: "
                  "the gold knows it but the listing does not say it; unknown: the gold is null, so abstaining is "
                  "right and an answer is invented. – where nothing divides a rate.", "",
                  "| attribute | situation | rows | answered | correct | accuracy | precision | recall | F1 | invented |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, by in [*situations["per_attribute"].items(), ("**all**", situations["total"])]:
            lines += [f"| {name} | {s} | {m['rows']} | {m['answered']} | {m['correct']} | {_cell(m['accuracy'])} | "
                      f"{_cell(m['precision'])} | {_cell(m['recall'])} | {_cell(m['f1'])} | {_cell(m.get('invented'))} |"
                      for s, m in by.items() if m["rows"]]
        lines += ["", "![attribute_situations](attribute_situations.png)"]
    else:
        lines.append("Skipped: needs a schema (`--schema`, or the `--model` folder's) whose attributes declare "
                     "`evidence:`, to tell values the listing states from values it does not.")
    if sources:
        lines += ["", "## Attributes by evidence source", "", "Every predicted value by the source its record gives "
                  "(`unknown`: the record carries no evidence).", "",
                  "| source | answered | correct | wrong | invented | precision |", "|---|---|---|---|---|---|",
                  *(f"| {s} | {m['answered']} | {m['correct']} | {m['wrong']} | {m['invented']} | {_cell(m['precision'])} |"
                    for s, m in sources["total"].items())]
    if rows.warnings:
        lines += ["", "## Input problems", "", f"{len(rows.warnings)} warning(s) about the inputs; bad lines were left "
                  "out or counted as invalid answers:", "", *(f"- {w}" for w in rows.warnings[:200])]
        if len(rows.warnings) > 200:
            lines.append(f"- ... and {len(rows.warnings) - 200} more")
    lines += ["", "## Plots", "", *(f"![{Path(p).stem}]({Path(p).name})" for p in plots)]
    lines += ["", "## The 20 worst errors", "", "| id | title | gold | predicted | status |", "|---|---|---|---|---|"]
    for i in worst_errors(rows, 20):
        title = rows.titles[i].replace("|", "/")[:70]
        lines.append(f"| {rows.ids[i]} | {title} | {rows.gold_category[i]} | {rows.pred_category[i]} | {rows.status[i]} |")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "intervals": intervals,
                                                  "comparison": comparison}, indent=2, default=str))


def worst_errors(rows: Rows, n: int) -> list[int]:
    """Wrong categories, the most confident first, then those sharing the least of the path."""
    wrong = [i for i, (g, p) in enumerate(zip(rows.gold_category, rows.pred_category)) if g is not None and g != p]

    def badness(i: int) -> tuple[float, float]:
        shared = len(_ancestors(rows.gold_category[i]) & (_ancestors(rows.pred_category[i]) if rows.pred_category[i] else set()))
        return (-(rows.confidence[i] or 0.0), shared)

    return sorted(wrong, key=badness)[:n]


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(figsize=(width, height), dpi=100)


def plot_confusion(rows: Rows, path: Path, top: int = 15) -> str:
    gold = [g for g in rows.gold_category if g is not None]
    labels = [c for c, _ in Counter(gold).most_common(top)]
    index = {c: i for i, c in enumerate(labels)}
    other = len(labels)
    matrix = np.zeros((len(labels), len(labels) + 1))
    for g, p in zip(rows.gold_category, rows.pred_category):
        if g in index:
            matrix[index[g], index.get(p, other)] += 1
    matrix = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    plt, (fig, ax) = _figure(12, 10)
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels) + 1), [_short(c) for c in labels] + ["(other / none)"], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), [_short(c) for c in labels], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"Confusion matrix, {len(labels)} most frequent gold categories (row-normalized)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def plot_per_class_f1(metrics: dict[str, Any], path: Path, top: int = 30) -> str:
    per_class = metrics["category"]["per_class"]
    classes = sorted(per_class, key=lambda c: -per_class[c]["support"])[:top][::-1]
    plt, (fig, ax) = _figure(10, 9)
    ax.barh(range(len(classes)), [per_class[c]["f1"] for c in classes], color="#4c72b0")
    ax.set_yticks(range(len(classes)), [f"{_short(c)} (n={per_class[c]['support']})" for c in classes], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    ax.set_title(f"Per-class F1, {len(classes)} largest categories")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def plot_calibration(rows: Rows, path: Path, bins: int = 10) -> str:
    pairs = [(c, g == p) for c, g, p in zip(rows.confidence, rows.gold_category, rows.pred_category)
             if c is not None and g is not None]
    conf = np.array([c for c, _ in pairs])
    hit = np.array([h for _, h in pairs], dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
    centers, accuracy, counts = [], [], []
    for b in range(bins):
        mask = which == b
        if mask.any():
            centers.append(conf[mask].mean())
            accuracy.append(hit[mask].mean())
            counts.append(int(mask.sum()))
    ece = sum(n * abs(a - c) for n, a, c in zip(counts, accuracy, centers)) / max(len(conf), 1)
    plt, (fig, ax) = _figure(6, 6)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(centers, accuracy, "o-", label=f"model (ECE {ece:.3f})")
    ax.set_xlabel("confidence of the predicted category")
    ax.set_ylabel("accuracy")
    ax.legend()
    ax.set_title("Reliability diagram")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def plot_risk_coverage(curve: Curve, selective: dict[str, Any], path: Path) -> str:
    plt, (fig, ax) = _figure(6, 4.5)
    ax.step([0.0, *curve.coverage], [curve.accuracy[0], *curve.accuracy], where="pre", label="kept rows")
    ax.axhline(curve.accuracy[-1], linestyle="--", color="grey", label=f"all rows ({curve.accuracy[-1]:.3f})")
    for target, point in selective["targets"].items():
        if point:
            ax.plot([point["coverage"]], [point["accuracy"]], "o", label=f"target {target}: t = {point['threshold']:.6g}, "
                                                                          f"{point['coverage']:.0%} kept")
    ax.set_xlabel("coverage (share of rows kept, most confident first)")
    ax.set_ylabel("accuracy of the kept rows")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    ax.set_title("Risk-coverage: category")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def plot_situations(situations: dict[str, Any], path: Path) -> str:
    names = list(situations["per_attribute"])
    x = np.arange(len(names))
    bars = [("extraction", "precision", "#4c72b0"), ("extraction", "recall", "#a1b9dc"),
            ("completion", "precision", "#dd8452"), ("completion", "recall", "#f2c4a3")]
    plt, (fig, ax) = _figure(max(6.0, 1.3 * len(names) + 2), 5)
    for i, (situation, metric, color) in enumerate(bars):
        values = [situations["per_attribute"][n][situation][metric] for n in names]
        ax.bar(x + (i - 1.5) * 0.2, [np.nan if v is None else v for v in values], 0.2, color=color,
               label=f"{situation} {metric}")
    counts = [f"{n}\n({situations['per_attribute'][n]['extraction']['rows']} / "
              f"{situations['per_attribute'][n]['completion']['rows']} rows)" for n in names]
    ax.set_xticks(x, counts, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("Attributes stated in the listing (extraction) vs not stated (completion)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _interval(bounds: Sequence[float] | None) -> str:
    return "" if bounds is None else f"[{bounds[0]:.4f}, {bounds[1]:.4f}]"


def _short(category: str, width: int = 45) -> str:
    return category if len(category) <= width else "..." + category[-(width - 3):]


def _path(category: Any) -> Any:
    """A category path as written, its spacing evened out as the schema evens it (:func:`mmllm.schema.clean_path`;
    the per-level and hierarchical scores split it so too): "Hobbies>Trains" is "Hobbies > Trains"."""
    return clean_path(category) if isinstance(category, str) else category


def _ancestors(path: str) -> set[str]:
    parts = [p.strip() for p in path.split(">")]
    return {SEPARATOR.join(parts[: i + 1]) for i in range(len(parts))}


def _prefix(path: str | None, level: int) -> str | None:
    if path is None:
        return None
    return SEPARATOR.join(p.strip() for p in path.split(">")[:level])


def _unscored(metrics: dict[str, Any], key: str) -> bool:
    """A headline number over nothing: the attribute F1 of rows with no gold attribute value and no answer
    (a schema without attributes, category-only labels) is 0/0, not a model's zero."""
    return key == "attribute_micro_f1" and metrics.get("attribute_values_scored") == 0


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _share(a: float, b: float) -> float | None:
    return a / b if b else None


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _harmonic(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def _f1(tp: int, fp: int, fn: int) -> float:
    return _harmonic(_ratio(tp, tp + fp), _ratio(tp, tp + fn))


# ---------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmllm.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--pred", type=Path, required=True, help="predictions JSONL (from mmllm label)")
    p.add_argument("--gold", type=Path, required=True, help="labelled catalog (any catalog format)")
    p.add_argument("--report", type=Path, required=True, help="folder for report.md, metrics.json and plots")
    p.add_argument("--schema", type=Path, help="label schema (default: the model folder's, else values as written)")
    p.add_argument("--model", type=Path, help="model folder: its schema and training curves go into the report")
    p.add_argument("--compare", type=Path, help="a second predictions file on the same gold: paired comparison")
    p.add_argument("--tolerance", type=float, default=0.0, help="numbers within this absolute difference match")
    p.add_argument("--bootstrap", type=at_least(1), default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-accuracy", type=float, action="append", default=[], metavar="A",
                   help="report the confidence threshold whose kept rows reach accuracy A (repeatable)")
    args = p.parse_args(argv)
    for target in args.target_accuracy:
        if not 0 < target <= 1:
            print(f"error: --target-accuracy {target}: must be in (0, 1]", file=sys.stderr)
            return 2
    try:  # before any work: the report never writes over an input, nor into the model folder
        check_folder([args.pred, args.gold, args.schema, args.model, args.compare], "--report", args.report, REPORT_FILES)
    except PathClash as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_schema = args.model / "label_schema.yaml" if args.model else None
    schema_path = args.schema or (model_schema if model_schema and model_schema.exists() else None)
    try:  # SchemaError and CatalogError are ValueErrors: one line each, like a missing file
        schema = LabelSchema.from_yaml(schema_path) if schema_path else None
        rows = align(args.pred, args.gold, schema)
        other = align(args.compare, args.gold, schema) if args.compare else None
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if schema is not None:
        rows.warnings.extend(schema_fit_warnings(rows, schema, schema_path, args.gold))
    _print_warnings(list(dict.fromkeys(rows.warnings + (other.warnings if other else []))))  # gold's once
    names = list(schema.attribute_names) if schema else sorted({k for a in rows.gold_attributes for k in a or {}})
    metrics = evaluate_rows(rows, names, args.tolerance)
    metrics["attribute_situations"] = situation_metrics(rows, names, args.tolerance) if declares_evidence(schema) else None
    metrics["attribute_sources"] = source_metrics(rows, names, args.tolerance)
    metrics["selective"] = selective_metrics(rows, args.target_accuracy)
    intervals = bootstrap(rows, names, args.tolerance, samples=args.bootstrap, seed=args.seed)
    comparison = None
    if other is not None:
        theirs = selective_metrics(other)
        comparison = {"other": str(args.compare), "metrics": {k: v for k, v in evaluate_rows(other, names, args.tolerance).items() if k in HEADLINE},
                      "accuracy_at_coverage": theirs["accuracy_at_coverage"] if theirs else None,
                      "intervals": bootstrap(rows, names, args.tolerance, samples=args.bootstrap, seed=args.seed, other=other)}
    write_report(args.report, metrics, intervals, rows, args.model, comparison)
    print(f"{'metric':<22} {'value':>8}  95% CI")
    for key in HEADLINE:
        lo, hi = intervals[key]
        print(f"{key:<22} {metrics[key]:>8.4f}  [{lo:.4f}, {hi:.4f}]" if not _unscored(metrics, key)
              else f"{key:<22} {'n/a':>8}  (no gold attribute value and no answer to score)")
    if metrics["attribute_situations"]:
        print(f"\n{'attributes':<12} {'rows':>6} {'answered':>8} {'precision':>9} {'recall':>7} {'F1':>6} {'invented':>8}")
        for s, m in metrics["attribute_situations"]["total"].items():
            print(f"{s:<12} {m['rows']:>6} {m['answered']:>8} {_cell(m['precision']):>9} {_cell(m['recall']):>7} "
                  f"{_cell(m['f1']):>6} {_cell(m.get('invented')):>8}")
    if metrics["selective"]:
        at, bounds = metrics["selective"]["accuracy_at_coverage"], intervals.get("accuracy_at_coverage", {})
        print("\ncategory accuracy at coverage " + ", ".join(f"{c}: {a:.4f} {_interval(bounds.get(c))}".rstrip()
                                                          for c, a in at.items()))
        for target, point in metrics["selective"]["targets"].items():
            print(f"target accuracy {target}: " + (point["sentence"] if point else "no share of the rows reaches it"))
    elif args.target_accuracy:
        print("\n--target-accuracy: the predictions carry no confidence; nothing to threshold", file=sys.stderr)
    print(f"rows {metrics['rows']}, missing {metrics['missing_rows']}, errors {metrics['error_rows']}, "
          f"invalid {metrics['invalid_rows']}; report: {args.report / 'report.md'}")
    return 0


def _print_warnings(warnings: list[str], limit: int = 20) -> None:
    for line in warnings[:limit]:
        print(f"warning: {line}", file=sys.stderr)
    if len(warnings) > limit:
        print(f"warning: ... and {len(warnings) - limit} more (listed in the report)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
