"""Softmax / sigmoid heads over the label schema: what the classifier and the fusion model share.

Heads come from the label schema:

* category: softmax over the taxonomy paths;
* enum / boolean attributes: softmax over ``["<not stated>", *values]``; with ``null_class`` (the
  default) the ``<not stated>`` class is trained on the rows whose gold is null, so a head learns
  when the listing does not say and abstains instead of inventing a value;
* list attributes: one sigmoid per value;
* integer / number attributes: softmax over value bins learned from the training labels
  (every distinct value when there are few, else quantile bins, each predicting its median);
* string attributes have no head and are predicted as null;
* an attribute no training row stated (recorded with 0 rows in the model folder's
  ``trained_fields``) keeps its head, untrained, and is predicted as null.

Without ``null_class`` a gold value that is unknown (null) is masked out of its head's loss. Predictions are the same
records as the generative path's (``category``, ``attributes``, ``status``) plus calibrated
``confidence`` and the ``top_k`` categories; a temperature fitted on dev rows calibrates them.
Also here: the one pooling of token states over a padding mask (``pool``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Sequence

import numpy as np
import torch
from torch import nn

from mmllm.catalog import attributes_labelled
from mmllm.config import help_field
from mmllm.schema import LabelSchema

NOT_STATED = "<not stated>"
MAX_EXACT_BINS = 64


@dataclass
class HeadsConfig:
    """How heads are built and trained (the fusion recipe's ``heads:``; ``classify:`` extends it)."""

    section: ClassVar[str] = "heads"  # the YAML key, for the messages
    label_smoothing: float = help_field(0.0, "cross-entropy label smoothing; 0.05-0.1 against over-confidence")
    class_weights: Literal["none", "balanced"] = help_field("none", "balanced = inverse class frequency, for long tails")
    bins: int = help_field(32, "value bins for numeric attributes with many distinct values")
    null_class: bool = help_field(True, "train the '<not stated>' class on rows whose gold is null, so heads can "
                                        "abstain; false = mask unknown values out of the loss")

    def __post_init__(self) -> None:
        if self.bins < 1:
            raise ValueError(f"{self.section}.bins must be >= 1, got {self.bins}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"{self.section}.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class HeadSpec:
    name: str  # "category" or the attribute name
    kind: Literal["softmax", "sigmoid"]
    classes: list[str]  # labels of the outputs
    values: list[Any] = field(default_factory=list)  # numeric bins: the value each class predicts
    edges: list[float] = field(default_factory=list)  # numeric bins: upper edges (value <= edge)
    abstains: bool = False  # class 0 ("<not stated>") is trained on gold nulls


def head_specs(schema: LabelSchema, labels: Sequence[dict[str, Any]], bins: int = 32,
               null_class: bool = False) -> list[HeadSpec]:
    """Heads for every schema field; numeric bins come from the training labels. With ``null_class``
    the softmax attribute heads train their ``<not stated>`` class on gold nulls."""
    specs = [HeadSpec("category", "softmax", list(schema.categories))]
    for attr in schema.attributes:
        if attr.type in ("enum", "boolean"):
            values = list(attr.values) if attr.type == "enum" else [False, True]
            specs.append(HeadSpec(attr.name, "softmax", [NOT_STATED, *map(str, values)], values=[None, *values],
                                  abstains=null_class))
        elif attr.type == "list":
            specs.append(HeadSpec(attr.name, "sigmoid", list(attr.values)))
        elif attr.type in ("integer", "number"):
            seen = sorted({((label or {}).get("attributes") or {}).get(attr.name) for label in labels} - {None})
            representatives, edges = _bins(seen, bins, attr.type == "integer")
            specs.append(HeadSpec(attr.name, "softmax", [NOT_STATED, *map(str, representatives)],
                                  values=[None, *representatives], edges=edges, abstains=null_class))
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


def json_number(value: Any) -> Any:
    """``json.dumps(default=...)`` for head configs: the last bin edge is infinite, which JSON lacks."""
    if value == math.inf:
        return "inf"
    raise TypeError(type(value))


def hidden_size(backbone: Any) -> int:
    """The width of a backbone's hidden states (a VLM keeps it in its ``text_config``)."""
    config = backbone.config
    return getattr(config, "text_config", config).hidden_size


# ---------------------------------------------------------------------- pooling
def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, D] token states -> [B, D] over the positions where ``mask`` ([B, T], 0/1) is 1.

    ``last`` takes each row's last position with mask 1, whatever side the padding is on (T-1
    under left padding, length-1 under right padding); ``mean`` averages the masked positions.
    Padded positions are dropped with ``where``, never multiplied by the mask: their states may be
    NaN or inf under some attention kernels, and NaN * 0 is NaN. A row with no position pools to
    zeros. The result keeps ``hidden``'s dtype (the count is cast to it, as a mask of ones summed
    in that dtype would be).
    """
    keep = mask.bool()  # [B, T]
    if how == "mean":
        summed = torch.where(keep.unsqueeze(-1), hidden, 0.0).sum(dim=1)  # [B, D]
        return summed / keep.sum(dim=1, keepdim=True).to(hidden.dtype).clamp(min=1.0)
    if how != "last":
        raise ValueError(f"pooling must be 'last' or 'mean', got {how!r}")
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)  # [B, T]
    last = torch.where(keep, positions, 0).amax(dim=1)  # [B]: index of the last 1 in each row
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, D]
    return torch.where(keep.any(dim=1, keepdim=True), picked, 0.0)


# ---------------------------------------------------------------------- targets and loss
def decoder(model: Any) -> Any:
    """The vision-language decoder under the LM head (through a PEFT wrapper: LoRA stays active,
    it lives inside the wrapped modules). Its ``last_hidden_state`` is what the heads read."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PeftModel or plain
    return inner.base_model  # transformers: the module named by base_model_prefix ("model" for Qwen-VL)


