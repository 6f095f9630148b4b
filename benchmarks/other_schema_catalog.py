"""Write a catalog regrouped under a schema of its own: a catalog unlike the default's.

The default recipe is tuned nowhere near these catalogs; they are where a claim such as "the recipe beats
a bag of words" is checked with no change to the recipe (``versus_bag_of_words.py --catalog``).

``--kind brand_price`` (default): ``amazon_uk_toys_10k`` (title-level listings) with

- ``category``: the top level of the browse path only (15 categories, skewed from 1,374 rows down to 2),
  where the default schema has two levels;
- ``brand``: an enum of the brands with at least ``--min-brand-rows`` rows in the file; other rows have
  no gold brand (a model that answers one invents it);
- ``price_band``: an enum, the seller's price cut at £5 / £10 / £20 (about the quartiles); rows without
  a price have no gold band.

Both attributes are derived from seller-table fields, so those fields (``brand``, ``price_gbp``) are
removed from the listing: a model must read the brand from the title and judge the price from what the
product is, as a catalog team would ask of a listing whose table is incomplete.

``--kind age_group``: the 863 ``amazon_uk_toys`` listings (train and dev, with descriptions and seller
tables) with

- ``category``: the top level of the browse path only (44 categories, 152 rows down to 1);
- ``age_group``: an enum from the gold minimum age, 0-2y / 3y-5y / 6y-8y / 9y-12y / 13y+ (the shape of
  a shop's age-group field); rows without a gold age have no gold group. The seller-table fields that
  state an age ("Manufacturer recommended age") are removed, so the group is judged from the product.

``--kind codes``: the same 863 listings and labels, each category renamed to an opaque code ("C117"),
as a catalog keyed by a taxonomy's ids would label them (the 151 categories in sorted order take the
codes C100-C250 in an order shuffled with seed 7). The name-anchored tuning has nothing to read in
such names; ``anchor.start: auto`` finds that out and starts the class vectors at the categories' titles.

``--kind skus``: the same 863 listings and labels, each title replaced by a SKU ("SKU-" and the first 8 hex
digits of the SHA-256 of the id, "SKU-60D52AAD"), descriptions and seller tables kept, as an ERP's export
names its products. The titles say nothing; ``anchor.reads: auto`` finds that out and tunes on title +
description instead.

The schema is not written here: the benchmark drafts it from the training rows, as ``mmllm schema
infer`` would.

    python benchmarks/other_schema_catalog.py --out /tmp/toys_10k_regrouped.jsonl
    python benchmarks/other_schema_catalog.py --kind age_group --out /tmp/toys_age_groups.jsonl
    python benchmarks/other_schema_catalog.py --kind age_group --top-categories 3 --out /tmp/toys_3.jsonl
    python benchmarks/other_schema_catalog.py --kind codes --out /tmp/toys_codes.jsonl
    python benchmarks/other_schema_catalog.py --kind skus --out /tmp/toys_skus.jsonl
    python benchmarks/versus_bag_of_words.py --catalog /tmp/toys_10k_regrouped.jsonl --seeds 0
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import random
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "examples" / "amazon_uk_toys_10k" / "listings.jsonl.gz"
AGE_SOURCES = (ROOT / "examples" / "amazon_uk_toys" / "train.jsonl", ROOT / "examples" / "amazon_uk_toys" / "dev.jsonl")
AGE_GROUPS = ((3.0, "0-2y"), (6.0, "3y-5y"), (9.0, "6y-8y"), (13.0, "9y-12y"), (float("inf"), "13y+"))
BANDS = ((5.0, "under £5"), (10.0, "£5 to £10"), (20.0, "£10 to £20"), (float("inf"), "over £20"))


def price_band(text: str | None) -> str | None:
    """The band of a price written as a plain number of pounds; None when there is no readable price."""
    try:
        price = float(str(text).replace(",", "").strip())
    except ValueError:
        return None
    if not math.isfinite(price) or price <= 0:
        return None
    return next(name for bound, name in BANDS if price < bound)


def read_labelled(sources: list[Path]) -> tuple[list[dict], int]:
    """The rows of the JSONL ``sources`` (gzipped or not) that have a gold category (the label both catalogs keep); a line
    that is not a JSON object is an error naming its file and line, and rows without a category are left
    out and counted (the benchmark has no use for them)."""
    rows, unlabelled = [], 0
    for source in sources:
        try:
            raw = source.read_bytes()
            text = (gzip.decompress(raw) if source.suffix == ".gz" else raw).decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise ValueError(f"{source}: cannot read it: {exc}") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}:{number}: not a JSON row ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{source}:{number}: a row is a JSON object, got {type(row).__name__}")
            if isinstance((row.get("label") or {}).get("category"), str):
                rows.append(row)
            else:
                unlabelled += 1
    return rows, unlabelled


def age_group(years: object) -> str | None:
    """The group of a minimum age in years; None when there is none."""
    if years is None or isinstance(years, bool):
        return None
    try:
        age = float(years)
    except (TypeError, ValueError):
        return None
    return next(name for bound, name in AGE_GROUPS if age < bound) if math.isfinite(age) and age >= 0 else None


def regroup_ages(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        # "Manufacturer recommended age", "Our recommended age": the field would state the answer
        table = {k: v for k, v in (row.get("attributes") or {}).items() if "age" not in k.lower().split()}
        label = row.get("label") or {}
        group = age_group((label.get("attributes") or {}).get("min_age_years"))
        category = str(label["category"]).split(" > ")[0].strip()
        out.append({**row, "attributes": table,
                    "label": {"category": category, "attributes": {"age_group": group} if group else {}}})
    return out


def recode(rows: list[dict]) -> list[dict]:
    """The rows with each category renamed to a code: the sorted categories take C100, C101, ... in an order
    shuffled with seed 7 (the same codes on every machine); everything else as it was."""
    categories = sorted({str(r["label"]["category"]) for r in rows})
    numbers = list(range(100, 100 + len(categories)))
    random.Random(7).shuffle(numbers)
    code = {c: f"C{n}" for c, n in zip(categories, numbers)}
    return [{**row, "label": {**row["label"], "category": code[str(row["label"]["category"])]}} for row in rows]


def sku_titles(rows: list[dict]) -> list[dict]:
    """The rows with each title replaced by a SKU made from the id ("SKU-" + the first 8 hex digits of its
    SHA-256, upper case: the same SKU on every machine); everything else as it was."""
    return [{**row, "title": "SKU-" + hashlib.sha256(str(row["id"]).encode()).hexdigest()[:8].upper()}
            for row in rows]


def regroup(rows: list[dict], min_brand_rows: int) -> list[dict]:
    brands = Counter((r.get("attributes") or {}).get("brand") for r in rows)
    kept = {b for b, n in brands.items() if b and n >= min_brand_rows}
    out = []
    for row in rows:
        table = dict(row.get("attributes") or {})
        brand, price = table.pop("brand", None), table.pop("price_gbp", None)
        attributes = {}
        if brand in kept:
            attributes["brand"] = brand
        band = price_band(price)
        if band is not None:
            attributes["price_band"] = band
        category = str(row["label"]["category"]).split(" > ")[0].strip()
        out.append({**row, "attributes": table, "label": {"category": category, "attributes": attributes}})
    return out


def largest_categories(rows: list[dict], n: int) -> list[dict]:
    """The rows of the ``n`` categories with the most rows (a tie goes to the name first in sorted order),
    in their order."""
    counts = Counter(r["label"]["category"] for r in rows)
    kept = set(sorted(counts, key=lambda c: (-counts[c], c))[:n])
    return [r for r in rows if r["label"]["category"] in kept]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("brand_price", "age_group", "codes", "skus"), default="brand_price")
    p.add_argument("--source", type=Path, nargs="+",
                   help="default: amazon_uk_toys_10k (brand_price), amazon_uk_toys train + dev (age_group, codes, "
                        "skus)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--min-brand-rows", type=int, default=30)
    p.add_argument("--top-categories", type=int, metavar="N",
                   help="keep the rows of the N largest categories only (a small shop's catalog: --kind age_group "
                        "--top-categories 3)")
    args = p.parse_args()
    if args.top_categories is not None and args.top_categories < 1:
        p.error(f"--top-categories must be 1 or more, got {args.top_categories}")
    sources = args.source or ([SOURCE] if args.kind == "brand_price" else list(AGE_SOURCES))
    if any(args.out.resolve() == s.resolve() for s in sources):
        p.error("--out must not be a source file")
    try:
        rows, unlabelled = read_labelled(sources)
    except ValueError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    out = (regroup(rows, args.min_brand_rows) if args.kind == "brand_price" else
           regroup_ages(rows) if args.kind == "age_group" else recode(rows) if args.kind == "codes" else
           sku_titles(rows))
    if args.top_categories:
        out = largest_categories(out, args.top_categories)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    counts = Counter(r["label"]["category"] for r in out)
    if unlabelled:
        print(f"left out {unlabelled} rows without a gold category")
    if args.kind == "skus":
        print(f"wrote {len(out)} rows to {args.out}: every title a SKU ({out[0]['title'] if out else '-'}, ...), "
              f"{len(counts)} categories")
        return 0
    if args.kind == "codes":
        print(f"wrote {len(out)} rows to {args.out}: {len(counts)} categories renamed to codes "
              f"({', '.join(sorted(counts)[:3])}, ...)")
        return 0
    if args.kind == "age_group":
        groups = Counter(r["label"]["attributes"].get("age_group") for r in out)
        print(f"wrote {len(out)} rows to {args.out}: {len(counts)} categories, "
              f"{sum(n for g, n in groups.items() if g)} with an age group "
              f"({', '.join(f'{g} {groups[g]}' for _, g in AGE_GROUPS if groups[g])})")
        return 0
    print(f"wrote {len(out)} rows to {args.out}: {len(counts)} categories, "
          f"{sum('brand' in r['label']['attributes'] for r in out)} with a brand "
          f"({len({r['label']['attributes'].get('brand') for r in out} - {None})} brands), "
          f"{sum('price_band' in r['label']['attributes'] for r in out)} with a price band")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
