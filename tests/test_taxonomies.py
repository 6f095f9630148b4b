"""`mmllm schema import` / `export`: Shopify and Google product taxonomy files as label schemas, cut by depth
and subtree, ids kept and carried by labels records; the files are built here (nothing is downloaded)."""

from __future__ import annotations

import json

import pytest

from mmllm.cli import main as mmllm
from mmllm.schema import LabelSchema, SchemaError
from mmllm.taxonomies import read_taxonomy, taxonomy_schema, write_taxonomy

from helpers import ROOT

SHOPIFY = """\
# Shopify Product Taxonomy: categories.txt (a slice)
gid://shopify/TaxonomyCategory/tg : Toys & Games
gid://shopify/TaxonomyCategory/tg-1 : Toys & Games > Games
gid://shopify/TaxonomyCategory/tg-1-3 : Toys & Games > Games > Board Games
gid://shopify/TaxonomyCategory/tg-1-4 : Toys & Games > Games > Card Games
gid://shopify/TaxonomyCategory/tg-5 : Toys & Games > Toys
gid://shopify/TaxonomyCategory/tg-5-4 : Toys & Games > Toys > Building Toys
gid://shopify/TaxonomyCategory/tg-5-4-1 : Toys & Games > Toys > Building Toys > Construction Sets
gid://shopify/TaxonomyCategory/tg-5-9 : Toys & Games > Toys > Dolls
gid://shopify/TaxonomyCategory/sg : Sporting Goods
gid://shopify/TaxonomyCategory/sg-4 : Sporting Goods > Outdoor Recreation
"""
GOOGLE = """\
# Google_Product_Taxonomy_Version: 2021-09-21
1239 - Toys & Games
3793 - Toys & Games > Games
1246 - Toys & Games > Games > Board Games
1247 - Toys & Games > Games > Card Games
1253 - Toys & Games > Toys
1254 - Toys & Games > Toys > Building Toys
3805 - Toys & Games > Toys > Building Toys > Construction Set Toys
1255 - Toys & Games > Toys > Dolls, Playsets & Toy Figures
988 - Sporting Goods
1011 - Sporting Goods > Outdoor Recreation
"""


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("fmt, text", [("shopify", SHOPIFY), ("google", GOOGLE)])
def test_import_then_export_gives_the_lines_back(tmp_path, capsys, fmt, text):
    source = tmp_path / f"{fmt}.txt"
    source.write_text(text)
    out = tmp_path / "schema.yaml"
    assert mmllm(["schema", "import", str(source), "--out", str(out)]) == 0
    assert "5 categories (10 nodes with ids)" in capsys.readouterr().out  # detected format, no --format needed
    schema = LabelSchema.from_yaml(out)
    assert schema.taxonomy_format == fmt and len(schema.category_ids) == 10
    assert schema.categories[0] == "Toys & Games > Games > Board Games"  # leaves only: parents are not labels
    assert "Toys & Games > Toys" not in schema.categories and "Sporting Goods > Outdoor Recreation" in schema.categories
    assert mmllm(["schema", "export", str(out)]) == 0
    assert _lines(capsys.readouterr().out) == _lines(text)
    # a schema file is never overwritten
    assert mmllm(["schema", "import", str(source), "--out", str(out)]) == 2
    assert f"error: {out} exists" in capsys.readouterr().err


def test_depth_and_subtree_cut_the_tree_and_keep_each_kept_nodes_id(tmp_path):
    fmt, nodes = read_taxonomy_text(GOOGLE, tmp_path)
    two = taxonomy_schema(nodes, name="g", fmt=fmt, depth=2)
    assert two.categories == ("Toys & Games > Games", "Toys & Games > Toys", "Sporting Goods > Outdoor Recreation")
    assert two.category_id("toys & games >  toys") == "1253" and two.category_id("Toys & Games") == "1239"
    assert two.category_id("Nowhere > Else") is None
    toys = taxonomy_schema(nodes, name="g", fmt=fmt, under="Toys & Games > Toys")
    assert toys.categories == ("Toys & Games > Toys > Building Toys > Construction Set Toys",
                               "Toys & Games > Toys > Dolls, Playsets & Toy Figures")
    assert write_taxonomy(toys) == ("1253 - Toys & Games > Toys\n1254 - Toys & Games > Toys > Building Toys\n"
                                    "3805 - Toys & Games > Toys > Building Toys > Construction Set Toys\n"
                                    "1255 - Toys & Games > Toys > Dolls, Playsets & Toy Figures\n")
    with pytest.raises(SchemaError, match="id 'gid://shopify/TaxonomyCategory/tg' cannot be written in the google"):
        write_taxonomy(taxonomy_schema(read_taxonomy_text(SHOPIFY, tmp_path)[1], name="s", fmt="shopify"), "google")
    with pytest.raises(SchemaError, match="no category under 'Garden'"):
        taxonomy_schema(nodes, name="g", fmt=fmt, under="Garden")


def read_taxonomy_text(text: str, folder):
    path = folder / "taxonomy.txt"
    path.write_text(text)
    return read_taxonomy(path)


