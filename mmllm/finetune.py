"""LoRA / QLoRA fine-tuning of a Qwen-VL model to answer listings with label JSON.

    python -m mmllm.finetune --config finetune/tiny_cpu.yaml [key.sub=value ...]
    accelerate launch -m mmllm.finetune --config finetune/qwen2_5_vl_3b_lora.yaml
    python -m mmllm.finetune merge MODEL_DIR OUT_DIR        # adapter folded into a full model
    python -m mmllm.finetune --config X --print-config      # every knob with its help

The story: load config -> schema, prompt template, rows -> processor and model (+ LoRA) ->
train (``mmllm.training``) with periodic evaluation -> save the model folder: adapter
(safetensors), processor, prompt template, label schema, resolved config, metrics, a report
with training curves, and in ``mmllm_model.json`` the training rows per field
(``trained_fields``; a field with 0 rows is answered null at labelling time).
Unusable inputs (missing or empty catalogs, a non-empty output folder) stop the run before
anything is built or written: exit status 2 and one line naming the config key and file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from mmllm.augment import AugmentConfig
from mmllm.catalog import CatalogError, Listing, RowError, iter_catalog
from mmllm.collator import TrainCollator
from mmllm.config import ConfigError, describe, help_field, load_config, save_config, to_dict
from mmllm.images import ImagePolicy
from mmllm.models.generative import (
    SCHEMA_FILE,
    GenerativePredictor,
    LoraSettings,
    ModelConfig,
    attach_lora,
    load_base_model,
    load_processor,
    merge_model_dir,
    trained_field_counts,
    untrained_attributes,
    write_meta,
)
from mmllm.models import classifier as cls_head
from mmllm.models.classifier import ClassifyConfig
from mmllm.models.fusion import FusionConfig
from mmllm.progress import Progress
from mmllm.prompts import PromptTemplate, target_text
from mmllm.schema import LabelSchema, SchemaError
from mmllm.training import TrainConfig, causal_lm_loss, latest_checkpoint, train_loop

log = logging.getLogger("mmllm.finetune")


@dataclass
class DataConfig:
    """Where the listings, the label schema and the prompt template come from."""

    train: str | None = help_field("examples/amazon_uk_toys/train.jsonl", "labelled catalog to train on (any catalog format)")
    dev: str | None = help_field("examples/amazon_uk_toys/dev.jsonl", "labelled catalog for evaluation; null = none")
    schema: str = help_field("examples/toys_schema.yaml", "label schema YAML (taxonomy + attributes)")
    template: str = help_field("listing_v1", "prompt template: a version in prompts/ or a YAML path")
    image_root: str | None = help_field(None, "folder image paths resolve in (default: each catalog's folder)")
    max_train_rows: int | None = help_field(None, "use only the first N training rows (smoke runs)")
    max_dev_rows: int | None = help_field(None, "use only the first N dev rows")

    def __post_init__(self) -> None:
        if self.train is None or not str(self.train).strip():
            raise ValueError("data.train is not set: give the labelled catalog to train on (data.train=PATH)")
        for name in ("max_train_rows", "max_dev_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1 (or null for all rows), got {getattr(self, name)}")


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
class FinetuneConfig:
    task: Literal["generate", "classify", "fusion"] = help_field(
        "generate", "generate = the VLM answers JSON; classify = softmax heads on the pooled prompt state; "
                    "fusion = pretrained text/image encoders + attribute MLP, fused, softmax heads (CPU baseline)")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)


# ---------------------------------------------------------------------- the story
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        return _merge_cli(argv[1:])
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(FinetuneConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        for key, help_text, default in describe(FinetuneConfig):
            print(f"{key:<32} {help_text}  [default: {default}]")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # peft calls a transformers method that transformers 5 deprecates; harmless, and noisy
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        result = finetune(cfg)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 130 if result["interrupted"] else 0


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run a whole fine-tuning job; returns a summary (also written into the model folder).

    Raises :class:`InputError` (naming the config key and the file) before building anything or
    touching the output folder when an input is unusable.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    schema, template, train_rows, dev_rows = load_inputs(cfg)
    trained = trained_field_counts(schema, [r.label for r in train_rows])
    untrained = untrained_attributes(trained)
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.train.mixed_precision))
    set_seed(cfg.train.seed)
    out_dir = _prepare_output_dir(Path(cfg.train.output_dir), cfg.train.resume, accelerator)
    _say(accelerator, f"{len(train_rows)} training rows, {len(dev_rows)} dev rows; "
                      f"{_describe_launch(accelerator.distributed_type.name, accelerator.num_processes)}")
    if untrained:
        _say(accelerator, f"no training row states {', '.join(untrained)}: the model will answer null for "
                          f"{'it' if len(untrained) == 1 else 'them'}")

    policy = ImagePolicy(root=Path(cfg.data.image_root).resolve() if cfg.data.image_root else None)
    train_policy, dev_policy = _policy_for(cfg.data.train, policy), _policy_for(cfg.data.dev, policy)
    if cfg.task == "fusion":
        return _finetune_fusion(cfg, accelerator, schema, train_rows, dev_rows, train_policy, dev_policy, out_dir,
                                trained)

    processor = load_processor(cfg.model.base, cfg.model)
    model = load_base_model(cfg.model)
    model = attach_lora(model, cfg.lora, quantized=cfg.model.quantization == "4bit",
                        gradient_checkpointing=cfg.model.gradient_checkpointing)
    if accelerator.is_main_process:
        model.print_trainable_parameters()

    augment = cfg.augment if cfg.augment.enabled else None
    if cfg.task == "classify":
        return _finetune_classifier(cfg, accelerator, model, processor, schema, template, train_rows, dev_rows,
                                    train_policy, dev_policy, augment, out_dir, trained)
    collate = TrainCollator(processor, schema, template, train_policy, cfg.model.max_images, augment)
    evaluate = _evaluator(cfg, processor, schema, template, dev_rows, dev_policy, out_dir, accelerator, untrained)

    result = train_loop(cfg.train, accelerator, model, train_rows, collate, causal_lm_loss, out_dir,
                        evaluate=evaluate if dev_rows else None, eval_every=cfg.eval.every)
    summary = _run_summary(result, accelerator)
    if result.interrupted:
        return summary
    if dev_rows:
        final = evaluate(accelerator.unwrap_model(model), result.steps)
        _record_final(accelerator, out_dir, summary, final)
    save_model_dir(out_dir, cfg, accelerator, model, processor, schema, template, summary, trained_fields=trained)
    _say(accelerator, f"model folder written: {out_dir}")
    return summary


def _finetune_classifier(cfg: FinetuneConfig, accelerator: Any, backbone: Any, processor: Any, schema: LabelSchema,
                         template: PromptTemplate, train_rows: list[Listing], dev_rows: list[Listing],
                         train_policy: ImagePolicy, dev_policy: ImagePolicy, augment: Any, out_dir: Path,
                         trained: dict[str, int]) -> dict[str, Any]:
    """Same loop, another model and loss: heads on the pooled prompt state, cross-entropy."""
    specs = cls_head.head_specs(schema, [r.label for r in train_rows], cfg.classify.bins)
    model = cls_head.ListingClassifier(backbone, cls_head._hidden_size(backbone), specs, cfg.classify.pooling)
    collate = cls_head.ClassifyCollator(processor, schema, template, train_policy, cfg.model.max_images, specs, augment)
    dev_collate = cls_head.ClassifyCollator(processor, schema, template, dev_policy, cfg.model.max_images, specs)
    summary, unwrapped = _train_heads(cfg, accelerator, model, specs, schema, train_rows, dev_rows, collate, dev_collate,
                                      out_dir, cls_head.count_rows, trained)
    if summary["interrupted"]:
        return summary
    save_model_dir(out_dir, cfg, accelerator, unwrapped.backbone, processor, schema, template, summary, kind="classifier",
                   trained_fields=trained)
    if accelerator.is_main_process:
        unwrapped.save_heads(out_dir)
    _say(accelerator, f"model folder written: {out_dir}")
    return summary


def _finetune_fusion(cfg: FinetuneConfig, accelerator: Any, schema: LabelSchema, train_rows: list[Listing],
                     dev_rows: list[Listing], train_policy: ImagePolicy, dev_policy: ImagePolicy,
                     out_dir: Path, trained: dict[str, int]) -> dict[str, Any]:
    """Frozen (cached) or fine-tuned encoders + fusion + the classifier's heads, same loop."""
    import time

    from mmllm.models import fusion

    fc = cfg.fusion
    specs = cls_head.head_specs(schema, [r.label for r in train_rows], cfg.classify.bins)
    encoders = fusion.Encoders(fc.text_encoder, fc.image_encoder, fc.max_text_tokens,
                               "text" in fc.modalities, "image" in fc.modalities)
    cache = fusion.FeatureCache(Path(fc.cache_dir) if fc.cache_dir else out_dir / "feature_cache") if fc.freeze else None
    featurizer = fusion.Featurizer(encoders, fc, cache)
    names = None
    if fc.label_prior and encoders.text is not None:  # the taxonomy's own words, embedded once
        names = encoders.sentence_vectors([fusion.category_name(c) for c in specs[0].classes])
    model = fusion.FusionModel(fc, specs, encoders.text_dim, encoders.image_dim, encoders, names)
    max_images = cfg.model.max_images if encoders.image is not None else 0
    collate = fusion.FusionCollator(featurizer, schema, specs, train_policy, max_images)
    dev_collate = fusion.FusionCollator(featurizer, schema, specs, dev_policy, max_images)
    if fc.freeze:  # fill the feature cache once; epochs (and reruns) read it
        encoders.eval()
        started = time.perf_counter()
        with Progress("encode", total_rows=len(train_rows) + len(dev_rows), unit="listings",
                      enabled=accelerator.is_main_process) as progress:
            for rows, col in ((train_rows, collate), (dev_rows, dev_collate)):
                for start in range(0, len(rows), fc.encode_batch):
                    col([(r, 0) for r in rows[start:start + fc.encode_batch]])
                    progress.update(len(rows[start:start + fc.encode_batch]))
        _say(accelerator, f"encoder features: {cache.misses} computed, {cache.hits} from the cache "
                          f"in {time.perf_counter() - started:.1f} s")
    summary, unwrapped = _train_heads(cfg, accelerator, model, specs, schema, train_rows, dev_rows, collate, dev_collate,
                                      out_dir, fusion.count_rows, trained)
    if summary["interrupted"]:
        return summary
    if accelerator.is_main_process:
        unwrapped.save(out_dir)
        schema.to_yaml(out_dir / SCHEMA_FILE, header=f"# label schema used for training (from {cfg.data.schema})\n")
        save_config(cfg, out_dir / "config.yaml", header="# resolved training config: rerun with --config this file\n")
        write_meta(out_dir, kind="fusion", base_model=f"text={fc.text_encoder}, image={fc.image_encoder}",
                   template=None, model={"max_images": max_images, "method": fc.method, "modalities": unwrapped.modalities},
                   training=summary, trained_fields=trained)
        write_report(out_dir)
    _say(accelerator, f"model folder written: {out_dir}")
    return summary


