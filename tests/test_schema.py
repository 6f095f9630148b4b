"""Label schema: loading, JSON Schema, validation/normalization of answers, inference."""

import json

import jsonschema
import pytest

from mmllm.catalog import Listing, iter_catalog
from mmllm.schema import AttributeSpec, LabelSchema, SchemaError
from mmllm.schema_infer import infer_schema

from helpers import ROOT, TOYS_SCHEMA


@pytest.fixture(scope="module")
def toys():
    return LabelSchema.from_yaml(TOYS_SCHEMA)


def test_shipped_toy_schema_loads(toys):
    assert toys.name == "toys" and len(toys.categories) == 151
    assert toys.attribute_names == (
        "min_age_years", "assembly_required", "batteries_required", "batteries_included", "piece_count", "material",
    )
    assert toys.attribute("piece_count").type == "integer"
    assert all(a.description for a in toys.attributes)


def test_every_gold_label_in_the_examples_fits_the_schema(toys):
    count = 0
    for name in ("amazon_uk_toys/train.jsonl", "amazon_uk_toys/dev.jsonl", "drawn/catalog.jsonl"):
        for row in iter_catalog(ROOT / "examples" / name):
            assert isinstance(row, Listing)
            result = toys.validate(row.label)
            assert result.ok, (row.id, result.reason())
            count += 1
    assert count == 691 + 172 + 9


def test_json_schema_accepts_canonical_answers_and_rejects_bad_ones(toys):
    schema = toys.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    good = json.loads(toys.canonical_json({"category": "Games > Chess", "attributes": {"piece_count": 32, "material": ["wood"]}}))
    assert list(validator.iter_errors(good)) == []
    bad_answers = [
        {"category": "Games > Checkers", "attributes": good["attributes"]},
        {"category": "Games > Chess", "attributes": {**good["attributes"], "piece_count": 0}},
        {"category": "Games > Chess", "attributes": {**good["attributes"], "material": ["steel"]}},
        {"category": "Games > Chess", "attributes": {**good["attributes"], "colour": "red"}},
        {"category": "Games > Chess"},
    ]
    for answer in bad_answers:
        assert list(validator.iter_errors(answer)), answer


def test_validate_normalizes_what_a_reader_would_forgive(toys):
    result = toys.validate(
        {
            "category": "  games >board games ",
            "attributes": {"piece_count": "1,000", "min_age_years": "3", "assembly_required": "Yes",
                           "batteries_included": 0, "material": "Wood"},
        }
    )
    assert result.ok, result.reason()
    assert result.value == {
        "category": "Games > Board Games",
        "attributes": {"min_age_years": 3, "assembly_required": True, "batteries_required": None,
                       "batteries_included": False, "piece_count": 1000, "material": ["wood"]},
    }


@pytest.mark.parametrize(
    "answer, field, code",
    [
        ([], "answer", "not_an_object"),
        ({"attributes": {}}, "category", "missing"),
        ({"category": 7, "attributes": {}}, "category", "wrong_type"),
        ({"category": "Games > Bored Games", "attributes": {}}, "category", "not_in_taxonomy"),
        ({"category": "Games > Chess", "attributes": [], }, "attributes", "wrong_type"),
        ({"category": "Games > Chess", "attributes": {}, "confidence": 1}, "confidence", "unknown_key"),
        ({"category": "Games > Chess", "attributes": {"colour": "red"}}, "attributes.colour", "unknown_key"),
        ({"category": "Games > Chess", "attributes": {"piece_count": 3.5}}, "attributes.piece_count", "wrong_type"),
        ({"category": "Games > Chess", "attributes": {"piece_count": "many"}}, "attributes.piece_count", "wrong_type"),
        ({"category": "Games > Chess", "attributes": {"piece_count": True}}, "attributes.piece_count", "wrong_type"),
        ({"category": "Games > Chess", "attributes": {"piece_count": 0}}, "attributes.piece_count", "out_of_range"),
        ({"category": "Games > Chess", "attributes": {"min_age_years": 99}}, "attributes.min_age_years", "out_of_range"),
        ({"category": "Games > Chess", "attributes": {"assembly_required": "maybe"}}, "attributes.assembly_required", "wrong_type"),
        ({"category": "Games > Chess", "attributes": {"material": ["steel"]}}, "attributes.material", "not_in_enum"),
        ({"category": "Games > Chess", "attributes": {"material": [1]}}, "attributes.material", "wrong_type"),
        ({"category": "Games > Chess", "attributes": {"material": ["wood", "metal", "glass", "paper"]}}, "attributes.material", "too_many"),
    ],
)
def test_each_bad_answer_gets_its_specific_error(toys, answer, field, code):
    result = toys.validate(answer)
    assert not result.ok and result.value is None
    assert (result.errors[0].field, result.errors[0].code) == (field, code), result.reason()


