"""The lexical member: a convex bag-of-words model beside the fusion heads, one per softmax head.

Why: on catalogs where the answer is a word of the listing (a brand in the title, a size, a named
product line), TF-IDF + logistic regression is a strong, stable baseline, and the fusion heads, which read
the words through a small jointly trained hashed bag, do not always match it (benchmarks/RESULTS.md: the
other-schema catalog). So the recipe fits that model itself and lets it vote:

* :class:`~mmllm.bag_of_words.Vectorizer`: TF-IDF over word uni/bigrams and within-word character 3-5
  grams of the title, the description (its first ``max_chars``) and the seller table, vocabulary from the
  training rows (n-grams in ``min_df`` rows or more), sublinear term frequency, smooth idf, each block
  L2-normalized;
* :func:`fit_lexicon`: multinomial logistic regression per softmax head (category, enum, boolean,
  numeric bins; with the heads' own classes, ``<not stated>`` included), L2-penalized as scikit-learn's
  ``C`` (loss = mean cross-entropy + ||W||^2 / (2 C N)), trained to convergence by full-batch L-BFGS;
  with several ``C`` candidates one is chosen per head by k-fold cross-validation on the training rows
  (log-loss), never on dev; a head that abstains (``<not stated>`` trained on gold nulls) is a hurdle
  model (``hurdle: true``): "is a value stated" on every row, "which value" on the rows that state one,
  as a bag of words trained on the labelled values would learn it;
* ``loss: squared_hinge`` (``fusion_minilm_cpu.yaml``'s; the field's default is ``logistic``): each
  regression but a hurdle's gate is a one-vs-rest L2-SVM (:func:`~mmllm.bag_of_words.fit_linear_svm`), its
  margins made a softmax by a temperature fitted on ``folds`` out-of-fold fits and folded into the weights;
  the category 1.6 and 2.5 points higher on two catalogs (benchmarks/RESULTS.md, "The lexical member as an
  L2-SVM"); the fits of few rows run in the rows' span (``bag_of_words._minimize``), ~8 s for 691 rows;
* :class:`Lexicon`: the weights as buffers, saved with the fusion weights (the vocabulary in
  ``lexicon.json``). At prediction (``FusionModel.forward`` in eval mode) each head's distribution is
  the mean of its own softmax and this model's (for the category, one more member of the anchor's vote).

A head whose weight matrix would exceed ``max_parameters`` (a taxonomy of thousands of categories over a
large vocabulary) is left out, and the recipe says so.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmllm.bag_of_words import (Vectorizer, fit_linear_svm, fit_logistic_regression, fit_temperature, listing_text,
                                 row_gram, select_rows)
from mmllm.catalog import Listing
from mmllm.config import help_field
from mmllm.models.fusion.encoders import publish_folder

LEXICON_FILE = "lexicon.json"


@dataclass
class LexiconConfig:
    """The fusion recipe's ``lexicon:`` section: the convex bag-of-words member."""

    enabled: bool = help_field(False, "fit TF-IDF + logistic regression per softmax head and let it vote beside "
                                      "the heads (mean of the distributions) at prediction")
    c: list[float] = help_field(default_factory=lambda: [10.0],
                                help="inverse L2 strength (scikit-learn's C); several = chosen per head by k-fold "
                                     "cross-validation on the training rows")
    folds: int = help_field(3, "folds of that cross-validation")
    max_iter: int = help_field(100, "L-BFGS iterations per fit")
    max_chars: int = help_field(600, "characters of the description read")
    min_df: int = help_field(2, "rows an n-gram must occur in to enter the vocabulary")
    max_features: int = help_field(200_000, "largest vocabulary (the most frequent n-grams)")
    max_parameters: int = help_field(50_000_000, "largest weight matrix of one head (vocabulary x classes)")
    category: bool = help_field(True, "fit the category's regression too; false = the attribute heads only (on a large "
                                      "catalog the category's is the costly one: 8,861 rows x 142 classes took 47 s, "
                                      "for 1.3 points of accuracy and a worse confidence order, benchmarks/RESULTS.md)")
    hurdle: bool = help_field(True, "a head that abstains (<not stated> trained on gold nulls) gets two regressions: "
                                    "whether a value is stated (every row), which value (the rows that state one)")
    loss: str = help_field("logistic", "logistic = multinomial logistic regression; squared_hinge = one-vs-rest L2-SVM "
                                       "(LinearSVC's loss), its margins made probabilities by a temperature fitted on "
                                       "k-fold out-of-fold scores (lexicon.folds more fits per head); a hurdle's "
                                       "whether-stated gate stays logistic")

    def __post_init__(self) -> None:
        if not self.c or any(c <= 0 for c in self.c):
            raise ValueError(f"lexicon.c must be one or more numbers > 0, got {self.c}")
        for name in ("folds", "max_iter", "max_chars", "min_df", "max_features", "max_parameters"):
            if getattr(self, name) < 1:
                raise ValueError(f"lexicon.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.c) > 1 and self.folds < 2:
            raise ValueError("lexicon.folds must be >= 2 to choose among several lexicon.c")
        if self.loss not in ("logistic", "squared_hinge"):
            raise ValueError(f"lexicon.loss must be logistic or squared_hinge, got {self.loss!r}")
        if self.loss == "squared_hinge" and self.folds < 2:
            raise ValueError("lexicon.folds must be >= 2 with lexicon.loss: squared_hinge (its temperature is "
                             "fitted on out-of-fold scores)")


def _part(gram: torch.Tensor | None, rows: list[int]) -> torch.Tensor | None:
    """The rows' and columns' ``rows`` of X X^T (None stays None)."""
    if gram is None:
        return None
    index = torch.tensor(rows, dtype=torch.long)
    return gram.index_select(0, index).index_select(1, index)


def _choose_and_fit(xs: torch.Tensor, ys: torch.Tensor, classes: int, cfg: LexiconConfig, seed: int,
                    loss: str = "logistic", settled: tuple[float, float] | None = None,
                    gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """One regression, its ``C`` chosen by k-fold cross-validated log-loss when there are several. With
    ``loss="squared_hinge"`` the k-fold scores are always made (each fold's margins on the rows it did not
    train on), the temperature that makes them the best softmax is fitted on them (per ``C``: the log-loss
    compared is at each one's own temperature), and the final weights and bias come divided by it, so
    their softmax is the calibrated distribution. ``settled`` = (C, temperature) found before (a fit on more
    rows of the same catalog): no cross-validation. ``gram``: X X^T of these rows (``row_gram``), or None.
    Returns (W, b, C, temperature)."""
    svm = loss == "squared_hinge"
    fit = fit_linear_svm if svm else fit_logistic_regression
    c, temperature = settled if settled is not None else (cfg.c[0], 1.0)
    if settled is None and (len(cfg.c) > 1 or svm):
        order = list(range(ys.shape[0]))
        random.Random(seed).shuffle(order)
        folds = [part for part in (order[f::cfg.folds] for f in range(cfg.folds)) if part]
        losses, temperatures = {}, {}
        for candidate in cfg.c:
            scores = torch.zeros(ys.shape[0], classes)
            for f, held in enumerate(folds):
                fit_on = [i for g, part in enumerate(folds) if g != f for i in part]
                if not fit_on:  # one row: no fold to learn from
                    continue
                w, b = fit(select_rows(xs, fit_on), ys[fit_on], classes, candidate, cfg.max_iter,
                           _part(gram, fit_on))
                scores[held] = torch.sparse.mm(select_rows(xs, held), w) + b
            temperatures[candidate] = fit_temperature(scores, ys) if svm else 1.0
            losses[candidate] = float(nn.functional.cross_entropy(scores / temperatures[candidate], ys))
        c = min(losses, key=losses.get)
        temperature = temperatures[c]
    w, b = fit(xs, ys, classes, c, cfg.max_iter, gram)
    return w / temperature, b / temperature, c, temperature


def fit_lexicon(x: torch.Tensor, targets: dict[str, torch.Tensor], heads: Sequence[tuple[str, int]],
                cfg: LexiconConfig, seed: int, say: Any = print, abstaining: Collection[str] = (),
                settled: dict[str, tuple[float, float]] | None = None) -> tuple["Lexicon", dict[str, float]]:
    """One regression per (head name, classes) over ``x`` [N, V] with ``targets[f"target_{name}"]``
    (-100 = no target), logistic or, with ``cfg.loss: squared_hinge``, the calibrated SVM; returns the module
    and the ``C`` chosen per head.

    A head named in ``abstaining`` (class 0 = "<not stated>", the target of a gold null) is, with
    ``cfg.hurdle``, a hurdle model: a binary regression of "stated or not" on every row and a regression
    over the values on the rows that state one, so which value it is is learned as the bag of words
    learns it, not against the 70% of rows (a catalog's brands) that state none. Its column 0 holds the
    log-odds of "not stated", the others the values' logits (``Lexicon.forward`` joins them).

    ``settled``: a head's (C, temperature) from an earlier fit (``Lexicon.settled`` of the fit on all the
    training rows): the vote's side fit on a part of them refits the weights without choosing again."""
    chosen: dict[str, float] = {}
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hurdle = []
    found: dict[str, tuple[float, float]] = {}
    # X X^T once for every head and fold, where the widest head's fit runs in the rows' span
    # (bag_of_words._minimize); otherwise a fit of fewer rows that does computes its own
    gram = row_gram(x, max((classes for _, classes in heads), default=0), cfg.max_iter)
    for name, classes in heads:
        y = targets[f"target_{name}"]
        keep = [i for i, t in enumerate(y.tolist()) if t >= 0]
        if len({int(y[i]) for i in keep}) < 2:
            continue  # one class or none: nothing to weigh against the heads
        if x.shape[1] * classes > cfg.max_parameters:
            say(f"lexicon: {name} left out ({x.shape[1]:,} n-grams x {classes:,} classes > lexicon.max_parameters)")
            continue
        xs, ys, gs = select_rows(x, keep), y[keep], _part(gram, keep)
        stated = [i for i, t in enumerate(ys.tolist()) if t > 0]
        if (cfg.hurdle and name in abstaining and 0 < len(stated) < len(keep)
                and len({int(ys[i]) for i in stated}) >= 2):
            gate_w, gate_b, _, _ = _choose_and_fit(xs, (ys > 0).long(), 2, cfg, seed, gram=gs)
            value_w, value_b, c, t = _choose_and_fit(select_rows(xs, stated), ys[stated] - 1, classes - 1, cfg,
                                                     seed, cfg.loss, (settled or {}).get(name), _part(gs, stated))
            weights[name] = (torch.cat([gate_w[:, :1] - gate_w[:, 1:], value_w], 1),
                             torch.cat([gate_b[:1] - gate_b[1:], value_b]))
            hurdle.append(name)
        else:
            w, b, c, t = _choose_and_fit(xs, ys, classes, cfg, seed, cfg.loss, (settled or {}).get(name), gs)
            weights[name] = (w, b)
        chosen[name] = c
        found[name] = (c, t)
    lexicon = Lexicon({n: (w.shape[0], w.shape[1]) for n, (w, _) in weights.items()}, hurdle=hurdle)
    for name, (w, b) in weights.items():
        getattr(lexicon, f"weight_{name}").copy_(w)
        getattr(lexicon, f"bias_{name}").copy_(b)
    lexicon.settled = found
    return lexicon, chosen


class Lexicon(nn.Module):
    """The fitted regressions as buffers: ``forward(ids, weights)`` -> logits per head (a ``hurdle``
    head's are log-probabilities: column 0 the log-odds of "not stated", the rest the values' logits)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], hurdle: Sequence[str] = ()) -> None:
        super().__init__()
        self.names = list(shapes)
        self.hurdle = [n for n in hurdle if n in shapes]
        # per head (C, temperature) of the fit (the weights hold the temperature already): what a refit on
        # a part of the rows reuses (fit_lexicon's settled)
        self.settled: dict[str, tuple[float, float]] = {}
        for name, (size, classes) in shapes.items():
            self.register_buffer(f"weight_{name}", torch.zeros(size, classes))
            self.register_buffer(f"bias_{name}", torch.zeros(classes))

    def shapes(self) -> dict[str, list[int]]:
        return {n: list(getattr(self, f"weight_{n}").shape) for n in self.names}

    def forward(self, ids: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.names:
            table = getattr(self, f"weight_{name}")
            bag = nn.functional.embedding_bag(ids, table, per_sample_weights=weights.to(table.dtype), mode="sum")
            z = bag + getattr(self, f"bias_{name}")
            if name in self.hurdle:  # P(not stated), then P(stated) x P(value | stated)
                gate = z[:, :1]
                z = torch.cat([nn.functional.logsigmoid(gate),
                               nn.functional.logsigmoid(-gate) + torch.log_softmax(z[:, 1:], -1)], -1)
            out[name] = z
        return out


# ---------------------------------------------------------------------- the shared cache
def lexicon_store(folder: Path | None, listings: Sequence[Listing], targets: dict[str, torch.Tensor],
                  heads: Sequence[tuple[str, int]], cfg: LexiconConfig, seed: int,
                  abstaining: Collection[str] = ()) -> Path | None:
    """Where a fit is kept in a shared cache folder: ``lexicon/<hash>`` of the rows' texts, the targets,
    the heads, the settings and the seed. None without a folder."""
    if folder is None:
        return None
    h = hashlib.sha256()
    h.update(json.dumps({"settings": {k: getattr(cfg, k) for k in ("c", "folds", "max_iter", "max_chars", "min_df",
                                                                     "max_features", "max_parameters", "hurdle", "loss")},
                         "abstaining": sorted(abstaining), "seed": seed, "heads": [list(x) for x in heads],
                         # 2: fits of few rows run in the rows' span (bag_of_words._minimize), float64
                         "fit": 2,
                         "torch": torch.__version__.split("+")[0]},
                        sort_keys=True).encode())
    for listing in listings:
        h.update(listing_text(listing, cfg.max_chars).encode())
        h.update(b"\x00")
    for name, _ in heads:
        h.update(json.dumps(targets[f"target_{name}"].tolist()).encode())
    return Path(folder) / "lexicon" / h.hexdigest()[:24]


def save_lexicon(store: Path, lexicon: "Lexicon", vectorizer: Vectorizer, chosen: dict[str, float]) -> None:
    """Write a fit (safetensors + JSON), whole or not at all (two runs at once on one cache: one kept)."""
    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in lexicon.state_dict().items()}, str(folder / "weights.safetensors"))
        (folder / LEXICON_FILE).write_text(json.dumps(vectorizer.to_dict(), ensure_ascii=False), encoding="utf-8")
        (folder / "chosen.json").write_text(json.dumps({"chosen": chosen, "shapes": lexicon.shapes(),
                                                        "hurdle": lexicon.hurdle,
                                                        "settled": lexicon.settled}), encoding="utf-8")

    publish_folder(store, write)


def load_lexicon(store: Path) -> tuple["Lexicon", Vectorizer, dict[str, float]]:
    meta = json.loads((store / "chosen.json").read_text(encoding="utf-8"))
    lexicon = Lexicon({n: tuple(shape) for n, shape in meta["shapes"].items()}, hurdle=meta.get("hurdle", ()))
    lexicon.load_state_dict(load_file(str(store / "weights.safetensors")))
    # a fit cached before the temperature was kept: logistic, temperature 1
    lexicon.settled = {n: (float(c), float(t)) for n, (c, t) in
                       (meta.get("settled") or {n: (c, 1.0) for n, c in meta["chosen"].items()}).items()}
    vectorizer = Vectorizer.from_dict(json.loads((store / LEXICON_FILE).read_text(encoding="utf-8")))
    return lexicon, vectorizer, {k: float(v) for k, v in meta["chosen"].items()}
