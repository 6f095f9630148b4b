"""Grounded attributes: the value the listing states, the model's guess, or ``null`` - chosen by a
model learned from the labelled rows, with the evidence for every value.

Every model kind (fusion, classification heads, generative VLM) answers every attribute, but a
catalog cannot publish a value that contradicts the seller's own table, nor one whose origin it
cannot see. This layer sits between any :class:`~mmllm.predictor.Predictor` and the jobs above it:

1. **Options.** Per attribute, the distinct values stated by the listing
   (:func:`mmllm.evidence.candidates`: seller-table keys, title / description patterns) and the
   model's own answer.
2. **Candidate reliability** (stage A, fitted on the *training* rows, which need no model): an
   L2-regularized logistic model of "this stated value is the gold value" from the evidence alone -
   source, table key or pattern, the parser's form ("4 - 10 years" is a ``range``), how many sources
   agree or conflict, how complete the seller table is, and how likely a listing like this one is to
   have a value at all (:mod:`mmllm.applicability`, a bag of words, out-of-fold on these rows: "200
   pieces" of jump rings is no piece count this catalog records). A catalog whose tables or patterns
   are unreliable learns to trust them less.
   For boolean and enum attributes the listing's *other* stated fields also propose a value
   (``context``: "Batteries Required: No" and "Assembly Required: No" but nothing about whether
   batteries are included), from one logistic model per value on the training rows that do not
   state the attribute.
3. **The choice** (stage B, fitted on the *dev* rows, which the model never trained on, with the
   model's predictions there): a small logistic model over stage A's score, whether the model agrees
   with the option, the model's probability, whether the option is the model's alone (completion),
   the context's probability, and the model's own probability that the listing has a value at all
   (``attribute_applies``, from heads trained on gold nulls; absent for a generative record). The option with the highest probability wins.
4. **Answer or abstain.** Per attribute a threshold on that probability, fitted on dev so that the
   answered values reach the target precision (a Wilson lower bound, so a handful of dev rows cannot
   set it); below it the value is ``null`` and the best option is kept under ``withheld`` for review.

A record gains ``evidence`` (per non-null value: ``source`` = ``table`` + key + the seller's text,
``title`` / ``description`` + character ``span``, ``context`` + the fields it came from, or
``model`` + ``probability``; its
``confidence``; the other sources that agree), ``conflicts`` (values other sources stated that lost)
and ``attribute_confidence``. The fitted choice is ``grounding.json`` in the model folder, written by
the training run; :class:`GroundedPredictor` applies it to whatever predictor the folder holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mmllm.applicability import APPLICABILITY_FILE, APPLICABILITY_WEIGHTS, Applicability, fit_applicability
from mmllm.bag_of_words import TfidfConfig
from mmllm.catalog import Listing, attributes_labelled
from mmllm.confidence import fit_logistic as newton_logistic, logit as _logit, sigmoid as _sigmoid, wilson
from mmllm.config import help_field
from mmllm.evidence import Candidate, candidates, stated_keys, value_key, values_match
from mmllm.schema import LabelSchema

GROUNDING_FILE = "grounding.json"
GROUNDING_FILES = (GROUNDING_FILE, APPLICABILITY_FILE, APPLICABILITY_WEIGHTS)  # what a folder's grounding is
FORMAT = 1
SOURCE_ORDER = {"table": 0, "title": 1, "description": 2, "model": 3}
B_FEATURES = ("bias", "stated_logit", "stated", "model_agrees", "model_agrees_p", "unstated_model", "unstated_model_p",
              "model_has_p", "context", "context_logit", "applies_known", "stated_applies_logit",
              "unstated_applies_logit")


@dataclass
class GroundingConfig:
    """The recipe's ``grounding:`` section: how the learned choice is fitted after training."""

    enabled: bool = help_field(True, "fit the grounded-attribute choice after training (grounding.json)")
    precision: float = help_field(0.9, "target precision of the answered values, per attribute (dev thresholds)")
    l2: float = help_field(1.0, "L2 penalty of the two logistic models")
    z: float = help_field(1.0, "Wilson bound width for the precision target (0 = the raw dev precision)")
    dev_rows: int | None = help_field(None, "dev rows predicted to fit the choice and the confidence calibration "
                                            "(generative: each one is a generation)")
    applicability: bool = help_field(True, "fit, per attribute, a bag of words of whether a listing has a value at "
                                           "all (title, description, seller table; out-of-fold on the training rows) "
                                           "and give stage A its probability: '200 pieces' of jump rings is not a "
                                           "piece count this catalog records, '894 pieces' of a LEGO set is")
    applicability_c: list[float] = help_field(default_factory=lambda: [3.0, 10.0, 30.0],
                                              help="inverse L2 strength of those regressions (loss = mean CE + ||W||^2 / (2 C N) "
                                                   "over the two classes' weights); "
                                                   "several = chosen per attribute by the out-of-fold log-loss")
    applicability_folds: int = help_field(5, "folds of the out-of-fold probabilities on the training rows")

    def __post_init__(self) -> None:
        if not 0 < self.precision <= 1:
            raise ValueError(f"grounding.precision must be in (0, 1], got {self.precision}")
        if self.precision == 1 and self.z > 0:
            raise ValueError("grounding.precision: 1 with grounding.z > 0 publishes nothing (the Wilson lower bound of "
                             "a finite dev sample never reaches 1); use a target below 1, or z: 0 for the raw dev "
                             "precision")
        if self.l2 < 0 or self.z < 0:
            raise ValueError("grounding.l2 and grounding.z must be >= 0")
        if self.dev_rows is not None and self.dev_rows < 1:
            raise ValueError(f"grounding.dev_rows must be >= 1 or null, got {self.dev_rows}")
        if not self.applicability_c or min(self.applicability_c) <= 0 or self.applicability_folds < 2:
            raise ValueError("grounding.applicability_c must be one or more numbers > 0 and "
                             "grounding.applicability_folds >= 2")


