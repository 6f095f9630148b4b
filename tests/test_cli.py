"""The `mmllm` command end to end: catalog validate / stats, schema tools, job dispatch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmllm.cli import main

from helpers import ROOT, TOYS_SCHEMA


def row(i, images=(), label=None, **extra):
    out = {"id": f"r{i}", "title": f"Toy {i}", "images": list(images)}
    if label:
        out["label"] = label
    out.update(extra)
    return out


@pytest.fixture
def catalog(tmp_path):
    """A catalog folder with good and bad images, and a file outside it."""
    root = tmp_path / "dump"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(root / "img" / "ok.png")
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "outside.png")
    (root / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    os.symlink(tmp_path / "outside.png", root / "img" / "escape.png")
    rows = [
        row(1, ["img/ok.png"], {"category": "Games > Chess", "attributes": {"piece_count": 32}}),
        row(2, ["../outside.png"]),
        row(3, ["img/missing.png"]),
        row(4, ["img/broken.jpg", "img/ok.png"]),
        row(5, ["img/escape.png"]),
        row(6, [], {"category": "Games > Chequers", "attributes": {"piece_count": 0}}),
        {"id": "r7", "title": ""},
        row(8),
    ]
    path = root / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_validate_names_every_bad_row_and_exits_non_zero(catalog, capsys, tmp_path):
    errors = tmp_path / "errors.jsonl"
    code = main(["catalog", "validate", str(catalog), "--schema", str(TOYS_SCHEMA), "--errors-out", str(errors), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert [b.split(" (id ")[0] for b in bad] == [f"BAD  catalog.jsonl line {n}" for n in (2, 3, 4, 5, 6, 7)]
    assert "images[0]: " in bad[0] and "../outside.png" in bad[0]
    assert "(id 'r3')" in bad[1] and "missing.png" in bad[1]
    assert "images[0]" in bad[2] and "broken.jpg" in bad[2] and "images[1]" not in bad[2]
    assert "escape.png" in bad[3] and "symlink" in bad[3]
    assert "label.category: 'Games > Chequers' is not in the taxonomy" in bad[4]
    assert "label.attributes.piece_count" in bad[4]
    assert "title: empty" in bad[5]
    assert "FAILED: 2 valid, 6 invalid of 8 rows" in out
    records = [json.loads(line) for line in errors.read_text().splitlines()]
    assert [(r["id"], r["line"], r["field"]) for r in records] == [
        ("r2", 2, "images[0]"), ("r3", 3, "images[0]"), ("r4", 4, "images[0]"), ("r5", 5, "images[0]"),
        ("r6", 6, "label.category"), ("r7", 7, "title"),
    ]


def test_validate_no_images_and_image_root(catalog, capsys, tmp_path):
    assert main(["catalog", "validate", str(catalog), "--no-images", "--quiet"]) == 1
    assert "FAILED: 7 valid, 1 invalid of 8 rows (rows only)" in capsys.readouterr().out
    elsewhere = tmp_path / "lists" / "c.jsonl"
    elsewhere.parent.mkdir()
    elsewhere.write_text(json.dumps(row(1, ["img/ok.png"])) + "\n")
    assert main(["catalog", "validate", str(elsewhere), "--quiet"]) == 1  # resolves next to the file: missing
    capsys.readouterr()
    assert main(["catalog", "validate", str(elsewhere), "--image-root", str(catalog.parent), "--quiet"]) == 0
    assert "OK: 1 valid, 0 invalid of 1 rows (1 images opened)" in capsys.readouterr().out


def test_validate_the_shipped_examples_passes(capsys):
    assert main(["catalog", "validate", str(ROOT / "examples/drawn/catalog.jsonl"), "--schema", str(TOYS_SCHEMA), "--quiet"]) == 0
    assert "OK: 9 valid, 0 invalid of 9 rows (9 images opened)" in capsys.readouterr().out


def test_stats_counts(catalog, capsys):
    assert main(["catalog", "stats", str(catalog), "--json", "--quiet"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == 8 and stats["valid"] == 7 and stats["invalid"] == 1
    assert stats["with_images"] == 5 and stats["without_images"] == 2 and stats["images"] == 6
    assert stats["labelled"] == 2 and stats["categories"] == {"Games > Chess": 1, "Games > Chequers": 1}
    assert stats["label_attribute_coverage"] == {"piece_count": 1.0}
    assert stats["errors_by_field"] == {"title": 1}


def test_stats_count_category_only_labels_apart(tmp_path, capsys):
    rows = [{"id": "a", "title": "chess", "label": {"category": "Games > Chess", "attributes": {"piece_count": 32}}},
            {"id": "b", "title": "draughts", "label": {"category": "Games > Chequers", "attributes": {}}},
            {"id": "c", "title": "go", "label": {"category": "Games > Chess"}},
            {"id": "d", "title": "ludo", "label": {}},  # says nothing: an unlabelled row
            {"id": "e", "title": "snap", "label": {"category": None, "attributes": None}}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["catalog", "stats", str(path), "--json", "--quiet"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["labelled"] == 3 and stats["category_only"] == 1
    assert stats["label_attribute_coverage"] == {"piece_count": 0.5}  # of the 2 rows labelled for attributes
    assert main(["catalog", "stats", str(path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "category only    1 (no attributes in the label" in printed
    assert "valid            5 (by the row contract; photos are not opened" in printed  # validate opens them


def test_stats_count_a_category_however_it_is_spelled(tmp_path, capsys):
    """Training reads 'games>chess' as Games > Chess; stats counted the two spellings as two categories."""
    schema = tmp_path / "s.yaml"
    schema.write_text("name: s\ntaxonomy: [Games > Chess, Outdoor > Kites]\nattributes: {}\n")
    rows = [{"id": "a", "title": "chess", "label": {"category": "Games > Chess"}},
            {"id": "b", "title": "chess", "label": {"category": "games>chess"}},
            {"id": "c", "title": "kite", "label": {"category": "Outdoor >  Kites"}}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["catalog", "stats", str(path), "--schema", str(schema), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["categories"] == {"Games > Chess": 2, "Outdoor > Kites": 1}
    assert main(["catalog", "stats", str(path), "--json", "--quiet"]) == 0  # without a schema: spacing evened out
    assert json.loads(capsys.readouterr().out)["categories"] == {"Games > Chess": 1, "games > chess": 1,
                                                                "Outdoor > Kites": 1}


def test_stats_table_on_the_amazon_examples(capsys):
    assert main(["catalog", "stats", str(ROOT / "examples/amazon_uk_toys/train.jsonl"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "rows               691" in out and "labelled           691 (100.0% of valid rows)" in out
    assert "min_age_years" in out and "top categories:" in out


def test_schema_infer_check_and_json_schema(tmp_path, capsys):
    out_path = tmp_path / "inferred.yaml"
    assert main(["schema", "infer", str(ROOT / "examples/amazon_uk_toys/train.jsonl"), "-o", str(out_path)]) == 0
    assert "from 691 rows" in capsys.readouterr().out
    assert out_path.read_text().startswith("# Drafted by `mmllm schema infer")
    assert main(["schema", "check", str(out_path)]) == 0
    assert "piece_count" in capsys.readouterr().out
    assert main(["schema", "json-schema", str(TOYS_SCHEMA)]) == 0
    assert json.loads(capsys.readouterr().out)["required"] == ["category", "attributes"]


def test_missing_catalog_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["catalog", "stats", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: {missing}: no such catalog file\n"


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "mmllm"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for verb in ("catalog", "schema", "finetune", "label", "evaluate", "search", "demo", "tiny"):
        assert verb in result.stdout


def test_validate_and_stats_count_categories_outside_the_schema(tmp_path, capsys):
    catalog = tmp_path / "shop.jsonl"
    labels = ["Games > Chess", "Garden > Hoses", "Garden > Hoses", "Kitchen > Pans", None]
    catalog.write_text("".join(json.dumps(row(i, label={"category": c, "attributes": {}} if c else None)) + "\n"
                               for i, c in enumerate(labels)))
    assert main(["catalog", "validate", str(catalog), "--schema", str(TOYS_SCHEMA), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert ("3 rows have a category outside schema 'toys' (2 categories): 'Garden > Hoses' (2), 'Kitchen > Pans' (1); "
            "training skips them") in out
    assert "FAILED: 2 valid, 3 invalid of 5 rows" in out
    assert main(["catalog", "stats", str(catalog), "--schema", str(TOYS_SCHEMA), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["outside_taxonomy"] == {"Garden > Hoses": 2, "Kitchen > Pans": 1}


def test_validate_never_writes_over_its_inputs_and_refuses_numbers_that_cannot_work(catalog, capsys, tmp_path):
    before = catalog.read_bytes()
    for target in (catalog, TOYS_SCHEMA):
        assert main(["catalog", "validate", str(catalog), "--schema", str(TOYS_SCHEMA), "--errors-out", str(target),
                     "--quiet"]) == 2
        assert f"--errors-out {target} would write over the input" in capsys.readouterr().err
    assert catalog.read_bytes() == before
    missing = tmp_path / "no" / "errors.jsonl"
    assert main(["catalog", "validate", str(catalog), "--errors-out", str(missing), "--quiet"]) == 2
    assert f"--errors-out {missing}: cannot write it" in capsys.readouterr().err
    for flag, value in (("--max-image-mb", "0"), ("--max-pixels", "-1")):
        with pytest.raises(SystemExit) as exit_info:
            main(["catalog", "validate", str(catalog), flag, value])
        assert exit_info.value.code == 2 and f"argument {flag}: must be above 0" in capsys.readouterr().err


def test_validate_names_a_rows_image_and_label_problems_together(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text(json.dumps(row(1, ["missing.png"], {"category": "Not > A Category",
                                                                            "attributes": {"min_age_years": 99}})) + "\n")
    assert main(["catalog", "validate", str(tmp_path / "c.jsonl"), "--schema", str(TOYS_SCHEMA), "--quiet"]) == 1
    bad = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and "images[0]" in bad[0] and "label.category" in bad[0] and "min_age_years: 99" in bad[0]


def test_schema_infer_never_overwrites_and_says_what_it_left_out_or_merged(tmp_path, capsys):
    catalog = tmp_path / "c.jsonl"
    rows = [row(1, label={"category": "Toys > Cars", "attributes": {"n": 3, "tags": []}}),
            row(2, label={"category": "toys  >  cars", "attributes": {"n": 1e308, "tags": []}}),
            row(3, label={"category": "Toys > Kites", "attributes": {}}),
            {"id": "r4", "title": "", "label": {"category": "Toys > Drums", "attributes": {}}},
            row(1, label={"category": "Toys > Boats", "attributes": {}})]
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = catalog.read_bytes()
    mine = tmp_path / "mine.yaml"
    mine.write_text("my schema\n")
    for out, message in ((catalog, "would write over the input"), (mine, "exists; choose another --out"),
                         (tmp_path / "no" / "s.yaml", "does not exist"), (tmp_path, "is a folder")):
        assert main(["schema", "infer", str(catalog), "-o", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert catalog.read_bytes() == before and mine.read_text() == "my schema\n"
    out = tmp_path / "s.yaml"
    assert main(["schema", "infer", str(catalog), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "c.jsonl line 4 (id 'r4'): title: empty" in err and "c.jsonl line 5 (id 'r1'): id: duplicate id" in err
    assert "2 bad row(s) left out of the draft" in err
    assert "'Toys > Cars' / 'toys > cars' are one category: 'Toys > Cars'" in err
    assert "left out tags: every label gives an empty list" in err
    from mmllm.schema import LabelSchema

    schema = LabelSchema.from_yaml(out)
    assert schema.categories == ("Toys > Cars", "Toys > Kites") and schema.attribute_names == ("n",)
