"""The demo's evidence display: the attribute table (value, source, evidence text, confidence, note)
and the highlighted title and description, from hand-written records; then a listing through
``Demo.predict`` with a grounded predictor - a stand-in with a hand-set choice (exact numbers), and
the tiny random Qwen2-VL with a choice fitted by ``fit_grounder`` (slow)."""

from __future__ import annotations

import pytest

from helpers import TOYS_SCHEMA, require_gradio

gr = require_gradio()  # before mmllm.demo, which imports gradio

from mmllm.catalog import Listing, parse_row
from mmllm.demo import Demo, build_app
from mmllm.record_view import attribute_rows, attribute_summary, evidence_highlights, evidence_source
from mmllm.grounding import AttributeChoice, GroundedPredictor, Grounder, GroundingConfig, fit_grounder
from mmllm.schema import LabelSchema

SCHEMA = LabelSchema.from_yaml(TOYS_SCHEMA)
CATEGORY = SCHEMA.categories[0]

TITLE = "Space Station Building Set, ages 6-12, 894 pieces"
DESCRIPTION = "Batteries not required. Some assembly required. Contains 900 pieces."


def span(text: str, part: str) -> list[int]:
    start = text.index(part)
    return [start, start + len(part)]


# A grounded record as Grounder.ground writes it: every kind of source, a withheld value, conflicts.
RECORD = {
    "id": "demo", "status": "ok", "category": CATEGORY,
    "attributes": {"min_age_years": 6, "assembly_required": None, "batteries_required": False,
                   "batteries_included": True, "piece_count": 894, "material": None},
    "attribute_confidence": {"min_age_years": 0.97, "batteries_required": 0.964, "batteries_included": 0.95,
                             "piece_count": 0.93},
    "evidence": {
        "min_age_years": {"source": "table", "key": "Manufacturer recommended age", "text": "6 years and up",
                          "form": "and_up", "confidence": 0.97,
                          "also": [{"source": "title", "key": "ages_range", "text": "ages 6-12", "form": "range",
                                    "span": span(TITLE, "ages 6-12")}]},
        "batteries_required": {"source": "description", "key": "no_batteries", "text": "Batteries not required",
                               "form": "pattern", "span": span(DESCRIPTION, "Batteries not required"),
                               "model": {"agrees": True, "probability": 0.95}, "confidence": 0.964},
        "batteries_included": {"source": "context", "from": {"batteries_required": False}, "probability": 0.93,
                               "confidence": 0.95},
        "piece_count": {"source": "title", "key": "n_pieces", "text": "894 pieces", "form": "plain",
                        "span": span(TITLE, "894 pieces"), "confidence": 0.93,
                        "applies": {"words": 0.62, "model": 0.571}},
    },
    "conflicts": {"piece_count": [{"value": 900, "source": "description", "key": "n_pieces", "text": "900 pieces",
                                   "form": "plain", "span": span(DESCRIPTION, "900 pieces")},
                                  {"value": 352, "source": "model", "probability": 0.4}]},
    "withheld": {"assembly_required": {"value": True, "confidence": 0.6, "source": "description",
                                       "key": "assembly_required", "text": "Some assembly required",
                                       "form": "pattern", "span": span(DESCRIPTION, "Some assembly required")}},
}


# ---------------------------------------------------------------------- the attribute table
def test_each_value_shows_its_source_text_confidence_and_what_was_withheld_or_outvoted():
    assert attribute_rows(RECORD) == [
        ["min_age_years", "6", "table: Manufacturer recommended age", "6 years and up", "0.97",
         "also title: ages_range"],
        ["assembly_required", "-", "description: assembly_required", "Some assembly required", "0.60",
         "withheld: true (0.60)"],
        ["batteries_required", "false", "description: no_batteries", "Batteries not required", "0.96",
         "model agrees (0.95)"],
        ["batteries_included", "true", "context: batteries_required=false", "", "0.95", ""],
        ["piece_count", "894", "title: n_pieces", "894 pieces", "0.93",
         "a value expected: words 0.62, model 0.57; description: n_pieces said 900; model said 352 (0.40)"],
        ["material", "-", "", "", "", ""],  # nothing stated, nothing published
    ]