# ---------------------------------------------------------------------- options
@dataclass
class Option:
    """One value an attribute could take for one listing, and who says so."""

    value: Any
    stated: list[Candidate] = field(default_factory=list)
    model_agrees: bool = False
    model_p: float | None = None  # the model's probability of its answer (None: no probability)
    context_p: float | None = None  # completion from the listing's other stated fields (stage A')
    context: dict[str, Any] = field(default_factory=dict)  # those fields: attribute -> stated value
    stated_p: float | None = None  # stage A's probability that the stated value is the gold one
    applies_p: float | None = None  # the model's probability that the listing has a value at all (None: unknown)
    applies_words: float | None = None  # the same from the listing's words (applicability), for a stated value

    def primary(self) -> Candidate | None:
        return min(self.stated, key=lambda c: SOURCE_ORDER[c.source]) if self.stated else None


def options_for(stated: Sequence[Candidate], model_value: Any, model_p: float | None,
                context: tuple[Any, float, dict[str, Any]] | None = None,
                applies_p: float | None = None) -> list[Option]:
    """The distinct values of one attribute for one listing: each stated value, the context's completion
    (only when nothing is stated) and the model's answer, merged where they agree. ``applies_p``: the
    model's probability that the listing has a value for the attribute at all, on every option."""
    by_key: dict[str, Option] = {}
    for c in stated:
        by_key.setdefault(value_key(c.value), Option(c.value)).stated.append(c)
    if context is not None and not stated:
        option = by_key.setdefault(value_key(context[0]), Option(context[0]))
        option.context_p, option.context = context[1], context[2]
    if model_value is not None:
        option = by_key.setdefault(value_key(model_value), Option(model_value))
        option.model_agrees, option.model_p = True, model_p
    for option in by_key.values():
        option.applies_p = applies_p
    return list(by_key.values())


