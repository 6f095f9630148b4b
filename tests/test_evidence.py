"""Evidence candidates: value parsers and text patterns against hand-written cases, spans that
point at the right characters, and schema entries that are wrong named clearly."""

from __future__ import annotations

import pytest

from mmllm.catalog import Listing
from mmllm.evidence import candidates, fold, parse_age, parse_boolean, parse_enum, parse_integer, parse_list, parse_number
from mmllm.schema import LabelSchema, SchemaError
from helpers import TOYS_SCHEMA


@pytest.fixture(scope="module")
def toys() -> LabelSchema:
    return LabelSchema.from_yaml(TOYS_SCHEMA)


@pytest.mark.parametrize("text, value, form", [
    ("8 years and up", 8, "and_up"),
    ("36 months - 8 years", 3, "months_range"),
    ("6 months - 3 years", 0.5, "months_range"),
    ("18 months and up", 1.5, "months"),
    ("4 - 10 years", 4, "range"),
    ("Ages 3+", 3, "and_up"),
    ("six and up", 6, "and_up"),
    ("3", 3, "plain"),
])
def test_age_parser(text, value, form):
    parsed = parse_age(text)
    assert (parsed.value, parsed.form) == (value, form)


@pytest.mark.parametrize("text", ["teen to adult", "3, 5 or 8 years", "", "٣ years and up", "٨", "30 years and up"])
def test_age_parser_refuses(text, toys):
    assert parse_age(text, toys.attribute("min_age_years")) is None  # 30 > maximum 21


@pytest.mark.parametrize("text, value, form", [
    ("1,000", 1000, "thousands"), ("894", 894, "plain"), ("12,500 pieces", 12500, "thousands"),
    ("1000 pieces", 1000, "plain"),
])
def test_integer_parser(text, value, form):
    parsed = parse_integer(text)
    assert (parsed.value, parsed.form) == (value, form)


@pytest.mark.parametrize("text", ["1.000", "1,5", "500-1000", "2.5", "about 3 or 4", "١٠٠٠", "１０００",
                                  "one thousand", "Two hundred", "twelve dozen", "two and a half"])
def test_integer_parser_refuses_what_it_cannot_read_surely(text):
    assert parse_integer(text) is None  # ambiguous separators, ranges, fractions, other scripts' digits


def test_number_parser_and_bounds(toys):
    assert parse_number("2.5 kg").value == 2.5
    assert parse_integer("0", toys.attribute("piece_count")) is None  # minimum 1
    assert parse_integer("100001", toys.attribute("piece_count")) is None  # maximum 100000


@pytest.mark.parametrize("text, value", [("Yes", True), ("no", False), ("TRUE", True), ("Not required", False),
                                         ("N", False)])
def test_boolean_parser(text, value):
    assert parse_boolean(text).value is value


@pytest.mark.parametrize("text", ["maybe", "Yes and no", "2 AA"])
def test_boolean_parser_refuses(text):
    assert parse_boolean(text) is None


def test_list_parser_needs_every_part_allowed(toys):
    material = toys.attribute("material")
    assert parse_list("Plastic, Wood", material).value == ["plastic", "wood"]
    assert parse_list("Plastic & unobtainium", material) is None


def _found(listing: Listing, schema: LabelSchema) -> dict[str, list[tuple]]:
    return {name: [(c.value, c.source, c.key) for c in cs] for name, cs in candidates(listing, schema).items() if cs}


def test_enum_values_compare_in_any_case_accents_and_spacing():
    from types import SimpleNamespace

    spec = SimpleNamespace(values=("Pokémon", "Hot Wheels", "LEGO"))
    assert fold(" POKÉMON ") == fold("pokemon") == "pokemon"
    assert [parse_enum(t, spec).value for t in ("pokemon", "POKÉMON", "hot  wheels", "Lego")] == [
        "Pokémon", "Pokémon", "Hot Wheels", "LEGO"]
    assert parse_enum("Pokemons", spec) is None and parse_enum("Hot", spec) is None


