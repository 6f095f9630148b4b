"""The numbers ``mmllm evaluate`` reports, over gold and predictions aligned by id (:class:`Rows`).

Category: accuracy, macro-F1, weighted-F1, accuracy per taxonomy level, hierarchical F1 (credit
for the shared prefix of the ``" > "`` path: precision / recall over the path's ancestor sets,
Kiritchenko et al. 2006), top-k accuracy when predictions carry ranked ``top_k`` categories.
The hierarchical F1 is the one MLPerf Inference's product-catalogue task reports: per row the
longest common prefix of the two paths (= the shared ancestors), summed over rows, over the summed
predicted path lengths (precision) and gold path lengths (recall); an unparsable answer predicts
nothing and scores 0 (``tests/test_evaluate.py`` checks it by hand), so a figure sits beside theirs.
Attributes: per attribute precision, recall and F1 (numbers match within a tolerance), coverage
(the model states a value where the gold has one) and invention (it states one where the gold has
none); by situation (the listing states the gold value, the gold knows it but the listing does not
say it, the gold is null) and by the evidence source each record gives. Selective prediction: the
risk-coverage curve of the category (:mod:`mmllm.confidence`) and the accuracy at
:data:`COVERAGES`. :func:`bootstrap`: seeded percentile intervals for the headline numbers, paired
when two prediction files are compared.

Plain functions of plain lists, no model and no files: the benchmarks score their own runs with them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from mmllm.confidence import Curve, operating_point, risk_coverage
from mmllm.evidence import values_match
from mmllm.schema import SEPARATOR


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
        if g is not None:
            s, q, r = _path_overlap(g, p)
            shared, predicted, relevant = shared + s, predicted + q, relevant + r
    precision, recall = _ratio(shared, predicted), _ratio(shared, relevant)
    return {"precision": precision, "recall": recall, "f1": _harmonic(precision, recall)}


def _path_overlap(gold: str, pred: str | None) -> tuple[int, int, int]:
    """One row's ancestors shared by the two paths, on the predicted path, on the gold path."""
    g_set, p_set = _ancestors(gold), _ancestors(pred) if pred else set()
    return len(g_set & p_set), len(p_set), len(g_set)