def stated_features(option: Option, options: Sequence[Option], table_keys: int, attr_type: str,
                    applies: float | None = None) -> dict[str, float]:
    """Stage A's features: the evidence alone (no model), so they mean the same on train and dev;
    ``applies``: the applicability model's probability that the listing has a value at all."""
    f: dict[str, float] = {"bias": 1.0}
    if applies is not None:
        f["applies_logit"] = _logit(applies, 1e-3)
    for c in option.stated:
        f[f"source={c.source}"] = 1.0
        f[f"{c.source}:{c.key}"] = 1.0
        f[f"{c.source}:{c.key}:{c.form}"] = 1.0
    f["agreeing"] = min(len(option.stated) - 1, 3)
    f["sources"] = len({c.source for c in option.stated}) - 1
    others = sum(1 for o in options if o is not option and o.stated)
    f["conflicting"] = min(others, 3)
    f["table_keys"] = float(table_keys)
    if attr_type in ("boolean", "enum"):
        f[f"value={value_key(option.value)}"] = 1.0
    return f


def context_features(stated: Mapping[str, list[Candidate]], table_keys: int, schema: LabelSchema,
                     exclude: str) -> tuple[dict[str, float], dict[str, Any]]:
    """Stage A's completion features for ``exclude``: which other attributes the listing states, and
    what it says for the boolean / enum ones. Returns the features and the fields they came from."""
    f: dict[str, float] = {"bias": 1.0, "table_keys": float(table_keys)}
    said: dict[str, Any] = {}
    for spec in schema.attributes:
        found = stated.get(spec.name) or []
        if spec.name == exclude or not found:
            continue
        f[f"stated:{spec.name}"] = 1.0
        primary = min(found, key=lambda c: SOURCE_ORDER[c.source])
        if spec.type in ("boolean", "enum"):
            f[f"says:{spec.name}={value_key(primary.value)}"] = 1.0
        said[spec.name] = primary.value
    return f, said


def choice_features(option: Option, stated_p: float | None) -> np.ndarray:
    """Stage B's features, in :data:`B_FEATURES` order."""
    p = option.model_p
    logit = _logit(stated_p) if (option.stated and stated_p is not None) else 0.0
    unstated_model = float(option.model_agrees and not option.stated)
    context = option.context_p is not None
    applies = option.applies_p is not None
    applies_logit = _logit(option.applies_p, 1e-3) if applies else 0.0  # bounded: +-6.9
    return np.array([1.0, logit, float(bool(option.stated)), float(option.model_agrees),
                     float(option.model_agrees) * (p or 0.0), unstated_model, unstated_model * (p or 0.0),
                     float(p is not None), float(context), _logit(option.context_p) if context else 0.0,
                     float(applies), float(bool(option.stated)) * applies_logit, unstated_model * applies_logit],
                    dtype=np.float64)


# ---------------------------------------------------------------------- logistic regression
def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 50) -> np.ndarray:
    """L2-penalized logistic regression by Newton's method (the bias, column 0, penalized lightly)."""
    penalty = np.full(x.shape[1], l2)
    penalty[0] = l2 * 1e-3
    return newton_logistic(x, y, penalty, iterations=iterations)


def wilson_lower(correct: int, n: int, z: float) -> float:
    """Lower Wilson bound of a proportion (z = 0: the proportion itself)."""
    if n == 0:
        return 0.0
    return correct / n if z == 0 else wilson(correct, n, z)[0]


# ---------------------------------------------------------------------- the fitted choice
@dataclass
class AttributeChoice:
    """The learned choice for one attribute."""

    name: str
    stated_weights: dict[str, float] = field(default_factory=dict)  # stage A (empty: no stated training rows)
    context_weights: dict[str, dict[str, float]] = field(default_factory=dict)  # stage A': value -> weights
    choice_weights: list[float] | None = None  # stage B (None: too few dev options to fit it, see probability)
    model_precision: float | None = None  # the model's non-null dev answers: (right + 1) / (answered + 2)
    threshold: float = 0.9
    trained_rows: int = 0  # training rows with a gold value
    stated_options: int = 0  # stage A's training options
    dev_options: int = 0  # stage B's options
    dev_precision: float | None = None  # of the answered dev values at the threshold
    dev_answered: int = 0

    def stated_p(self, features: Mapping[str, float]) -> float:
        if not self.stated_weights:
            return 0.5
        z = sum(self.stated_weights.get(k, 0.0) * v for k, v in features.items())
        return float(_sigmoid(z))

    def context_option(self, features: Mapping[str, float], values: Sequence[Any]) -> tuple[Any, float] | None:
        """The most probable value given the listing's other stated fields, and its probability."""
        best = None
        for v in values:
            weights = self.context_weights.get(value_key(v))
            if weights:
                p = float(_sigmoid(sum(weights.get(k, 0.0) * x for k, x in features.items())))
                if best is None or p > best[1]:
                    best = (v, p)
        return best

    def probability(self, option: Option, stated_p: float | None) -> float:
        """Stage B's probability; without it, a stated value's stage A probability, else the context's,
        else the model's smoothed dev precision (no dev rows: the model alone is never published)."""
        if self.choice_weights is None:
            if option.stated and stated_p is not None:
                return stated_p
            if option.context_p is not None:
                return option.context_p
            return self.model_precision if (option.model_agrees and self.model_precision is not None) else 0.0
        x = choice_features(option, stated_p)
        weights = np.zeros(len(x))
        weights[:len(self.choice_weights)] = self.choice_weights[:len(x)]  # a folder fitted before a feature: 0
        return float(_sigmoid(x @ weights))