def test_validate_reports_every_problem_with_hints(toys):
    result = toys.validate({"category": "Games > Bored Games", "attributes": {"colour": "red", "material": ["woood"]}})
    codes = [(e.field, e.code) for e in result.errors]
    assert codes == [
        ("category", "not_in_taxonomy"), ("attributes.colour", "unknown_key"), ("attributes.material", "not_in_enum"),
    ]
    assert "closest: 'Games > Board Games'" in result.reason()
    assert "did you mean 'wood'" in result.reason()


def test_parse_model_text(toys):
    text = 'Sure! ```json\n{"category": "Games > Chess", "attributes": {"piece_count": 32}}\n```'
    assert toys.parse(text).value["attributes"]["piece_count"] == 32
    for bad, reason in [("", "empty answer"), ("no json here", "no JSON object"), ('{"category": "Games > Ch', "not valid JSON"),
                        ("[1]", "no JSON object")]:
        result = toys.parse(bad)
        assert result.errors[0].code == "invalid_json" and reason in result.reason(), bad


def test_canonical_json_is_fixed_order_and_compact(toys):
    a = toys.canonical_json({"attributes": {"material": ["wood"], "piece_count": 32}, "category": "games > chess"})
    b = toys.canonical_json({"category": "Games > Chess", "attributes": {"piece_count": "32", "material": "wood"}})
    assert a == b
    assert a.startswith('{"category":"Games > Chess","attributes":{"min_age_years":null,')
    assert " " not in a.replace("Games > Chess", "")
    with pytest.raises(ValueError, match="piece_count"):
        toys.canonical_json({"category": "Games > Chess", "attributes": {"piece_count": -1}})


def test_nested_taxonomy_and_all_types():
    schema = LabelSchema.from_dict(
        {
            "name": "t",
            "taxonomy": {"Games": ["Chess", "Card Games"], "Outdoor": {"Water": None, "Kites": ["Stunt"]}},
            "attributes": {
                "colour": {"type": "enum", "values": ["red", "blue"]},
                "note": {"type": "string", "max_length": 5},
                "weight_kg": {"type": "number", "minimum": 0},
            },
        }
    )
    assert schema.categories == ("Games > Chess", "Games > Card Games", "Outdoor > Water", "Outdoor > Kites > Stunt")
    assert schema.validate({"category": "Outdoor > Kites > Stunt", "attributes": {"colour": "RED", "weight_kg": "0.5"}}).value[
        "attributes"] == {"colour": "red", "note": None, "weight_kg": 0.5}
    assert schema.validate({"category": "Games > Chess", "attributes": {"note": "too long"}}).errors[0].code == "too_long"
    assert schema.validate({"category": "Games > Chess", "attributes": {"colour": "green"}}).errors[0].code == "not_in_enum"


@pytest.mark.parametrize(
    "text, message",
    [
        ("taxonomy: [A]\nattributes: {x: {type: colour}}\n", "attribute 'x': type 'colour' is not one of"),
        ("taxonomy: [A]\nattributes: {x: {type: enum}}\n", "attribute 'x': type enum needs a non-empty 'values' list"),
        ("taxonomy: [A]\nattributes: {x: {type: integer, minimum: 5, maximum: 1}}\n", "minimum 5 > maximum 1"),
        ("taxonomy: [A, a]\n", "category 'a' is listed twice"),
        ("taxonomy: []\n", "the taxonomy is empty"),
        ("taxonomy: [A]\ncolours: []\n", "unknown top-level key(s) ['colours']"),
        ("taxonomy: [A]\nattributes: {x: {type: boolean, choices: [1]}}\n", "attribute 'x': unknown key(s) ['choices']"),
        ("taxonomy: [A\n", "cannot read the label schema"),
    ],
)
def test_bad_schema_files_name_the_file_and_entry(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SchemaError) as info:
        LabelSchema.from_yaml(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)