def _value_outcome(gold: Any, pred: Any, tolerance: float) -> tuple[int, int, int]:
    """One attribute value's true positive, false positive, false negative (each 0 or 1)."""
    if gold is not None and pred is not None and values_match(pred, gold, tolerance):
        return 1, 0, 0
    return 0, int(pred is not None), int(gold is not None)


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
            tp, fp, fn = _value_outcome(g, p, tolerance)
            c["tp"], c["fp"], c["fn"] = c["tp"] + tp, c["fp"] + fp, c["fn"] + fn
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
              other: Rows | None = None, progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Seeded percentile bootstrap over rows for the headline metrics (paired when ``other`` is given).

    Where the predictions (both files, when paired) carry a confidence, the accuracy at each of
    :data:`COVERAGES` too, under ``"accuracy_at_coverage"``: each resample draws its own curve, so the
    interval holds the rows' noise and where the share's boundary falls among them. ``progress(1)`` after
    each resample.

    Each row's part in every headline number is counted once (:class:`_Tally`); a resample is then the
    number of times it draws each row and its metrics a few weighted sums: the same numbers as
    :func:`evaluate_rows` and :func:`selective_curve` on the resampled rows, to the last bit, at a
    thousandth of the cost (40,000 rows x 1,000 resamples: seconds, where re-scoring each resample
    took 15-23 minutes)."""
    rng = np.random.default_rng(seed)
    n = len(rows.ids)
    draws: dict[str, list[float]] = {k: [] for k in HEADLINE}
    given = [r for r in (rows, other) if r is not None]
    tallies = [_Tally.of(r, attribute_names, tolerance) for r in given]
    at_coverage: dict[str, list[float]] = {f"{c:.0%}": [] for c in COVERAGES} if all(map(scored, given)) else {}
    for _ in range(samples):
        counts = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        a, *b = [tally.headline(counts) for tally in tallies]
        for key in HEADLINE:
            draws[key].append(a[key] - (b[0][key] if b else 0.0))
        if at_coverage:
            accuracies = [tally.accuracy_at(counts) for tally in tallies]
            for c in COVERAGES:
                values = [acc[c] for acc in accuracies]
                if None not in values:  # a resample without gold categories has no curve
                    at_coverage[f"{c:.0%}"].append(values[0] - (values[1] if len(values) > 1 else 0.0))
        if progress is not None:
            progress(1)
    intervals: dict[str, Any] = {key: _percentiles(v) for key, v in draws.items()}
    if at_coverage:
        intervals["accuracy_at_coverage"] = {key: _percentiles(v) for key, v in at_coverage.items() if v}
    return intervals


@dataclass
class _Tally:
    """Each row's part in the headline numbers, as arrays: a resample's ``counts`` (how often it draws
    each row) turn them into the numbers :func:`evaluate_rows` gives for the resampled rows."""

    labelled: np.ndarray  # [n] the gold has a category
    right: np.ndarray  # [n] labelled and the answer is the gold category
    gold: np.ndarray  # [n] the gold category's index among the classes, -1 none
    pred: np.ndarray  # [n] the answer's, -1 none
    classes: int
    hierarchy: np.ndarray  # [n, 3] shared ancestors, predicted path length, gold path length
    attributes: np.ndarray  # [n, 3] attribute tp, fp, fn
    ok: np.ndarray  # [n] status ok
    answered: np.ndarray  # [n] status other than missing
    group: np.ndarray  # [n] the labelled row's confidence group (most confident first, no score last), -1 unlabelled
    groups: int

    @classmethod
    def of(cls, rows: Rows, attribute_names: Sequence[str], tolerance: float) -> "_Tally":
        n = len(rows.ids)
        labelled = np.array([g is not None for g in rows.gold_category], dtype=bool)
        names = sorted({g for g in rows.gold_category if g is not None}
                       | {p for g, p in zip(rows.gold_category, rows.pred_category) if g is not None and p is not None})
        index = {c: i for i, c in enumerate(names)}
        gold = np.array([index[g] if g is not None else -1 for g in rows.gold_category], dtype=np.int64)
        pred = np.array([index.get(p, -1) if p is not None else -1 for p in rows.pred_category], dtype=np.int64)
        right = np.array([g is not None and g == p for g, p in zip(rows.gold_category, rows.pred_category)], dtype=bool)
        hierarchy = np.zeros((n, 3), dtype=np.float64)
        for i, (g, p) in enumerate(zip(rows.gold_category, rows.pred_category)):
            if g is not None:
                hierarchy[i] = _path_overlap(g, p)  # as hierarchical_prf counts them
        attributes = np.zeros((n, 3), dtype=np.float64)
        for i, (g_attrs, p_attrs) in enumerate(zip(rows.gold_attributes, rows.pred_attributes)):
            if g_attrs is not None:
                for name in attribute_names:  # as attribute_metrics counts them
                    attributes[i] += _value_outcome(g_attrs.get(name), p_attrs.get(name), tolerance)
        # the curve's groups: a threshold cannot split tied confidences (risk_coverage), no score comes last
        scores = sorted({float(c) for c, lab in zip(rows.confidence, labelled) if lab and c is not None}, reverse=True)
        rank = {c: i for i, c in enumerate(scores)}
        group = np.array([-1 if not lab else len(scores) if c is None else rank[float(c)]
                          for c, lab in zip(rows.confidence, labelled)], dtype=np.int64)
        return cls(labelled, right, gold, pred, len(names), hierarchy, attributes,
                   np.array([s == "ok" for s in rows.status], dtype=bool),
                   np.array([s != "missing" for s in rows.status], dtype=bool), group, len(scores) + 1)

    def headline(self, counts: np.ndarray) -> dict[str, float]:
        """:data:`HEADLINE` of the rows drawn ``counts`` times each."""
        on = counts * self.labelled
        pairs = on.sum()
        wrong = on * ~self.right
        golden, answered = self.gold >= 0, self.pred >= 0
        tp = np.bincount(self.gold[golden], weights=(counts * self.right)[golden], minlength=self.classes).astype(np.float64)
        fp = np.bincount(self.pred[answered], weights=wrong[answered], minlength=self.classes).astype(np.float64)
        fn = np.bincount(self.gold[golden], weights=wrong[golden], minlength=self.classes).astype(np.float64)
        present = (tp + fp + fn) > 0  # the classes of the resampled rows' gold and answers
        precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
        recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
        shared, predicted, relevant = counts @ self.hierarchy
        h_precision, h_recall = _ratio(shared, predicted), _ratio(shared, relevant)
        a_tp, a_fp, a_fn = counts @ self.attributes
        return {"category_accuracy": _ratio(float(counts @ self.right), float(pairs)),
                "category_macro_f1": float(np.mean(f1[present])) if present.any() else 0.0,
                "hierarchical_f1": _harmonic(float(h_precision), float(h_recall)),
                "attribute_micro_f1": _f1(a_tp, a_fp, a_fn),
                "json_valid_rate": _ratio(float(counts @ self.ok), float(counts @ self.answered))}

    def accuracy_at(self, counts: np.ndarray) -> dict[float, float | None]:
        """The accuracy at each of :data:`COVERAGES` of the resampled rows' curve (:func:`selective_curve`)."""
        labelled = self.group >= 0
        kept = np.bincount(self.group[labelled], weights=counts[labelled], minlength=self.groups)
        hits = np.bincount(self.group[labelled], weights=(counts * self.right)[labelled], minlength=self.groups)
        drawn = kept > 0  # a group the resample never draws is no point of its curve
        rank, right = np.cumsum(kept)[drawn], np.cumsum(hits)[drawn]
        if not len(rank):
            return {c: None for c in COVERAGES}
        total = rank[-1]
        out: dict[float, float | None] = {}
        for c in COVERAGES:
            at = int(np.argmax(rank / total >= c - 1e-12))
            out[c] = float(right[at] / rank[at])
        return out


