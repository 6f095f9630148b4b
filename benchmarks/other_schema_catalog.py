"""Write ``amazon_uk_toys_10k`` regrouped under a schema of its own: a catalog unlike the default's.

The default recipe is tuned nowhere near this catalog; it is where a claim such as "the recipe beats a
bag of words" is checked with no change to the recipe (``versus_bag_of_words.py --catalog``):

- ``category``: the top level of the browse path only (15 categories, skewed from 1,374 rows down to 2),
  where the default schema has two levels;
- ``brand``: an enum of the brands with at least ``--min-brand-rows`` rows in the file; other rows have
  no gold brand (a model that answers one invents it);
- ``price_band``: an enum, the seller's price cut at £5 / £10 / £20 (about the quartiles); rows without
  a price have no gold band.

Both attributes are derived from seller-table fields, so those fields (``brand``, ``price_gbp``) are
removed from the listing: a model must read the brand from the title and judge the price from what the
product is, as a catalog team would ask of a listing whose table is incomplete. The schema is not written
here: the benchmark drafts it from the training rows, as ``mmllm schema infer`` would.

    python benchmarks/other_schema_catalog.py --out /tmp/toys_10k_regrouped.jsonl
    python benchmarks/versus_bag_of_words.py --catalog /tmp/toys_10k_regrouped.jsonl --seeds 0
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "amazon_uk_toys_10k" / "listings.jsonl"
BANDS = ((5.0, "under £5"), (10.0, "£5 to £10"), (20.0, "£10 to £20"), (float("inf"), "over £20"))


def price_band(text: str | None) -> str | None:
    """The band of a price written as a plain number of pounds; None when there is no readable price."""
    try:
        price = float(str(text).replace(",", "").strip())
    except ValueError:
        return None
    if price <= 0:
        return None
    return next(name for bound, name in BANDS if price < bound)


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=SOURCE)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--min-brand-rows", type=int, default=30)
    args = p.parse_args()
    if args.out.resolve() == args.source.resolve():
        p.error("--out must not be the source file")
    rows = [json.loads(line) for line in args.source.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = regroup(rows, args.min_brand_rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    counts = Counter(r["label"]["category"] for r in out)
    print(f"wrote {len(out)} rows to {args.out}: {len(counts)} categories, "
          f"{sum('brand' in r['label']['attributes'] for r in out)} with a brand "
          f"({len({r['label']['attributes'].get('brand') for r in out} - {None})} brands), "
          f"{sum('price_band' in r['label']['attributes'] for r in out)} with a price band")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