def test_the_lego_title_states_pieces_and_age_with_exact_spans(toys):
    title = "LEGO City Police Station 60141 building set, 894 pieces, ages 6-12"
    found = candidates(Listing("lego", title), toys)
    (pieces,) = found["piece_count"]
    (age,) = found["min_age_years"]
    assert (pieces.value, pieces.source, pieces.key) == (894, "title", "n_pieces")
    assert title[pieces.span[0]:pieces.span[1]] == "894 pieces" == pieces.text
    assert (age.value, age.form) == (6, "range")
    assert title[age.span[0]:age.span[1]] == "ages 6-12"
    assert "60141" not in [str(c.value) for c in found["piece_count"]]  # a set number is not a count


def test_negations_give_false_and_never_true(toys):
    listing = Listing("n", "Wooden train", "No batteries required. No assembly required. Batteries not included.")
    found = _found(listing, toys)
    assert found["batteries_required"] == [(False, "description", "no_batteries")]
    assert found["assembly_required"] == [(False, "description", "no_assembly")]
    assert found["batteries_included"] == [(False, "description", "batteries_not_included")]


def test_positive_statements(toys):
    listing = Listing("p", "Robot dog", "Requires 3 AAA batteries (included). Adult assembly required.")
    found = _found(listing, toys)
    assert (True, "description", "needs_batteries") in found["batteries_required"]
    assert found["assembly_required"] == [(True, "description", "assembly_required")]


def test_description_span_is_in_the_description(toys):
    description = "A lovely puzzle. Contains 1,000 pieces for ages 8 and up."
    found = candidates(Listing("d", "Puzzle", description), toys)
    (pieces,) = found["piece_count"]
    assert (pieces.value, pieces.form) == (1000, "thousands")
    assert description[slice(*pieces.span)] == "1,000 pieces"
    (age,) = found["min_age_years"]
    assert (age.value, age.source) == (8, "description")
    assert description[slice(*age.span)].startswith("ages 8")


def test_table_keys_match_loosely_and_parse(toys):
    table = {"manufacturer recommended age:": "36 months - 12 years", "Batteries": "2 AA batteries required. (included)",
             "Number of Puzzle Pieces": "1,000"}
    found = _found(Listing("t", "Jigsaw", "", table), toys)
    assert found["min_age_years"] == [(3, "table", "manufacturer recommended age:")]
    assert found["batteries_required"] == [(True, "table", "Batteries")]
    assert found["batteries_included"] == [(True, "table", "Batteries")]
    assert found["piece_count"] == [(1000, "table", "Number of Puzzle Pieces")]


def test_foreign_digits_in_the_table_are_refused_not_misread(toys):
    found = _found(Listing("f", "Puzzle", "", {"Number of Puzzle Pieces": "١٠٠٠", "Manufacturer recommended age": "٣"}),
                   toys)
    assert found == {}


def _schema(evidence: object) -> dict:
    return {"taxonomy": ["A > B"], "attributes": {"n": {"type": "integer", "evidence": evidence}}}


@pytest.mark.parametrize("evidence, message", [
    ({"parse": "roman"}, "unknown parser 'roman'"),
    ({"text": [{"name": "x", "pattern": "([0-9]+"}]}, "evidence.text[0].pattern: not a regular expression"),
    ({"text": [{"name": "x", "pattern": "[0-9]+ pieces"}]}, "needs a (?P<value>...) group"),
    ({"text": [{"pattern": "(?P<value>[0-9]+)"}]}, "needs a 'name'"),
    ({"table": [{"key": "K", "pattern": "yes"}]}, "needs the 'value'"),
    ({"tables": ["K"]}, "unknown key(s) ['tables']"),
])
def test_schema_names_the_wrong_evidence_entry(evidence, message):
    with pytest.raises(SchemaError, match="attribute 'n': evidence") as err:
        LabelSchema.from_dict(_schema(evidence))
    assert message in str(err.value)


def test_evidence_round_trips_through_yaml(tmp_path, toys):
    path = tmp_path / "s.yaml"
    toys.to_yaml(path)
    again = LabelSchema.from_yaml(path)
    listing = Listing("r", "Jigsaw 500 pieces, ages 3+", "Batteries not included", {"Assembly Required": "No"})
    assert _found(listing, again) == _found(listing, toys)


