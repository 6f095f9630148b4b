"""The classification-head variant: VLM backbone + softmax heads, trained with cross-entropy.

p(y | x) = softmax(W f(x) + b), where f(x) pools the backbone's last hidden state over the
same listing prompt the generative path reads (no answer). The heads, their targets and loss,
calibration and the prediction record live in ``mmllm.models.heads`` (the fusion model shares
them); this module is the model around them: config, backbone + heads, save / load, predictor
and training collator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmllm.catalog import Listing
from mmllm.class_prior import ClassPrior
from mmllm.collator import encode_prompts, load_listing_images
from mmllm.config import help_field
from mmllm.images import ImagePolicy
from mmllm.models.heads import (HeadsConfig, HeadSpec, decoder, encode_targets, head_probabilities, hidden_size,
                                json_number, pool, prediction_record, prompt_vectors)
from mmllm.predictor import predict_in_batches
from mmllm.prompts import PromptTemplate
from mmllm.schema import LabelSchema

HEADS_FILE = "heads.safetensors"
HEADS_CONFIG = "heads.json"


@dataclass
class ClassifyConfig(HeadsConfig):
    """The classification heads (``task: classify``): the heads' settings plus the backbone's pooling."""

    section: ClassVar[str] = "classify"
    pooling: Literal["last", "mean"] = help_field("last", "last non-padding token, or the masked mean over the prompt")
    top_k: int = help_field(5, "categories listed in each prediction's top_k")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1:
            raise ValueError(f"classify.top_k must be >= 1, got {self.top_k}")


class ListingClassifier(nn.Module):
    """A (PEFT-wrapped) VLM backbone with one linear head per schema field."""

    def __init__(self, backbone: Any, hidden_size: int, specs: list[HeadSpec], pooling: str = "last",
                 top_k: int = 5) -> None:
        super().__init__()
        self.backbone = backbone
        self.specs = specs
        self.pooling = pooling
        self.top_k = top_k  # categories (and values) each prediction lists: classify.top_k, kept in heads.json
        self.heads = nn.ModuleDict({s.name: nn.Linear(hidden_size, len(s.classes)) for s in specs if s.classes})
        self.temperature = 1.0

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs = {k: v for k, v in inputs.items() if not k.startswith(("target_", "mask_"))}
        # no LM head, no logits, and no cache: every layer's keys and values would be kept to the end of the pass
        hidden = decoder(self.backbone)(**inputs, use_cache=False).last_hidden_state  # [B, T, H]
        pooled = pool(hidden, inputs["attention_mask"], self.pooling).float()  # [B, H]
        return {name: head(pooled) for name, head in self.heads.items()}

    def save_heads(self, folder: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}, str(folder / HEADS_FILE))
        config = {"pooling": self.pooling, "temperature": self.temperature, "top_k": self.top_k,
                  "heads": [s.__dict__ for s in self.specs]}
        (folder / HEADS_CONFIG).write_text(json.dumps(config, indent=2, default=json_number))

    @classmethod
    def load(cls, backbone: Any, folder: Path) -> "ListingClassifier":
        config = json.loads((folder / HEADS_CONFIG).read_text())
        specs = [HeadSpec(**{**h, "edges": [float(e) for e in h["edges"]]}) for h in config["heads"]]
        hidden = hidden_size(backbone)
        model = cls(backbone, hidden, specs, config["pooling"], int(config.get("top_k", 5)))
        model.heads.load_state_dict(load_file(str(folder / HEADS_FILE)))
        model.temperature = float(config["temperature"])
        return model


@dataclass
class ClassifierPredictor:
    """Same interface as the generative predictor; one forward pass per batch, no decoding."""

    model: ListingClassifier
    processor: Any
    schema: LabelSchema
    template: PromptTemplate
    max_images: int = 4
    batch_size: int = 16
    top_k: int = 5
    untrained: tuple[str, ...] = ()  # attributes without training rows: answered null
    class_prior: ClassPrior | None = None  # the category answers moved to another catalog's shares
    takes: ClassVar[frozenset[str]] = frozenset({"pixels", "class_prior"})  # heads always answer inside the schema
    light_encode: ClassVar[bool] = True  # encode: prompts, tokens and pictures; the model runs in predict_encoded

    def encode(self, listings: Sequence[Listing], images: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        return encode_prompts(self.processor, listings, self.schema, self.template, [list(i)[: self.max_images] for i in images])

    def probabilities(self, enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logits = self.model(**{k: v.to(device) for k, v in enc.items()})
        probs = head_probabilities(self.model.specs, logits, self.model.temperature)
        if self.class_prior is not None:
            probs["category"] = self.class_prior.apply(probs["category"])
        return probs

    def predict_encoded(self, enc: dict[str, torch.Tensor], raw: bool = False) -> list[dict[str, Any]]:
        probs = self.probabilities(enc)  # (heads have no answer text: ``raw`` adds nothing)
        records = []
        for row in range(enc["input_ids"].shape[0]):
            records.append(self._record(row, probs))
        return records

    def _record(self, row: int, probs: dict[str, torch.Tensor]) -> dict[str, Any]:
        return prediction_record(self.model.specs, probs, row, self.schema, self.top_k, self.untrained)

    def embed_encoded(self, enc: dict[str, torch.Tensor], pooling: str = "last") -> np.ndarray:
        """Similar-product vectors: the pooled prompt state of the backbone (LoRA active)."""
        return prompt_vectors(self.model.backbone, enc, pooling)

    def predict(self, listings: Sequence[Listing], image_policy: ImagePolicy) -> list[dict[str, Any]]:
        return predict_in_batches(self, listings, image_policy)


@dataclass
class ClassifyCollator:
    """Listings -> the prompt (no answer, left padded as at prediction time) + head targets."""

    processor: Any
    schema: LabelSchema
    template: PromptTemplate
    image_policy: ImagePolicy
    max_images: int
    specs: list[HeadSpec]
    augment: Any = None

    def __call__(self, batch: Sequence[tuple[Listing, int]]) -> dict[str, torch.Tensor]:
        import random

        from mmllm.augment import augment_images, augment_listing

        listings, images = [], []
        for listing, seed in batch:
            rng = random.Random(seed)
            if self.augment is not None:
                listing = augment_listing(listing, self.augment, rng)
            pictures = load_listing_images(listing, self.image_policy, self.max_images)
            if self.augment is not None:
                pictures = augment_images(pictures, self.augment, rng)
            listings.append(listing)
            images.append(pictures)
        enc = encode_prompts(self.processor, listings, self.schema, self.template, images)
        return {**enc, **encode_targets(self.specs, [listing.label for listing in listings], self.schema)}
