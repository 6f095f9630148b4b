"""The fusion recipe (``task: fusion``): pretrained text / image encoders + a small attribute
network, fused, with the classify recipe's heads, loss and calibration - the CPU baseline.

The story: checked inputs (``common.setup``) -> encoders, feature cache and fusion model -> fill
the cache once (frozen encoders) -> train the heads (``heads_training``) -> the model folder:
``fusion.safetensors`` + ``fusion.json``, label schema, resolved config, metrics, model card ->
the grounded-attribute choice fitted on it (``grounding.json``, :mod:`mmllm.grounding`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmllm import model_dir
from mmllm.config import help_field
from mmllm.grounding import GroundingConfig
from mmllm.models import fusion, heads
from mmllm.models.fusion import FusionConfig
from mmllm.progress import Progress
from mmllm.recipes.common import DataConfig, fit_grounding, say, setup
from mmllm.recipes.heads_training import HeadsEvalConfig, train_heads
from mmllm.training import TrainConfig


@dataclass
class ImagesConfig:
    """The photo budget (read only when ``fusion.image_encoder`` is set)."""

    max_images: int = help_field(4, "photos per listing fed to the image encoder; the rest are ignored")

    def __post_init__(self) -> None:
        if self.max_images < 0:
            raise ValueError("model.max_images must be >= 0")


@dataclass
class FusionRecipeConfig:
    """``task: fusion``: encoders + attribute network, fused, softmax heads."""

    task: Literal["fusion"] = help_field(
        "fusion", "fusion = pretrained text/image encoders + attribute MLP, fused, softmax heads (CPU baseline)")
    model: ImagesConfig = field(default_factory=ImagesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: HeadsEvalConfig = field(default_factory=HeadsEvalConfig)
    heads: heads.HeadsConfig = field(default_factory=heads.HeadsConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)


def run(cfg: FusionRecipeConfig) -> dict[str, Any]:
    """Frozen (cached) or fine-tuned encoders + fusion + heads, in the shared loop; returns the summary."""
    s = setup(cfg)
    fc = cfg.fusion
    specs = heads.head_specs(s.schema, [r.label for r in s.train_rows], cfg.heads.bins, cfg.heads.null_class)
    encoders = fusion.Encoders(fc.text_encoder, fc.image_encoder, fc.max_text_tokens,
                               "text" in fc.modalities, "image" in fc.modalities)
    cache = fusion.FeatureCache(Path(fc.cache_dir) if fc.cache_dir else s.out_dir / "feature_cache") if fc.freeze else None
    featurizer = fusion.Featurizer(encoders, fc, cache, remember_rows=True)  # every epoch reads the same rows
    names = None
    if fc.label_prior and encoders.text is not None:  # the taxonomy's own words, embedded once
        names = encoders.sentence_vectors([fusion.category_name(c) for c in specs[0].classes])
    model = fusion.FusionModel(fc, specs, encoders.text_dim, encoders.image_dim, encoders, names)
    max_images = cfg.model.max_images if encoders.image is not None else 0
    collate = fusion.FusionCollator(featurizer, s.schema, specs, s.train_policy, max_images)
    dev_collate = fusion.FusionCollator(featurizer, s.schema, specs, s.dev_policy, max_images)
    if fc.freeze:  # fill the feature cache once; epochs (and reruns) read it
        encoders.eval()
        started = time.perf_counter()
        with Progress("encode", total_rows=len(s.train_rows) + len(s.dev_rows), unit="listings",
                      enabled=s.accelerator.is_main_process) as progress:
            for rows, col in ((s.train_rows, collate), (s.dev_rows, dev_collate)):
                for start in range(0, len(rows), fc.encode_batch):
                    col([(r, 0) for r in rows[start:start + fc.encode_batch]])
                    progress.update(len(rows[start:start + fc.encode_batch]))
        say(s.accelerator, f"encoder features: {cache.misses} computed, {cache.hits} from the cache "
                           f"in {time.perf_counter() - started:.1f} s")
    summary, unwrapped = train_heads(s, model, specs, collate, dev_collate, heads.count_rows, cfg.train, cfg.eval,
                                     cfg.heads)
    if summary["interrupted"]:
        return summary
    if s.accelerator.is_main_process:
        unwrapped.save(s.out_dir)
        model_dir.write_folder(s.out_dir, kind="fusion", base_model=f"text={fc.text_encoder}, image={fc.image_encoder}",
                               schema=s.schema, schema_source=cfg.data.schema, config=cfg, template=None,
                               model={"max_images": max_images, "method": fc.method, "modalities": unwrapped.modalities},
                               training=summary, trained_fields=s.trained)
        fit_grounding(s, cfg.grounding, fusion.FusionPredictor(unwrapped, featurizer, s.schema, max_images,
                                                               untrained=s.untrained))
    say(s.accelerator, f"model folder written: {s.out_dir}")
    return summary