@pytest.mark.parametrize("text, value", [("18m+", 1.5), ("6m+", 0.5), ("12m+", 1), ("18 mos+", 1.5), ("12 mo+", 1),
                                         ("18+m", 1.5), ("18+ mos", 1.5), ("6 weeks and up", 0.12), ("1½ years", 1.5)])
def test_an_m_after_the_number_is_months(text, value):
    assert parse_age(text).value == value


@pytest.mark.parametrize("text", ["3 years and under", "3 and under", "up to 4 years", "4 - 3 years", "10 - 3 years",
                                  "3 days", "2 and a half years", "2 1/2 years", "1¾ years"])
def test_a_maximum_age_or_a_backwards_range_is_no_minimum(text):
    assert parse_age(text) is None


@pytest.mark.parametrize("description, value", [
    ("Little ones aged 18+ months will love it.", 1.5),  # read as 18 years and published, before
    ("Suitable for ages 6-18 months.", 0.5),
    ("Recommended age: 18 months+", 1.5),
    ("For ages 3+ and up.", 3),
    ("Rocking horse, recommended age 18m+", 1.5),  # 18 years, its evidence cut to "recommended age 18", before
    ("Recommended age: 18 mos+", 1.5),
    ("Soft book, aged 18+ mos", 1.5),
    ("Suitable for ages 6-18 mos.", 0.5),
    ("Suitable for ages 3+, kite flies 30m+", 3),  # 30 metres are no age (read as 2.5 years by "m+")
])
def test_ages_in_months_are_read_as_months(toys, description, value):
    found = candidates(Listing("m", "Rocking horse", description), toys)["min_age_years"]
    assert found and {c.value for c in found} == {value}, found


@pytest.mark.parametrize("description, attribute, value", [
    ("Batteries Required: No", "batteries_required", False),
    ("Batteries required? No", "batteries_required", False),
    ("Batteries Included: No", "batteries_included", False),
    ("Assembly required: No", "assembly_required", False),
    ("No adult assembly required.", "assembly_required", False),
    ("No tools or assembly required.", "assembly_required", False),
    # other separators: each was read as true at confidence 0.999, its evidence quoting "Batteries required"
    ("Batteries required - No", "batteries_required", False),
    ("Batteries Required \u2013 No", "batteries_required", False),
    ("Batteries Required = No", "batteries_required", False),
    ("Batteries required: Not needed", "batteries_required", False),
    ("Batteries included - No", "batteries_included", False),
    ("Batteries Included (No)", "batteries_included", False),
    ("Assembly required - No", "assembly_required", False),
    ("Assembly required: Not needed", "assembly_required", False),
    # and what still says yes
    ("Batteries required - not included", "batteries_required", True),
    ("Batteries required: 2 x AA (not included)", "batteries_required", True),
    ("Assembly required - yes", "assembly_required", True),
    # a no that is not the line's answer: the line still says yes (read false by the first fix of the above)
    ("Batteries required (none included)", "batteries_required", True),
    ("Batteries required - no batteries included, buy separately", "batteries_required", True),
    ("Assembly required - no tools needed", "assembly_required", True),
    ("Batteries included - no charger", "batteries_included", True),
    ("Batteries Required: No Batteries Included: No", "batteries_included", False),
    ("Batteries required (no batteries supplied)", "batteries_included", False),  # "batteries supplied" was true
    ("Batteries supplied separately.", "batteries_included", False),
])
def test_a_spec_line_saying_no_is_false(toys, description, attribute, value):
    assert {c.value for c in candidates(Listing("b", "Kite", description), toys)[attribute]} == {value}


@pytest.mark.parametrize("description", [
    "Each puzzle has 200-600 pieces.",           # a range: which count?
    "Comes with 2 pieces of ascending track.",   # a component, not the box
    "Numbered at 576 of 10,000 pieces worldwide.",  # an edition size
    "Box contains 3 x 1000 piece jigsaws.",      # a multipack: 1000 each, not the box
])
def test_what_is_not_the_box_piece_count_is_not_read_as_it(toys, description):
    assert candidates(Listing("p", "Jigsaw", description), toys)["piece_count"] == []


