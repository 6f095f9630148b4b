"""The report folder ``mmllm evaluate --report`` writes: ``report.md``, ``metrics.json`` and PNG plots
(the confusion matrix of the most frequent categories, per-class F1, the attribute situations, a
reliability diagram and the risk-coverage curve when predictions carry probabilities, and the
training curves when a model folder is given). Reads the metrics :mod:`mmllm.metrics` computed;
computes none of its own but the plots' binning."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmllm.confidence import Curve
from mmllm.metrics import HEADLINE, Rows, selective_curve, unscored, worst_errors


REPORT_FILES = ("report.md", "metrics.json", "confusion_matrix.png", "per_class_f1.png", "attribute_situations.png",
                "calibration.png", "risk_coverage.png", "training_curves.png")  # what --report's folder gets


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
        lines.append(f"| {key} | {metrics[key]:.4f} | [{lo:.4f}, {hi:.4f}] |" if not unscored(metrics, key)
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
                  *(f"| {c} | {a:.4f} | {interval(intervals.get('accuracy_at_coverage', {}).get(c))} |"
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
            lines += [f"| {name} | {s} | {m['rows']} | {m['answered']} | {m['correct']} | {cell(m['accuracy'])} | "
                      f"{cell(m['precision'])} | {cell(m['recall'])} | {cell(m['f1'])} | {cell(m.get('invented'))} |"
                      for s, m in by.items() if m["rows"]]
        lines += ["", "![attribute_situations](attribute_situations.png)"]
    else:
        lines.append("Skipped: needs a schema (`--schema`, or the `--model` folder's) whose attributes declare "
                     "`evidence:`, to tell values the listing states from values it does not.")
    if sources:
        lines += ["", "## Attributes by evidence source", "", "Every predicted value by the source its record gives "
                  "(`unknown`: the record carries no evidence).", "",
                  "| source | answered | correct | wrong | invented | precision |", "|---|---|---|---|---|---|",
                  *(f"| {s} | {m['answered']} | {m['correct']} | {m['wrong']} | {m['invented']} | {cell(m['precision'])} |"
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


def interval(bounds: Sequence[float] | None) -> str:
    return "" if bounds is None else f"[{bounds[0]:.4f}, {bounds[1]:.4f}]"


def _short(category: str, width: int = 45) -> str:
    return category if len(category) <= width else "..." + category[-(width - 3):]


def cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
