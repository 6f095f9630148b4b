"""The classification-head variant: VLM backbone + softmax heads, trained with cross-entropy.

p(y | x) = softmax(W f(x) + b), where f(x) pools the backbone's last hidden state over the
same listing prompt the generative path reads (no answer). Heads come from the label schema:

* category: softmax over the taxonomy paths;
* enum / boolean attributes: softmax over ``["<not stated>", *values]``;
* list attributes: one sigmoid per value;
* integer / number attributes: softmax over value bins learned from the training labels
  (every distinct value when there are few, else quantile bins, each predicting its median);
* string attributes have no head and are predicted as null;
* an attribute no training row stated (recorded with 0 rows in the model folder's
  ``trained_fields``) keeps its head, untrained, and is predicted as null.

A gold value that is unknown (null) is masked out of its head's loss. Predictions are the same
records as the generative path's (``category``, ``attributes``, ``status``) plus calibrated
``confidence`` and the ``top_k`` categories; a temperature fitted on dev rows calibrates them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmllm.catalog import Listing
from mmllm.collator import encode_prompts, load_listing_images
from mmllm.config import help_field
from mmllm.images import ImagePolicy
from mmllm.prompts import PromptTemplate
from mmllm.schema import LabelSchema

NOT_STATED = "<not stated>"
HEADS_FILE = "heads.safetensors"
HEADS_CONFIG = "heads.json"
MAX_EXACT_BINS = 64


@dataclass
class ClassifyConfig:
    """The classification heads (used when ``task: classify``)."""

    pooling: Literal["last", "mean"] = help_field("last", "last non-padding token, or the masked mean over the prompt")
    label_smoothing: float = help_field(0.0, "cross-entropy label smoothing; 0.05-0.1 against over-confidence")
    class_weights: Literal["none", "balanced"] = help_field("none", "balanced = inverse class frequency, for long tails")
    bins: int = help_field(32, "value bins for numeric attributes with many distinct values")
    top_k: int = help_field(5, "categories listed in each prediction's top_k")

    def __post_init__(self) -> None:
        for name in ("bins", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"classify.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"classify.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class HeadSpec:
    name: str  # "category" or the attribute name
    kind: Literal["softmax", "sigmoid"]
    classes: list[str]  # labels of the outputs
    values: list[Any] = field(default_factory=list)  # numeric bins: the value each class predicts
    edges: list[float] = field(default_factory=list)  # numeric bins: upper edges (value <= edge)


def head_specs(schema: LabelSchema, labels: Sequence[dict[str, Any]], bins: int = 32) -> list[HeadSpec]:
    """Heads for every schema field; numeric bins come from the training labels."""
    specs = [HeadSpec("category", "softmax", list(schema.categories))]
    for attr in schema.attributes:
        if attr.type in ("enum", "boolean"):
            values = list(attr.values) if attr.type == "enum" else [False, True]
            specs.append(HeadSpec(attr.name, "softmax", [NOT_STATED, *map(str, values)], values=[None, *values]))
        elif attr.type == "list":
            specs.append(HeadSpec(attr.name, "sigmoid", list(attr.values)))
        elif attr.type in ("integer", "number"):
            seen = sorted({((label or {}).get("attributes") or {}).get(attr.name) for label in labels} - {None})
            representatives, edges = _bins(seen, bins, attr.type == "integer")
            specs.append(HeadSpec(attr.name, "softmax", [NOT_STATED, *map(str, representatives)],
                                  values=[None, *representatives], edges=edges))
    return specs


def _bins(seen: list[float], bins: int, integer: bool) -> tuple[list[float], list[float]]:
    if not seen:
        return [], []
    if len(seen) <= MAX_EXACT_BINS:
        edges = [(a + b) / 2 for a, b in zip(seen, seen[1:])] + [math.inf]
        return seen, edges
    groups = [seen[round(i * len(seen) / bins):round((i + 1) * len(seen) / bins)] for i in range(bins)]
    groups = [g for g in groups if g]
    representatives = [g[len(g) // 2] for g in groups]
    if integer:
        representatives = [int(round(v)) for v in representatives]
    edges = [g[-1] for g in groups[:-1]] + [math.inf]
    return representatives, edges


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, H] -> [B, H]; the last non-padding token whatever side the padding is on."""
    if how == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [B, T]
    last = (positions * mask.long()).argmax(dim=1)  # [B]: index of the last 1 in each row
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class ListingClassifier(nn.Module):
    """A (PEFT-wrapped) VLM backbone with one linear head per schema field."""

    def __init__(self, backbone: Any, hidden_size: int, specs: list[HeadSpec], pooling: str = "last") -> None:
        super().__init__()
        self.backbone = backbone
        self.specs = specs
        self.pooling = pooling
        self.heads = nn.ModuleDict({s.name: nn.Linear(hidden_size, len(s.classes)) for s in specs if s.classes})
        self.temperature = 1.0

    def _inner(self) -> Any:
        """The decoder without its LM head: hidden states are all the heads need."""
        model = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        return model.model

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs = {k: v for k, v in inputs.items() if not k.startswith(("target_", "mask_"))}
        hidden = self._inner()(**inputs).last_hidden_state  # [B, T, H]
        pooled = pool(hidden, inputs["attention_mask"], self.pooling).float()  # [B, H]
        return {name: head(pooled) for name, head in self.heads.items()}

    def save_heads(self, folder: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}, str(folder / HEADS_FILE))
        config = {"pooling": self.pooling, "temperature": self.temperature,
                  "heads": [s.__dict__ for s in self.specs]}
        (folder / HEADS_CONFIG).write_text(json.dumps(config, indent=2, default=_json_number))

    @classmethod
    def load(cls, backbone: Any, folder: Path) -> "ListingClassifier":
        config = json.loads((folder / HEADS_CONFIG).read_text())
        specs = [HeadSpec(**{**h, "edges": [float(e) for e in h["edges"]]}) for h in config["heads"]]
        hidden = _hidden_size(backbone)
        model = cls(backbone, hidden, specs, config["pooling"])
        model.heads.load_state_dict(load_file(str(folder / HEADS_FILE)))
        model.temperature = float(config["temperature"])
        return model