def test_a_table_key_listed_twice_in_two_spellings_is_read_once(toys):
    found = candidates(Listing("t", "Kite", "", {"Assembly Required": "Yes"}), toys)["assembly_required"]
    assert [(c.value, c.key) for c in found] == [(True, "Assembly Required")]


@pytest.mark.parametrize("description, key, form", [
    ("For ages 3+.", "ages_plus", "and_up"),          # the rule's value group holds the 3, the "+" is after it
    ("Aged 4 and above.", "ages_plus", "and_up"),
    ("Ages 6-12.", "ages_range", "range"),
    ("Fun from 18 months and up.", "months_plus", "months"),
])
def test_a_rule_match_carries_the_form_its_text_states(toys, description, key, form):
    found = candidates(Listing("f", "Kite", description), toys)["min_age_years"]
    assert [(c.key, c.form) for c in found] == [(key, form)]


def test_a_rules_fixed_value_is_the_attributes_canonical_value_or_a_schema_error():
    """A rule's fixed value was published as written: "Lego" beside the enum's LEGO, the string "no" for a
    boolean, 5000 for pieces bounded to 100."""
    def schema(attribute: dict) -> LabelSchema:
        return LabelSchema.from_dict({"taxonomy": ["Toys"], "attributes": {"a": attribute}})

    lego = schema({"type": "enum", "values": ["LEGO", "Mattel"],
                   "evidence": {"text": [{"name": "lego", "pattern": r"\blego\b", "value": "Lego"}]}})
    assert [c.value for c in candidates(Listing("1", "Lego car", ""), lego)["a"]] == ["LEGO"]
    remote = schema({"type": "boolean", "evidence": {"text": [{"name": "no_remote", "pattern": "no remote", "value": "no"}],
                                                      "table": [{"key": "Remote", "pattern": "yes", "value": "yes",
                                                                 "otherwise": "no"}]}})
    assert [c.value for c in candidates(Listing("1", "Car, no remote", "", {"Remote": "maybe"}), remote)["a"]] == [False, False]
    with pytest.raises(SchemaError, match=r"attribute 'a': evidence text pattern 'big': the value 5000 does not fit"):
        schema({"type": "integer", "minimum": 1, "maximum": 100,
                "evidence": {"text": [{"name": "big", "pattern": "huge set", "value": 5000}]}})
    with pytest.raises(SchemaError, match=r"table key 'Brand': the value 'Lgo' does not fit the attribute \('Lgo' is not one of"):
        schema({"type": "enum", "values": ["LEGO"], "evidence": {"table": [{"key": "Brand", "pattern": "l", "value": "Lgo"}]}})


def test_table_values_given_as_lists_or_long_texts_are_read(toys):
    """The catalog accepts a list as a table value and values up to 10,000 characters; such values gave no
    candidate (a list), or none past 200 characters."""
    listing = Listing("1", "Toy", "", {"Material": ["Plastic", "Wood"], "Number of Pieces": [1000]})
    found = candidates(listing, toys)
    assert [c.value for c in found["piece_count"]] == [1000]
    assert [c.value for c in found["material"]] == [["plastic", "wood"]]
    two = candidates(Listing("1", "Toy", "", {"Number of Pieces": [500, 1000]}), toys)["piece_count"]
    assert two == []  # two numbers for one count: none of them
    long = "2 x AA batteries required (included). " + "Safety: keep away from fire and water. " * 9
    assert len(long) > 300
    found = candidates(Listing("1", "Toy", "", {"Batteries": long}), toys)
    assert [c.value for c in found["batteries_required"]] == [True] and [c.value for c in found["batteries_included"]] == [True]


def test_numbers_that_differ_past_six_digits_are_two_options():
    from mmllm.evidence import value_key
    assert value_key(1234567) != value_key(1234568)
    assert value_key(3) == value_key(3.0) == "num:3" and value_key(0.5) == "num:0.5"  # the keys grounding.json keeps
