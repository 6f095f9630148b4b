"""Catalog readers: every format streams, every bad-row kind is named, good rows come through."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmllm.catalog import (
    CatalogError,
    CatalogReader,
    Listing,
    RowError,
    RowLimits,
    iter_catalog,
    load_listings,
    parse_row,
)

from helpers import ROOT


def good(i, **extra):
    row = {
        "id": f"g{i}",
        "title": f"Wooden train set {i}",
        "description": "A train.",
        "attributes": {"Brand": "Oak", "Age": "3+", "Pieces": 12},
        "images": [],
        "label": {"category": "Hobbies > Model Trains & Railway Sets", "attributes": {"piece_count": 12}},
    }
    row.update(extra)
    return row


def write_lines(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n")
            if isinstance(line, bytes) and not line.endswith(b"\n"):
                f.write(b"\n")
    return path


def split(rows):
    return [r for r in rows if isinstance(r, Listing)], [r for r in rows if isinstance(r, RowError)]


def test_jsonl_good_rows_parse_into_listings(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [good(1), good(2, images=["a.jpg", "b.png"], description=None)])
    rows = list(iter_catalog(path))
    assert [r.id for r in rows] == ["g1", "g2"]
    first, second = rows
    assert first.title == "Wooden train set 1" and first.line == 1 and first.source == "c.jsonl"
    assert first.attributes == {"Brand": "Oak", "Age": "3+", "Pieces": 12}
    assert first.label == {"category": "Hobbies > Model Trains & Railway Sets", "attributes": {"piece_count": 12}}
    assert second.images == ("a.jpg", "b.png") and second.description == ""
    assert second.to_dict()["images"] == ["a.jpg", "b.png"]


def test_every_bad_row_kind_has_its_own_message_and_good_rows_survive(tmp_path):
    lines = [
        good(1),
        {"title": "no id here"},  # line 2
        good(3, title="   "),  # line 3
        good(4, title=42),  # line 4
        good(5, attributes=["Brand", "Oak"]),  # line 5
        good(6, images={"front": "a.jpg"}),  # line 6
        good(7, label="Games > Chess"),  # line 7
        good(1, title="same id again"),  # line 8
        b'{"id": "bad-utf8", "title": "caf\xe9 \xff set"}',  # line 9
        good(10, title="x" * 10_000_000),  # line 10: a 10 MB title
        b'{"id": "broken-json", "title": "half a row"',  # line 11
        b"[1, 2, 3]",  # line 12
        good(13, attributes={"Size": {"w": 1, "h": 2}}),  # line 13
        good(14),
    ]
    rows = list(iter_catalog(write_lines(tmp_path / "dump.jsonl", lines)))
    ok, bad = split(rows)
    assert [r.id for r in ok] == ["g1", "g14"]
    by_line = {e.line: e for e in bad}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    expect = {
        2: ("id", "missing"),
        3: ("title", "empty"),
        4: ("title", "expected a string, got int"),
        5: ("attributes", "expected an object"),
        6: ("images", "expected a list of path strings"),
        7: ("label", "expected an object"),
        8: ("id", "duplicate id, first seen at line 1"),
        9: ("row", "not valid UTF-8 (byte 0xe9"),
        10: ("title", "10,000,000 characters, limit 1,000"),
        11: ("row", "not valid JSON"),
        12: ("row", "expected a JSON object, got list"),
        13: ("attributes.Size", "expected a string, number, boolean or list"),
    }
    for line, (field, text) in expect.items():
        err = by_line[line]
        assert err.field == field, (line, err)
        assert text in err.message, (line, err.message)
        assert err.source == "dump.jsonl"
        assert f"dump.jsonl line {line}" in str(err)
    # ids are named even for rows that never parsed, when they can be found
    assert by_line[9].id == "bad-utf8" and by_line[11].id == "broken-json"
    assert by_line[4].id == "g4" and "(id 'g4')" in str(by_line[4])
    assert by_line[8].to_dict() == {
        "source": "dump.jsonl", "line": 8, "id": "g1", "field": "id", "error": "id: duplicate id, first seen at line 1",
    }


def test_a_row_reports_all_its_problems(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [{"id": "x", "title": "", "images": "", "description": 5, "label": {"category": 3}}])
    (err,) = list(iter_catalog(path))
    assert [f for f, _ in err.problems] == ["title", "description", "label.category"]


def test_overlong_line_is_skipped_and_reading_goes_on(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [good(1, description="y" * 5000), good(2)])
    rows = list(iter_catalog(path, limits=RowLimits(max_line_bytes=1000)))
    assert isinstance(rows[0], RowError) and "line longer than 1,000 bytes" in rows[0].message
    assert isinstance(rows[1], Listing) and rows[1].id == "g2" and rows[1].line == 2


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(good(1)) + "\n\n   \n" + json.dumps(good(2)) + "\n")
    assert [(r.id, r.line) for r in iter_catalog(path)] == [("g1", 1), ("g2", 4)]


def test_gzipped_jsonl(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(3):
            f.write(json.dumps(good(i)) + "\n")
    assert [r.id for r in iter_catalog(path)] == ["g0", "g1", "g2"]


def test_a_gzipped_dump_reports_its_progress_in_bytes_of_the_file(tmp_path):
    """A .jsonl.gz gave no total (its position counted decompressed bytes), so labelling, validating or
    indexing a gzipped dump of millions of rows showed no ETA: now the compressed file's position, which
    its size on disk totals."""
    import random

    from mmllm.catalog import CatalogReader, byte_total

    from mmllm.catalog import GZIP_SETTLED

    path = tmp_path / "c.jsonl.gz"
    noise = random.Random(0)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(8000):  # noise that gzip cannot squeeze: past a MiB compressed
            f.write(json.dumps(good(i, description="".join(noise.choices("abcdefgh ", k=400)))) + "\n")
    reader = CatalogReader(path)
    seen = []
    for _ in reader:
        seen.append(reader.progress())
    size = path.stat().st_size
    assert size > 1.5 * GZIP_SETTLED
    assert {total for _, total in seen} == {size} and seen[-1][0] == size
    done = [d for d, _ in seen]
    assert done == sorted(done) and len(set(done)) > 10  # it moves as the rows are read
    # the first MiB counts as 0 (no estimate): the compressed position runs a read buffer ahead of the rows,
    # and put the end of a file at 61 rows after its first row
    moved = next(i for i, d in enumerate(done) if d)
    assert done[0] == 0 and GZIP_SETTLED <= done[moved] and abs(moved / len(done) - GZIP_SETTLED / size) < 0.1
    assert byte_total([tmp_path / "missing.jsonl"]) is None
    # a progress line counts through the bytes of gzipped dumps or of plain ones, not of a mix (rows per byte
    # ten times apart: one rate over both put the end of 8,773 rows at 2,092)
    plain = write_lines(tmp_path / "p.jsonl", [good(i) for i in range(5)])
    assert byte_total([path]) == size and byte_total([plain]) == plain.stat().st_size
    assert byte_total([plain, path]) is None and byte_total([tmp_path]) is None


def test_numeric_ids_become_strings(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [good(1, id=123), good(2, id=True)])
    first, second = list(iter_catalog(path))
    assert first.id == "123"
    assert isinstance(second, RowError) and second.field == "id" and "got bool" in second.message


def test_csv_reader_nested_columns_and_errors(tmp_path):
    path = tmp_path / "c.csv"
    header = "id,title,description,attributes,images,label,seller_note\n"
    body = (
        'c1,Toy car,"two\nline description","{""Brand"": ""Zoom""}",a.jpg|b.jpg,"{""category"": ""Games > Chess""}",hi\n'
        'c2,Kite,,,"[""k.png""]",,\n'
        'c3,Bad attrs,,"{not json",,,\n'
        ',No id,,,,,\n'
        'c5,Too,many,cells,x,y,z,extra\n'
    )
    path.write_bytes("\ufeff".encode() + header.encode() + body.encode() + "c6,caf".encode() + b"\xe9\n")
    reader = CatalogReader(path)
    ok, bad = split(list(reader))
    assert [r.id for r in ok] == ["c1", "c2"]
    c1, c2 = ok
    assert c1.description == "two\nline description" and c1.attributes == {"Brand": "Zoom"}
    assert c1.images == ("a.jpg", "b.jpg") and c1.label["category"] == "Games > Chess"
    assert c2.images == ("k.png",) and c2.attributes == {} and c2.label is None
    assert c2.line == 4  # c1 spans lines 2-3
    errs = {e.line: e for e in bad}
    assert errs[5].field == "attributes" and "not valid JSON" in errs[5].message and errs[5].id == "c3"
    assert errs[6].field == "id" and "missing" in errs[6].message
    assert "8 cells for 7 header columns" in errs[7].message
    assert errs[8].field == "title" and "not valid UTF-8" in errs[8].message
    assert reader.unknown_fields == {"seller_note": 1}  # counted where it holds data


def test_csv_without_required_columns_is_a_file_error(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("sku,name\n1,x\n")
    with pytest.raises(CatalogError, match=r"c.csv: CSV header lacks column\(s\) \['id', 'title'\]"):
        list(iter_catalog(path))


def test_tsv_reader(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("id\ttitle\tattributes\nt1\tDice\t{\"Pieces\": \"3\"}\n")
    (row,) = list(iter_catalog(path))
    assert row.id == "t1" and row.attributes == {"Pieces": "3"}


def test_parquet_reader_native_and_json_columns(tmp_path):
    path = tmp_path / "c.parquet"
    table = pa.table(
        {
            "id": ["p1", "p2", "p3", "p1"],
            "title": ["Chess set", "Teddy", None, "dup"],
            "attributes": pa.array(
                [[("Brand", "Gambit")], [("Material", "plush")], [], []], type=pa.map_(pa.string(), pa.string())
            ),
            "images": [["c.jpg"], [], None, []],
            "label": ['{"category": "Games > Chess", "attributes": {"piece_count": 32}}', None, None, None],
        }
    )
    pq.write_table(table, path, row_group_size=2)
    reader = CatalogReader(path)
    rows = list(reader)
    assert reader.progress() == (4, 4)
    ok, bad = split(rows)
    assert [r.id for r in ok] == ["p1", "p2"]
    assert ok[0].attributes == {"Brand": "Gambit"} and ok[0].images == ("c.jpg",)
    assert ok[0].label == {"category": "Games > Chess", "attributes": {"piece_count": 32}}
    assert [(e.line, e.field, e.unit) for e in bad] == [(3, "title", "row"), (4, "id", "row")]
    assert "c.parquet row 3 (id 'p3')" in str(bad[0]) and "first seen at row 1" in bad[1].message


def test_parquet_struct_columns_drop_nulls(tmp_path):
    path = tmp_path / "s.parquet"
    rows = [
        {"id": "s1", "title": "A", "attributes": {"Brand": "X", "Colour": None}},
        {"id": "s2", "title": "B", "attributes": {"Brand": None, "Colour": "red"}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert [r.attributes for r in iter_catalog(path)] == [{"Brand": "X"}, {"Colour": "red"}]


def test_hf_dataset_and_save_to_disk_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([good(1), good(2), {**good(3), "title": ""}])
    ok, bad = split(list(iter_catalog(ds)))
    assert [r.id for r in ok] == ["g1", "g2"] and bad[0].line == 3 and bad[0].unit == "row"
    folder = tmp_path / "saved"
    ds.save_to_disk(str(folder))
    reader = CatalogReader(folder)
    assert reader.fmt == "dataset"
    assert [r.id for r in reader if isinstance(r, Listing)] == ["g1", "g2"]
    streamed = datasets.Dataset.from_list([good(7)]).to_iterable_dataset()
    assert [r.id for r in iter_catalog(streamed)] == ["g7"]


def test_list_of_dicts_and_load_listings(tmp_path):
    listings = load_listings([good(1), good(2)])
    assert [x.id for x in listings] == ["g1", "g2"]
    with pytest.raises(CatalogError, match=r"(?s)1 bad row\(s\).*records row 2 \(id 'g1'\): id: duplicate id"):
        load_listings([good(1), good(1)])


def test_reader_streams_instead_of_loading_the_file(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(20_000):
            f.write(json.dumps(good(i)) + "\n")
    reader = CatalogReader(path)
    rows = iter(reader)
    first = next(rows)
    done, total = reader.progress()
    assert first.id == "g0"
    assert total == path.stat().st_size and 0 < done < total / 10  # only a buffer's worth read


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "c.xlsx").write_text("x")
    with pytest.raises(CatalogError, match="unknown catalog format"):
        CatalogReader(tmp_path / "c.xlsx")
    with pytest.raises(CatalogError, match="no such catalog file"):
        CatalogReader(tmp_path / "nope.jsonl")


def test_duplicate_check_can_be_switched_off(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [good(1), good(1)])
    assert all(isinstance(r, Listing) for r in iter_catalog(path, check_duplicates=False))


def test_shipped_example_catalogs_are_valid():
    root = ROOT / "examples"
    for name in ("amazon_uk_toys/train.jsonl", "amazon_uk_toys/dev.jsonl", "drawn/catalog.jsonl"):
        rows = load_listings(root / name)
        assert rows, name
    assert len(load_listings(root / "amazon_uk_toys/train.jsonl")) == 691


def test_text_no_utf8_file_can_hold_and_numbers_that_are_not_finite_are_named_by_field():
    """A lone surrogate (a JSON "\\ud83d" escape, or a CSV byte decoded as one) anywhere in a row, or NaN /
    Infinity / 1e400 in a label, would break the output line, the schema or a plot later: refused here."""
    def problems(raw):
        row = parse_row(raw, source="f.jsonl", line=3)
        assert isinstance(row, RowError)
        return row.id, list(row.problems)

    assert problems({"id": "a", "title": "Kite \ud83d"})[1][0][0] == "title"
    row_id, found = problems({"id": "caf\udce9", "title": "Train"})
    assert row_id is None and found[0][0] == "id" and "not valid UTF-8" in found[0][1]
    assert problems({"id": "a", "title": "T", "label": {"category": "Spielzeug \udcfc > Autos"}})[1][0][0] == "label.category"
    assert problems({"id": "a", "title": "T", "attributes": {"Mark\udce9": "x"}})[1][0][0] == "attributes"
    assert problems({"id": "a", "title": "T", "label": {"category": "C", "attributes": {"n": float("nan")}}})[1] == [
        ("label.attributes.n", "nan is not a finite number")]
    assert problems({"id": "a", "title": "T", "attributes": {"weight": float("inf")}})[1] == [
        ("attributes.weight", "inf is not a finite number")]
    assert "401 digits" in problems({"id": "a", "title": "T", "label": {"category": "C", "attributes": {"n": 10 ** 400}}})[1][0][1]
    # pandas writes a missing number as NaN: a seller-table cell that says nothing, not a bad row
    row = parse_row({"id": "a", "title": "T", "attributes": {"w": float("nan"), "sizes": [1.0, float("nan")]},
                     "extra": float("nan")}, source="f.jsonl", line=1)
    assert isinstance(row, Listing) and row.attributes == {"sizes": [1.0]}


def test_a_jsonl_nan_or_infinity_is_one_bad_row_and_the_others_are_read(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "title": "T", "label": {"category": "C", "attributes": {"pieces": NaN}}}\n'
                    '{"id": "b", "title": "T", "label": {"category": "C", "attributes": {"pieces": 1e400}}}\n'
                    '{"id": "c", "title": "T", "label": {"category": "C", "attributes": {"pieces": 3}}}\n')
    rows = list(CatalogReader(path))
    assert [type(r).__name__ for r in rows] == ["RowError", "RowError", "Listing"]
    assert rows[0].problems == (("label.attributes.pieces", "nan is not a finite number"),)
    assert rows[1].problems == (("label.attributes.pieces", "inf is not a finite number"),)


def test_a_pretty_printed_json_array_is_told_to_be_json_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps([{"id": "a", "title": "Kite"}, {"id": "b", "title": "Drum"}], indent=2))
    first = next(iter(CatalogReader(path)))
    assert isinstance(first, RowError) and "a catalog is JSON Lines (one object per line)" in first.problems[0][1]


def test_a_csv_field_past_the_line_limit_is_one_bad_row_and_the_others_are_read(tmp_path):
    """csv raised 'field larger than field limit' out of the reader: every later row was lost (and
    `catalog validate` printed a traceback)."""
    path = tmp_path / "big.csv"
    path.write_text("id,title,description\nr1,A,ok\nr2,B," + "x" * 5000 + "\nr3,C,ok\n")
    rows = list(iter_catalog(path, limits=RowLimits(max_line_bytes=1000)))
    assert [r.id for r in rows if isinstance(r, Listing)] == ["r1", "r3"]
    bad = [r for r in rows if isinstance(r, RowError)]
    assert len(bad) == 1 and bad[0].line == 3 and "a field longer than 1,000 bytes" in bad[0].message
    # blank lines before the bad row and a cell over two lines before them: each row named by its own first line
    # (the bad row was named by the line after the previous record, 4 here)
    path.write_text('id,title,description\nr1,A,"two\nlines"\n\n\nr2,B,' + "x" * 5000 + '\n\nr3,C,"ok\nok"\nr4,D,\n')
    rows = list(iter_catalog(path, limits=RowLimits(max_line_bytes=1000)))
    assert [(type(r).__name__, r.line if isinstance(r, RowError) else r.id) for r in rows] == [
        ("Listing", "r1"), ("RowError", 6), ("Listing", "r3"), ("Listing", "r4")]
    bad_id = tmp_path / "bad_id.csv"  # a row refused by its checks is named by its first line too
    bad_id.write_text('id,title\n\n\nr1,"a\nb"\n\n,no id\n')
    errors = [r for r in iter_catalog(bad_id) if isinstance(r, RowError)]
    assert [(e.line, e.field) for e in errors] == [(7, "id")]  # lines 2-3 and 6 blank, r1 on lines 4-5
    upper = tmp_path / "DUMP.TSV"  # the tab dialect whatever the suffix's case
    upper.write_text("id\ttitle\nr1\tA train\n")
    assert [r.id for r in iter_catalog(upper)] == ["r1"]


def test_pandas_missing_values_are_missing_not_floats(tmp_path):
    """pandas stores an integer id column with a gap as floats (101.0) and a missing text as NaN: every row's
    id was refused as a float, and a NaN description as a number."""
    pq.write_table(pa.table({"id": [101.0, None, 103.0], "title": ["A train", "B", "C"]}), tmp_path / "pd.parquet")
    ok, bad = split(list(iter_catalog(tmp_path / "pd.parquet")))
    assert [r.id for r in ok] == ["101", "103"]
    assert len(bad) == 1 and bad[0].line == 2 and bad[0].field == "id" and "missing" in bad[0].message
    records = [{"id": 7, "title": "A", "description": float("nan")}, {"id": 8, "title": "B", "description": "b"}]
    assert [(r.id, r.description) for r in iter_catalog(records)] == [("7", ""), ("8", "b")]  # df.to_dict("records")
    assert parse_row({"id": 1.5, "title": "x"}, source="s", line=1).field == "id"  # not an integer: refused


def test_a_dataset_dict_names_its_splits(tmp_path):
    import datasets

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([good(1)]),
                                   "test": datasets.Dataset.from_list([good(2)])})
    with pytest.raises(CatalogError, match=r"DatasetDict of splits \['test', 'train'\]: give one split"):
        CatalogReader(splits)
    splits.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(CatalogError, match=r"DatasetDict of splits \['test', 'train'\]: give one split's folder"):
        CatalogReader(tmp_path / "dd")
    assert [r.id for r in iter_catalog(tmp_path / "dd" / "train")] == ["g1"]


def test_a_csv_row_is_named_by_its_own_first_line():
    """A blank line before a row (which the reader skips) made its errors name the blank line."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "blank.csv"
        path.write_text('id,title,description\nr1,Train,"two\nlines"\n\nr2,\n\n\nr3,Kite,ok\n')
        rows = list(iter_catalog(path))
        assert [(r.id, r.line) for r in rows] == [("r1", 2), ("r2", 5), ("r3", 8)]