def _train_heads(cfg: FinetuneConfig, accelerator: Any, model: Any, specs: list, schema: LabelSchema,
                 train_rows: list[Listing], dev_rows: list[Listing], collate: Any, dev_collate: Any, out_dir: Path,
                 count_rows: Any, trained: dict[str, int]) -> tuple[dict[str, Any], Any]:
    """The softmax-head variants (classifier, fusion): cross-entropy in the shared loop, dev metrics,
    then temperature scaling of the category head on the dev rows (Guo et al. 2017)."""
    untrained = set(untrained_attributes(trained))
    weights = None
    if cfg.classify.class_weights == "balanced":
        weights = cls_head.balanced_weights(specs, cls_head.encode_targets(specs, [r.label for r in train_rows], schema))

    def loss_fn(m: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        loss = cls_head.classification_loss(m(**batch), batch, specs, cfg.classify.label_smoothing, weights)
        return loss, torch.tensor(count_rows(batch))

    def evaluate(m: Any, step: int) -> dict[str, Any]:
        accelerator.wait_for_everyone()
        metrics: dict[str, Any] = {}
        if accelerator.is_main_process:
            m.eval()
            metrics = _classifier_dev_metrics(m, dev_collate, dev_rows[: cfg.eval.loss_rows], specs, accelerator.device,
                                              untrained)
            m.train()
        accelerator.wait_for_everyone()
        return metrics

    result = train_loop(cfg.train, accelerator, model, train_rows, collate, loss_fn, out_dir,
                        evaluate=evaluate if dev_rows else None, eval_every=cfg.eval.every, count_items=count_rows)
    summary = _run_summary(result, accelerator)
    unwrapped = accelerator.unwrap_model(model)
    if result.interrupted:
        return summary, unwrapped
    if dev_rows:
        final = evaluate(unwrapped, result.steps)
        if accelerator.is_main_process:
            unwrapped.eval()
            logits, target = _category_logits(unwrapped, dev_collate, dev_rows, accelerator.device)
            unwrapped.temperature = cls_head.fit_temperature(logits, target)
            final["temperature"] = round(unwrapped.temperature, 4)
            final["ece_calibrated"] = round(cls_head.expected_calibration_error(
                torch.softmax(logits / unwrapped.temperature, -1), target), 4)
        _record_final(accelerator, out_dir, summary, final)
    unwrapped.eval()
    return summary, unwrapped


def _category_logits(model: Any, collate: Any, rows: list[Listing], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    logits, targets = [], []
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            batch = collate([(r, 0) for r in rows[start:start + 8]])
            logits.append(model(**{k: v.to(device) for k, v in batch.items()})["category"].float().cpu())
            targets.append(batch["target_category"])
    return torch.cat(logits), torch.cat(targets)


def _classifier_dev_metrics(model: Any, collate: Any, rows: list[Listing], specs: list, device: Any,
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
            total += float(cls_head.classification_loss(logits, batch, specs))
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
            "ece": round(cls_head.expected_calibration_error(torch.softmax(logits, -1), target), 4)}


def _run_summary(result: Any, accelerator: Any) -> dict[str, Any]:
    """What a run did (also stored in the model folder); says how to continue a stopped run."""
    if result.interrupted:
        _say(accelerator, f"stopped at step {result.steps}; continue with train.resume=true")
    return {"steps": result.steps, "interrupted": result.interrupted, "wall_s": round(result.wall_s, 2),
            "distributed_type": accelerator.distributed_type.name, "num_processes": accelerator.num_processes}


def _record_final(accelerator: Any, out_dir: Path, summary: dict[str, Any], final: dict[str, Any]) -> None:
    """The final evaluation: into the summary, onto the console and into metrics.jsonl."""
    summary.update(final)
    _say(accelerator, "final evaluation: " + ", ".join(f"{k}={v}" for k, v in final.items()))
    if accelerator.is_main_process:
        with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": summary["steps"], **final}) + "\n")


# ---------------------------------------------------------------------- inputs
class InputError(ValueError):
    """A training input is unusable; the message names the config key and the file (exit status 2)."""


def load_inputs(cfg: FinetuneConfig) -> tuple[LabelSchema, PromptTemplate, list[Listing], list[Listing]]:
    """Schema, template, training and dev rows, and a check of the output folder: everything that
    can fail on the user's inputs, done before a model is built or anything is written."""
    for key, source in (("data.train", cfg.data.train), ("data.dev", cfg.data.dev)):
        if source and not Path(source).exists():
            raise InputError(f"{key}: {source} does not exist; give a labelled catalog ({key}=PATH)")
    try:
        schema = LabelSchema.from_yaml(cfg.data.schema)
    except SchemaError as exc:
        raise InputError(f"data.schema: {exc}") from None
    try:
        template = PromptTemplate.load(cfg.data.template)
    except (OSError, ValueError) as exc:
        raise InputError(f"data.template: {exc}") from None
    _check_output_dir(Path(cfg.train.output_dir), cfg.train.resume)
    train_rows = load_training_rows(cfg.data.train, schema, cfg.data.max_train_rows, key="data.train")
    dev_rows = load_training_rows(cfg.data.dev, schema, cfg.data.max_dev_rows, key="data.dev") if cfg.data.dev else []
    return schema, template, train_rows, dev_rows


def load_training_rows(source: str, schema: LabelSchema, limit: int | None, key: str = "data.train") -> list[Listing]:
    """Labelled listings whose label fits the schema; bad rows are reported and skipped.

    Raises :class:`InputError` naming ``key`` when the catalog cannot be read or no row is usable.
    """
    rows: list[Listing] = []
    skipped: list[str] = []
    try:
        for row in iter_catalog(source):
            if limit is not None and len(rows) >= limit:
                break
            if isinstance(row, RowError):
                skipped.append(str(row))
                continue
            try:
                target_text(row, schema)
            except ValueError as exc:
                skipped.append(str(exc))
                continue
            rows.append(row)
    except CatalogError as exc:
        raise InputError(f"{key}: {exc}") from None
    if not rows and not skipped:
        raise InputError(f"{key}: {source} holds no rows")
    if not rows:
        raise InputError(f"{key}: {source} has no usable labelled rows ({len(skipped)} skipped; first: {skipped[0]}); "
                         "check it with `mmllm catalog validate --schema`")
    for line in skipped[:20]:
        log.warning("skipped: %s", line)
    if len(skipped) > 20:
        log.warning("... and %d more skipped rows (run `mmllm catalog validate --schema`)", len(skipped) - 20)
    return rows


def _check_output_dir(out_dir: Path, resume: bool) -> None:
    """A new run needs an empty (or new) folder; a resumed one a finished checkpoint in it. Read only."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"train.output_dir: {out_dir} is a file, not a folder; pass another train.output_dir")
    if resume:
        if latest_checkpoint(out_dir / "checkpoints") is None:
            raise InputError(f"train.output_dir: train.resume=true but {out_dir / 'checkpoints'} holds no finished "
                             "checkpoint; drop train.resume to start a new run")
    elif out_dir.is_dir() and any(out_dir.iterdir()):
        raise InputError(f"train.output_dir: {out_dir} is not empty; pass train.resume=true to continue it, "
                         "or another train.output_dir")


def save_model_dir(out_dir: Path, cfg: FinetuneConfig, accelerator: Any, model: Any, processor: Any,
                   schema: LabelSchema, template: PromptTemplate, summary: dict[str, Any],
                   kind: str = "generative-lora", trained_fields: dict[str, int] | None = None) -> None:
    """Adapter + everything needed to use it: processor, template, schema, config, report.

    ``trained_fields`` (training rows with a known gold value, per field) goes into the meta file;
    predictors answer null for an attribute recorded with 0 rows."""
    state_dict = accelerator.get_state_dict(model)  # gathers shards under FSDP / DeepSpeed
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(out_dir, is_main_process=accelerator.is_main_process, state_dict=state_dict,
                              safe_serialization=True)
    if not accelerator.is_main_process:
        return
    processor.save_pretrained(out_dir)
    template.save_to(out_dir)
    schema.to_yaml(out_dir / SCHEMA_FILE, header=f"# label schema used for training (from {cfg.data.schema})\n")
    save_config(cfg, out_dir / "config.yaml", header="# resolved training config: rerun with --config this file\n")
    model_fields = {k: v for k, v in to_dict(cfg.model).items()
                    if k in ("dtype", "attn_implementation", "quantization", "quant_skip_modules", "max_images")}
    write_meta(out_dir, kind=kind, base_model=cfg.model.base, template=template.version,
               model=model_fields, training=summary, **({"trained_fields": trained_fields} if trained_fields else {}))
    write_report(out_dir)


def write_report(out_dir: Path) -> None:
    """training_curves.png + README.md (model card) from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="dev loss")
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("cross-entropy per answer token")
    axes[0].legend()
    for key, label in (("json_valid", "JSON valid"), ("category_acc", "category accuracy"), ("attribute_acc", "attribute accuracy")):
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            axes[1].plot(*zip(*points), "o-", label=label)
    axes[1].set_ylim(0, 1.05)
    axes[1].set_xlabel("optimizer step")
    axes[1].set_title("dev generation" if evals else "no dev set")
    axes[1].legend() if evals else None
    fig.tight_layout()
    fig.savefig(out_dir / "training_curves.png", dpi=110)
    plt.close(fig)
    meta = json.loads((out_dir / "mmllm_model.json").read_text())
    last_eval = evals[-1] if evals else {}
    untrained = untrained_attributes(meta.get("trained_fields"))
    lines = [
        f"# mmllm model: {meta['kind']} on `{meta['base_model']}`", "",
        f"Prompt template `{meta.get('template')}`, label schema `label_schema.yaml`, config `config.yaml`.",
        f"Trained {meta['training']['steps']} steps in {meta['training']['wall_s']} s "
        f"({_describe_launch(meta['training']['distributed_type'], meta['training']['num_processes'])}).", "",
        "| metric | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in last_eval.items() if k != "step"),
        *(f"| final train loss | {train[-1]['loss']} |" for _ in train[-1:]), "",
        *([f"No training row stated {', '.join(untrained)}: the model answers null for "
           f"{'it' if len(untrained) == 1 else 'them'}.", ""] if untrained else []),
        "![training curves](training_curves.png)", "",
        "Load it: `mmllm.models.generative.load_model_dir(THIS_FOLDER)`; "
        "merge it into a standalone model: `python -m mmllm.finetune merge THIS_FOLDER OUT`.",
    ]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------- evaluation
def _evaluator(cfg: FinetuneConfig, processor: Any, schema: LabelSchema, template: PromptTemplate,
               dev_rows: list[Listing], policy: ImagePolicy, out_dir: Path, accelerator: Any,
               untrained: Sequence[str] = ()):
    """Dev loss (teacher forced) and generation metrics, computed on the main process; attributes no
    training row stated are answered null, as the saved model folder will."""
    loss_collate = TrainCollator(processor, schema, template, policy, cfg.model.max_images, None)

    def evaluate(model: Any, step: int) -> dict[str, Any]:
        accelerator.wait_for_everyone()
        metrics: dict[str, Any] = {}
        if accelerator.is_main_process:
            model.eval()
            metrics = {**_dev_loss(model, loss_collate, dev_rows[: cfg.eval.loss_rows], accelerator.device),
                       **generation_metrics(GenerativePredictor(model, processor, schema, template, cfg.model.max_images,
                                                                cfg.eval.max_new_tokens, cfg.eval.batch_size,
                                                                untrained=tuple(untrained)),
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
    return {"eval_loss": round(total / max(items, 1), 5)}


def generation_metrics(predictor: GenerativePredictor, rows: list[Listing], policy: ImagePolicy) -> dict[str, float]:
    """JSON validity, category accuracy and attribute accuracy (over attributes with a gold value)."""
    if not rows:
        return {}
    predictions = predictor.predict(rows, policy)
    valid = cat_ok = attr_ok = attr_total = 0
    for row, pred in zip(rows, predictions):
        gold = predictor.schema.validate(row.label).value
        valid += pred["status"] == "ok"
        cat_ok += pred["category"] == gold["category"]
        for name, value in gold["attributes"].items():
            if value is not None:
                attr_total += 1
                attr_ok += pred["attributes"].get(name) == value
    return {"json_valid": round(valid / len(rows), 4), "category_acc": round(cat_ok / len(rows), 4),
            "attribute_acc": round(attr_ok / max(attr_total, 1), 4), "generated_rows": len(rows)}


# ---------------------------------------------------------------------- helpers
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmllm.finetune", description=__doc__.split("\n\n")[0],
                                epilog="Overrides are key.sub=value, e.g. train.lr=1e-4 lora.rank=8. "
                                       "Merge an adapter: python -m mmllm.finetune merge MODEL_DIR OUT_DIR")
    p.add_argument("--config", type=Path, help="training YAML (see finetune/)")
    p.add_argument("--print-config", action="store_true", help="list every config key with its help and default")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return p


def _merge_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m mmllm.finetune merge", description="write a merged full model")
    p.add_argument("model_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    args = p.parse_args(argv)
    out = merge_model_dir(args.model_dir, args.out_dir)
    print(f"merged model written to {out}")
    return 0


def _mixed_precision(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _policy_for(source: str | None, policy: ImagePolicy) -> ImagePolicy:
    """Images resolve in --image-root, or else in the catalog file's own folder."""
    if policy.root is not None or source is None:
        return policy
    from dataclasses import replace

    return replace(policy, root=Path(source).resolve().parent)


def _prepare_output_dir(out_dir: Path, resume: bool, accelerator: Any) -> Path:
    if accelerator.is_main_process:
        _check_output_dir(out_dir, resume)  # checked before anything was built; checked again just before writing
        out_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return out_dir


def _describe_launch(distributed_type: str, processes: int) -> str:
    return "single process" if processes == 1 else f"{distributed_type} x {processes} process(es)"


def _say(accelerator: Any, text: str) -> None:
    if accelerator.is_main_process:
        print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