@torch.inference_mode()
def prompt_vectors(model: Any, enc: Mapping[str, torch.Tensor], pooling: str = "last") -> np.ndarray:
    """One encoded batch -> [B, D] L2-normalized float32 vectors of the pooled prompt state.

    The decoder's ``last_hidden_state`` is what ``output_hidden_states=True`` gives as
    ``hidden_states[-1]`` (final norm applied) without keeping every layer's states or computing
    [B, T, vocab] logits (gigabytes for a real vocabulary).
    """
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    hidden = decoder(model)(**enc, use_cache=False).last_hidden_state  # [B, T, H]; no cache: nothing is generated
    pooled = torch.nn.functional.normalize(pool(hidden.float(), enc["attention_mask"], pooling), dim=-1)
    return pooled.cpu().numpy().astype(np.float32, copy=False)


def count_rows(batch: dict[str, torch.Tensor]) -> int:
    """What the heads' loss averages over: rows (every batch of either head model has an attention mask)."""
    return int(batch["attention_mask"].shape[0])


def encode_targets(specs: list[HeadSpec], labels: Sequence[dict[str, Any] | None], schema: LabelSchema) -> dict[str, torch.Tensor]:
    """Per-head targets: class index (-100 = unknown, masked) or a multi-hot row plus a mask. A label
    for the category only (:func:`~mmllm.catalog.attributes_labelled`) masks every attribute head."""
    out: dict[str, torch.Tensor] = {}
    normalized = [schema.validate(label, require_category=False).value if label else None for label in labels]
    labelled = [attributes_labelled(label) for label in labels]
    for spec in specs:
        if spec.kind == "sigmoid":
            hot = torch.zeros(len(labels), len(spec.classes))
            mask = torch.zeros(len(labels))
            for row, label in enumerate(normalized):
                if not labelled[row]:
                    continue
                value = (label or {}).get("attributes", {}).get(spec.name)
                if value is not None:
                    mask[row] = 1.0
                    for item in value:
                        hot[row, spec.classes.index(item)] = 1.0
            out[f"target_{spec.name}"], out[f"mask_{spec.name}"] = hot, mask
            continue
        index = torch.full((len(labels),), -100, dtype=torch.long)
        for row, label in enumerate(normalized):
            if label is None or (spec.name != "category" and not labelled[row]):
                continue
            value = label["category"] if spec.name == "category" else label["attributes"].get(spec.name)
            if value is None:
                if spec.abstains:
                    index[row] = 0  # the source never said: "<not stated>" is the answer to learn
                continue  # else unknown: masked out of the loss
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
    return _fitted_temperature(lambda t: nn.functional.cross_entropy(logits / t, target), steps)