def test_infer_schema_from_the_amazon_training_rows():
    labels = [row.label for row in iter_catalog(ROOT / "examples/amazon_uk_toys/train.jsonl")]
    schema, report = infer_schema(labels, name="amazon")
    assert report["rows"] == 691
    assert len(schema.categories) == len(report["categories"]) > 100
    types = {a.name: a.type for a in schema.attributes}
    assert types == {"assembly_required": "boolean", "batteries_included": "boolean", "batteries_required": "boolean",
                     "min_age_years": "number", "piece_count": "integer"}
    age = schema.attribute("min_age_years")
    assert age.minimum == 0 and age.maximum >= 18
    for label in labels:  # every row it was drafted from fits the draft
        assert schema.validate(label).ok


def test_infer_enum_list_and_string_types():
    labels = [
        {"category": "A", "attributes": {"colour": "red", "tags": ["x", "y"], "note": f"free text {i}"}} for i in range(3)
    ] + [{"category": "B", "attributes": {"colour": "Blue", "tags": ["y"], "note": "other"}}]
    schema, _ = infer_schema(labels)
    assert schema.attribute("colour").type == "enum" and schema.attribute("colour").values == ("Blue", "red")
    assert schema.attribute("tags").type == "list" and schema.attribute("tags").values == ("x", "y")
    assert schema.attribute("note").type == "string"
    with pytest.raises(SchemaError, match="no labelled rows"):
        infer_schema([{"attributes": {"a": 1}}])


def test_infer_reads_one_attribute_written_several_ways_and_accepts_its_own_labels():
    """A catalog writes 386 and "386", true and "yes", a list and a bare string: the draft had typed them
    string / an enum of 'True', 'yes', ... / an enum of stringified lists and refused half of its own gold
    labels (each losing its whole label in training), silently. Values kept their double spaces and tabs
    (which the schema squeezes before comparing, so they matched nothing), took the last spelling seen
    (one "lego" beat 99 "LEGO") or, in a list, a spelling that changed with the hash seed."""
    labels = [{"category": "Toys", "attributes": {
        "pieces": i if i % 2 else str(i), "battery": [True, False][i % 2] if i % 3 else ["yes", "no"][i % 2],
        "tags": ["wood", "Metal "] if i % 2 else "wood", "brand": "LEGO" if i % 10 else "lego",
        "maker": "Hot  Wheels" if i % 2 else "Play\tDoh", "kit": ["LEGO", "Duplo"] if i % 10 else ["lego"]}}
        for i in range(1, 101)]
    schema, report = infer_schema(labels)
    types = {a.name: a.type for a in schema.attributes}
    assert types == {"battery": "boolean", "brand": "enum", "kit": "list", "maker": "enum", "pieces": "integer",
                     "tags": "list"}
    assert schema.attribute("pieces").maximum == 1000 and schema.attribute("tags").values == ("Metal", "wood")
    assert schema.attribute("brand").values == ("LEGO",) and schema.attribute("kit").values == ("Duplo", "LEGO")
    assert schema.attribute("maker").values == ("Hot Wheels", "Play Doh")
    assert all(schema.validate(label).ok for label in labels) and "refused_labels" not in report
    # what no one type reads (a number beside a list) is counted and named, never dropped in silence
    mixed = [{"category": "Toys", "attributes": {"size": 3}}, {"category": "Toys", "attributes": {"size": ["S"]}},
             {"category": "Toys", "attributes": {"size": "M"}}]
    _, report = infer_schema(mixed)
    assert report["refused_labels"]["size"] == {"values": 2, "of": 3, "first": "3", "types": {"int": 1, "list": 1, "str": 1}}
    # true beside 1 and 0 is one boolean (it drafted an enum of '0', '1', 'False', 'True' refusing all five)
    flags, report = infer_schema([{"category": "Toys", "attributes": {"b": v}} for v in (True, 0, 1, False, "yes")])
    assert flags.attribute("b").type == "boolean" and "refused_labels" not in report
    # a negative bound is rounded exactly: -100000000000000001 was bounded at -100000000000000000 through a float
    low, report = infer_schema([{"category": "Toys", "attributes": {"n": v}} for v in (-100000000000000001, 5)])
    assert low.attribute("n").minimum <= -100000000000000001 and "refused_labels" not in report
    # a value past the largest float times ten: a bound, not an OverflowError
    huge, _ = infer_schema([{"category": "Toys", "attributes": {"n": 10 ** 308}}, {"category": "Toys", "attributes": {"n": 1}}])
    assert huge.attribute("n").type == "integer" and huge.attribute("n").maximum >= 10 ** 308


def test_schema_round_trips_through_yaml(tmp_path, toys):
    toys.to_yaml(tmp_path / "s.yaml")
    again = LabelSchema.from_yaml(tmp_path / "s.yaml")
    assert again == toys and again.json_schema() == toys.json_schema()


