"""Evaluate predictions against gold labels: metrics with confidence intervals, and a report.

    python -m mmllm.evaluate --pred labels.jsonl --gold dev.jsonl --report reports/dev [--schema S.yaml]
        [--model MODEL_DIR] [--compare other_labels.jsonl] [--tolerance 0.5]

This module reads the two files and aligns them (:func:`align`); :mod:`mmllm.metrics` computes the
numbers and :mod:`mmllm.report` writes the report. Category: accuracy, macro-F1, weighted-F1,
accuracy per taxonomy level, hierarchical F1 (MLPerf's product-catalogue figure), top-k accuracy.
Attributes: per attribute precision, recall and F1 (numbers match within ``--tolerance``),
coverage and invention. JSON validity, error rows and rows missing from the predictions. Headline
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
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

from mmllm.catalog import CatalogReader, RowError, attributes_labelled
from mmllm.config import at_least
from mmllm.evidence import candidates
from mmllm.metrics import (HEADLINE, SOURCES, Rows, bootstrap, evaluate_rows, selective_metrics, situation_metrics,
                           source_metrics, unscored)
from mmllm.output_paths import PathClash, check_folder
from mmllm.progress import Progress
from mmllm.report import REPORT_FILES, cell, interval, write_report
from mmllm.schema import LabelSchema, clean_path


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


def _path(category: Any) -> Any:
    """A category path as written, its spacing evened out as the schema evens it (:func:`mmllm.schema.clean_path`;
    the per-level and hierarchical scores split it so too): "Hobbies>Trains" is "Hobbies > Trains"."""
    return clean_path(category) if isinstance(category, str) else category


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
    intervals = _bootstrap(rows, names, args)
    comparison = None
    if other is not None:
        theirs = selective_metrics(other)
        comparison = {"other": str(args.compare), "metrics": {k: v for k, v in evaluate_rows(other, names, args.tolerance).items() if k in HEADLINE},
                      "accuracy_at_coverage": theirs["accuracy_at_coverage"] if theirs else None,
                      "intervals": _bootstrap(rows, names, args, other)}
    write_report(args.report, metrics, intervals, rows, args.model, comparison)
    print(f"{'metric':<22} {'value':>8}  95% CI")
    for key in HEADLINE:
        lo, hi = intervals[key]
        print(f"{key:<22} {metrics[key]:>8.4f}  [{lo:.4f}, {hi:.4f}]" if not unscored(metrics, key)
              else f"{key:<22} {'n/a':>8}  (no gold attribute value and no answer to score)")
    if comparison:  # the verdict a user runs --compare for, not only in the report
        print(f"\nagainst {args.compare}: difference (this - other), 95% CI of the paired difference")
        for key in HEADLINE:
            lo, hi = comparison["intervals"][key]
            verdict = "this is better" if lo > 0 else "other is better" if hi < 0 else "no clear difference"
            print(f"{key:<22} {metrics[key] - comparison['metrics'][key]:>+8.4f}  [{lo:+.4f}, {hi:+.4f}]  {verdict}")
    if metrics["attribute_situations"]:
        print(f"\n{'attributes':<12} {'rows':>6} {'answered':>8} {'precision':>9} {'recall':>7} {'F1':>6} {'invented':>8}")
        for s, m in metrics["attribute_situations"]["total"].items():
            print(f"{s:<12} {m['rows']:>6} {m['answered']:>8} {cell(m['precision']):>9} {cell(m['recall']):>7} "
                  f"{cell(m['f1']):>6} {cell(m.get('invented')):>8}")
    if metrics["selective"]:
        at, bounds = metrics["selective"]["accuracy_at_coverage"], intervals.get("accuracy_at_coverage", {})
        print("\ncategory accuracy at coverage " + ", ".join(f"{c}: {a:.4f} {interval(bounds.get(c))}".rstrip()
                                                          for c, a in at.items()))
        for target, point in metrics["selective"]["targets"].items():
            print(f"target accuracy {target}: " + (point["sentence"] if point else "no share of the rows reaches it"))
    elif args.target_accuracy:
        print("\n--target-accuracy: the predictions carry no confidence; nothing to threshold", file=sys.stderr)
    print(f"rows {metrics['rows']}, missing {metrics['missing_rows']}, errors {metrics['error_rows']}, "
          f"invalid {metrics['invalid_rows']}; report: {args.report / 'report.md'}")
    return 0


SLOW_BOOTSTRAP = 50_000_000  # rows x resamples past which the intervals take half a minute: say so, show progress


def _bootstrap(rows: Rows, names: list[str], args: argparse.Namespace, other: Rows | None = None) -> dict[str, Any]:
    """The intervals, with a progress line (resamples/s, ETA) where they take a while: each resample is a
    few weighted sums over the rows (40,000 rows x 1,000 resamples: about 25 s on 2 cores)."""
    slow = len(rows.ids) * args.bootstrap >= SLOW_BOOTSTRAP
    if slow:
        print(f"bootstrap: {args.bootstrap:,} resamples of {len(rows.ids):,} rows (--bootstrap 200 for a quicker "
              "report, with wider intervals)", file=sys.stderr)
    with Progress("bootstrap", total_rows=args.bootstrap, unit="resamples", enabled=slow,
                  log_every_rows=max(1, args.bootstrap // 10)) as progress:
        return bootstrap(rows, names, args.tolerance, samples=args.bootstrap, seed=args.seed, other=other,
                         progress=progress.update)


def _print_warnings(warnings: list[str], limit: int = 20) -> None:
    for line in warnings[:limit]:
        print(f"warning: {line}", file=sys.stderr)
    if len(warnings) > limit:
        print(f"warning: ... and {len(warnings) - limit} more (listed in the report)", file=sys.stderr)


if __name__ == "__main__":
    from mmllm import interrupt

    interrupt.run(main)
