"""The generative recipe (``task: generate``): LoRA / QLoRA on a Qwen-VL model that answers each
listing with its label JSON.

The story: checked inputs (``common.setup``) -> processor and base model + LoRA -> train
(``mmllm.training``, causal-LM loss on the answer tokens) with periodic dev evaluation (teacher
forced loss, then generation: JSON validity and accuracies) -> the model folder: adapter
(safetensors), processor, prompt template, label schema, resolved config, metrics, model card ->
the grounded-attribute choice fitted on the model's dev answers (``grounding.json``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from mmllm import model_dir
from mmllm.augment import AugmentConfig
from mmllm.catalog import Listing, attributes_labelled
from mmllm.collator import TrainCollator
from mmllm.config import help_field, to_dict
from mmllm.grounding import GroundingConfig
from mmllm.images import ImagePolicy
from mmllm.models.generative import GenerativePredictor, LoraSettings, ModelConfig, attach_lora, load_base_model, load_processor
from mmllm.models.mini_sequence import chunk_mlps
from mmllm.recipes.common import (DataConfig, InputError, Setup, fit_after_training, record_final, run_summary, say,
                                  setup)
from mmllm.training import TrainConfig, causal_lm_loss, train_loop


@dataclass
class EvalConfig:
    """Evaluation on the dev rows during and after training."""

    every: int = help_field(0, "optimizer steps between evaluations; 0 = only at the end")
    loss_rows: int = help_field(64, "dev rows for the teacher-forced loss")
    generate_rows: int = help_field(32, "dev rows answered by generation (JSON validity, accuracies)")
    max_new_tokens: int = help_field(256, "generation budget; must fit the longest answer")
    batch_size: int = help_field(4, "listings per generation batch")

    def __post_init__(self) -> None:
        for name in ("every", "loss_rows", "generate_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class GenerateConfig:
    """``task: generate``: the vision-language model learns to answer the label JSON."""

    task: Literal["generate"] = help_field("generate", "generate = the VLM answers JSON (the default task)")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)


def run(cfg: GenerateConfig) -> dict[str, Any]:
    """A whole generative fine-tuning job; returns its summary (also written into the model folder)."""
    s = setup(cfg)
    processor, model = build_backbone(cfg.model, cfg.lora, s.accelerator)
    augment = cfg.augment if cfg.augment.enabled else None
    collate = TrainCollator(processor, s.schema, s.template, s.train_policy, cfg.model.max_images, augment)
    evaluate = _evaluator(cfg, processor, s)

    result = train_loop(replace(cfg.train, resume=s.resume), s.accelerator, model, s.train_rows, collate,
                        causal_lm_loss, s.out_dir, evaluate=evaluate if s.dev_rows else None, eval_every=cfg.eval.every)
    summary = run_summary(result, s.accelerator)
    if result.interrupted:
        return summary
    if s.dev_rows:
        final = evaluate(s.accelerator.unwrap_model(model), result.steps)
        record_final(s.accelerator, s.out_dir, summary, final)
    save_model_dir(s, cfg, model, processor, summary)
    if s.accelerator.is_main_process:
        # the dev answers decoded as `mmllm label` decodes them (under the grammar where xgrammar is
        # installed): their scores are Platt-calibrated, then checked against what each listing states
        fit_after_training(s, cfg.grounding, GenerativePredictor(
            s.accelerator.unwrap_model(model), processor, s.schema, s.template, cfg.model.max_images,
            cfg.eval.max_new_tokens, cfg.eval.batch_size, untrained=s.untrained,
            constrained=importlib.util.find_spec("xgrammar") is not None), platt=True)
    say(s.accelerator, f"model folder written: {s.out_dir}")
    return summary


def build_backbone(model_cfg: ModelConfig, lora: LoraSettings, accelerator: Any) -> tuple[Any, Any]:
    """Processor and base model with LoRA attached (the classify recipe's backbone too)."""
    from mmllm.tiny import resolve  # `tiny:ARCH` bases for smoke runs

    base = resolve(model_cfg.base)
    if model_dir.looks_like_path(base) and not Path(base).is_dir():
        raise InputError(f"model.base: {base} is no folder here (a local checkpoint), nor a hub id (owner/name)")
    processor = load_processor(base, model_cfg)
    model = load_base_model(model_cfg, source=base)
    try:
        model = attach_lora(model, lora, gradient_checkpointing=model_cfg.gradient_checkpointing)
    except ValueError as exc:  # the target regex matches no module of this model, ...
        raise InputError(f"lora: {exc}") from None
    if model_cfg.mlp_chunks > 1:
        chunked = chunk_mlps(model, model_cfg.mlp_chunks)
        say(accelerator, f"mini-sequence MLPs: {chunked} language-model MLPs run in {model_cfg.mlp_chunks} "
                         f"checkpointed slices of the sequence while training")
    if accelerator.is_main_process:
        model.print_trainable_parameters()
    return processor, model


def save_model_dir(s: Setup, cfg: Any, model: Any, processor: Any, summary: dict[str, Any],
                   kind: str = "generative-lora") -> None:
    """Adapter + everything needed to use it: processor, template, schema, config, model card.

    The run's ``trained`` counts go into the meta file; predictors answer null for an attribute
    recorded with 0 rows."""
    accelerator, out_dir = s.accelerator, s.out_dir
    if accelerator.is_main_process:
        model_dir.begin(out_dir)
    state_dict = accelerator.get_state_dict(model)  # gathers shards under FSDP / DeepSpeed
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(out_dir, is_main_process=accelerator.is_main_process, state_dict=state_dict,
                              safe_serialization=True)
    if not accelerator.is_main_process:
        return
    processor.save_pretrained(out_dir)
    model_fields = {k: v for k, v in to_dict(cfg.model).items()
                    if k in ("dtype", "attn_implementation", "quantization", "quant_skip_modules", "max_images")}
    model_dir.write_folder(out_dir, kind=kind, base_model=cfg.model.base, schema=s.schema, schema_source=cfg.data.schema,
                           config=cfg, template=s.template, model=model_fields, training=summary,
                           trained_fields=s.trained, category_counts=s.category_counts)


# ---------------------------------------------------------------------- evaluation
def _evaluator(cfg: GenerateConfig, processor: Any, s: Setup):
    """Dev loss (teacher forced) and generation metrics, computed on the main process; attributes no
    training row stated are answered null, as the saved model folder will."""
    accelerator, schema, template, dev_rows, policy = s.accelerator, s.schema, s.template, s.dev_rows, s.dev_policy
    loss_collate = TrainCollator(processor, schema, template, policy, cfg.model.max_images, None)

    def evaluate(model: Any, step: int) -> dict[str, Any]:
        accelerator.wait_for_everyone()
        metrics: dict[str, Any] = {}
        if accelerator.is_main_process:
            model.eval()
            metrics = {**_dev_loss(model, loss_collate, dev_rows[: cfg.eval.loss_rows], accelerator.device),
                       **generation_metrics(GenerativePredictor(model, processor, schema, template, cfg.model.max_images,
                                                                cfg.eval.max_new_tokens, cfg.eval.batch_size,
                                                                untrained=s.untrained),
                                            dev_rows[: cfg.eval.generate_rows], policy)}
            model.train()
        accelerator.wait_for_everyone()
        return metrics

    return evaluate


def _dev_loss(model: Any, collate: TrainCollator, rows: list[Listing], device: Any) -> dict[str, float]:
    total, items = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 4):
            batch = collate([(r, 0) for r in rows[start:start + 4]])
            loss_sum, n = causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
            total, items = total + float(loss_sum), items + int(n)
    if not items:  # eval.loss_rows=0 (generation metrics only), or no supervised token: no loss, not a 0.0
        return {}
    return {"eval_loss": round(total / items, 5)}


def generation_metrics(predictor: GenerativePredictor, rows: Sequence[Listing], policy: ImagePolicy) -> dict[str, float]:
    """JSON validity, category accuracy and attribute accuracy (over attributes with a gold value)."""
    if not rows:
        return {}
    predictions = predictor.predict(rows, policy)
    valid = cat_ok = attr_ok = attr_total = 0
    for row, pred in zip(rows, predictions):
        gold = predictor.schema.validate(row.label).value
        valid += pred["status"] == "ok"
        cat_ok += pred["category"] == gold["category"]
        for name, value in (gold["attributes"] if attributes_labelled(row.label) else {}).items():
            if value is not None:
                attr_total += 1
                attr_ok += pred["attributes"].get(name) == value
    return {"json_valid": round(valid / len(rows), 4), "category_acc": round(cat_ok / len(rows), 4),
            "attribute_acc": round(attr_ok / max(attr_total, 1), 4), "generated_rows": len(rows)}
