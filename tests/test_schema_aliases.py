"""`mmllm schema infer` proposes seller-table keys (``evidence.table``) from a labelled dump.

The small catalog below is built so every number can be checked by hand; the last test runs on the
shipped Amazon rows.
"""

import json

import pytest
import yaml

from mmllm.catalog import load_listings
from mmllm.cli import main
from mmllm.evidence import candidates
from mmllm.schema import LabelSchema
from mmllm.schema_infer import TableKeyProposal, infer_schema, name_pattern, propose_table_keys, propose_text_names

from helpers import ROOT

AMAZON_TRAIN = ROOT / "examples/amazon_uk_toys/train.jsonl"

# id: (seller table, gold attributes). Gold min_age_years has a 1.5, so the attribute is a number.
#   "Recommended Age"   r1-r5: the age parser reads 8, 3, 1.5, 5, 10 = gold, 5/5 (the number parser
#                       only 2/5: "36 months - 8 years" and "5 - 12 years" are two numbers, "18 months+" is 18).
#                       Chance: five different values, each once on both sides: 5 * (1 * 1) / 5**2 = 0.2.
#   "Batteries needed"  r1-r5: Yes Yes No No Yes against gold T T F F F: 4/5 = 0.8 (r5 disagrees).
#                       Chance: P(yes) P(T) + P(no) P(F) = 3/5 * 2/5 + 2/5 * 3/5 = 0.48; kappa (0.8 - 0.48) / 0.52 = 8/13.
#   "Pieces"            r1-r6: 100 500 250 36 60 1,000 against gold 100 500 300 40 64 1200: 2/6.
#                       Chance: 100 and 500 once on both sides: 2 / 6**2 = 1/18; kappa (1/3 - 1/18) / (17/18) = 5/17.
#   "Batteries"         r1-r4 only: agrees 4/4 with batteries_required but on fewer than 5 rows: never judged.
ROWS = {
    "r1": ({"Recommended Age": "8 years and up", "Batteries needed": "Yes", "Pieces": "100", "Batteries": "Yes"},
           {"min_age_years": 8, "batteries_required": True, "piece_count": 100}),
    "r2": ({"Recommended Age": "36 months - 8 years", "Batteries needed": "Yes", "Pieces": "500", "Batteries": "yes"},
           {"min_age_years": 3, "batteries_required": True, "piece_count": 500}),
    "r3": ({"Recommended Age": "18 months+", "Batteries needed": "No", "Pieces": "250", "Batteries": "No"},
           {"min_age_years": 1.5, "batteries_required": False, "piece_count": 300}),
    "r4": ({"Recommended Age": "5 - 12 years", "Batteries needed": "No", "Pieces": "36", "Batteries": "No"},
           {"min_age_years": 5, "batteries_required": False, "piece_count": 40}),
    "r5": ({"recommended age:": "10+ years", "Batteries needed": "Yes", "Pieces": "60"},
           {"min_age_years": 10, "batteries_required": False, "piece_count": 64}),
    "r6": ({"Pieces": "1,000"}, {"min_age_years": 12, "batteries_required": False, "piece_count": 1200}),
    "r7": ({}, {"min_age_years": 4, "batteries_required": None, "piece_count": None}),
}


@pytest.fixture
def labelled(tmp_path):
    path = tmp_path / "catalog.jsonl"
    lines = [{"id": rid, "title": f"Toy {rid}", "description": "", "attributes": table, "images": [],
              "label": {"category": "Toys > Puzzles", "attributes": gold}} for rid, (table, gold) in ROWS.items()]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_keys_are_scored_against_the_gold_with_the_best_parser(labelled):
    rows = _rows(labelled)
    schema, _ = infer_schema([r["label"] for r in rows])  # the attribute types the keys are scored against
    assert {a.name: a.type for a in schema.attributes} == {
        "batteries_required": "boolean", "min_age_years": "number", "piece_count": "integer"}
    got = propose_table_keys(rows, schema.attributes)
    assert got == [
        TableKeyProposal("batteries_required", "Batteries needed", "boolean", 5, 4, pytest.approx(0.48), True),
        # "recommended age:" of r5 is the same key; the seller's most frequent spelling names it
        TableKeyProposal("min_age_years", "Recommended Age", "age", 5, 5, pytest.approx(0.2), True),
        TableKeyProposal("piece_count", "Pieces", "integer", 6, 2, pytest.approx(1 / 18), False),
    ]
    assert [p.agreement for p in got] == [0.8, 1.0, pytest.approx(1 / 3)]
    assert [p.kappa for p in got] == [pytest.approx(8 / 13), 1.0, pytest.approx(5 / 17)]
    # Listings (objects with .attributes and .label) are read the same way as dicts
    assert propose_table_keys(load_listings(labelled), schema.attributes) == got


