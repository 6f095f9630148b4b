"""The category shares a model's answers follow, and moving them to another catalog's (label shift).

A classifier trained on rows with category shares pi_train answers p(c | x) under pi_train. Labelling
a catalog whose categories come in other shares pi_target, Bayes' rule gives the posterior there by
reweighting each answer and renormalizing (Saerens et al. 2002; Lipton et al. 2018; the logit
adjustment of Menon et al. 2021 is the case pi_target = uniform):

    p_target(c | x)  proportional to  p(c | x) * pi_target(c) / pi_train(c)

This is what a review loop needs: corrections from a new catalog go into ``data.train`` and shift the
model's shares towards that catalog, so labelling the *old* catalog again with its own shares
(``mmllm label --class-prior OLD_TRAIN.jsonl``) gives back what the shift cost there, and the new one
is labelled as trained (or with a sample of its own reviewed rows as the prior).

* :func:`category_counts`: the training rows per category, stored as ``category_counts`` in the model
  folder's ``mmllm_model.json`` by every recipe with a category head;
* :func:`target_shares`: ``uniform``, or the gold category shares of a labelled catalog;
* :class:`ClassPrior`: the log ratio per class, applied to the category distribution of a batch.

Shares are add-one smoothed on both sides (a category with no row keeps a small share), as
``fusion.prior_correction`` smooths the training counts. A fusion model trained with
``prior_correction`` = lambda already answers under pi_train ** (1 - lambda), and its ratio starts there.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from mmllm.schema import category_key

__all__ = ["COUNTS_KEY", "ClassPrior", "ClassPriorError", "category_counts", "smoothed_shares", "target_shares"]


COUNTS_KEY = "category_counts"  # in mmllm_model.json: {category: training rows}


class ClassPriorError(ValueError):
    """A ``--class-prior`` that cannot be used with this model (the message says why and what to do)."""


def category_counts(labels: Iterable[Mapping[str, Any] | None], classes: Sequence[str]) -> dict[str, int]:
    """Training rows per category of ``classes`` (every class listed, 0 where none), in class order. A gold
    category counts under the taxonomy's spelling (case and spacing forgiven, as training reads it)."""
    seen = Counter(category_key(c) for c in ((label or {}).get("category") for label in labels) if isinstance(c, str))
    return {c: int(seen.get(category_key(c), 0)) for c in classes}


def smoothed_shares(counts: Sequence[float]) -> list[float]:
    """Add-one smoothed shares of ``counts``: a category with no row keeps a small share (the training
    shares ``fusion.prior_correction`` removes, and both sides of a ``--class-prior`` ratio)."""
    total = sum(counts) + len(counts)
    return [(c + 1.0) / total for c in counts]


def target_shares(spec: str, classes: Sequence[str]) -> tuple[list[float], str]:
    """The shares ``spec`` names, in class order, and a line saying what they are.

    ``uniform``: every category alike (the balanced posterior). Otherwise ``spec`` is a labelled catalog
    (any format ``mmllm`` reads): its gold categories counted, add-one smoothed. Bad rows, rows without a
    category and categories outside the model's taxonomy are counted and named in the note, never used."""
    if spec == "uniform":
        return [1.0 / len(classes)] * len(classes), "uniform shares"
    from mmllm.catalog import CatalogError, RowError, iter_catalog

    path = Path(spec)
    if not path.exists():
        raise ClassPriorError(f"--class-prior {spec}: no such file (give a labelled catalog, or 'uniform')")
    index = {category_key(c): i for i, c in enumerate(classes)}  # spelled as training reads it
    counts = [0] * len(classes)
    bad: list[str] = []
    unlabelled = 0
    outside: Counter[str] = Counter()
    first_outside: dict[str, str] = {}
    try:
        for row in iter_catalog(path):
            if isinstance(row, RowError):
                bad.append(str(row))
                continue
            category = (row.label or {}).get("category")
            if category is None:
                unlabelled += 1
            elif category_key(str(category)) in index:
                counts[index[category_key(str(category))]] += 1
            else:
                outside[str(category)] += 1
                first_outside.setdefault(str(category), str(row.id))
    except CatalogError as exc:
        raise ClassPriorError(f"--class-prior {spec}: {exc}") from None
    used = sum(counts)
    if not used:
        raise ClassPriorError(f"--class-prior {spec}: no row has a gold category of this model's taxonomy "
                              f"({unlabelled} without one, {sum(outside.values())} outside it, {len(bad)} bad rows)")
    note = f"the gold category shares of {used:,} rows of {path.name}"
    skipped = []
    if bad:
        skipped.append(f"{len(bad)} bad rows (first: {bad[0]})")
    if unlabelled:
        skipped.append(f"{unlabelled} without a gold category")
    if outside:
        name, n = outside.most_common(1)[0]
        skipped.append(f"{sum(outside.values())} with a category outside the model's taxonomy (e.g. '{name}', "
                       f"{n} rows, first id {first_outside[name]})")
    if skipped:
        note += "; not counted: " + "; ".join(skipped)
    return smoothed_shares(counts), note


@dataclass
class ClassPrior:
    """Moves a model's category answers from its training shares to another catalog's (``for_model``)."""

    log_ratio: torch.Tensor  # [C] log pi_target - log pi_source
    note: str = ""

    @classmethod
    def for_model(cls, spec: str, classes: Sequence[str], counts: Mapping[str, int] | None, source: str,
                  correction: float = 0.0) -> "ClassPrior":
        """``counts``: the model folder's ``category_counts``; ``correction``: its ``fusion.prior_correction``
        (the answers already lose that much of log pi_train)."""
        if counts is None:
            raise ClassPriorError(f"--class-prior: {source} records no training category counts (it was written "
                                  "before they were kept); retrain it to label with another catalog's shares")
        missing = [c for c in classes if c not in counts]
        if missing:
            raise ClassPriorError(f"--class-prior: {source}'s category_counts lack {len(missing)} of its categories "
                                  f"(first: '{missing[0]}'); the folder is inconsistent, retrain it")
        damaged = [c for c in classes if isinstance(counts[c], bool) or not isinstance(counts[c], int) or counts[c] < 0]
        if damaged:
            raise ClassPriorError(f"--class-prior: {source}'s category_counts give '{damaged[0]}' "
                                  f"{counts[damaged[0]]!r}, not a count of rows; the folder is damaged, retrain it")
        source_log = [(1.0 - correction) * math.log(p) for p in smoothed_shares([counts[c] for c in classes])]
        shares, note = target_shares(spec, classes)
        ratio = torch.tensor([math.log(t) - s for t, s in zip(shares, source_log)], dtype=torch.float32)
        return cls(ratio - ratio.max(), note)

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        """[N, C] category probabilities -> the same under the target shares (rows sum to 1)."""
        moved = probs.float() * self.log_ratio.exp().to(probs.device)
        return moved / moved.sum(-1, keepdim=True).clamp_min(1e-30)
