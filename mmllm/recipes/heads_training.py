"""Training softmax / sigmoid heads, shared by the classify and fusion recipes: cross-entropy in
the shared loop, dev metrics during training, then temperature scaling of the category head on
the dev rows (Guo et al. 2017). The recipes differ only in the model and collators they pass in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mmllm.catalog import Listing
from mmllm.config import help_field
from mmllm.models import heads
from mmllm.recipes.common import Setup, record_final, run_summary
from mmllm.training import TrainConfig, train_loop


@dataclass
class HeadsEvalConfig:
    """Evaluation on the dev rows during and after training (no generation: the heads answer)."""

    every: int = help_field(0, "optimizer steps between evaluations; 0 = only at the end")
    loss_rows: int = help_field(64, "dev rows for the dev loss, accuracies and ECE (temperature: all dev rows)")

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0, got {self.every}")
        if self.loss_rows < 1:  # 0 crashed after the whole training; no dev rows at all is data.dev=null
            raise ValueError(f"eval.loss_rows must be >= 1, got {self.loss_rows} (for no dev rows, set data.dev=null)")


def train_heads(run: Setup, model: Any, specs: list[heads.HeadSpec], collate: Any, dev_collate: Any,
                count_rows: Callable[[dict[str, torch.Tensor]], int], train: TrainConfig, evaluation: HeadsEvalConfig,
                settings: heads.HeadsConfig) -> tuple[dict[str, Any], Any]:
    """Train ``model`` (heads over any encoder) on the run's rows; returns the summary and the
    unwrapped model, in eval mode, with its fitted ``temperature`` when there are dev rows."""
    accelerator, untrained = run.accelerator, set(run.untrained)
    loss_fn = heads_loss(run, run.train_rows, specs, count_rows, settings)

    def evaluate(m: Any, step: int) -> dict[str, Any]:
        accelerator.wait_for_everyone()
        metrics: dict[str, Any] = {}
        if accelerator.is_main_process:
            m.eval()
            metrics = dev_metrics(m, dev_collate, run.dev_rows[: evaluation.loss_rows], specs, accelerator.device,
                                  untrained)
            m.train()
        accelerator.wait_for_everyone()
        return metrics

    result = train_loop(dataclasses.replace(train, resume=run.resume), accelerator, model, run.train_rows, collate,
                        loss_fn, run.out_dir,
                        evaluate=evaluate if run.dev_rows else None, eval_every=evaluation.every, count_items=count_rows)
    summary = run_summary(result, accelerator)
    unwrapped = accelerator.unwrap_model(model)
    if result.interrupted:
        return summary, unwrapped
    if run.dev_rows:
        final = evaluate(unwrapped, result.steps)
        if accelerator.is_main_process:
            unwrapped.eval()
            outputs, target = _category_logits(unwrapped, dev_collate, run.dev_rows, accelerator.device)
            logits = outputs["category"]
            unwrapped.temperature = heads.fit_temperature(logits, target)
            final["temperature"] = round(unwrapped.temperature, 4)
            final["ece_calibrated"] = round(heads.expected_calibration_error(
                torch.softmax(logits / unwrapped.temperature, -1), target), 4)
            if "category_check" in outputs:  # a fusion model with reference rows: its answers' confidence
                check, answers = outputs["category_check"], logits.argmax(-1)
                unwrapped.check_temperature = heads.fit_answer_temperature(check, answers, target)
                final["check_temperature"] = round(unwrapped.check_temperature, 4)
                confidence = torch.softmax(check / unwrapped.check_temperature, -1).gather(1, answers[:, None])[:, 0]
                final["check_ece"] = round(heads.answer_calibration_error(confidence, answers == target), 4)
        record_final(accelerator, run.out_dir, summary, final)
    unwrapped.eval()
    return summary, unwrapped


def heads_loss(run: Setup, rows: list[Listing], specs: list[heads.HeadSpec],
               count_rows: Callable[[dict[str, torch.Tensor]], int], settings: heads.HeadsConfig) -> Any:
    """The loss of ``train_loop``: the heads' cross-entropy (class weights from ``rows``), summed over rows."""
    weights = None
    if settings.class_weights == "balanced":
        weights = heads.balanced_weights(specs, heads.encode_targets(specs, [r.label for r in rows], run.schema))

    def loss_fn(m: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        loss = heads.classification_loss(m(**batch), batch, specs, settings.label_smoothing, weights)
        return loss, torch.tensor(count_rows(batch))

    return loss_fn


def fit_heads(run: Setup, model: Any, rows: list[Listing], specs: list[heads.HeadSpec], collate: Any,
              count_rows: Callable[[dict[str, torch.Tensor]], int], train: TrainConfig, settings: heads.HeadsConfig,
              out_dir: Path) -> Any:
    """A side fit: ``model`` trained on ``rows`` alone with the run's settings, no evaluation, no
    checkpoint, its metrics in ``out_dir`` (the vote's held-out fit); the unwrapped model in eval mode.
    Stopped by the user (Ctrl-C), it raises KeyboardInterrupt: a side fit has nothing to resume."""
    out_dir.mkdir(parents=True, exist_ok=True)
    side = dataclasses.replace(train, resume=False, save_every=0)
    result = train_loop(side, run.accelerator, model, rows, collate, heads_loss(run, rows, specs, count_rows, settings),
                        out_dir, count_items=count_rows, final_checkpoint=False)
    if result.interrupted:
        raise KeyboardInterrupt("stopped during a side fit of the heads")
    unwrapped = run.accelerator.unwrap_model(model)
    unwrapped.eval()
    return unwrapped


def dev_metrics(model: Any, collate: Any, rows: list[Listing], specs: list[heads.HeadSpec], device: Any,
                untrained: set[str] = frozenset()) -> dict[str, float]:
    """Dev loss per row, category accuracy, mean attribute accuracy and ECE before calibration.

    An attribute no training row stated is answered null, so its known dev values count as misses."""
    total, hits, attr_hits, attr_total = 0.0, 0, 0, 0
    logits_all, target_all = [], []
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            batch = collate([(r, 0) for r in rows[start:start + 8]])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch)
            total += float(heads.classification_loss(logits, batch, specs))
            hits += int((logits["category"].argmax(-1) == batch["target_category"]).sum())
            logits_all.append(logits["category"].float().cpu())
            target_all.append(batch["target_category"].cpu())
            for spec in specs[1:]:
                if spec.kind == "softmax" and spec.name in logits:
                    t = batch[f"target_{spec.name}"]
                    known = t >= 0
                    if spec.name not in untrained:
                        attr_hits += int((logits[spec.name].argmax(-1)[known] == t[known]).sum())
                    attr_total += int(known.sum())
    logits, target = torch.cat(logits_all), torch.cat(target_all)
    return {"eval_loss": round(total / max(len(rows), 1), 5), "category_acc": round(hits / max(len(rows), 1), 4),
            "attribute_acc": round(attr_hits / max(attr_total, 1), 4),
            "ece": round(heads.expected_calibration_error(torch.softmax(logits, -1), target), 4)}


def _category_logits(model: Any, collate: Any, rows: list[Listing], device: Any
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The dev rows' ``category`` logits [N, C] (and ``category_check``'s, when the model gives them), and targets."""
    logits: dict[str, list[torch.Tensor]] = {}
    targets = []
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            batch = collate([(r, 0) for r in rows[start:start + 8]])
            out = model(**{k: v.to(device) for k, v in batch.items()})
            for name in ("category", "category_check"):
                if name in out:
                    logits.setdefault(name, []).append(out[name].float().cpu())  # [B, C]
            targets.append(batch["target_category"])
    return {name: torch.cat(parts) for name, parts in logits.items()}, torch.cat(targets)