def test_attribute_spec_rejects_values_on_scalars():
    with pytest.raises(SchemaError, match="only applies to enum and list"):
        AttributeSpec("x", "integer", values=("1",))


def test_taxonomy_leaves_written_as_empty_sections_and_spacing_are_kept():
    """'Cards: {}' and 'Go: []' were dropped silently, and a nested name kept its stray spaces (so the gold
    'Games > Card Games' matched no category)."""
    schema = LabelSchema.from_dict({"name": "t", "taxonomy": {"Games": {"Chess": None, "Cards": {}, "Go": []},
                                                              "Kites": [" Big  Kite "]}, "attributes": {}})
    assert schema.categories == ("Games > Chess", "Games > Cards", "Games > Go", "Kites > Big Kite")
    assert schema.canonical_category("kites >  big kite") == "Kites > Big Kite"


def test_the_first_json_object_is_found_after_prose_with_braces():
    from mmllm.schema import answer_spans, extract_json_object

    text = 'I will answer as {category, attributes}: {"category": "Games > Chess", "attributes": {}}'
    assert extract_json_object(text) == ({"category": "Games > Chess", "attributes": {}}, None)
    assert text[slice(*answer_spans(text)["category"])] == '"Games > Chess"'
    obj, error = extract_json_object('{"category": "A", "attr')  # cut short: its own error, from its brace
    assert obj is None and error.startswith("not valid JSON (Unterminated string")


def test_digits_of_other_scripts_are_not_read_as_numbers(toys):
    """The evidence parsers refuse them; the schema read '٣' (Arabic-Indic three) as 3."""
    answer = {"category": toys.categories[0], "attributes": {"piece_count": "٣"}}
    result = toys.validate(answer)
    assert not result.ok and "piece_count" in result.reason()


def test_a_drafted_age_read_from_a_table_that_says_months_is_a_number_and_bounds_leave_room():
    """Whole-year gold agrees with both the plain number and the age parser on "3 years and up"; the
    key names age units, so the age parser reads it, and "18 months and up" is 1.5, not 18."""
    rows = [{"id": f"r{i}", "title": "toy", "attributes": {"Recommended age": f"{age} years and up", "Pieces": n},
             "label": {"category": "Games > Chess", "attributes": {"min_age": age, "piece_count": n}}}
            for i, (age, n) in enumerate([(3, 10), (4, 500), (6, 20), (8, 100), (3, 50), (5, 30)])]
    schema, report = infer_schema([r["label"] for r in rows], rows=rows)
    age = schema.attribute("min_age")
    assert age.type == "number" and age.evidence.parse == "age"
    assert [k["parser"] for k in report["table_keys"] if k["attribute"] == "min_age"] == ["age"]
    from mmllm.evidence import PARSE

    assert PARSE["age"]("18 months and up", age).value == 1.5
    pieces = schema.attribute("piece_count")
    assert pieces.type == "integer" and pieces.maximum == 5000  # ten times the 500 seen, rounded up
    assert PARSE["integer"]("1000 pieces", pieces).value == 1000


def test_a_key_named_as_the_attribute_that_never_disagrees_is_proposed_when_every_value_is_one():
    """Every sampled row says "No" and every gold is false: kappa is undefined (chance explains all), so
    agreement beyond chance cannot be shown; a key named as the attribute is still the attribute. A key
    of another name in the same position is not proposed."""
    rows = [{"id": f"r{i}", "title": "toy", "attributes": {"Batteries Required": "No", "Batteries Included": "No"},
             "label": {"category": "Games > Chess", "attributes": {"batteries_required": False,
                                                                  "assembly_required": False}}}
            for i in range(14)]
    schema, report = infer_schema([r["label"] for r in rows], rows=rows)
    assert [r.key for r in schema.attribute("batteries_required").evidence.table] == ["Batteries Required"]
    assert schema.attribute("assembly_required").evidence is None
    proposed = {(k["attribute"], k["key"]): k["proposed"] for k in report["table_keys"]}
    assert proposed[("assembly_required", "Batteries Included")] is False


def test_a_draft_names_categories_written_with_another_separator():
    labels = [{"category": "Games > Card Games"}, {"category": "Games / Board Games"}, {"category": "Puzzles"},
              {"category": "Arts/Crafts"}]
    _, report = infer_schema(labels)
    assert report["other_separator"] == ["Arts/Crafts", "Games / Board Games"]
    assert "other_separator" not in infer_schema([{"category": "Arts/Crafts"}, {"category": "Puzzles"}])[1]