def test_thresholds_decide_what_is_proposed(labelled):
    rows = _rows(labelled)
    specs = infer_schema([r["label"] for r in rows])[0].attributes
    strict = propose_table_keys(rows, specs, min_agreement=0.81)
    assert [(p.key, p.proposed) for p in strict] == [("Batteries needed", False), ("Recommended Age", True),
                                                     ("Pieces", False)]
    # "Batteries" (4/4 on four rows) is judged once four rows are enough
    loose = propose_table_keys(rows, specs, min_rows=4)
    assert [(p.attribute, p.key, p.support, p.agree, p.proposed) for p in loose if p.key == "Batteries"] == [
        ("batteries_required", "Batteries", 4, 4, True)]
    # agreement beyond chance: 0.8 agreement with kappa 8/13 is refused when kappa must reach 0.7
    assert [p.proposed for p in propose_table_keys(rows, specs, min_kappa=0.7)] == [False, True, False]


def test_infer_schema_writes_the_proposals_into_evidence(labelled):
    rows = _rows(labelled)
    schema, report = infer_schema([r["label"] for r in rows], rows=rows)
    assert schema.attribute("min_age_years").evidence.to_dict() == {"parse": "age", "table": ["Recommended Age"]}
    assert schema.attribute("batteries_required").evidence.to_dict() == {"table": ["Batteries needed"]}
    assert schema.attribute("piece_count").evidence is None
    assert [(e["attribute"], e["key"], e["support"], e["agree"], e["agreement"], e["proposed"])
            for e in report["table_keys"]] == [
        ("batteries_required", "Batteries needed", 5, 4, 0.8, True),
        ("min_age_years", "Recommended Age", 5, 5, 1.0, True),
        ("piece_count", "Pieces", 6, 2, pytest.approx(1 / 3), False)]
    # without rows: the draft and report as before
    plain, plain_report = infer_schema([r["label"] for r in rows])
    assert all(a.evidence is None for a in plain.attributes) and "table_keys" not in plain_report


