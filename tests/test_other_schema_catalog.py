"""benchmarks/other_schema_catalog.py: the two catalogs regrouped under schemas of their own, where the
recipe is compared with a bag of words without change. The field a label is derived from must leave the
listing (else the answer is written in it), rows without a source value have no gold value, and a line
that is not a row is named by its file and line."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT, benchmark_module


def _module():
    return benchmark_module("other_schema_catalog")


def test_age_groups_come_from_the_gold_minimum_age_and_the_age_fields_leave_the_table(tmp_path):
    other = _module()
    assert [other.age_group(a) for a in (0, 2.5, 3, 5, 6, 8.9, 9, 12, 13, 16, None, True, "x", -1, "inf", "nan")] == [
        "0-2y", "0-2y", "3y-5y", "3y-5y", "6y-8y", "6y-8y", "9y-12y", "9y-12y", "13y+", "13y+",
        None, None, None, None, None, None]
    rows = [{"id": "a", "title": "Wooden train", "attributes": {"brand": "Brio", "Manufacturer recommended age":
                                                                "3 years and up", "Package age": "new"},
             "label": {"category": "Hobbies > Model Trains", "attributes": {"min_age_years": 3, "piece_count": 9}}},
            {"id": "b", "title": "Chess set", "attributes": {"Our recommended age": "8 years"},
             "label": {"category": "Games > Chess", "attributes": {"min_age_years": None}}},
            {"id": "c", "title": "Kite", "label": {"category": "Sports Toys & Outdoor > Kites"}}]
    out = other.regroup_ages(rows)
    assert [r["label"] for r in out] == [{"category": "Hobbies", "attributes": {"age_group": "3y-5y"}},
                                         {"category": "Games", "attributes": {}},
                                         {"category": "Sports Toys & Outdoor", "attributes": {}}]
    assert [r["attributes"] for r in out] == [{"brand": "Brio"}, {}, {}]
    assert [r["title"] for r in out] == ["Wooden train", "Chess set", "Kite"]
    assert rows[0]["attributes"]["Manufacturer recommended age"] == "3 years and up"  # the input is not changed

    # the script: two sources read in order, one file written, and the sources never overwritten
    src = [tmp_path / "train.jsonl", tmp_path / "dev.jsonl"]
    src[0].write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    unlabelled = {"id": "d", "title": "No label yet", "attributes": {}}
    src[1].write_text(json.dumps(rows[2]) + "\n\n" + json.dumps(unlabelled) + "\n")
    script = [sys.executable, str(ROOT / "benchmarks" / "other_schema_catalog.py"), "--kind", "age_group",
              "--source", *map(str, src)]
    done = subprocess.run([*script, "--out", str(tmp_path / "ages.jsonl")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "3 rows" in done.stdout and "1 with an age group (3y-5y 1)" in done.stdout
    assert "left out 1 rows without a gold category" in done.stdout
    written = [json.loads(line) for line in (tmp_path / "ages.jsonl").read_text().splitlines()]
    assert [r["id"] for r in written] == ["a", "b", "c"] and written == out
    before = src[1].read_bytes()
    refused = subprocess.run([*script, "--out", str(src[1])], capture_output=True, text=True)
    assert refused.returncode == 2 and "must not be a source file" in refused.stderr
    assert src[1].read_bytes() == before

    # a line that is not a row: the file and line are named, nothing is written
    src[1].write_text(json.dumps(rows[2]) + "\n{not json\n")
    bad = subprocess.run([*script, "--out", str(tmp_path / "bad.jsonl")], capture_output=True, text=True)
    assert bad.returncode == 2 and f"{src[1]}:2: not a JSON row" in bad.stderr
    assert not (tmp_path / "bad.jsonl").exists()


def test_brand_and_price_band_come_from_fields_that_leave_the_listing():
    other = _module()
    rows = [{"id": str(i), "title": f"Car {i}", "attributes": {"brand": "Corgi" if i < 2 else "Rare",
                                                               "price_gbp": price, "stock": "5 new"},
             "label": {"category": "Die-Cast & Toy Vehicles > Toy Vehicles"}}
            for i, price in enumerate(["4.99", "12", "n/a"])]
    assert [other.price_band(t) for t in ("4.99", "1,250", "0", "-3", "inf", "nan", None)] == [
        "under £5", "over £20", None, None, None, None, None]
    out = other.regroup(rows, min_brand_rows=2)
    assert [r["label"]["attributes"] for r in out] == [{"brand": "Corgi", "price_band": "under £5"},
                                                       {"brand": "Corgi", "price_band": "£10 to £20"}, {}]
    assert {r["label"]["category"] for r in out} == {"Die-Cast & Toy Vehicles"}
    assert all(r["attributes"] == {"stock": "5 new"} for r in out)


def test_the_default_source_is_the_projects_own_gzipped_copy(tmp_path):
    """A fresh clone has no data beside it: the default reads examples/amazon_uk_toys_10k/listings.jsonl.gz."""
    script = [sys.executable, str(ROOT / "benchmarks" / "other_schema_catalog.py")]
    done = subprocess.run([*script, "--out", str(tmp_path / "R.jsonl")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote 8173 rows" in done.stdout and "15 categories, 2535 with a brand (44 brands)" in done.stdout
    first = json.loads((tmp_path / "R.jsonl").read_text().splitlines()[0])
    assert " > " not in first["label"]["category"] and not {"brand", "price_gbp"} & set(first["attributes"])


def test_codes_rename_every_category_and_keep_the_rest(tmp_path):
    """--kind codes: one code per category, the same on every run, rows and attribute labels untouched; the
    default source is the 863 listings of the example catalog."""
    other = _module()
    rows = [{"id": "a", "title": "Kite", "label": {"category": "Sports > Kites", "attributes": {"min_age_years": 6}}},
            {"id": "b", "title": "Chess", "label": {"category": "Games > Chess"}},
            {"id": "c", "title": "Box kite", "label": {"category": "Sports > Kites"}}]
    out = other.recode(rows)
    codes = [r["label"]["category"] for r in out]
    assert codes[0] == codes[2] != codes[1] and all(c.startswith("C") and c[1:].isdigit() for c in codes)
    assert other.recode(rows) == out and rows[0]["label"]["category"] == "Sports > Kites"
    assert [{k: v for k, v in r.items() if k != "label"} for r in out] == [
        {k: v for k, v in r.items() if k != "label"} for r in rows]
    assert out[0]["label"]["attributes"] == {"min_age_years": 6}
    script = [sys.executable, str(ROOT / "benchmarks" / "other_schema_catalog.py"), "--kind", "codes"]
    done = subprocess.run([*script, "--out", str(tmp_path / "codes.jsonl")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote 863 rows" in done.stdout and "151 categories renamed to codes (C100, C101, C102" in done.stdout
    written = [json.loads(line) for line in (tmp_path / "codes.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len({r["label"]["category"] for r in written}) == 151


def test_skus_replace_every_title_and_keep_the_rest(tmp_path):
    """--kind skus: each title a SKU made from the id (SHA-256), the same on every run, distinct per id; the
    descriptions, seller tables and labels untouched; the default source is the 863 listings."""
    other = _module()
    rows = [{"id": "03756123c54f2857ac841e94b9679189", "title": "Model street lights", "description": "20 lamps",
             "attributes": {"brand": "Generic"}, "label": {"category": "Hobbies > Model Trains"}},
            {"id": "b", "title": "Chess", "label": {"category": "Games > Chess"}}]
    out = other.sku_titles(rows)
    assert [r["title"] for r in out] == ["SKU-60D52AAD", "SKU-3E23E816"]
    assert other.sku_titles(rows) == out and rows[0]["title"] == "Model street lights"
    assert [{k: v for k, v in r.items() if k != "title"} for r in out] == [
        {k: v for k, v in r.items() if k != "title"} for r in rows]
    script = [sys.executable, str(ROOT / "benchmarks" / "other_schema_catalog.py"), "--kind", "skus"]
    done = subprocess.run([*script, "--out", str(tmp_path / "skus.jsonl")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote 863 rows" in done.stdout and "every title a SKU (SKU-" in done.stdout
    assert "151 categories" in done.stdout
    written = [json.loads(line) for line in (tmp_path / "skus.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len({r["title"] for r in written}) == 863 and all(r["title"].startswith("SKU-") for r in written)
    assert sum(bool(r.get("description")) for r in written) > 800


def test_the_largest_categories_alone_make_a_small_shops_catalog(tmp_path):
    other = _module()
    rows = [{"id": str(i), "title": f"toy {i}", "label": {"category": c}}
            for i, c in enumerate(["Games", "Dolls", "Games", "Kites", "Dolls", "Games", "Puzzles"])]
    # Games 3, Dolls 2, then Kites and Puzzles 1 each: the tie goes to the first name in sorted order
    assert [r["id"] for r in other.largest_categories(rows, 2)] == ["0", "1", "2", "4", "5"]
    assert [r["label"]["category"] for r in other.largest_categories(rows, 3)] == [
        "Games", "Dolls", "Games", "Kites", "Dolls", "Games"]
    assert other.largest_categories(rows, 10) == rows
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({**r, "label": {"category": r["label"]["category"] + " > Other",
                                                      "attributes": {"min_age_years": 4}}}) + "\n" for r in rows))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "other_schema_catalog.py"), "--kind", "age_group",
                           "--source", str(src), "--top-categories", "2", "--out", str(tmp_path / "out.jsonl")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["id"], r["label"]["category"], r["label"]["attributes"]) for r in out] == [
        (i, c, {"age_group": "3y-5y"}) for i, c in [("0", "Games"), ("1", "Dolls"), ("2", "Games"), ("4", "Dolls"),
                                                     ("5", "Games")]]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "other_schema_catalog.py"), "--kind", "age_group",
                           "--source", str(src), "--top-categories", "0", "--out", str(tmp_path / "no.jsonl")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--top-categories must be 1 or more" in done.stderr
    assert not (tmp_path / "no.jsonl").exists()