class Grounder:
    """Chooses, per attribute, among the stated values, the model's answer and ``null``."""

    def __init__(self, schema: LabelSchema, choices: Mapping[str, AttributeChoice], precision: float = 0.9,
                 untrained: Sequence[str] = (), applicability: Applicability | None = None) -> None:
        self.schema = schema
        self.choices = dict(choices)
        self.precision = precision
        self.untrained = set(untrained)
        self.applicability = applicability

    # ------------------------------------------------------------------ scoring
    def scored(self, listing: Listing, record: Mapping[str, Any]) -> dict[str, list[tuple[float, Option]]]:
        """Per attribute, its options with their probabilities, best first."""
        stated = candidates(listing, self.schema)
        keys = stated_keys(listing.attributes or {}, self.schema.attributes)
        model_attrs = record.get("attributes") or {}
        confidence = record.get("attribute_confidence") or {}
        applies = record.get("attribute_applies") or {}
        applies_text = ({k: v[0] for k, v in self.applicability.predict([listing]).items()}
                        if self.applicability is not None else {})
        out = {}
        for spec in self.schema.attributes:
            choice = self.choices.get(spec.name)
            if choice is None or spec.name in self.untrained:
                out[spec.name] = []
                continue
            context = None
            if choice.context_weights and not stated.get(spec.name):
                features, said = context_features(stated, keys, self.schema, spec.name)
                best = choice.context_option(features, _values(spec))
                context = (best[0], best[1], said) if best is not None else None
            options = options_for(stated.get(spec.name, []), model_attrs.get(spec.name), confidence.get(spec.name),
                                  context, applies.get(spec.name))
            scored = []
            for option in options:
                if option.stated:
                    option.applies_words = applies_text.get(spec.name)
                    option.stated_p = choice.stated_p(stated_features(option, options, keys, spec.type,
                                                                      option.applies_words))
                scored.append((choice.probability(option, option.stated_p), option))
            scored.sort(key=lambda t: -t[0])
            out[spec.name] = scored
        return out

    def ground(self, listing: Listing, record: dict[str, Any]) -> dict[str, Any]:
        """The record with grounded ``attributes``, ``evidence``, ``conflicts``, ``attribute_confidence``."""
        if record.get("status") != "ok" or not isinstance(record.get("attributes"), dict):
            return record  # an invalid answer or an error has nothing to ground
        attributes = {a.name: None for a in self.schema.attributes}
        evidence: dict[str, Any] = {}
        conflicts: dict[str, Any] = {}
        withheld: dict[str, Any] = {}
        confidence: dict[str, float] = {}
        for name, scored in self.scored(listing, record).items():
            if not scored:
                continue
            p, best = scored[0]
            others = [_option_view(o) for _, o in scored[1:]]
            if p >= self.choices[name].threshold:
                attributes[name] = best.value
                confidence[name] = round(p, 4)
                evidence[name] = {**_evidence(best), "confidence": round(p, 4)}
                if others:
                    conflicts[name] = others
            else:
                withheld[name] = {"value": best.value, "confidence": round(p, 4), **_evidence(best)}
        out = {**record, "attributes": attributes, "evidence": evidence, "attribute_confidence": confidence}
        out.pop("conflicts", None)
        out.pop("withheld", None)
        if conflicts:
            out["conflicts"] = conflicts
        if withheld:
            out["withheld"] = withheld
        return out

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        out = {"format": FORMAT, "precision": self.precision, "untrained": sorted(self.untrained),
               "attributes": {name: vars(c) for name, c in self.choices.items()}}
        if self.applicability is not None:
            out["applicability"] = APPLICABILITY_FILE
        return out

    def save(self, folder: str | Path) -> Path:
        """``grounding.json`` (+ the applicability model's two files, when there is one) in ``folder``."""
        if self.applicability is not None:
            self.applicability.save(folder)
        path = Path(folder) / GROUNDING_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path, schema: LabelSchema) -> "Grounder | None":
        """The folder's fitted choice, or None when it has none (older folders: answers stay the model's)."""
        path = Path(folder) / GROUNDING_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, this mmllm reads {FORMAT}")
            choices = {}
            for name, c in data["attributes"].items():
                if name not in schema.attribute_names:
                    raise ValueError(f"attribute '{name}' is not in the schema")
                choices[name] = AttributeChoice(**c)
            applicability = Applicability.load(path.parent) if data.get("applicability") else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a grounding file: {exc}") from None
        return cls(schema, choices, float(data.get("precision", 0.9)), data.get("untrained", ()), applicability)