def fit_answer_temperature(logits: torch.Tensor, answers: torch.Tensor, target: torch.Tensor, steps: int = 100) -> float:
    """The temperature under which each row's probability of ``answers`` (chosen elsewhere: not always the
    argmax of ``logits``) best predicts whether that answer is right: the binary log-loss of
    ``softmax(logits / T)[answer]`` against ``answer == target`` on dev. ``fit_temperature`` calibrates a
    distribution for its own argmax; this calibrates a second opinion on another model's answer
    (:meth:`mmllm.models.fusion.anchor.Anchor.check`). 1.0 when there is nothing to fit."""
    keep = target >= 0
    if keep.sum() < 2:
        return 1.0
    logits, answers = logits[keep].detach().float(), answers[keep]
    right = (answers == target[keep]).float()

    def loss(t: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits / t, -1).gather(1, answers[:, None])[:, 0].clamp(1e-6, 1 - 1e-6)
        return nn.functional.binary_cross_entropy(p, right)

    return _fitted_temperature(loss, steps)


def _fitted_temperature(loss: Callable[[torch.Tensor], torch.Tensor], steps: int) -> float:
    """The temperature T minimizing ``loss(T)``, by L-BFGS on log T from T = 1, clamped to [0.05, 20]."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss(log_t.exp())
        value.backward()
        return value

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, bins: int = 10) -> float:
    keep = target >= 0
    confidence, predicted = probs[keep].max(dim=-1)
    return answer_calibration_error(confidence, predicted == target[keep], bins)


def answer_calibration_error(confidence: torch.Tensor, right: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error of confidences [N] against whether each answer was right [N]."""
    hits = right.float()
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
    confidence: dict[str, float] = {}  # the head's probability of the answer it gives
    alternatives: dict[str, list[dict[str, Any]]] = {}  # enum / boolean heads: their top-k values (null = not stated)
    applies: dict[str, float] = {}  # heads trained on gold nulls: the probability that the listing has a value at all
    category_spec = specs[0]
    p = probs["category"][row]
    top = torch.topk(p, min(top_k, p.numel()))
    for spec in specs[1:]:
        if spec.name not in probs or spec.name in untrained:
            continue
        q = probs[spec.name][row]
        if spec.kind == "sigmoid":  # the most probable values above 0.5, as many as the schema allows
            ranked = sorted(zip(q.tolist(), spec.classes), reverse=True)
            chosen = [(v, c) for v, c in ranked if v > 0.5][: schema.attribute(spec.name).max_items]
            attributes[spec.name] = [c for _, c in chosen] or None
            if chosen:
                confidence[spec.name] = round(float(min(v for v, _ in chosen)), 6)
        else:
            attributes[spec.name] = spec.values[int(q.argmax())]
            confidence[spec.name] = round(float(q.max()), 6)
            if spec.abstains and spec.values and spec.values[0] is None:
                applies[spec.name] = round(float(1.0 - q[0]), 6)
            if schema.attribute(spec.name).type in ("enum", "boolean"):  # the alternatives, for a reviewer
                ranked = torch.topk(q, min(top_k, q.numel()))
                alternatives[spec.name] = [{"value": spec.values[int(i)], "score": round(float(v), 6)}
                                           for v, i in zip(ranked.values, ranked.indices)]
    answer = {"category": category_spec.classes[int(top.indices[0])], "attributes": attributes}
    result = schema.validate(answer)
    record = {**(result.value or answer), "status": "ok" if result.ok else "invalid",
              "confidence": round(float(top.values[0]), 6), "attribute_confidence": confidence,
              "top_k": [{"category": category_spec.classes[int(i)], "score": round(float(v), 6)}
                        for v, i in zip(top.values, top.indices)]}
    if alternatives:
        record["attribute_top_k"] = alternatives
    if applies:
        record["attribute_applies"] = applies
    if not result.ok:
        record["error"] = result.reason()
    if untrained:
        record["untrained"] = list(untrained)
    return record


def mark_untrained(record: dict[str, Any], untrained: Sequence[str]) -> dict[str, Any]:
    """Null the attributes no training row stated and say so (``untrained``), so a reviewer sees why."""
    if not untrained:
        return record
    attributes = record.get("attributes") or {}
    record["attributes"] = {k: None if k in untrained else v for k, v in attributes.items()}
    record["untrained"] = list(untrained)
    return record