def test_a_record_without_evidence_is_the_models_own_answer():
    record = {"status": "ok", "attributes": {"piece_count": 32, "material": ["wood"], "assembly_required": None},
              "attribute_confidence": {"piece_count": 0.815}}
    assert attribute_rows(record) == [["piece_count", "32", "model", "", "0.81", ""],
                                      ["material", '["wood"]', "model", "", "", ""],
                                      ["assembly_required", "-", "model", "", "", ""]]
    assert evidence_highlights("Kite, 32 pieces", "Blue.", record) == [("Kite, 32 pieces", None), ("\n\n", None),
                                                                        ("Blue.", None)]
    assert attribute_summary(record) == 'piece_count=32 (model), material=["wood"] (model)'


@pytest.mark.parametrize("record", [{}, {"status": "error", "error": "boom"}, {"attributes": "oops", "evidence": 3},
                                    {"attributes": {"a": 1}, "evidence": {"a": "text"}, "withheld": [1],
                                     "conflicts": {"a": "x"}, "attribute_confidence": {"a": "high"}}])
def test_odd_records_give_plain_rows_never_a_crash(record):
    rows = attribute_rows(record)
    assert rows in ([], [["a", "1", "model", "", "", ""]])
    assert evidence_highlights("Kite", "", record) == [("Kite", None)]


@pytest.mark.parametrize("evidence, expected", [
    ({"source": "table", "key": "Pieces"}, "table: Pieces"),
    ({"source": "title", "key": "n_pieces"}, "title: n_pieces"),
    ({"source": "context", "from": {"batteries_required": False, "piece_count": 12}},
     "context: batteries_required=false, piece_count=12"),
    ({"source": "context"}, "context"),
    ({"source": "model", "probability": 0.9}, "model"),
    ({}, "model"),
])
def test_the_source_in_words(evidence, expected):
    assert evidence_source(evidence) == expected


def test_the_batch_preview_names_each_published_value_with_its_source_and_the_withheld_ones():
    assert attribute_summary(RECORD) == ("min_age_years=6 (table), batteries_required=false (description), "
                                         "batteries_included=true (context), piece_count=894 (title); "
                                         "withheld: assembly_required")


# ---------------------------------------------------------------------- highlighted spans
def test_spans_are_labelled_in_the_title_and_the_description_by_their_own_offsets():
    assert evidence_highlights(TITLE, DESCRIPTION, RECORD) == [
        ("Space Station Building Set, ", None), ("ages 6-12", "min_age_years"), (", ", None),
        ("894 pieces", "piece_count"),
        ("\n\n", None),
        ("Batteries not required", "batteries_required"), (". ", None),
        ("Some assembly required", "assembly_required (withheld)"), (". Contains ", None),
        ("900 pieces", "piece_count (conflict)"), (".", None),
    ]


def test_a_span_counts_in_its_own_field_only():
    """[10, 19] is inside the description only: as a title span it is out of range, as a description span it holds."""
    title, description = "Red kite", "A big red 3 pieces kite"
    in_description = {"evidence": {"piece_count": {"source": "description", "span": [10, 18]}}}
    in_title = {"evidence": {"piece_count": {"source": "title", "span": [10, 18]}}}
    assert evidence_highlights(title, description, in_description) == [
        ("Red kite", None), ("\n\n", None), ("A big red ", None), ("3 pieces", "piece_count"), (" kite", None)]
    assert evidence_highlights(title, description, in_title) == [
        ("Red kite", None), ("\n\n", None), ("A big red 3 pieces kite", None)]
    # no description: no break; no title: the description alone
    assert evidence_highlights(title, "", in_title) == [("Red kite", None)]
    assert evidence_highlights("", description, in_description) == [
        ("A big red ", None), ("3 pieces", "piece_count"), (" kite", None)]
    assert evidence_highlights("", "", in_description) == []