def _values(spec: Any) -> list[Any]:
    return [False, True] if spec.type == "boolean" else list(spec.values) if spec.type == "enum" else []


def _evidence(option: Option) -> dict[str, Any]:
    primary = option.primary()
    model_p = None if option.model_p is None else round(option.model_p, 4)
    if primary is None and option.context_p is not None:
        out = {"source": "context", "from": option.context, "probability": round(option.context_p, 4)}
        if option.model_agrees:
            out["model"] = {"agrees": True, "probability": model_p}
        return out
    if primary is None:
        out = {"source": "model", "probability": model_p}
        if option.applies_p is not None:  # stage B read it: why a model-only value is published or withheld
            out["applies"] = {"model": round(option.applies_p, 4)}
        return out
    out = primary.evidence()
    also = [c.evidence() for c in option.stated if c is not primary]
    if also:
        out["also"] = also
    if option.model_agrees:
        out["model"] = {"agrees": True, "probability": None if option.model_p is None else round(option.model_p, 4)}
    applies = {k: round(v, 4) for k, v in (("words", option.applies_words), ("model", option.applies_p))
               if v is not None}
    if applies:  # how likely this listing is to have a value at all: why the same pattern is published or not
        out["applies"] = applies
    return out


def _option_view(option: Option) -> dict[str, Any]:
    return {"value": option.value, **_evidence(option)}