def _json_number(value: Any) -> Any:
    if value == math.inf:
        return "inf"
    raise TypeError(type(value))


def _hidden_size(backbone: Any) -> int:
    config = backbone.config
    return getattr(config, "text_config", config).hidden_size


# ---------------------------------------------------------------------- targets and loss
def encode_targets(specs: list[HeadSpec], labels: Sequence[dict[str, Any] | None], schema: LabelSchema) -> dict[str, torch.Tensor]:
    """Per-head targets: class index (-100 = unknown, masked) or a multi-hot row plus a mask."""
    out: dict[str, torch.Tensor] = {}
    normalized = [schema.validate(label, require_category=False).value if label else None for label in labels]
    for spec in specs:
        if spec.kind == "sigmoid":
            hot = torch.zeros(len(labels), len(spec.classes))
            mask = torch.zeros(len(labels))
            for row, label in enumerate(normalized):
                value = (label or {}).get("attributes", {}).get(spec.name)
                if value is not None:
                    mask[row] = 1.0
                    for item in value:
                        hot[row, spec.classes.index(item)] = 1.0
            out[f"target_{spec.name}"], out[f"mask_{spec.name}"] = hot, mask
            continue
        index = torch.full((len(labels),), -100, dtype=torch.long)
        for row, label in enumerate(normalized):
            if label is None:
                continue
            value = label["category"] if spec.name == "category" else label["attributes"].get(spec.name)
            if value is None:
                continue  # unknown: masked out of the loss
            index[row] = _class_of(spec, value)
        out[f"target_{spec.name}"] = index
    return out


def _class_of(spec: HeadSpec, value: Any) -> int:
    if spec.name == "category":
        return spec.classes.index(value)
    if spec.edges:  # numeric bins
        for i, edge in enumerate(spec.edges):
            if value <= edge:
                return i + 1
        return len(spec.edges)
    return spec.values.index(value)


def classification_loss(logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], specs: list[HeadSpec],
                        label_smoothing: float = 0.0, class_weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Summed over heads and rows (the loop divides by the row count); unknown targets add nothing."""
    total = torch.zeros((), device=next(iter(logits.values())).device)
    for spec in specs:
        if spec.name not in logits:
            continue
        target = batch[f"target_{spec.name}"].to(total.device)
        if spec.kind == "sigmoid":
            mask = batch[f"mask_{spec.name}"].to(total.device)  # [B]
            per_row = nn.functional.binary_cross_entropy_with_logits(logits[spec.name], target, reduction="none").sum(-1)
            total = total + (per_row * mask).sum()
            continue
        weight = (class_weights or {}).get(spec.name)
        total = total + nn.functional.cross_entropy(
            logits[spec.name], target, weight=None if weight is None else weight.to(total.device),
            ignore_index=-100, reduction="sum", label_smoothing=label_smoothing)
    return total


def balanced_weights(specs: list[HeadSpec], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse-frequency class weights (mean 1 over seen classes) for the softmax heads."""
    weights = {}
    for spec in specs:
        if spec.kind != "softmax":
            continue
        t = targets[f"target_{spec.name}"]
        counts = torch.bincount(t[t >= 0], minlength=len(spec.classes)).float()
        w = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), torch.ones_like(counts))
        weights[spec.name] = w
    return weights