def test_overlapping_spans_carry_every_label_in_record_order():
    record = {"evidence": {"min_age_years": {"source": "title", "span": [0, 9]},  # "ages 6-12"
                           "max_age_years": {"source": "title", "span": [5, 15]},  # "6-12 years"
                           "age_band": {"source": "title", "span": [5, 9],  # "6-12", and the same span again
                                        "also": [{"source": "title", "span": [5, 9]}]}},
              "withheld": {"piece_count": {"source": "title", "span": [0, 15]}}}  # the whole title
    assert evidence_highlights("ages 6-12 years", "", record) == [
        ("ages ", "min_age_years, piece_count (withheld)"),
        ("6-12", "min_age_years, max_age_years, age_band, piece_count (withheld)"),
        (" years", "max_age_years, piece_count (withheld)"),
    ]


@pytest.mark.parametrize("bad", [[-1, 3], [3, 99], [4, 4], [5, 2], [1.0, 3.0], [True, 3], [1, 2, 3], "1-3", None,
                                 {"start": 1, "end": 3}])
def test_a_malformed_or_out_of_range_span_is_ignored_and_the_others_still_show(bad):
    record = {"evidence": {"bad": {"source": "title", "span": bad},
                           "good": {"source": "title", "span": [0, 3], "also": [{"source": "title", "span": bad}]}},
              "withheld": {"bad": {"source": "description", "span": bad}},
              "conflicts": {"bad": [{"source": "title", "span": bad}, "not a dict"]}}
    assert evidence_highlights("abcdef", "ghi", record) == [("abc", "good"), ("def", None), ("\n\n", None),
                                                            ("ghi", None)]


def test_spans_of_other_sources_and_broken_entries_are_ignored():
    record = {"evidence": {"a": {"source": "table", "span": [0, 3]}, "b": {"source": "image", "span": [0, 3]},
                           "c": "text", "d": {"source": "title", "span": [1, 2], "also": "not a list"}},
              "withheld": "nothing", "conflicts": {"a": {"not": "a list"}}}
    assert evidence_highlights("abcdef", "", record) == [("a", None), ("b", "d"), ("cdef", None)]


# ---------------------------------------------------------------------- through the demo
class PieceCounter:
    """A stand-in model: says 352 pieces (probability 0.4) and that assembly is required (0.7)."""

    schema = SCHEMA
    max_images = 0
    batch_size = 2

    def encode(self, listings, images):
        return {"rows": len(listings)}

    def predict_encoded(self, enc, raw=False):
        answer = SCHEMA.validate({"category": CATEGORY,
                                  "attributes": {"piece_count": 352, "assembly_required": True}}).value
        return [{**answer, "status": "ok", "attribute_confidence": {"piece_count": 0.4, "assembly_required": 0.7}}
                ] * enc["rows"]


def hand_grounder() -> Grounder:
    """Stated pieces are trusted (sigmoid(3) = 0.9526), stated assembly is a coin toss (0.5); threshold 0.9."""
    return Grounder(SCHEMA, {"piece_count": AttributeChoice("piece_count", stated_weights={"bias": 3.0}, threshold=0.9),
                             "assembly_required": AttributeChoice("assembly_required", stated_weights={"bias": 0.0},
                                                                  threshold=0.9)})


def test_a_grounded_prediction_shows_its_evidence_withheld_value_and_the_models_outvoted_answer():
    demo = Demo(GroundedPredictor(PieceCounter(), hand_grounder()))
    view = demo.predict(None, "Space Station  Building Set, 894 pieces", "No assembly required.", None)
    assert view.status.startswith(f"**ok**: the answer validates against schema '{SCHEMA.name}'")
    rows = {row[0]: row for row in view.attributes}
    assert rows["piece_count"] == ["piece_count", "894", "title: n_pieces", "894 pieces", "0.95",
                                   "model said 352 (0.40)"]
    assert rows["assembly_required"] == ["assembly_required", "-", "description: no_assembly", "No assembly", "0.50",
                                         "withheld: false (0.50)"]
    assert rows["material"] == ["material", "-", "", "", "", ""]  # grounded: the model's null is no source
    assert [row[0] for row in view.attributes] == list(SCHEMA.attribute_names)
    # the cleaned title (one space) is what the spans point into
    assert view.highlights == [("Space Station Building Set, ", None), ("894 pieces", "piece_count"), ("\n\n", None),
                               ("No assembly", "assembly_required (withheld)"), (" required.", None)]
    assert view.extras is None  # evidence, conflicts, withheld have their widgets
    assert view.record["withheld"]["assembly_required"]["value"] is False


