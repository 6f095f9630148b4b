"""The classification-head recipe (``task: classify``): the generative recipe's backbone (LoRA on a
Qwen-VL model) plus softmax / sigmoid heads on the pooled prompt state, trained with cross-entropy.

Same loop, another model and loss: one forward pass per listing at labelling time, calibrated
probabilities and the top-k categories. The model folder holds the adapter, the heads
(``heads.safetensors``) and what the generative folder holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmllm.augment import AugmentConfig
from mmllm.config import help_field
from mmllm.grounding import GroundingConfig
from mmllm.models import classifier, heads
from mmllm.models.classifier import ClassifyConfig
from mmllm.models.generative import LoraSettings, ModelConfig
from mmllm.recipes.common import DataConfig, fit_after_training, say, setup
from mmllm.recipes.generate import build_backbone, save_model_dir
from mmllm.recipes.heads_training import HeadsEvalConfig, train_heads
from mmllm.training import TrainConfig


@dataclass
class ClassifyRecipeConfig:
    """``task: classify``: heads on the pooled prompt state of a LoRA-tuned vision-language model."""

    task: Literal["classify"] = help_field("classify", "classify = softmax heads on the pooled prompt state")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: HeadsEvalConfig = field(default_factory=HeadsEvalConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)


def run(cfg: ClassifyRecipeConfig) -> dict[str, Any]:
    """A whole classification-head fine-tuning job; returns its summary (also in the model folder)."""
    s = setup(cfg)
    processor, backbone = build_backbone(cfg.model, cfg.lora, s.accelerator)
    augment = cfg.augment if cfg.augment.enabled else None
    specs = heads.head_specs(s.schema, [r.label for r in s.train_rows], cfg.classify.bins, cfg.classify.null_class)
    model = classifier.ListingClassifier(backbone, heads.hidden_size(backbone), specs, cfg.classify.pooling,
                                         cfg.classify.top_k)
    collate = classifier.ClassifyCollator(processor, s.schema, s.template, s.train_policy, cfg.model.max_images, specs,
                                          augment)
    dev_collate = classifier.ClassifyCollator(processor, s.schema, s.template, s.dev_policy, cfg.model.max_images, specs)
    summary, unwrapped = train_heads(s, model, specs, collate, dev_collate, heads.count_rows, cfg.train, cfg.eval,
                                     cfg.classify)
    if summary["interrupted"]:
        return summary
    save_model_dir(s, cfg, unwrapped.backbone, processor, summary, kind="classifier")
    if s.accelerator.is_main_process:
        unwrapped.save_heads(s.out_dir)
        predictor = classifier.ClassifierPredictor(unwrapped, processor, s.schema, s.template, cfg.model.max_images,
                                                   top_k=unwrapped.top_k, untrained=s.untrained)
        fit_after_training(s, cfg.grounding, predictor)
    say(s.accelerator, f"model folder written: {s.out_dir}")
    return summary