# ---------------------------------------------------------------------- fitting
def fit_grounder(schema: LabelSchema, train: Sequence[Listing], dev: Sequence[Listing],
                 dev_records: Sequence[Mapping[str, Any]], cfg: GroundingConfig = GroundingConfig(),
                 untrained: Sequence[str] = ()) -> tuple[Grounder, dict[str, Any]]:
    """Fit stage A on the labelled ``train`` listings and stage B + thresholds on ``dev`` (the model's
    ``dev_records``, aligned). Returns the grounder and a report per attribute. Rows labelled for
    their category only (:func:`~mmllm.catalog.attributes_labelled`) say nothing of the attributes and
    are left out of every fit."""
    train = [row for row in train if attributes_labelled(row.label)]
    kept = [(row, record) for row, record in zip(dev, dev_records) if attributes_labelled(row.label)]
    dev, dev_records = [row for row, _ in kept], [record for _, record in kept]
    choices: dict[str, AttributeChoice] = {}
    applicability, out_of_fold = None, {}
    if cfg.applicability and train:
        golds = {spec.name: [_gold(row, spec.name) is not None for row in train]
                 for spec in schema.attributes if spec.name not in untrained}
        applicability, out_of_fold = fit_applicability(train, golds, TfidfConfig(), c=cfg.applicability_c,
                                                       folds=cfg.applicability_folds)
    train_stated = [candidates(row, schema) for row in train]
    train_keys = [stated_keys(row.attributes or {}, schema.attributes) for row in train]
    for spec in schema.attributes:
        name = spec.name
        if name in untrained:
            continue
        choice = AttributeChoice(name, trained_rows=sum(_gold(r, name) is not None for r in train))
        rows_f, rows_y = [], []
        applies = out_of_fold.get(name)
        for i, (row, stated, keys) in enumerate(zip(train, train_stated, train_keys)):
            gold = _gold(row, name)
            options = options_for(stated[name], None, None)
            for option in options:
                rows_f.append(stated_features(option, options, keys, spec.type, applies[i] if applies else None))
                rows_y.append(float(gold is not None and values_match(option.value, gold)))
        if rows_f:
            vocab = sorted({k for f in rows_f for k in f})
            x = np.array([[f.get(k, 0.0) for k in vocab] for f in rows_f])
            order = [vocab.index("bias")] + [i for i, k in enumerate(vocab) if k != "bias"]
            w = fit_logistic(x[:, order], np.array(rows_y), cfg.l2)
            choice.stated_weights = {vocab[i]: round(float(v), 6) for i, v in zip(order, w)}
            choice.stated_options = len(rows_f)
        choice.context_weights = _fit_context(schema, spec, train, train_stated, train_keys, cfg.l2)
        choices[name] = choice
    grounder = Grounder(schema, choices, cfg.precision, untrained,
                        applicability if applicability is not None and applicability.weights else None)
    _fit_choice(grounder, dev, dev_records, cfg)
    report = {name: {**{k: v for k, v in vars(c).items() if k not in ("name", "stated_weights", "choice_weights")},
                     "combined": c.choice_weights is not None,
                     "applicability_c": None if applicability is None else applicability.c.get(name)}
              for name, c in choices.items()}
    return grounder, report


def _fit_context(schema: LabelSchema, spec: Any, train: Sequence[Listing], stated: Sequence[Mapping[str, list]],
                 keys: Sequence[int], l2: float) -> dict[str, dict[str, float]]:
    """Stage A': for a boolean / enum attribute, one logistic model per value of "the gold is this
    value" from the listing's other stated fields, on the training rows that do not state it."""
    values = _values(spec)
    rows = [(context_features(st, k, schema, spec.name)[0], _gold(row, spec.name))
            for row, st, k in zip(train, stated, keys) if not st[spec.name] and row.label is not None]
    if not values or len(rows) < 20:
        return {}
    vocab = ["bias"] + sorted({k for f, _ in rows for k in f} - {"bias"})
    x = np.array([[f.get(k, 0.0) for k in vocab] for f, _ in rows])
    out = {}
    for v in values:
        y = np.array([float(g is not None and values_match(v, g)) for _, g in rows])
        if y.sum() >= 5:
            w = fit_logistic(x, y, l2)
            out[value_key(v)] = {k: round(float(c), 6) for k, c in zip(vocab, w) if abs(c) > 1e-9}
    return out


def _fit_choice(grounder: Grounder, dev: Sequence[Listing], records: Sequence[Mapping[str, Any]],
                cfg: GroundingConfig) -> None:
    """Stage B and the thresholds, from the dev rows and the model's answers on them."""
    identity = dict(grounder.choices)
    per_attr_x: dict[str, list[np.ndarray]] = {n: [] for n in identity}
    per_attr_y: dict[str, list[float]] = {n: [] for n in identity}
    model_right: dict[str, list[bool]] = {n: [] for n in identity}
    for row, record in zip(dev, records):
        if record.get("status") != "ok":
            continue
        for name, scored in grounder.scored(row, record).items():
            if name not in identity:
                continue
            gold = _gold(row, name)
            said = (record.get("attributes") or {}).get(name)
            if said is not None:
                model_right[name].append(gold is not None and values_match(said, gold))
            for _, option in scored:
                per_attr_x[name].append(choice_features(option, option.stated_p))
                per_attr_y[name].append(float(gold is not None and values_match(option.value, gold)))
    for name, choice in identity.items():
        if model_right[name]:
            choice.model_precision = round((sum(model_right[name]) + 1) / (len(model_right[name]) + 2), 6)
        y = np.array(per_attr_y[name])
        choice.dev_options = len(y)
        if len(y) >= 20 and y.sum() >= 5 and (len(y) - y.sum()) >= 5:
            choice.choice_weights = [round(float(v), 6) for v in fit_logistic(np.stack(per_attr_x[name]), y, cfg.l2)]
    # thresholds: the chosen answer per dev row, then the lowest cut whose answers reach the precision
    answers: dict[str, list[tuple[float, bool]]] = {n: [] for n in identity}
    for row, record in zip(dev, records):
        if record.get("status") != "ok":
            continue
        for name, scored in grounder.scored(row, record).items():
            if scored and name in answers:
                p, best = scored[0]
                gold = _gold(row, name)
                answers[name].append((p, gold is not None and values_match(best.value, gold)))
    for name, choice in identity.items():
        choice.threshold, choice.dev_precision, choice.dev_answered = _threshold(answers[name], cfg, dev_given=bool(dev))