def test_bad_lines_are_named_by_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 - Toys\n2 Toys > Dolls\n")
    assert mmllm(["schema", "import", str(bad), "--out", str(tmp_path / "s.yaml")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {bad} line 2: '2 Toys > Dolls' is not a google taxonomy line "
                                               "(ID - A > B)")
    bad.write_text("1 - Toys\n1 - Games\n")
    with pytest.raises(SchemaError, match="line 2: id 1 is already used on line 1"):
        read_taxonomy(bad)
    bad.write_text("Toys > Dolls\n")
    with pytest.raises(SchemaError, match="neither Shopify"):
        read_taxonomy(bad)
    # a '>' inside a name would be read as one more level (export gave "Ages 3 > 5" back): named, not split
    bad.write_text("1 - Toys\n2 - Toys > Ages 3>5\n")
    with pytest.raises(SchemaError, match="line 2: a name in 'Toys > Ages 3>5' holds '>'"):
        read_taxonomy(bad)
    assert not (tmp_path / "s.yaml").exists()


def test_names_spaced_oddly_import_as_the_schema_compares_them(tmp_path, capsys):
    """A no-break space or a double space inside a name: the import failed ("category 'Toys & Games > Toys'
    has no id in category_ids", naming neither file nor line) as the schema squeezed the ids' keys only."""
    odd = tmp_path / "odd.txt"
    odd.write_text("1239 - Toys\u00a0& Games\n1253 - Toys  &  Games >\tToys\n", encoding="utf-8")
    out = tmp_path / "s.yaml"
    assert mmllm(["schema", "import", str(odd), "--out", str(out)]) == 0
    schema = LabelSchema.from_yaml(out)
    assert schema.categories == ("Toys & Games > Toys",)
    assert schema.category_id("toys & games > toys") == "1253"
    flat = LabelSchema.from_dict({"name": "f", "taxonomy": ["Toys  & Games"], "category_ids": {"Toys & Games": "1"},
                                  "attributes": {}})
    assert flat.category_id("Toys & Games") == "1"
    # --under in the file's own spelling reads as the paths do
    under = tmp_path / "under.yaml"
    assert mmllm(["schema", "import", str(odd), "--out", str(under), "--under", "Toys  &  Games"]) == 0
    assert LabelSchema.from_yaml(under).categories == ("Toys & Games > Toys",)


def test_attribute_definitions_are_added_and_checked(tmp_path, capsys):
    source = tmp_path / "google.txt"
    source.write_text(GOOGLE)
    attrs = tmp_path / "attrs.yaml"
    attrs.write_text("attributes:\n  age_group: {type: enum, values: [baby, kids, adult], description: who it is for}\n")
    out = tmp_path / "schema.yaml"
    assert mmllm(["schema", "import", str(source), "--out", str(out), "--depth", "2", "--attributes", str(attrs)]) == 0
    schema = LabelSchema.from_yaml(out)
    assert schema.attribute("age_group").values == ("baby", "kids", "adult") and len(schema.categories) == 3
    attrs.write_text("attributes:\n  age_group: {type: colour}\n")
    assert mmllm(["schema", "import", str(source), "--out", str(tmp_path / "s2.yaml"), "--attributes", str(attrs)]) == 2
    assert "age_group" in capsys.readouterr().err and not (tmp_path / "s2.yaml").exists()


@pytest.mark.slow
def test_labels_records_carry_the_taxonomy_id(tmp_path, capsys):
    """A model trained under an imported schema writes each record's category id beside its path."""
    source = tmp_path / "google.txt"
    source.write_text(GOOGLE)
    schema_path = tmp_path / "schema.yaml"
    assert mmllm(["schema", "import", str(source), "--out", str(schema_path), "--depth", "3"]) == 0
    schema = LabelSchema.from_yaml(schema_path)
    words = {"Board Games": "board game dice", "Card Games": "playing cards deck", "Building Toys": "bricks build",
             "Dolls, Playsets & Toy Figures": "doll figure", "Outdoor Recreation": "tent camping"}
    rows = [{"id": f"r{i}", "title": f"{words[c.split(' > ')[-1]]} {i}", "label": {"category": c, "attributes": {}}}
            for i, c in enumerate(schema.categories * 3)]
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tmp_path / "model"
    assert mmllm(["finetune", "--config", str(ROOT / "finetune" / "fusion_minilm_cpu.yaml"), f"data.train={catalog}",
                  f"data.dev={catalog}", f"data.schema={schema_path}", "train.max_steps=2", "train.batch_size=8",
                  "fusion.max_text_tokens=32", "fusion.hidden=16", "fusion.lexical_buckets=256",
                  "fusion.attr_buckets=64", "anchor.epochs=1", f"train.output_dir={model}"]) == 0
    # the default recipe's reference rows are the toys catalog's: none fits this schema, the run says so and goes on
    said = capsys.readouterr().out
    assert "anchor.reference: " in said and "has no usable labelled rows" in said
    assert "the answers' confidence is their own probability" in said
    assert json.loads((model / "fusion.json").read_text())["anchor"]["reference_size"] == 0
    out = tmp_path / "labels.jsonl"
    assert mmllm(["label", str(catalog), "--model", str(model), "--out", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 15 and all(r["status"] == "ok" for r in records)
    assert all(r["category_id"] == schema.category_ids[r["category"]] for r in records)
    assert {r["category_id"] for r in records} <= {"1246", "1247", "1254", "1255", "1011"}
