"""The learned choice between stated values, the model's answer and null: it learns which sources a
catalog can trust, fits thresholds for precision, and every answered value carries its evidence."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from mmllm.catalog import Listing
from mmllm.grounding import (GROUNDING_FILE, Grounder, GroundedPredictor, GroundingConfig, _threshold, fit_grounder,
                             fit_logistic, wilson_lower)
from mmllm.schema import LabelSchema

SCHEMA = {
    "taxonomy": ["Toys > Cars", "Toys > Dolls"],
    "attributes": {
        "remote": {"type": "boolean", "evidence": {"table": ["Remote Included"]}},
        "wheels": {"type": "boolean", "evidence": {"table": ["Has Wheels"]}},  # this catalog's sellers get it wrong
        "pieces": {"type": "integer", "minimum": 1, "maximum": 5000,
                   "evidence": {"table": ["Pieces"], "text": [{"name": "n_pieces",
                                                               "pattern": "(?P<value>[0-9]+) pieces"}]}},
    },
}


def _rows(n: int, seed: int) -> tuple[list[Listing], list[dict]]:
    """Listings whose `remote` table is true to the gold, whose `wheels` table is a coin flip (the
    gold is the opposite 60% of the time), and whose `pieces` are in the title; with a model that
    knows `wheels` (right 9 times in 10) and guesses `remote` (right half the time)."""
    rng = random.Random(seed)
    listings, records = [], []
    for i in range(n):
        remote, wheels, pieces = rng.random() < 0.5, rng.random() < 0.5, rng.choice([100, 250, 500, 1000])
        table = {"Remote Included": "Yes" if remote else "No",
                 "Has Wheels": ("Yes" if wheels else "No") if rng.random() < 0.4 else ("No" if wheels else "Yes")}
        title = f"Toy {i}, {pieces} pieces"
        gold = {"remote": remote, "wheels": wheels, "pieces": pieces}
        listings.append(Listing(f"r{seed}-{i}", title, "", table, label={"category": "Toys > Cars", "attributes": gold}))
        right = rng.random() < 0.9
        records.append({"category": "Toys > Cars", "status": "ok",
                        "attributes": {"remote": rng.random() < 0.5, "wheels": wheels if right else not wheels,
                                       "pieces": 7},
                        "attribute_confidence": {"remote": 0.55, "wheels": 0.95 if right else 0.6, "pieces": 0.3}})
    return listings, records


@pytest.fixture(scope="module")
def fitted() -> tuple[Grounder, dict]:
    schema = LabelSchema.from_dict(SCHEMA)
    train, _ = _rows(300, seed=1)
    dev, dev_records = _rows(150, seed=2)
    return fit_grounder(schema, train, dev, dev_records, GroundingConfig(precision=0.9))


def test_rows_labelled_for_their_category_only_leave_the_fit_as_it_was(fitted):
    """Category-only labels (a big title-level catalog) say nothing of the attributes: the fit is the
    same with them, where taking their attributes for "not stated" would teach every table key to lie."""
    schema = LabelSchema.from_dict(SCHEMA)
    train, _ = _rows(300, seed=1)
    dev, dev_records = _rows(150, seed=2)
    extra, extra_records = _rows(200, seed=4)
    only = [Listing(r.id + "-c", r.title, "", r.attributes, label={"category": "Toys > Cars", "attributes": None})
            for r in extra]
    grounder, report = fit_grounder(schema, train + only, dev + only[:100], dev_records + extra_records[:100],
                                    GroundingConfig(precision=0.9))
    assert report == fitted[1]
    assert grounder.to_dict() == fitted[0].to_dict()
    as_not_stated = [Listing(r.id, r.title, "", r.attributes, label={"category": "Toys > Cars", "attributes": {}})
                     for r in only]
    _, poisoned = fit_grounder(schema, train + as_not_stated, dev, dev_records, GroundingConfig(precision=0.9))
    assert poisoned != fitted[1]  # the same rows read as "not stated" do change it


def test_the_choice_learns_which_table_lies_and_which_source_to_trust(fitted):
    grounder, report = fitted
    test, records = _rows(300, seed=3)
    out = [grounder.ground(row, rec) for row, rec in zip(test, records)]
    gold = [row.label["attributes"] for row in test]
    # the truthful table answers every row, from the table, all correct
    assert all(o["attributes"]["remote"] is g["remote"] and o["evidence"]["remote"]["source"] == "table"
               for o, g in zip(out, gold))
    assert all(o["evidence"]["remote"]["key"] == "Remote Included" and o["evidence"]["remote"]["confidence"] > 0.9
               for o in out)
    # the lying table is outweighed: wheels come from the model, precise, and the table is kept as a conflict
    answered = [(o, g) for o, g in zip(out, gold) if o["attributes"]["wheels"] is not None]
    precision = sum(o["attributes"]["wheels"] is g["wheels"] for o, g in answered) / len(answered)
    assert precision >= 0.9 and len(answered) >= 0.5 * len(test)
    # each answer is the model's: alone, or agreeing with the table (the table then is shown first)
    assert all(o["evidence"]["wheels"]["source"] == "model" or o["evidence"]["wheels"]["model"]["agrees"]
               for o, _ in answered)
    assert grounder.choices["wheels"].stated_weights["table:Has Wheels"] < grounder.choices["remote"].stated_weights[
        "table:Remote Included"]
    disagreeing = [o for o, _ in answered if o.get("conflicts", {}).get("wheels")]
    assert disagreeing and all(o["conflicts"]["wheels"][0]["source"] == "table" for o in disagreeing)
    # the model's wrong piece count never beats the title: the value and its span are the title's
    for row, o in zip(test, out):
        ev = o["evidence"]["pieces"]
        assert o["attributes"]["pieces"] == row.label["attributes"]["pieces"]
        assert (ev["source"], ev["key"]) == ("title", "n_pieces")
        assert row.title[slice(*ev["span"])] == f"{o['attributes']['pieces']} pieces"
    assert report["wheels"]["dev_precision"] >= 0.9


def test_withheld_values_keep_their_evidence_for_review(fitted):
    grounder, _ = fitted
    row = Listing("w", "Toy", "", {"Has Wheels": "Yes"})
    record = {"category": "Toys > Cars", "status": "ok", "attributes": {"remote": None, "wheels": None, "pieces": None},
              "attribute_confidence": {}}
    out = grounder.ground(row, record)
    assert out["attributes"]["wheels"] is None  # the lying table alone is not published
    withheld = out["withheld"]["wheels"]
    assert (withheld["value"], withheld["source"], withheld["text"]) == (True, "table", "Yes")
    assert withheld["confidence"] < grounder.choices["wheels"].threshold
    assert out["evidence"] == {} and "remote" not in out["withheld"]  # nothing stated, no model answer: null


def test_errors_and_invalid_answers_pass_through(fitted):
    grounder, _ = fitted
    error = {"status": "error", "stage": "model", "error": "boom"}
    assert grounder.ground(Listing("e", "t"), error) is error


def test_the_fitted_choice_round_trips_through_the_model_folder(fitted, tmp_path):
    grounder, _ = fitted
    grounder.save(tmp_path)
    again = Grounder.load(tmp_path, grounder.schema)
    test, records = _rows(40, seed=4)
    assert [again.ground(r, rec) for r, rec in zip(test, records)] == [grounder.ground(r, rec)
                                                                       for r, rec in zip(test, records)]
    (tmp_path / GROUNDING_FILE).write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match=f"{GROUNDING_FILE}: not a grounding file: format 99"):
        Grounder.load(tmp_path, grounder.schema)
    assert Grounder.load(tmp_path / "missing", grounder.schema) is None


def test_wrapped_predictor_grounds_what_the_inner_one_answers(fitted):
    grounder, _ = fitted

    class Inner:
        schema, max_images, batch_size, takes = grounder.schema, 0, 2, frozenset()

        def encode(self, listings, images):
            return len(listings)

        def predict_encoded(self, n, raw=False):
            return [{"category": "Toys > Cars", "status": "ok", "attributes": {"remote": False, "wheels": None,
                                                                               "pieces": 1}}] * n

        def embed_encoded(self, n, pooling="last"):
            return np.ones((n, 3), np.float32)

    wrapped = GroundedPredictor(Inner(), grounder)
    wrapped.batch_size = 5  # options land on the model
    assert wrapped.inner.batch_size == 5 and wrapped.max_images == 0
    rows = [Listing("a", "Car, 500 pieces", "", {"Remote Included": "Yes"})]
    (record,) = wrapped.predict_encoded(wrapped.encode(rows, [[]]))
    assert record["attributes"]["remote"] is True and record["attributes"]["pieces"] == 500
    assert record["conflicts"]["remote"] == [{"value": False, "source": "model", "probability": None}]
    assert wrapped.embed_encoded(wrapped.encode(rows, [[]])).shape == (1, 3)


def test_threshold_is_the_lowest_cut_whose_wilson_bound_reaches_the_target():
    cfg = GroundingConfig(precision=0.8, z=0.0)
    # 10 answers: the top 6 right, then wrong, right, wrong, wrong: raw precision 6/6, 6/7, 7/8, 7/9, 7/10
    answers = [(0.99 - i * 0.01, ok) for i, ok in enumerate([1, 1, 1, 1, 1, 1, 0, 1, 0, 0])]
    threshold, precision, answered = _threshold(answers, cfg, dev_given=True)
    assert (round(threshold, 2), precision, answered) == (0.92, 0.875, 8)
    # with a Wilson bound (z = 1) the same answers support only the cut where 6/6 are right
    assert wilson_lower(6, 6, 1.0) == pytest.approx(6 / 7)
    assert _threshold(answers, GroundingConfig(precision=0.8, z=1.0), dev_given=True)[2] == 6
    # no cut's bound reaches 0.95: the 5 answers at or above 0.95 are all right, so 0.95 is taken at its word
    assert _threshold(answers, GroundingConfig(precision=0.95, z=1.0), dev_given=True) == (0.95, 1.0, 5)
    # ... but when the answers above the target are wrong too often, the attribute is never answered
    wrong_on_top = [(0.99, False), (0.98, True), (0.97, True)]
    assert _threshold(wrong_on_top, GroundingConfig(precision=0.95, z=1.0), dev_given=True)[2] == 0
    assert _threshold([], cfg, dev_given=False) == (0.8, None, 0)  # no dev rows: probabilities at their word


def test_logistic_fit_recovers_a_known_rule():
    rng = np.random.default_rng(0)
    x = np.column_stack([np.ones(2000), rng.normal(size=2000)])
    y = (rng.random(2000) < 1 / (1 + np.exp(-(0.5 + 2.0 * x[:, 1])))).astype(float)
    w = fit_logistic(x, y, l2=0.1)
    assert w == pytest.approx([0.5, 2.0], abs=0.25)


@pytest.mark.parametrize("bad", ["precision=0", "precision=1.5", "l2=-1", "dev_rows=0"])
def test_config_bounds(bad):
    key, value = bad.split("=")
    with pytest.raises(ValueError, match=f"grounding.{key}"):
        GroundingConfig(**{key: float(value) if key != "dev_rows" else int(value)})


def test_a_choice_fitted_before_the_applicability_features_reads_them_as_zero():
    """A folder's stage B written with the first ten features (before ``applies_known`` and the two
    applicability logits) gives the same probabilities it gave then, whatever the record says now."""
    from mmllm.grounding import B_FEATURES, AttributeChoice, Option, choice_features

    old = [0.3, 1.1, 0.5, 0.2, 0.4, -0.6, 0.7, 0.1, 0.9, 0.8]
    assert len(B_FEATURES) > len(old)
    choice = AttributeChoice("pieces", choice_weights=old)
    option = Option(500, model_agrees=True, model_p=0.8, applies_p=0.95)
    x = choice_features(option, None)
    expected = 1 / (1 + np.exp(-float(x[:len(old)] @ np.array(old))))
    assert x[len(old):].any() and choice.probability(option, None) == pytest.approx(expected)


def test_a_precision_target_of_one_with_a_wilson_bound_is_refused():
    """It was accepted and published nothing: the Wilson lower bound of a finite dev sample never reaches 1."""
    with pytest.raises(ValueError, match=r"grounding.precision: 1 with grounding.z > 0 publishes nothing"):
        GroundingConfig(precision=1.0)
    assert GroundingConfig(precision=1.0, z=0).precision == 1.0  # the raw dev precision can be 1
