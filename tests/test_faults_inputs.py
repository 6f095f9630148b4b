"""Fault injection on user inputs (issue 13): each bad input gets one clear line naming the file,
the line or row id and the field, the run goes on or stops with exit 2, and no input file is touched."""

import gzip
import json
import os
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmllm.catalog import CatalogReader, Listing, RowError
from mmllm.cli import main

from helpers import TOYS_SCHEMA


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy(i: int) -> dict:
    return {"id": f"r{i}", "title": f"Toy {i} " + "x" * 40}


# ---------------------------------------------------------------------- 1. catalog rows and streams
def test_bom_before_the_first_row_is_read_in_jsonl_and_csv(tmp_path, capsys):
    dump = tmp_path / "bom.jsonl"
    dump.write_bytes(b"\xef\xbb\xbf" + json.dumps(toy(1)).encode() + b"\n" + json.dumps(toy(2)).encode() + b"\n")
    table = tmp_path / "bom.csv"
    table.write_bytes(b"\xef\xbb\xbfid,title\r\nc1,Car\r\nc2,Boat\r\n")
    before = snapshot(dump, table)
    assert [(r.id, r.line) for r in CatalogReader(dump)] == [("r1", 1), ("r2", 2)]
    assert [(r.id, r.line) for r in CatalogReader(table)] == [("c1", 2), ("c2", 3)]
    for path in (dump, table):
        assert main(["catalog", "validate", str(path), "--no-images", "--quiet"]) == 0
        assert capsys.readouterr().out == f"OK: 2 valid, 0 invalid of 2 rows (rows only) in {path}\n"
    assert snapshot(dump, table) == before