def test_the_header_names_the_wrapped_model_and_its_grounding():
    def header(predictor) -> str:
        app = build_app(predictor, examples=None)
        return next(b.value for b in app.blocks.values() if isinstance(b, gr.Markdown) and b.value.startswith("# "))

    assert "piececounter model, grounded attributes · schema **toys**" in header(GroundedPredictor(PieceCounter(),
                                                                                                   hand_grounder()))
    assert "piececounter model · schema" in header(PieceCounter())


def training_rows(n: int = 40) -> list[Listing]:
    """Listings whose table and text state the right age and piece count; their "No assembly required"
    is right half the time."""
    rows = []
    for i in range(n):
        age = 3 + i % 5
        raw = {"id": f"t{i}", "title": f"Rocket kit {i}, {100 + i} pieces",
               "description": f"For ages {age}-12. No assembly required.",
               "attributes": {"Manufacturer recommended age": f"{age} years and up"},
               "label": {"category": CATEGORY,
                         "attributes": {"piece_count": 100 + i, "min_age_years": age, "assembly_required": i % 2 == 0}}}
        row = parse_row(raw, source="train", line=i + 1)
        assert isinstance(row, Listing), row
        rows.append(row)
    return rows


@pytest.mark.slow
def test_a_real_model_grounded_by_a_fitted_choice_end_to_end(tiny_checkpoint):
    from mmllm.label import load_predictor

    model = load_predictor(model=str(tiny_checkpoint("qwen2_vl")), schema=str(TOYS_SCHEMA), template=None,
                           constrained=True, max_new_tokens=64, batch_size=4, min_pixels=None, max_pixels=None)
    grounder, _ = fit_grounder(SCHEMA, training_rows(), [], [], GroundingConfig())  # no dev rows: thresholds 0.9
    title, description = "Space Station Building Set, 894 pieces", "For ages 6-12. No assembly required."
    table = [["Manufacturer recommended age", "6 years and up"]]

    view = Demo(GroundedPredictor(model, grounder)).predict(None, title, description, table)
    assert view.status.startswith("**ok**") and view.raw.startswith('{"category"')
    rows = {row[0]: row for row in view.attributes}
    evidence = view.record["evidence"]
    assert rows["piece_count"][:4] == ["piece_count", "894", "title: n_pieces", "894 pieces"]
    assert rows["min_age_years"][:4] == ["min_age_years", "6", "table: Manufacturer recommended age", "6 years and up"]
    assert rows["min_age_years"][5].startswith("also description: ages_range")
    for name in ("piece_count", "min_age_years"):
        assert float(rows[name][4]) >= 0.9 and rows[name][4] == f"{evidence[name]['confidence']:.2f}"
    held = view.record["withheld"]["assembly_required"]
    assert rows["assembly_required"][:4] == ["assembly_required", "-", "description: no_assembly", "No assembly"]
    assert rows["assembly_required"][5].startswith(f"withheld: false ({held['confidence']:.2f})")
    assert ("894 pieces", "piece_count") in view.highlights and ("ages 6-12", "min_age_years") in view.highlights
    assert ("No assembly", "assembly_required (withheld)") in view.highlights
    assert "".join(text for text, _ in view.highlights) == f"{title}\n\n{description}"

    # the same model without grounding: its own answers, every source "model", nothing highlighted
    plain = Demo(model).predict(None, title, description, table)
    assert plain.status.startswith("**ok**") and "evidence" not in plain.record
    assert {row[2] for row in plain.attributes} == {"model"}
    assert plain.highlights == [(title, None), ("\n\n", None), (description, None)]
