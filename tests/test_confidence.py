"""Calibration maps, the risk-coverage curve and the threshold for a target accuracy (mmllm.confidence),
and the value spans a generative answer's probabilities are read over (schema.answer_spans)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mmllm.confidence import CALIBRATION_FILE, FORMAT, Calibration, SCORE, Platt, operating_point, risk_coverage, wilson
from mmllm.schema import answer_spans


def test_platt_recovers_the_map_that_generated_the_outcomes():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.01, 0.99, 20000)
    truth = 1 / (1 + np.exp(-(2.0 * np.log(scores / (1 - scores)) - 1.0)))
    correct = rng.uniform(size=scores.size) < truth
    platt = Platt.fit(scores.tolist(), correct.tolist())
    assert platt.a == pytest.approx(2.0, abs=0.1) and platt.b == pytest.approx(-1.0, abs=0.1)
    assert platt.rows == 20000
    # monotone: the order of the rows (and so the curve) never changes
    mapped = [platt(s) for s in np.sort(scores)[::500]]
    assert mapped == sorted(mapped)
    assert platt(0.5) == pytest.approx(1 / (1 + math.exp(1.0)), abs=0.03)


def test_platt_is_the_identity_when_there_is_nothing_to_fit():
    assert Platt.fit([0.2, 0.9], [True, False]).identity  # too few rows
    assert Platt.fit([0.1 * i for i in range(1, 10)], [True] * 9).identity  # one outcome only
    assert Platt()(0.3) == pytest.approx(0.3) and Platt()(None) is None


def test_platt_stays_finite_when_dev_separates_perfectly():
    platt = Platt.fit([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9], [False] * 4 + [True] * 4)
    assert math.isfinite(platt.a) and math.isfinite(platt.b) and platt.a > 1
    assert platt(0.9) > 0.9 and platt(0.1) < 0.1


def test_platt_fits_scores_bunched_far_from_the_identity():
    """A small model's path probabilities, all near 0.02, two of eight right: a full Newton step from the
    identity overshot into the sigmoid's flat tail and stopped at a map sending every row to 1e-13 (all
    tied, so no threshold reached any accuracy); the damped step finds the minimum of the log-loss."""
    scores = [0.0181011, 0.0211606, 0.0162676, 0.0233229, 0.015209, 0.0124143, 0.0199388, 0.0137865]
    correct = [False, False, False, True, False, False, False, True]
    platt = Platt.fit(scores, correct)
    mapped = [platt(s) for s in scores]
    assert 0.15 < sum(mapped) / len(mapped) < 0.35  # about the 2 in 8 that are right
    assert len(set(mapped)) == len(scores) and platt.a > 0  # the order of the rows is kept

    def loss(a: float, b: float) -> float:  # the fit's own objective
        z = [a * math.log(s / (1 - s)) + b for s in scores]
        return sum(math.log1p(math.exp(v)) - y * v for v, y in zip(z, correct)) + ((a - 1) ** 2 + b ** 2) / 2

    best = loss(platt.a, platt.b)
    assert all(best <= loss(platt.a + da, platt.b + db) + 1e-9
               for da in (-0.01, 0, 0.01) for db in (-0.01, 0, 0.01))


def test_risk_coverage_by_hand_ties_kept_together_and_unscored_rows_last():
    confidence = [0.9, 0.8, 0.8, 0.3, None]
    correct = [True, False, True, True, False]
    curve = risk_coverage(confidence, correct)
    assert curve.thresholds == [0.9, 0.8, 0.3, -math.inf]
    assert curve.coverage == [0.2, 0.6, 0.8, 1.0]
    assert curve.accuracy == [1.0, pytest.approx(2 / 3), 0.75, 0.6]
    assert curve.kept == [1, 3, 4, 5]
    assert curve.accuracy_at(0.5) == pytest.approx(2 / 3)  # the point at or just above 50%
    assert curve.accuracy_at(1.0) == 0.6
    assert curve.area() == pytest.approx(0.2 * 1 + 0.4 * 2 / 3 + 0.2 * 0.75 + 0.2 * 0.6)


def test_operating_point_is_the_lowest_threshold_reaching_the_target():
    curve = risk_coverage([0.9, 0.8, 0.8, 0.3, None], [True, False, True, True, False])
    point = operating_point(curve, 0.75)
    assert (point.threshold, point.coverage, point.kept, point.accuracy) == (0.3, 0.8, 4, 0.75)
    assert (point.low, point.high) == pytest.approx(wilson(3, 4))
    assert operating_point(curve, 0.99).threshold == 0.9
    assert operating_point(risk_coverage([0.5, 0.4], [False, False]), 0.5) is None
    with pytest.raises(ValueError, match="target accuracy"):
        operating_point(curve, 1.5)
    assert "keep rows with confidence >= 0.3: 80% of them (4), accuracy 0.750" in point.sentence()


def test_wilson_interval_by_hand():
    low, high = wilson(8, 10)  # p = 0.8, z = 1.96
    z = 1.96
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    assert (low, high) == pytest.approx((centre - half, centre + half))


def test_calibration_file_round_trips_and_names_a_broken_file(tmp_path):
    curve = risk_coverage([0.9, 0.7, 0.4, None], [True, True, False, False])
    calibration = Calibration("platt", Platt(1.5, -0.2, 40), Platt(0.8, 0.1, 90), curve)
    calibration.save(tmp_path)
    again = Calibration.load(tmp_path)
    assert again.method == "platt" and again.category == Platt(1.5, -0.2, 40) and again.attributes == Platt(0.8, 0.1, 90)
    assert again.curve == curve
    assert again.threshold_for(1.0).threshold == 0.7
    assert Calibration.load(tmp_path / "nowhere") is None
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match=f"{CALIBRATION_FILE}: not a readable calibration file"):
        Calibration.load(tmp_path)


def test_a_platt_map_fitted_on_an_older_score_is_stale_and_gives_no_threshold(tmp_path):
    curve = risk_coverage([0.9, 0.7, 0.4], [True, True, False])
    Calibration("platt", Platt(1.5, -0.2, 40), Platt(), curve).save(tmp_path)
    data = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    assert data["score"] == SCORE
    del data["score"]  # a folder calibrated before the score's definition was written down
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(data))
    old = Calibration.load(tmp_path)
    assert old.stale and old.category == Platt(1.5, -0.2, 40)  # still applied: lower, so conservative
    with pytest.raises(ValueError, match="older answer score.*--review-below"):
        old.threshold_for(0.9)
    heads = Calibration("temperature", curve=curve)  # the heads' temperature is in their weights: no score
    heads.save(tmp_path)
    assert "score" not in json.loads((tmp_path / CALIBRATION_FILE).read_text())
    assert not Calibration.load(tmp_path).stale and Calibration.load(tmp_path).threshold_for(1.0).threshold == 0.7


def test_answer_spans_point_at_each_value():
    text = 'Sure: {"category": "Games > Chess", "attributes": {"piece_count": 32, "material": ["wood", "glass"], ' \
           '"assembly_required": null}} done'
    spans = answer_spans(text)
    shown = {key: text[a:b] for key, (a, b) in spans.items()}
    assert shown == {"category": '"Games > Chess"', "attributes.piece_count": "32",
                     "attributes.material": '["wood", "glass"]', "attributes.assembly_required": "null"}


def test_answer_spans_keep_what_was_read_before_the_json_breaks():
    text = '{"category":"Games > Chess","attributes":{"piece_count":3'
    spans = answer_spans(text)
    assert {key: text[a:b] for key, (a, b) in spans.items()} == {"category": '"Games > Chess"', "attributes.piece_count": "3"}
    assert answer_spans("no json here") == {}
    assert answer_spans('{"category": "A \\" quoted"}') == {"category": (13, 26)}


def test_calibration_applies_to_a_record_and_small_probabilities_keep_their_order():
    calibration = Calibration("platt", Platt(2.0, 0.5, 50), Platt(1.0, 1.0, 50))
    record = {"category": "A", "confidence": 0.4, "attribute_confidence": {"n": 0.25}, "status": "ok"}
    out = calibration.apply(record)
    assert out["confidence"] == pytest.approx(Platt(2.0, 0.5)(0.4), rel=1e-5)
    assert out["attribute_confidence"] == {"n": pytest.approx(Platt(1.0, 1.0)(0.25), rel=1e-5)}
    assert out["category"] == "A" and record["confidence"] == 0.4  # the record itself is left as it was
    tiny = Calibration("platt").apply({"confidence": 2.99e-7, "attribute_confidence": {}})
    assert tiny["confidence"] == 2.99e-7  # 6 significant digits, not 6 decimals (which would give 0.0)
    assert Calibration("platt").apply({"confidence": 3.01e-7})["confidence"] > tiny["confidence"]


@pytest.mark.parametrize("content, reason", [
    ("[]", "expected a JSON object, got list"),
    ('{"format": FORMAT, "method": "platt", "category": "platt"}', "category: expected an object, got str"),
    ('{"format": FORMAT, "method": "platt", "category": {"method": "platt", "a": NaN, "b": 0}}', "not finite"),
    ('{"format": FORMAT, "method": "platt", "dev_curve": {"rows": 3, "points": []}}', "dev_curve: no points"),
    ('{"format": FORMAT, "method": "platt", "dev_curve": {"rows": 3, "points": [{"t": 1}]}}', "a point is not"),
    ('{"format": FORMAT, "method": "platt", "dev_curve": {"rows": 3, "points": [[NaN, 1, 1, 3]]}}', "not a finite number"),
])
def test_a_damaged_calibration_file_is_named_with_what_is_wrong(tmp_path, content, reason):
    (tmp_path / CALIBRATION_FILE).write_text(content.replace("FORMAT", json.dumps(FORMAT)))
    with pytest.raises(ValueError, match=f"{CALIBRATION_FILE}: not a readable calibration file") as info:
        Calibration.load(tmp_path)
    assert reason in str(info.value)


@pytest.mark.parametrize("platt", [False, True])
def test_calibration_reads_the_dev_gold_as_the_schema_spells_it(tmp_path, platt):
    """A dev file's gold in another case ('games > chess') is the taxonomy's 'Games > Chess' for training and
    `mmllm evaluate`; calibration.json counted every right answer as wrong (its curve 0.0 everywhere, and
    --review-target-accuracy refused the folder)."""
    from types import SimpleNamespace

    from mmllm.catalog import Listing
    from mmllm.recipes.common import fit_calibration
    from mmllm.schema import LabelSchema

    schema = LabelSchema.from_dict({"name": "s", "taxonomy": ["Games > Chess", "Outdoor > Kites"], "attributes": {}})
    setup = SimpleNamespace(schema=schema, out_dir=tmp_path, accelerator=SimpleNamespace(is_main_process=True))
    rows = [Listing(f"r{i}", "x", label={"category": spelled}) for i, spelled in
            enumerate(["games > chess", " Games  >  Chess ", "outdoor > kites", "Outdoor > Kites"] * 3)]
    records = [{"id": row.id, "category": "Games > Chess", "confidence": 0.9 - 0.01 * i}
               for i, row in enumerate(rows)]
    fit_calibration(setup, SimpleNamespace(calibration=None), rows, records, platt=platt)
    curve = Calibration.load(tmp_path).curve
    right = [i % 4 < 2 for i in range(12)]  # the two spellings of Games > Chess in every four rows
    assert curve.accuracy == pytest.approx([sum(right[:k]) / k for k in range(1, 13)])
