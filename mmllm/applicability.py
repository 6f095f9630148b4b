"""Attribute applicability: the probability that a listing has a value for an attribute at all, from
its words.

Why: a listing's text states numbers and ages that are not the attribute a catalog records. "200
pieces 8mm Gold Plated Metal Jump Rings" states 200 pieces, and this catalog records no piece count
for jump rings; "LEGO City Police Station, 894 pieces" states one it would record. Whether a stated
value is the gold one depends on what kind of product it is, which the evidence alone (source,
pattern, form) cannot see. Product-information systems keep this as an attribute-applicability
table per category; a bag of words over the listing learns the same from the labelled rows, with no
category table to maintain and no model of any kind needed (so it serves every model kind).

How: per attribute, an L2-penalized logistic regression of "the gold has a value" over the TF-IDF of
the listing's words (title, description, seller table), fitted on the training rows. The grounding
layer's stage A reads it as one more feature of a stated value; its training rows get out-of-fold
probabilities (``folds`` fits, each blind to its fold), so the feature means on the training rows what
it will mean on new ones.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmllm.bag_of_words import TfidfConfig, Vectorizer, fit_logistic_regression, select_rows

APPLICABILITY_FILE = "applicability.json"
APPLICABILITY_WEIGHTS = "applicability.safetensors"


@dataclass
class Applicability:
    """Per attribute: the weights [V] and bias of "the listing has a value", over ``vectorizer``."""

    vectorizer: Vectorizer
    weights: dict[str, tuple[torch.Tensor, float]]
    c: dict[str, float] = field(default_factory=dict)  # the inverse L2 strength each attribute was fitted with

    def predict(self, listings: Sequence[Any]) -> dict[str, list[float]]:
        """Per attribute, the probability of each listing."""
        if not self.weights or not listings:
            return {name: [] for name in self.weights}
        x = self.vectorizer.matrix(listings)
        return {name: torch.sigmoid(torch.sparse.mm(x, w[:, None])[:, 0] + b).tolist()
                for name, (w, b) in self.weights.items()}

    def save(self, folder: str | Path) -> list[Path]:
        """``applicability.json`` (the vocabulary, idf and attribute names) and ``applicability.safetensors``
        (weights [attributes, vocabulary], bias [attributes]) in ``folder``."""
        names = list(self.weights)
        weights = (torch.stack([w.float() for w, _ in self.weights.values()]) if names
                   else torch.zeros(0, self.vectorizer.size))
        bias = torch.tensor([b for _, b in self.weights.values()], dtype=torch.float32)
        folder = Path(folder)
        save_file({"weight": weights.contiguous(), "bias": bias}, str(folder / APPLICABILITY_WEIGHTS))
        meta = {"format": 1, "attributes": names, "c": self.c, "vectorizer": self.vectorizer.to_dict()}
        (folder / APPLICABILITY_FILE).write_text(json.dumps(meta) + "\n", encoding="utf-8")
        return [folder / APPLICABILITY_FILE, folder / APPLICABILITY_WEIGHTS]

    @classmethod
    def load(cls, folder: str | Path) -> "Applicability":
        """What :meth:`save` wrote; a ValueError naming the file when it is missing or does not fit."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / APPLICABILITY_FILE).read_text(encoding="utf-8"))
            vectorizer = Vectorizer.from_dict(meta["vectorizer"])
            try:
                tensors = load_file(str(folder / APPLICABILITY_WEIGHTS))
            except SafetensorError as exc:  # a damaged weights file: named, not a bare header error
                raise ValueError(f"{folder / APPLICABILITY_WEIGHTS}: {exc}") from None
            weight, bias, names = tensors["weight"], tensors["bias"], list(meta["attributes"])
            if weight.shape != (len(names), vectorizer.size) or bias.shape != (len(names),):
                raise ValueError(f"weights {tuple(weight.shape)} do not fit {len(names)} attributes x "
                                 f"{vectorizer.size} n-grams")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{folder / APPLICABILITY_FILE}: not an applicability model: {exc}") from None
        return cls(vectorizer, {n: (weight[i], float(bias[i])) for i, n in enumerate(names)}, dict(meta.get("c", {})))


def _fold(row_id: str, folds: int) -> int:
    digest = hashlib.sha256(f"applicability:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def fit_applicability(listings: Sequence[Any], golds: Mapping[str, Sequence[bool]], cfg: TfidfConfig,
                      c: float | Sequence[float] = (3.0, 10.0, 30.0), folds: int = 5, min_rows: int = 5,
                      max_iter: int = 100) -> tuple[Applicability, dict[str, list[float]]]:
    """Fit on ``listings`` with ``golds[attribute][i]`` = row i has a gold value. Returns the model and,
    per attribute, each row's out-of-fold probability (from a fit on the other folds). With several ``c``
    (inverse L2 strength) each attribute takes the one with the lowest out-of-fold log-loss, and those
    out-of-fold probabilities. An attribute with fewer than ``min_rows`` rows on either side is left out."""
    candidates = [float(c)] if isinstance(c, (int, float)) else [float(v) for v in c]
    vectorizer = Vectorizer.fit(listings, cfg, chars=False)  # words: what kind of product it is
    x = vectorizer.matrix(listings)
    fold_of = [_fold(getattr(r, "id", str(i)), folds) for i, r in enumerate(listings)]
    weights: dict[str, tuple[torch.Tensor, float]] = {}
    out_of_fold: dict[str, list[float]] = {}
    chosen: dict[str, float] = {}
    for name, gold in golds.items():
        y = torch.tensor([int(bool(g)) for g in gold], dtype=torch.long)
        if min(int(y.sum()), len(y) - int(y.sum())) < min_rows:
            continue
        best = None
        for candidate in candidates:
            oof = _out_of_fold(x, y, fold_of, folds, candidate, max_iter)
            loss = _log_loss(oof, y.tolist())
            if best is None or loss < best[0] - 1e-9:
                best = (loss, candidate, oof)
        _, chosen[name], out_of_fold[name] = best
        weights[name] = _binary(x, y, chosen[name], max_iter)
    return Applicability(vectorizer, weights, chosen), out_of_fold


def _out_of_fold(x: torch.Tensor, y: torch.Tensor, fold_of: Sequence[int], folds: int, c: float,
                 max_iter: int) -> list[float]:
    oof = [0.0] * len(fold_of)
    for f in range(folds):
        held = [i for i, g in enumerate(fold_of) if g == f]
        kept = [i for i, g in enumerate(fold_of) if g != f]
        if not held:
            continue
        yk = y[kept]
        if not kept:  # every row in this fold (duplicate ids): the overall rate, never an empty mean
            p = [float(y.float().mean())] * len(held)
        elif int(yk.sum()) in (0, len(kept)):
            p = [float(yk.float().mean())] * len(held)  # one class in the other folds: its rate
        else:
            wf, bf = _binary(select_rows(x, kept), yk, c, max_iter)
            p = torch.sigmoid(torch.sparse.mm(select_rows(x, held), wf[:, None])[:, 0] + bf).tolist()
        for i, v in zip(held, p):
            oof[i] = v
    return oof


def _log_loss(p: Sequence[float], y: Sequence[int]) -> float:
    return -sum(math.log(min(max(q if t else 1.0 - q, 1e-6), 1.0)) for q, t in zip(p, y)) / max(len(y), 1)


def _binary(x: torch.Tensor, y: torch.Tensor, c: float, max_iter: int) -> tuple[torch.Tensor, float]:
    w, b = fit_logistic_regression(x, y, 2, c, max_iter)
    return w[:, 1] - w[:, 0], float(b[1] - b[0])