def _threshold(answers: list[tuple[float, bool]], cfg: GroundingConfig, dev_given: bool) -> tuple[float, float | None, int]:
    """The lowest probability cut (>= 0.5) whose answers' Wilson-bounded precision reaches the target,
    placed halfway to the first dev answer it leaves out (or, when it leaves none out, no higher than
    the target itself: a calibrated probability above it needs no dev row to vouch for it).

    When no cut's bound reaches the target, the dev rows are too few to vouch for any cut: the
    probabilities are taken at their word (cut = the target) if the dev answers above the target are
    precise enough, and the attribute is never answered if they are not. Without dev rows the
    probabilities are taken at their word."""
    if not dev_given or not answers:
        return cfg.precision, None, 0
    ranked = sorted(answers, key=lambda t: -t[0])
    above = [ok for p, ok in ranked if p >= cfg.precision]
    if not above or sum(above) / len(above) >= cfg.precision:
        best: tuple[float, float | None, int] = (cfg.precision, round(sum(above) / len(above), 4) if above else None,
                                                 len(above))
    else:
        best = (1.0 + 1e-9, None, 0)  # the dev answers contradict the probabilities: never answer
    correct = 0
    for i, (p, ok) in enumerate(ranked, 1):
        correct += ok
        if p < 0.5:
            break
        if i < len(ranked) and ranked[i][0] == p:
            continue  # ties answer together
        if wilson_lower(correct, i, cfg.z) >= cfg.precision:
            below = ranked[i][0] if i < len(ranked) else None
            cut = max((p + below) / 2, 0.5) if below is not None else min(p, cfg.precision)
            best = (cut, round(correct / i, 4), i)
    return round(best[0], 6), best[1], best[2]


def _gold(row: Listing, name: str) -> Any:
    return ((row.label or {}).get("attributes") or {}).get(name)


# ---------------------------------------------------------------------- the predictor wrapper
class GroundedPredictor:
    """Any predictor, with its records grounded: ``encode`` keeps the listings beside the model's
    inputs so ``predict_encoded`` can read what each listing states."""

    _own = ("inner", "grounder")

    def __init__(self, inner: Any, grounder: Grounder) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "grounder", grounder)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:  # batch_size, constrained, ... set on the model
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def encode(self, listings: Sequence[Listing], images: Sequence[Sequence[Any]]) -> Any:
        return list(listings), self.inner.encode(listings, images)

    def predict_encoded(self, encoded: Any, raw: bool = False) -> list[dict[str, Any]]:
        listings, inner = encoded
        return [self.grounder.ground(listing, record)
                for listing, record in zip(listings, self.inner.predict_encoded(inner, raw=raw))]

    def embed_encoded(self, encoded: Any, pooling: str = "last") -> np.ndarray:
        return self.inner.embed_encoded(encoded[1], pooling)

    def predict(self, listings: Sequence[Listing], image_policy: Any) -> list[dict[str, Any]]:
        """Grounded records with ids, in order (the inner model's ``predict`` would skip the grounding)."""
        from mmllm.predictor import predict_in_batches

        return predict_in_batches(self, listings, image_policy)