def test_a_blank_id_is_a_row_error_on_field_id(tmp_path, capsys):
    dump = jsonl(tmp_path / "c.jsonl", [toy(1), {"id": "   ", "title": "Blank"}, toy(3)])
    before = snapshot(dump)
    rows = list(CatalogReader(dump))
    assert [type(r) for r in rows] == [Listing, RowError, Listing]
    assert (rows[1].line, rows[1].id, rows[1].field) == (2, None, "id")
    assert main(["catalog", "validate", str(dump), "--no-images", "--quiet"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "BAD  c.jsonl line 2: id: blank ('   '); every row needs a unique string id",
        f"FAILED: 2 valid, 1 invalid of 3 rows (rows only) in {dump}",
    ]
    assert snapshot(dump) == before


@pytest.mark.parametrize("name", ["dump.jsonl.gz", "dump.csv.gz"])
def test_truncated_gzip_yields_every_whole_line_then_one_read_error(tmp_path, capsys, name):
    if name.endswith(".csv.gz"):
        header, lines = 1, "id,title\n" + "".join(f"r{i},Toy {i} {'x' * 40}\n" for i in range(1, 201))
    else:
        header, lines = 0, "".join(json.dumps(toy(i)) + "\n" for i in range(1, 201))
    whole = gzip.compress(lines.encode(), mtime=0)
    cut = whole[: len(whole) // 2]
    dump = tmp_path / name
    dump.write_bytes(cut)
    # the lines a gzip reader can get out of the cut bytes: every one of them must come through
    complete = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")
    assert header < complete < 200
    rows = list(CatalogReader(dump))
    assert [(r.id, r.line) for r in rows[:-1]] == [(f"r{n - header}", n) for n in range(header + 1, complete + 1)]
    assert all(isinstance(r, Listing) for r in rows[:-1])
    error = rows[-1]
    assert isinstance(error, RowError) and (error.source, error.line, error.id, error.field) == (
        name, complete + 1, None, "read")
    assert error.message == (
        f"read: {name}: stream ended early after line {complete} (EOFError: Compressed file ended before "
        "the end-of-stream marker was reached); the rest of the file was not read, re-copy or re-export it")
    assert main(["catalog", "validate", str(dump), "--no-images", "--quiet"]) == 1
    valid = complete - header
    assert capsys.readouterr().out.splitlines() == [
        f"BAD  {name} line {complete + 1}: {error.message}",
        f"FAILED: {valid} valid, 1 invalid of {valid + 1} rows (rows only) in {dump}",
    ]
    assert snapshot(dump) == {dump: cut}


def test_corrupt_parquet_yields_the_rows_before_the_damage_then_one_read_error(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([toy(i) for i in range(1, 201)]), good, row_group_size=50)
    offset = pq.ParquetFile(good).metadata.row_group(2).column(0).data_page_offset
    garbage = bytearray(good.read_bytes())
    garbage[offset:offset + 40] = b"\xff" * 40  # the page header of rows 101..150
    dump = tmp_path / "dump.parquet"
    dump.write_bytes(bytes(garbage))
    rows = list(CatalogReader(dump))
    assert [r.id for r in rows[:-1]] == [f"r{i}" for i in range(1, 101)]
    error = rows[-1]
    assert isinstance(error, RowError) and (error.source, error.unit, error.line, error.field) == (
        "dump.parquet", "row", 101, "read")
    assert error.message.startswith("read: dump.parquet: cannot read further after row 100 (OSError: ")
    assert error.message.endswith("); the rest of the file was not read, re-copy or re-export it")
    assert "\n" not in error.message
    assert dump.read_bytes() == bytes(garbage)

    footer = bytearray(good.read_bytes())
    footer[-12:] = b"\x00" * 12  # no footer: nothing can be read
    dump.write_bytes(bytes(footer))
    assert [str(r) for r in CatalogReader(dump)] == [
        "dump.parquet row 1: read: dump.parquet: cannot read further before the first row (ArrowInvalid: Parquet "
        "magic bytes not found in footer. Either the file is corrupted or this is not a parquet file.); the rest "
        "of the file was not read, re-copy or re-export it"]


# ---------------------------------------------------------------------- 2. catalog validate on a bad header
@pytest.mark.parametrize("action", ["validate", "stats"])
def test_csv_without_title_column_is_one_error_line_and_exit_2(tmp_path, capsys, action):
    table = tmp_path / "shop.csv"
    table.write_text("id,name\nc1,Car\n")
    before = snapshot(table)
    assert main(["catalog", action, str(table), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"error: {table}: CSV header lacks column(s) ['title'] (it has ['id', 'name']); "
                            "add them, or rename the columns that hold them\n")
    assert captured.out == ""
    assert snapshot(table) == before


# ---------------------------------------------------------------------- 3. evaluate on bad lines
GOLD = [{"id": "r1", "title": "t1", "label": {"category": "A > B", "attributes": {"n": 1}}},
        {"id": "r2", "title": "t2", "label": {"category": "A > C", "attributes": {"n": 2}}},
        {"id": "r3", "title": "t3", "label": {"category": "A > B", "attributes": {}}}]
PRED = [{"id": r["id"], "status": "ok", **r["label"]} for r in GOLD]


def evaluate(tmp_path, capsys, gold_lines, pred_lines, *extra):
    gold = tmp_path / "gold.jsonl"
    pred = tmp_path / "pred.jsonl"
    gold.write_text("".join(json.dumps(r) + "\n" for r in gold_lines))
    pred.write_text("".join(json.dumps(r) + "\n" for r in pred_lines))
    before = snapshot(gold, pred)
    report = tmp_path / "report"
    code = main(["evaluate", "--pred", str(pred), "--gold", str(gold), "--report", str(report), "--bootstrap", "10", *extra])
    assert snapshot(gold, pred) == before
    warnings = capsys.readouterr().err.splitlines()
    metrics = json.loads((report / "metrics.json").read_text())["metrics"] if code == 0 else None
    return code, warnings, metrics, report


EVALUATE_FAULTS = [
    ("gold row without a category",
     [GOLD[0], {**GOLD[1], "label": {"attributes": {"n": 2}}}, GOLD[2]], PRED,
     "gold.jsonl line 2 (id 'r2'): label.category: missing; row left out of the category metrics",
     {"rows": 3, "category_accuracy": 1.0, "invalid_rows": 0, "missing_rows": 0}),
    ("predicted category is a list",
     GOLD, [PRED[0], {**PRED[1], "category": ["A > C"]}, PRED[2]],
     "pred.jsonl line 2 (id 'r2'): category: expected a taxonomy path string, got list [\"A > C\"]; "
     "counted as an invalid answer",
     {"rows": 3, "category_accuracy": 2 / 3, "invalid_rows": 1, "missing_rows": 0}),
    ("predicted attributes are a string",
     GOLD, [PRED[0], {**PRED[1], "attributes": "n=2"}, PRED[2]],
     "pred.jsonl line 2 (id 'r2'): attributes: expected an object of name -> value, got str \"n=2\"; "
     "counted as an invalid answer",
     {"rows": 3, "category_accuracy": 2 / 3, "invalid_rows": 1, "missing_rows": 0}),
    ("prediction line is a JSON array",
     GOLD, [PRED[0], ["r2", "A > C"], PRED[2]],
     "pred.jsonl line 2: expected a JSON object, got list [\"r2\", \"A > C\"]; line skipped",
     {"rows": 3, "category_accuracy": 2 / 3, "invalid_rows": 0, "missing_rows": 1}),
    ("gold line is a JSON array",
     [GOLD[0], ["r2", "A > C"], GOLD[2]], PRED,
     "gold.jsonl line 2: expected a JSON object, got list; gold row left out",
     {"rows": 2, "category_accuracy": 1.0, "invalid_rows": 0, "missing_rows": 0}),
]


@pytest.mark.parametrize("fault, gold, pred, warning, counts", EVALUATE_FAULTS, ids=[f[0] for f in EVALUATE_FAULTS])
def test_evaluate_warns_per_bad_line_and_scores_the_rest(tmp_path, capsys, fault, gold, pred, warning, counts):
    code, warnings, metrics, report = evaluate(tmp_path, capsys, gold, pred)
    assert code == 0, fault
    assert warnings == [f"warning: {warning}"]
    assert {key: metrics[key] for key in counts} == pytest.approx(counts)
    assert f"- {warning}" in (report / "report.md").read_text()


def test_evaluate_warns_when_the_schema_fits_none_of_the_gold(tmp_path, capsys):
    code, warnings, _, _ = evaluate(tmp_path, capsys, GOLD, PRED, "--schema", str(TOYS_SCHEMA))
    assert code == 0
    assert warnings == [
        f"warning: {TOYS_SCHEMA}: none of the 2 gold categories of gold.jsonl is in its taxonomy (e.g. 'A > B'); "
        "category scores mean nothing, check --schema",
        f"warning: {TOYS_SCHEMA}: none of the gold attribute names of gold.jsonl (n) is in it (min_age_years, "
        "assembly_required, batteries_required, batteries_included, piece_count, material); attribute scores "
        "mean nothing, check --schema",
    ]


# ---------------------------------------------------------------------- 4. schema files
BAD_SCHEMAS = [
    (b"taxonomy: [A]\nattributes: [colour, size]\n",
     "'attributes' must map each attribute name to its spec, got a list"),
    (b"taxonomy: [A]\nattributes: {note: {type: string, max_length: lots}}\n",
     "attribute 'note': max_length must be a whole number >= 1, got 'lots'"),
    (b"taxonomy: [A]\nattributes: {note: {type: string, max_length: -5}}\n",
     "attribute 'note': max_length must be a whole number >= 1, got -5"),
    (b"taxonomy: [A]\nattributes: {weight: {type: number, minimum: .nan}}\n",
     "attribute 'weight': minimum must be a finite number or left out, got nan"),
    (b"taxonomy: [A]\nattributes: {weight: {type: number, maximum: .inf}}\n",
     "attribute 'weight': maximum must be a finite number or left out, got inf"),
    (b"taxonomy: [Spielzeug \xfc]\n",
     "cannot read the label schema: byte 0xfc at offset 21 is not UTF-8; save the file as UTF-8"),
]
ENTRY_POINTS = {
    "schema check": lambda s, c, o: ["schema", "check", s],
    "schema json-schema": lambda s, c, o: ["schema", "json-schema", s],
    "catalog validate": lambda s, c, o: ["catalog", "validate", c, "--schema", s, "--quiet"],
    "catalog stats": lambda s, c, o: ["catalog", "stats", c, "--schema", s, "--quiet"],
    "evaluate": lambda s, c, o: ["evaluate", "--pred", c, "--gold", c, "--report", o, "--schema", s],
}


@pytest.mark.parametrize("text, message", BAD_SCHEMAS, ids=["attributes list", "max_length lots", "max_length -5",
                                                           "minimum nan", "maximum inf", "not utf-8"])
def test_bad_schema_is_one_line_and_exit_2_at_every_entry_point(tmp_path, capsys, text, message):
    schema = tmp_path / "schema.yaml"
    schema.write_bytes(text)
    catalog = jsonl(tmp_path / "c.jsonl", GOLD)
    before = snapshot(schema, catalog)
    for name, argv in ENTRY_POINTS.items():
        assert main(argv(str(schema), str(catalog), str(tmp_path / "report"))) == 2, name
        captured = capsys.readouterr()
        assert captured.err == f"error: {schema}: {message}\n", name
        assert captured.out == "", name
    assert snapshot(schema, catalog) == before
    assert not (tmp_path / "report").exists()


# ---------------------------------------------------------------------- 5. images
def test_image_errors_name_the_path_as_given_never_where_it_resolves(tmp_path, capsys):
    root = tmp_path / "dump"
    (root / "img").mkdir(parents=True)
    secret = tmp_path / "private" / "secret.png"
    secret.parent.mkdir()
    Image.new("RGB", (4, 4)).save(secret)
    os.symlink(secret, root / "img" / "escape.png")
    os.symlink(secret.parent, root / "shared", target_is_directory=True)
    os.symlink(root / "img" / "gone.png", root / "img" / "dangling.png")
    (root / "img" / "folder.png").mkdir()
    refs = ["img/escape.png", "shared/secret.png", "../private/secret.png", "img/dangling.png", "img/folder.png"]
    catalog = jsonl(root / "c.jsonl", [{"id": f"r{i}", "title": "t", "images": [ref]} for i, ref in enumerate(refs, 1)])
    before = snapshot(catalog, secret)
    assert main(["catalog", "validate", str(catalog), "--quiet"]) == 1
    assert capsys.readouterr().out.splitlines()[:5] == [
        "BAD  c.jsonl line 1 (id 'r1'): images[0]: image 'img/escape.png': path leaves the image root through a "
        "symlink; copy the file into the root instead of linking it",
        "BAD  c.jsonl line 2 (id 'r2'): images[0]: image 'shared/secret.png': path leaves the image root through a "
        "symlink; copy the file into the root instead of linking it",
        "BAD  c.jsonl line 3 (id 'r3'): images[0]: image '../private/secret.png': path leaves the image root "
        "through '..'; keep image paths inside it",
        "BAD  c.jsonl line 4 (id 'r4'): images[0]: image 'img/dangling.png': cannot open it (No such file or "
        "directory); check the path and the image root",
        "BAD  c.jsonl line 5 (id 'r5'): images[0]: image 'img/folder.png': not a regular file; point to an image file",
    ]
    assert snapshot(catalog, secret) == before
