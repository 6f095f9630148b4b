"""The vote on each attribute head: the fusion heads, the lexical member and the encoder's neighbours,
mixed with weights chosen per head on held-out TRAINING rows (never on dev).

Why per head: the members are good at different things. On a catalog with its own schema (benchmarks/RESULTS.md,
``benchmarks/other_schema_catalog.py``) the brand is a word of the title, where the heads and the bag of
words win, while the price band is a judgement from the whole product, where the heads are the weakest
member and the neighbours (listings like this one) the strongest. An equal-weight mean cannot beat its
better member on both; one weight vector per head can, and cross-validation is how a stacked ensemble
chooses it (Wolpert 1992; Breiman 1996, "Stacked regressions"): each member's prediction for a row must
come from a fit that did not see the row.

How (``weights: holdout``, the default): the recipe holds out ``holdout`` of the training rows (by a hash
of the listing id, so the split does not depend on the file's order), trains the heads again on the rest,
refits the lexical member on the rest, takes the neighbours among the rest, and here, per attribute head,
scores every point of a grid over the simplex of member weights by its log-loss on the held-out rows
whose gold the head knows (``min_rows`` of them at least, else equal weights): for a head that abstains
that includes the rows whose gold is "not stated", since the mix decides whether to answer as well as
what (weighing the two questions apart was measured and not kept: benchmarks/RESULTS.md, "Tried for the
brand, not kept"). The log-loss, not the accuracy:
a few hundred rows decide, and the log-loss moves smoothly where the accuracy jumps by one row. Of the
points within one standard error of the best (``select: within_one_se``), it keeps the one nearest equal
weights: held-out rows are a sample, and the best point on them is partly their noise. The final heads
and members are then trained on all the training rows and mixed with those weights.

The category keeps the equal-weight vote of ``anchor`` (heads, names, neighbours, lexical member): its
names member is tuned on every training title, so held-out training rows would flatter it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import torch

from mmllm.config import help_field

MEMBERS = ("heads", "lexicon", "neighbours")


@dataclass
class VoteConfig:
    """The recipe's ``vote:`` section (fusion): how each attribute head's members are mixed."""

    members: list[str] = help_field(default_factory=lambda: list(MEMBERS),
                                    help="what votes on each enum / numeric attribute: heads, lexicon (the "
                                         "lexical member, when lexicon.enabled), neighbours (the anchor's k nearest "
                                         "training rows, when anchor.epochs > 0)")
    weights: Literal["holdout", "equal"] = help_field(
        "holdout", "holdout = per-head weights with the lowest log-loss on held-out training rows (one more "
                   "training of the heads on the rest); equal = the plain mean")
    holdout: float = help_field(0.25, "share of the training rows held out to choose the weights")
    step: float = help_field(0.1, "grid step over the simplex of member weights")
    min_rows: int = help_field(40, "held-out rows whose gold the head knows (\"not stated\" included, for a head "
                                   "that abstains), at least, for its weights to be chosen (fewer: equal weights)")
    select: Literal["within_one_se", "best"] = help_field(
        "within_one_se", "best = the grid point with the lowest held-out log-loss; within_one_se = of the points "
                         "whose log-loss is within one standard error of the best's (paired over the held-out rows), "
                         "the one nearest equal weights (the one-standard-error rule)")

    def __post_init__(self) -> None:
        unknown = [m for m in self.members if m not in MEMBERS]
        if unknown or "heads" not in self.members:
            raise ValueError(f"vote.members must include heads and come from {list(MEMBERS)}, got {self.members}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"vote.holdout must be in (0, 1), got {self.holdout}")
        if not 0 < self.step <= 0.5 or abs(round(1 / self.step) * self.step - 1) > 1e-9:
            raise ValueError(f"vote.step must divide 1 and be in (0, 0.5], got {self.step}")
        if self.min_rows < 1:
            raise ValueError(f"vote.min_rows must be >= 1, got {self.min_rows}")
        if self.select not in ("within_one_se", "best"):
            raise ValueError(f"vote.select must be within_one_se or best, got {self.select!r}")


def mix(members: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """The weighted mean of the members' distributions [B, C] (equal weights for members ``weights``
    does not name, or all of them without ``weights``); a weight of 0 drops a member."""
    if weights is None or not any(weights.get(m, 0.0) > 0 for m in members):
        weights = {m: 1.0 for m in members}
    total = sum(weights.get(m, 0.0) for m in members)
    return sum(p.float() * (weights.get(m, 0.0) / total) for m, p in members.items())


def simplex(members: Sequence[str], step: float) -> list[dict[str, float]]:
    """Every weight vector over ``members`` on a grid of ``step`` that sums to 1."""
    n = round(1 / step)
    points = []
    for cut in itertools.product(range(n + 1), repeat=len(members) - 1):
        if sum(cut) <= n:
            parts = [*cut, n - sum(cut)]
            points.append({m: k / n for m, k in zip(members, parts)})
    return points


def log_loss(probs: torch.Tensor, target: torch.Tensor) -> float:
    """Mean negative log-probability of the targets (clamped: one zero never makes it infinite)."""
    return float(-torch.log(probs[torch.arange(len(target)), target].clamp_min(1e-6)).mean())


def row_losses(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N] negative log-probability of each row's target (clamped as :func:`log_loss`)."""
    return -torch.log(probs[torch.arange(len(target)), target].clamp_min(1e-6))