def _percentiles(values: Sequence[float]) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def worst_errors(rows: Rows, n: int) -> list[int]:
    """Wrong categories, the most confident first, then those sharing the least of the path."""
    wrong = [i for i, (g, p) in enumerate(zip(rows.gold_category, rows.pred_category)) if g is not None and g != p]

    def badness(i: int) -> tuple[float, float]:
        shared = len(_ancestors(rows.gold_category[i]) & (_ancestors(rows.pred_category[i]) if rows.pred_category[i] else set()))
        return (-(rows.confidence[i] or 0.0), shared)

    return sorted(wrong, key=badness)[:n]


def unscored(metrics: dict[str, Any], key: str) -> bool:
    """A headline number over nothing: the attribute F1 of rows with no gold attribute value and no answer
    (a schema without attributes, category-only labels) is 0/0, not a model's zero."""
    return key == "attribute_micro_f1" and metrics.get("attribute_values_scored") == 0


def _ancestors(path: str) -> set[str]:
    parts = [p.strip() for p in path.split(">")]
    return {SEPARATOR.join(parts[: i + 1]) for i in range(len(parts))}


def _prefix(path: str | None, level: int) -> str | None:
    if path is None:
        return None
    return SEPARATOR.join(p.strip() for p in path.split(">")[:level])


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _share(a: float, b: float) -> float | None:
    return a / b if b else None


def _harmonic(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def _f1(tp: int, fp: int, fn: int) -> float:
    return _harmonic(_ratio(tp, tp + fp), _ratio(tp, tp + fn))