# ---------------------------------------------------------------------- calibration
def fit_temperature(logits: torch.Tensor, target: torch.Tensor, steps: int = 100) -> float:
    """The temperature minimizing dev NLL (Guo et al. 2017); 1.0 when there is nothing to fit."""
    keep = target >= 0
    if keep.sum() < 2:
        return 1.0
    logits, target = logits[keep].detach().float(), target[keep]
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, bins: int = 10) -> float:
    keep = target >= 0
    confidence, predicted = probs[keep].max(dim=-1)
    hits = (predicted == target[keep]).float()
    ece = 0.0
    edges = torch.linspace(0, 1, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.float().mean().item() * abs(hits[in_bin].mean().item() - confidence[in_bin].mean().item())
    return ece


# ---------------------------------------------------------------------- prediction
def head_probabilities(specs: list[HeadSpec], logits: dict[str, torch.Tensor], temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Logits -> probabilities per head; the temperature calibrates the category head only."""
    out = {}
    for spec in specs:
        if spec.name not in logits:
            continue
        scale = temperature if spec.name == "category" else 1.0
        x = logits[spec.name].float().cpu() / scale
        out[spec.name] = torch.sigmoid(x) if spec.kind == "sigmoid" else torch.softmax(x, dim=-1)
    return out


def prediction_record(specs: list[HeadSpec], probs: dict[str, torch.Tensor], row: int, schema: LabelSchema,
                      top_k: int = 5, untrained: Sequence[str] = ()) -> dict[str, Any]:
    """One row of head probabilities -> the prediction record (validated, with confidence and top_k).

    Heads in ``untrained`` never saw a labelled row: their attributes are null, listed in ``untrained``."""
    attributes: dict[str, Any] = {a.name: None for a in schema.attributes}
    category_spec = specs[0]
    p = probs["category"][row]
    top = torch.topk(p, min(top_k, p.numel()))
    for spec in specs[1:]:
        if spec.name not in probs or spec.name in untrained:
            continue
        q = probs[spec.name][row]
        if spec.kind == "sigmoid":  # the most probable values above 0.5, as many as the schema allows
            ranked = sorted(zip(q.tolist(), spec.classes), reverse=True)
            chosen = [c for v, c in ranked if v > 0.5][: schema.attribute(spec.name).max_items]
            attributes[spec.name] = chosen or None
        else:
            attributes[spec.name] = spec.values[int(q.argmax())]
    answer = {"category": category_spec.classes[int(top.indices[0])], "attributes": attributes}
    result = schema.validate(answer)
    record = {**(result.value or answer), "status": "ok" if result.ok else "invalid",
              "confidence": round(float(top.values[0]), 6),
              "top_k": [{"category": category_spec.classes[int(i)], "score": round(float(v), 6)}
                        for v, i in zip(top.values, top.indices)]}
    if not result.ok:
        record["error"] = result.reason()
    if untrained:
        record["untrained"] = list(untrained)
    return record


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

    def encode(self, listings: Sequence[Listing], images: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        return encode_prompts(self.processor, listings, self.schema, self.template, [list(i)[: self.max_images] for i in images])

    def probabilities(self, enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logits = self.model(**{k: v.to(device) for k, v in enc.items()})
        return head_probabilities(self.model.specs, logits, self.model.temperature)

    def predict_encoded(self, enc: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        probs = self.probabilities(enc)
        records = []
        for row in range(enc["input_ids"].shape[0]):
            records.append(self._record(row, probs))
        return records

    def _record(self, row: int, probs: dict[str, torch.Tensor]) -> dict[str, Any]:
        return prediction_record(self.model.specs, probs, row, self.schema, self.top_k, self.untrained)

    def predict(self, listings: Sequence[Listing], image_policy: ImagePolicy) -> list[dict[str, Any]]:
        return predict_in_batches(self, listings, image_policy)


def predict_in_batches(predictor: Any, listings: Sequence[Listing], image_policy: ImagePolicy) -> list[dict[str, Any]]:
    """``encode`` + ``predict_encoded`` over ``batch_size`` chunks: one record (with its id) per listing."""
    records = []
    for start in range(0, len(listings), predictor.batch_size):
        chunk = listings[start:start + predictor.batch_size]
        images = [load_listing_images(listing, image_policy, predictor.max_images) if predictor.max_images else []
                  for listing in chunk]
        for listing, record in zip(chunk, predictor.predict_encoded(predictor.encode(chunk, images))):
            records.append({"id": listing.id, **record})
    return records


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


def count_rows(batch: dict[str, torch.Tensor]) -> int:
    """What the classification loss averages over: rows."""
    return int(batch["input_ids"].shape[0])