def fit_weights(members: Mapping[str, torch.Tensor], target: torch.Tensor, step: float,
                select: str = "best") -> dict[str, float]:
    """A grid point of member weights for ``target`` [N] under the mixture of ``members`` ({name: [N, C]
    probabilities}). ``best``: the lowest log-loss, ties to the point nearest equal weights.
    ``within_one_se``: of the points whose mean log-loss exceeds the best's by at most the standard error
    of their paired difference over the rows, the one nearest equal weights (the lower log-loss breaking
    ties). The weights then leave the plain mean only as far as the rows can tell the points apart: the
    one-standard-error rule of Breiman et al. (1984), with equal weights as the simplest model, which
    out of sample is hard to beat when the estimated weights are noisy (the forecast combination puzzle,
    Stock and Watson 2004)."""
    names = list(members)
    equal = 1 / len(names)
    points = simplex(names, step)
    losses = torch.stack([row_losses(mix(members, point), target) for point in points])  # [P, N]
    mean = losses.mean(1)
    spread = torch.tensor([sum((w - equal) ** 2 for w in point.values()) for point in points])
    best = min(range(len(points)), key=lambda i: (round(float(mean[i]), 9), float(spread[i])))
    if select == "best" or len(target) < 2:
        return points[best]
    if select != "within_one_se":
        raise ValueError(f"vote.select {select!r}: one of within_one_se, best")
    error = (losses - losses[best]).std(1) / math.sqrt(len(target))  # [P] paired standard errors
    within = [i for i in range(len(points)) if float(mean[i] - mean[best]) <= float(error[i]) + 1e-12]
    return points[min(within, key=lambda i: (round(float(spread[i]), 9), float(mean[i])))]


def holdout_split(ids: Sequence[str], share: float) -> tuple[list[int], list[int]]:
    """(kept, held) row indices: a row is held out when the hash of its id falls under ``share``,
    so the split is the same whatever order the rows come in."""
    kept, held = [], []
    for i, row_id in enumerate(ids):
        digest = hashlib.sha256(f"vote:{row_id}".encode()).digest()
        (held if int.from_bytes(digest[:8], "big") / 2 ** 64 < share else kept).append(i)
    return kept, held


@dataclass
class VoteFit:
    """What the held-out fit found, per head: the weights and the held-out log-loss / accuracy of the
    equal-weight mean and of the chosen mixture (printed by the recipe, kept in ``fusion.json``)."""

    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


def choose(members: Mapping[str, Mapping[str, torch.Tensor]], targets: Mapping[str, torch.Tensor],
           cfg: VoteConfig) -> VoteFit:
    """Per head (``members[head]`` = {member: [N, C]}, ``targets[head]`` [N], below 0 = gold unknown; an
    abstaining head's class 0, "not stated", is known): the weights, or none (equal) when fewer than
    ``cfg.min_rows`` rows have a known gold."""
    fit = VoteFit()
    for head, probs in members.items():
        known = targets[head] >= 0
        rows = int(known.sum())
        if len(probs) < 2 or rows < cfg.min_rows:
            continue
        kept = {m: p[known] for m, p in probs.items()}
        y = targets[head][known]
        weights = fit_weights(kept, y, cfg.step, cfg.select)
        equal, chosen = mix(kept), mix(kept, weights)
        fit.weights[head] = weights
        fit.scores[head] = {"rows": rows, "log_loss_equal": round(log_loss(equal, y), 4),
                            "log_loss": round(log_loss(chosen, y), 4),
                            "accuracy_equal": round(float((equal.argmax(-1) == y).float().mean()), 4),
                            "accuracy": round(float((chosen.argmax(-1) == y).float().mean()), 4)}
    return fit
