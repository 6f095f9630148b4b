"""Confidence a reviewer can act on: calibration, the risk-coverage curve, a threshold for a target accuracy.

A catalog team publishes the rows it can trust and sends the rest to people. That needs three things,
all here and all plain numbers (no model code):

- **Calibration.** A raw score becomes a probability of being right. The heads models fit a
  temperature on dev (:func:`mmllm.models.heads.fit_temperature`); a generative model's score is the
  product of its answer's token probabilities under the grammar, which is far from calibrated (a
  forced token has probability 1, a long path multiplies many factors). :class:`Platt` maps it with
  ``sigmoid(a * logit(p) + b)``, fitted on dev by Newton's method on the log-loss (Platt 1999). It is
  monotone, so it changes the reported probabilities and never the order of the rows.
- **Selective prediction.** Sorting rows by confidence and keeping the top share gives the
  risk-coverage curve (:func:`risk_coverage`; Geifman & El-Yaniv 2017): the accuracy of the rows
  kept against the share kept. :func:`operating_point` picks the lowest threshold whose kept rows
  reach a target accuracy on dev, with a Wilson interval for that accuracy.
- **``calibration.json``** in a model folder (:class:`Calibration`): the maps and the dev curve, so
  ``mmllm label --review-target-accuracy 0.95`` turns a target into a threshold without dev at hand.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

CALIBRATION_FILE = "calibration.json"
FORMAT = "mmllm-calibration/1"
MIN_ROWS = 8  # fewer dev rows (or one class only): the identity map, said so in the file
EPS = 1e-6  # probabilities are clipped to [EPS, 1 - EPS] before a logit
PATH_EPS = 1e-12  # ... except a Platt map's: an answer path's probability is often far below 1e-6
# What a generative answer's raw score is, written beside a Platt map fitted on it. A map fitted on
# another definition (a file without the key: before 2026-12-05 a value's probability left out the
# step that ended it) reads today's scores wrongly; it is kept, said to be stale, and no threshold is
# taken from its dev curve.
SCORE = "answer-tokens-with-end/1"


# ---------------------------------------------------------------------- calibration maps
@dataclass(frozen=True)
class Platt:
    """``p -> sigmoid(a * logit(p) + b)``; the identity is ``a = 1, b = 0``."""

    a: float = 1.0
    b: float = 0.0
    rows: int = 0  # dev rows it was fitted on (0: not fitted, the identity)

    def __call__(self, p: float | None) -> float | None:
        if p is None or self.identity:
            return p
        return float(sigmoid(self.a * logit(p, PATH_EPS) + self.b))

    @property
    def identity(self) -> bool:
        return self.a == 1.0 and self.b == 0.0

    @classmethod
    def fit(cls, scores: Sequence[float], correct: Sequence[bool], l2: float = 1.0, steps: int = 50) -> "Platt":
        """Minimize the log-loss of ``sigmoid(a * logit(s) + b)``, summed over rows, plus
        ``l2 * ((a - 1)^2 + b^2) / 2``: a pull towards the identity worth about one row, which keeps
        the map finite when dev separates perfectly and vanishes as the rows grow.
        Too few rows, or rows of one outcome only, give the identity."""
        x = np.array([logit(s, PATH_EPS) for s in scores], dtype=np.float64)
        y = np.asarray(correct, dtype=np.float64)
        if len(x) < MIN_ROWS or y.min(initial=1) == y.max(initial=0):
            return cls()
        design = np.stack([x, np.ones_like(x)], axis=1)  # [N, 2]: a, b
        w = fit_logistic(design, y, np.full(2, l2), prior=np.array([1.0, 0.0]), iterations=steps)
        return cls(float(w[0]), float(w[1]), len(y))

    def to_dict(self) -> dict[str, Any]:
        return {"method": "identity"} if self.identity else {"method": "platt", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Platt":
        if not data or data.get("method") == "identity":
            return cls()
        a, b = float(data["a"]), float(data["b"])
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"a Platt map of {a} and {b}: not finite")
        return cls(a, b, int(data.get("rows", 0)))


def logit(p: float, eps: float = EPS) -> float:
    p = min(max(float(p), eps), 1 - eps)
    return math.log(p / (1 - p))


def significant(p: float) -> float:
    """``p`` to 6 significant digits: a small probability keeps its order (0.000000299, not 0.0)."""
    return float(f"{p:.6g}")


def sigmoid(z: Any) -> Any:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def fit_logistic(x: np.ndarray, y: np.ndarray, penalty: np.ndarray, *, prior: np.ndarray | None = None,
                 iterations: int = 50) -> np.ndarray:
    """Logistic regression by Newton's method: the summed log-loss of ``sigmoid(x @ w)`` plus
    ``sum(penalty * (w - prior)^2) / 2`` (``prior`` zero by default), started at ``prior``.
    Each step is halved until the objective goes down (a damped Newton method): a full step from far
    away (scores bunched in a narrow range, a start far from the answer) can overshoot into the sigmoid's
    flat tails, where the gradient vanishes and the fit stops at a map that sends every row to 0.
    Shared by the Platt maps here and the grounded-attribute choice (:mod:`mmllm.grounding`)."""
    prior = np.zeros(x.shape[1]) if prior is None else prior
    w = prior.astype(np.float64).copy()

    def objective(v: np.ndarray) -> float:
        z = x @ v
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(penalty * (v - prior) ** 2))

    current = objective(w)
    for _ in range(iterations):
        p = sigmoid(x @ w)
        grad = x.T @ (p - y) + penalty * (w - prior)
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        for _ in range(40):
            trial = objective(w - step)
            if trial <= current + 1e-12 * abs(current):
                break
            step = step / 2
        w -= step
        current = objective(w)
        if np.max(np.abs(step)) < 1e-8:
            break
    return w


# ---------------------------------------------------------------------- selective prediction
@dataclass(frozen=True)
class Curve:
    """Risk-coverage: keeping the rows with confidence >= ``thresholds[i]`` keeps ``coverage[i]`` of
    the rows at ``accuracy[i]``. Points only where the confidence changes (ties stay together)."""

    thresholds: list[float]
    coverage: list[float]
    accuracy: list[float]
    kept: list[int]
    rows: int

    def accuracy_at(self, coverage: float) -> float | None:
        """Accuracy of the most confident ``coverage`` share (the point at or just above it)."""
        for c, a in zip(self.coverage, self.accuracy):
            if c >= coverage - 1e-12:
                return a
        return None

    def area(self) -> float:
        """Mean accuracy over coverage (area under the accuracy-coverage curve, steps)."""
        area, before = 0.0, 0.0
        for c, a in zip(self.coverage, self.accuracy):
            area += (c - before) * a
            before = c
        return area


def _score(confidence: float | None) -> float | None:
    return None if confidence is None else float(confidence)


def risk_coverage(confidence: Sequence[float | None], correct: Sequence[bool]) -> Curve:
    """The curve for rows scored by ``confidence`` (``None``: no score, kept last)."""
    if len(confidence) != len(correct):
        raise ValueError(f"{len(confidence)} confidences for {len(correct)} outcomes")
    n = len(correct)
    order = sorted(range(n), key=lambda i: math.inf if confidence[i] is None else -float(confidence[i]))
    thresholds, coverage, accuracy, kept = [], [], [], []
    hits = 0
    for rank, i in enumerate(order, 1):
        hits += bool(correct[i])
        nxt = order[rank] if rank < n else None
        here = confidence[i]
        if nxt is not None and _score(confidence[nxt]) == _score(here):
            continue  # a threshold cannot split tied rows (nor two integers past 2**53 that are one float)
        thresholds.append(-math.inf if here is None else float(here))
        coverage.append(rank / n)
        accuracy.append(hits / rank)
        kept.append(rank)
    return Curve(thresholds, coverage, accuracy, kept, n)


@dataclass(frozen=True)
class OperatingPoint:
    """Keep rows with confidence >= ``threshold``: ``coverage`` of them, at ``accuracy`` [``low``, ``high``]."""

    target: float
    threshold: float
    coverage: float
    accuracy: float
    kept: int
    low: float
    high: float

    def sentence(self, what: str = "rows") -> str:
        return (f"keep {what} with confidence >= {self.threshold:.6g}: {self.coverage:.0%} of them "
                f"({self.kept:,}), accuracy {self.accuracy:.3f} [95% CI {self.low:.3f}-{self.high:.3f}]")


def operating_point(curve: Curve, target: float) -> OperatingPoint | None:
    """The lowest threshold (the most rows kept) whose kept rows reach ``target`` accuracy; ``None``
    when no share of the rows does."""
    if not 0 < target <= 1:
        raise ValueError(f"target accuracy must be in (0, 1], got {target}")
    best = None
    for t, c, a, k in zip(curve.thresholds, curve.coverage, curve.accuracy, curve.kept):
        if a >= target - 1e-12 and t != -math.inf:
            best = (t, c, a, k)
    if best is None:
        return None
    t, c, a, k = best
    low, high = wilson(round(a * k), k)
    return OperatingPoint(target, t, c, a, k, low, high)


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------------- the model folder's file
@dataclass
class Calibration:
    """``calibration.json``: how confidences were calibrated, and the dev curve they give."""

    method: str  # "temperature" (heads models: inside the weights) or "platt" (generative: ``category``)
    category: Platt = field(default_factory=Platt)
    attributes: Platt = field(default_factory=Platt)
    curve: Curve | None = None
    score: str = SCORE  # the raw score the Platt maps were fitted on (see SCORE)

    @property
    def stale(self) -> bool:
        """A Platt map fitted on another definition of the generative score than today's."""
        return self.method == "platt" and self.score != SCORE

    def apply(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` with its ``confidence`` and ``attribute_confidence`` mapped by the Platt maps."""
        out = dict(record)
        if record.get("confidence") is not None:
            out["confidence"] = significant(self.category(record["confidence"]))
        if record.get("attribute_confidence"):
            out["attribute_confidence"] = {k: significant(self.attributes(v)) for k, v in record["attribute_confidence"].items()}
        return out

    def threshold_for(self, target: float) -> OperatingPoint | None:
        """The dev operating point for a target accuracy (``None``: no dev curve, or never reached).
        A stale calibration (:attr:`stale`) has none to give: its curve's thresholds are in the scale
        of the old score."""
        if self.stale:
            raise ValueError(f"the {CALIBRATION_FILE} was fitted on an older answer score ({self.score!r}, today "
                             f"{SCORE!r}): its dev thresholds do not apply to today's confidences; retrain the model "
                             "folder (with data.dev) to refit it, or give --review-below T")
        return operating_point(self.curve, target) if self.curve is not None else None

    def to_dict(self) -> dict[str, Any]:
        curve = None
        if self.curve is not None:
            curve = {"rows": self.curve.rows,
                     "points": [[_finite(t), c, a, k] for t, c, a, k in
                                zip(self.curve.thresholds, self.curve.coverage, self.curve.accuracy, self.curve.kept)]}
        score = {"score": self.score} if self.method == "platt" else {}
        return {"format": FORMAT, "method": self.method, **score, "category": self.category.to_dict(),
                "attributes": self.attributes.to_dict(), "dev_curve": curve}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CALIBRATION_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Calibration | None":
        path = Path(folder) / CALIBRATION_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            for key in ("category", "attributes", "dev_curve"):
                if data.get(key) is not None and not isinstance(data[key], dict):
                    raise ValueError(f"{key}: expected an object, got {type(data[key]).__name__}")
            curve = None
            if data.get("dev_curve"):
                points = data["dev_curve"]["points"]
                if not isinstance(points, list) or not points:
                    raise ValueError("dev_curve: no points")
                if not all(isinstance(p, list) and len(p) == 4 for p in points):
                    raise ValueError("dev_curve: a point is not [threshold, coverage, accuracy, kept]")
                curve = Curve([-math.inf if p[0] is None else _finite_number(p[0]) for p in points],
                              [_finite_number(p[1]) for p in points], [_finite_number(p[2]) for p in points],
                              [int(p[3]) for p in points], int(data["dev_curve"]["rows"]))
            score = data.get("score", "answer-tokens/0")  # no key: fitted before SCORE was written down
            if not isinstance(score, str):
                raise ValueError(f"score: expected a string, got {type(score).__name__}")
            return cls(str(data["method"]), Platt.from_dict(data.get("category")),
                       Platt.from_dict(data.get("attributes")), curve, score)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(f"{path}: not a readable calibration file ({exc}); refit the model or delete the file") from exc


def _finite_number(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _finite(t: float) -> float | None:
    return None if t == -math.inf else t
