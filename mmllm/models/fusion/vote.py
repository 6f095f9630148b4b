"""The vote on each attribute head: the fusion heads, the lexical member and the encoder's neighbours,
mixed with weights chosen per head on held-out TRAINING rows (never on dev).

Why per head: the members are good at different things. On a catalog with its own schema (README,
``benchmarks/other_schema_catalog.py``) the brand is a word of the title, where the heads and the bag of
words win, while the price band is a judgement from the whole product, where the heads are the weakest
member and the neighbours (listings like this one) the strongest. An equal-weight mean cannot beat its
better member on both; one weight vector per head can, and cross-validation is how a stacked ensemble
chooses it (Wolpert 1992; Breiman 1996, "Stacked regressions"): each member's prediction for a row must
come from a fit that did not see the row.

How (``weights: holdout``, the default): the recipe holds out ``holdout`` of the training rows (by a hash
of the listing id, so the split does not depend on the file's order), trains the heads again on the rest,
refits the lexical member on the rest, takes the neighbours among the rest, and here, per attribute head,
picks the point of a grid over the simplex of member weights with the lowest log-loss on the held-out rows
that state a value (``min_rows`` of them at least, else equal weights). The log-loss, not the accuracy:
a few hundred rows decide, and the log-loss moves smoothly where the accuracy jumps by one row. The
final heads and members are then trained on all the training rows and mixed with those weights.

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
    min_rows: int = help_field(40, "held-out rows stating a value, at least, for a head's weights to be chosen "
                                   "(fewer: equal weights)")

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


def fit_weights(members: Mapping[str, torch.Tensor], target: torch.Tensor, step: float) -> dict[str, float]:
    """The grid point with the lowest log-loss of ``target`` [N] under the mixture of ``members``
    ({name: [N, C] probabilities}); ties go to the point nearest equal weights."""
    names = list(members)
    equal = 1 / len(names)
    best, best_key = {m: equal for m in names}, (math.inf, 0.0)
    for point in simplex(names, step):
        key = (round(log_loss(mix(members, point), target), 9), sum((w - equal) ** 2 for w in point.values()))
        if key < best_key:
            best, best_key = point, key
    return best


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
    """Per head (``members[head]`` = {member: [N, C]}, ``targets[head]`` [N], -100 or below 0 = no value):
    the weights, or none (equal) when fewer than ``cfg.min_rows`` rows state a value."""
    fit = VoteFit()
    for head, probs in members.items():
        known = targets[head] >= 0
        rows = int(known.sum())
        if len(probs) < 2 or rows < cfg.min_rows:
            continue
        kept = {m: p[known] for m, p in probs.items()}
        y = targets[head][known]
        weights = fit_weights(kept, y, cfg.step)
        equal, chosen = mix(kept), mix(kept, weights)
        fit.weights[head] = weights
        fit.scores[head] = {"rows": rows, "log_loss_equal": round(log_loss(equal, y), 4),
                            "log_loss": round(log_loss(chosen, y), 4),
                            "accuracy_equal": round(float((equal.argmax(-1) == y).float().mean()), 4),
                            "accuracy": round(float((chosen.argmax(-1) == y).float().mean()), 4)}
    return fit