def test_cli_drafts_evidence_tables_and_prints_the_proposals(labelled, tmp_path, capsys):
    out = tmp_path / "drafted.yaml"
    assert main(["schema", "infer", str(labelled), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 1 categories, 3 attributes from 7 rows" in printed
    table = [line.split() for line in printed.splitlines()[3:]]  # after the summary, title and column names
    assert table == [["batteries_required", "Batteries", "needed", "boolean", "4/5", "80%", "48%", "0.62", "yes"],
                     ["min_age_years", "Recommended", "Age", "age", "5/5", "100%", "20%", "1.00", "yes"],
                     ["piece_count", "Pieces", "integer", "2/6", "33%", "6%", "0.29", "no"]]
    schema = LabelSchema.from_yaml(out)
    age = schema.attribute("min_age_years").evidence
    assert age.parse == "age" and [r.key for r in age.table] == ["Recommended Age"]
    assert [r.key for r in schema.attribute("batteries_required").evidence.table] == ["Batteries needed"]
    assert schema.attribute("piece_count").evidence is None

    assert main(["schema", "infer", str(labelled), "-o", str(out), "--min-agreement", "0.9"]) == 2  # never overwritten
    assert "exists; choose another --out" in capsys.readouterr().err
    out = out.with_name("strict.yaml")
    assert main(["schema", "infer", str(labelled), "-o", str(out), "--min-agreement", "0.9"]) == 0
    assert "Batteries needed" not in out.read_text() and "Recommended Age" in out.read_text()
    assert "batteries_required Batteries needed boolean 4/5 80% 48% 0.62 no" in " ".join(capsys.readouterr().out.split())

    out = out.with_name("no_keys.yaml")
    assert main(["schema", "infer", str(labelled), "-o", str(out), "--no-table-keys"]) == 0
    assert "seller-table keys" not in capsys.readouterr().out
    assert all(a.evidence is None for a in LabelSchema.from_yaml(out).attributes)
    assert "evidence:" not in out.read_text()


def test_cli_keeps_stdout_for_the_yaml(labelled, capsys):
    assert main(["schema", "infer", str(labelled)]) == 0
    captured = capsys.readouterr()
    schema = LabelSchema.from_dict(yaml.safe_load(captured.out))  # stdout is the YAML alone, ready to redirect
    assert schema.attribute("min_age_years").evidence.parse == "age"
    assert captured.err.startswith("seller-table keys (proposed: agreement >= 80% and kappa >= 0.6 over >= 5 rows):")


@pytest.mark.parametrize("value", ["1.5", "-0.1", "most"])
def test_min_agreement_must_be_a_fraction(labelled, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["schema", "infer", str(labelled), "--min-agreement", value])
    assert info.value.code == 2
    assert f"expected a number from 0 to 1, got '{value}'" in capsys.readouterr().err


def test_missing_catalog_is_still_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["schema", "infer", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: {missing}: no such catalog file\n"


def test_amazon_rows_propose_the_seller_keys():
    rows = load_listings(AMAZON_TRAIN)
    schema, report = infer_schema([r.label for r in rows], rows=rows)
    proposed = {(e["attribute"], e["key"]) for e in report["table_keys"] if e["proposed"]}
    assert ("min_age_years", "Manufacturer recommended age") in proposed
    assert ("batteries_required", "Batteries Required") in proposed
    assert schema.attribute("min_age_years").evidence.parse == "age"
    # Mostly-"No" look-alikes agree often by chance alone and are reported, not proposed
    look_alike = next(e for e in report["table_keys"]
                      if (e["attribute"], e["key"]) == ("assembly_required", "Batteries Included"))
    assert look_alike["agreement"] >= 0.8 and not look_alike["proposed"]


# id: (title, gold brand). Golds: Playmobil 5, Hasbro 3, Star Wars 2, LEGO 1 (11 with a value).
#   Playmobil: named (any case, any spacing) in b1-b5, gold Playmobil in all 5: agreement 1, chance 5/11,
#              kappa 1: proposed. "Playmobilish" (b12) is not the whole word.
#   Star Wars: named in b6-b11 (6 titles), b10's gold is null: support 5, agree 2 (b7, b8): 0.4, not proposed
#              (the catalog files most Star Wars titles under their maker).
#   LEGO:      named in b6, b7 only: under 5 rows, not judged.
BRANDS = {"b1": ("Playmobil City Fire Station", "Playmobil"), "b2": ("PLAYMOBIL  Pirate ship", "Playmobil"),
          "b3": ("my first playmobil zoo", "Playmobil"), "b4": ("Playmobil horse stable", "Playmobil"),
          "b5": ("Knights castle (Playmobil)", "Playmobil"), "b6": ("Star Wars Millennium Falcon by LEGO", "LEGO"),
          "b7": ("LEGO Star Wars X-wing", "Star Wars"), "b8": ("Star Wars lightsaber", "Star Wars"),
          "b9": ("Star Wars figure", "Hasbro"), "b10": ("Star  Wars mug", None), "b11": ("Star Wars blaster", "Hasbro"),
          "b12": ("Playmobilish clone toy", "Hasbro")}


@pytest.fixture
def branded(tmp_path):
    path = tmp_path / "brands.jsonl"
    lines = [{"id": rid, "title": title, "description": "", "attributes": {}, "images": [],
              "label": {"category": "Toys", "attributes": {"brand": brand}}} for rid, (title, brand) in BRANDS.items()]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def test_values_named_in_titles_are_scored_against_the_gold(branded):
    rows = _rows(branded)
    schema, _ = infer_schema([r["label"] for r in rows])
    assert schema.attribute("brand").type == "enum"
    got = [(p.value, p.mentions, p.support, p.agree, p.chance, p.proposed)
           for p in propose_text_names(rows, schema.attributes)]
    assert got == [("Playmobil", 5, 5, 5, pytest.approx(5 / 11), True),
                   ("Star Wars", 6, 5, 2, pytest.approx(2 / 11), False)]
    assert propose_text_names(rows, schema.attributes)[0].kappa == pytest.approx(1.0)
    assert propose_text_names(rows, schema.attributes, min_rows=6) == []
    # Star Wars passes once 40% agreement is enough, but not when its kappa (0.4 - 2/11) / (9/11) = 0.27 must reach 0.3
    assert [p.proposed for p in propose_text_names(rows, schema.attributes, min_agreement=0.4, min_kappa=0.25)] == [True, True]
    assert [p.proposed for p in propose_text_names(rows, schema.attributes, min_agreement=0.4, min_kappa=0.3)] == [True, False]


def test_name_pattern_prefers_the_longest_name_and_whole_words():
    import re

    pattern = re.compile(name_pattern(["Hot", "Hot Wheels", "Q-Workshop", "Pokémon"]), re.IGNORECASE | re.ASCII)
    assert [m["value"] for m in pattern.finditer("hot  WHEELS track, Hot sauce, Q-Workshop dice, Hotshot")] == [
        "hot  WHEELS", "Hot", "Q-Workshop"]
    # titles drop accents and shout: all three name the value (the ASCII flag alone would miss the last)
    assert [m["value"] for m in pattern.finditer("Pokemon tin, POKÉMON cards, pokÉmon, Pokemonster")] == [
        "Pokemon", "POKÉMON", "pokÉmon"]


def test_the_drafted_rule_states_the_named_value_with_its_span(branded):
    from mmllm.catalog import Listing

    rows = _rows(branded)
    schema, report = infer_schema([r["label"] for r in rows], rows=rows)
    rule = schema.attribute("brand").evidence.to_dict()["text"]
    assert [(r["name"], r["fields"]) for r in rule] == [("named_in_title", ["title"])]
    assert [e["value"] for e in report["text_names"] if e["proposed"]] == ["Playmobil"]
    # the rule survives the YAML round trip and finds the value, in the schema's spelling, with its span
    schema = LabelSchema.from_dict(yaml.safe_load(yaml.safe_dump(schema.to_dict())))
    title = "Star Wars meets PLAYMOBIL: space set"
    found = candidates(Listing("x", title), schema)["brand"]
    assert [(c.value, c.source, c.key, c.text, c.span) for c in found] == [
        ("Playmobil", "title", "named_in_title", "PLAYMOBIL", (16, 25))]
    assert title[16:25] == "PLAYMOBIL"
    assert candidates(Listing("y", "Playmobilish Star Wars toy", "Playmobil in the description"), schema)["brand"] == []
    # without text names: no rule, no report
    plain, plain_report = infer_schema([r["label"] for r in rows], rows=rows, text_names=False)
    assert plain.attribute("brand").evidence is None and "text_names" not in plain_report


def test_cli_prints_the_named_values(branded, tmp_path, capsys):
    out = tmp_path / "drafted.yaml"
    assert main(["schema", "infer", str(branded), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    start = printed.index("enum values named in titles")
    table = [line.split() for line in printed[start:].splitlines()[2:]]
    assert table == [["brand", "Playmobil", "5", "5/5", "100%", "45%", "1.00", "yes"],
                     ["brand", "Star", "Wars", "6", "2/5", "40%", "18%", "0.27", "no"]]
    assert "named_in_title" in out.read_text()
    out = out.with_name("no_names.yaml")
    assert main(["schema", "infer", str(branded), "-o", str(out), "--no-text-names"]) == 0
    assert "enum values named" not in capsys.readouterr().out and "named_in_title" not in out.read_text()
