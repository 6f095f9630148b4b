"""Catalog reading speed and memory: rows/s and peak memory for 10k and 200k generated rows.

Each (format, rows, mode) is read in a fresh child process so its peak resident memory
(``VmHWM``) is its own. Modes:

* ``stream``: the reader alone (``check_duplicates=False``), which is what must stay flat;
* ``dedup``: with the duplicate-id check, which keeps an 8-byte hash and a line number per
  row, so it grows by a known amount per row (reported as bytes/row).

    python benchmarks/catalog_stream.py [--rows 10000 200000] [--formats jsonl csv parquet]

Prints a table and writes benchmarks/results/catalog_stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = "wooden train set kite puzzle plush teddy bear racing car chess board dice family game kids toy".split()


def make_row(i: int, rng: random.Random) -> dict:
    title = " ".join(rng.choice(WORDS) for _ in range(8))
    return {
        "id": f"row-{i:08d}",
        "title": title.title(),
        "description": " ".join(rng.choice(WORDS) for _ in range(60)),
        "attributes": {"Brand": rng.choice(["Oak", "Zoom", "Gambit"]), "Age": f"{rng.randint(1, 12)} years and up",
                       "Item Weight": f"{rng.randint(50, 2000)} g", "Pieces": rng.randint(1, 1000)},
        "images": [f"images/{i % 997}.jpg"],
        "label": {"category": rng.choice(["Games > Chess", "Games > Card Games", "Jigsaws & Puzzles > Jigsaws"]),
                  "attributes": {"min_age_years": rng.randint(1, 12), "piece_count": rng.randint(1, 1000)}},
    }


def write_catalog(path: Path, fmt: str, rows: int) -> None:
    rng = random.Random(0)
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for i in range(rows):
                f.write(json.dumps(make_row(i, rng)) + "\n")
    elif fmt == "csv":
        import csv

        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "title", "description", "attributes", "images", "label"])
            writer.writeheader()
            for i in range(rows):
                r = make_row(i, rng)
                writer.writerow({**r, "attributes": json.dumps(r["attributes"]), "images": "|".join(r["images"]),
                                 "label": json.dumps(r["label"])})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        for start in range(0, rows, 10_000):  # written in chunks so the writer itself stays small
            chunk = [make_row(i, rng) for i in range(start, min(rows, start + 10_000))]
            for r in chunk:
                r["attributes"] = json.dumps(r["attributes"])
                r["label"] = json.dumps(r["label"])
            table = pa.Table.from_pylist(chunk)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
        writer.close()


CHILD = """
import json, sys, time
from mmllm.catalog import CatalogReader, Listing

def hwm_kib():
    # VmHWM is this process's own peak; ru_maxrss can carry the parent's peak across fork/exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

path, dedup = sys.argv[1], sys.argv[2] == "1"
base = hwm_kib()
start = time.perf_counter()
good = bad = 0
for row in CatalogReader(path, check_duplicates=dedup):
    if isinstance(row, Listing):
        good += 1
    else:
        bad += 1
seconds = time.perf_counter() - start
peak = hwm_kib()
print(json.dumps({"good": good, "bad": bad, "seconds": seconds, "base_kib": base, "peak_kib": peak}))
"""


def measure(path: Path, dedup: bool) -> dict:
    # Arrow's default allocator (mimalloc) keeps up to ~20 MB of freed row-group buffers
    # cached, which plateaus but blurs a 10k-vs-200k comparison; the system allocator shows
    # what the reader itself holds. Users can set the same variable for the smallest footprint.
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), "1" if dedup else "0"],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 200_000])
    parser.add_argument("--formats", nargs="+", default=["jsonl", "csv", "parquet"])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "catalog_stream.json")
    args = parser.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            for rows in args.rows:
                path = Path(tmp) / f"catalog_{rows}.{fmt}"
                write_catalog(path, fmt, rows)
                for mode in ("stream", "dedup"):
                    r = measure(path, dedup=mode == "dedup")
                    assert r["good"] == rows and r["bad"] == 0, r
                    results.append({
                        "format": fmt, "rows": rows, "mode": mode, "file_mb": round(path.stat().st_size / 2**20, 1),
                        "rows_per_s": round(rows / r["seconds"]), "peak_mib": round(r["peak_kib"] / 1024, 1),
                        "reading_mib": round((r["peak_kib"] - r["base_kib"]) / 1024, 1),
                    })
                path.unlink()

    print(f"{'format':<8} {'rows':>8} {'mode':<7} {'file MB':>8} {'rows/s':>9} {'peak MiB':>9} {'+reading MiB':>13}")
    for r in results:
        print(f"{r['format']:<8} {r['rows']:>8,} {r['mode']:<7} {r['file_mb']:>8} {r['rows_per_s']:>9,} "
              f"{r['peak_mib']:>9} {r['reading_mib']:>13}")
    growth = {}
    lo, hi = min(args.rows), max(args.rows)
    for fmt in args.formats:
        for mode in ("stream", "dedup"):
            a = next(r for r in results if (r["format"], r["rows"], r["mode"]) == (fmt, lo, mode))
            b = next(r for r in results if (r["format"], r["rows"], r["mode"]) == (fmt, hi, mode))
            extra = (b["peak_mib"] - a["peak_mib"]) * 2**20
            growth[f"{fmt}/{mode}"] = {"peak_growth_mib": round(b["peak_mib"] - a["peak_mib"], 1),
                                       "bytes_per_extra_row": round(extra / (hi - lo), 1)}
    print(f"\npeak growth from {lo:,} to {hi:,} rows:")
    for key, g in growth.items():
        print(f"  {key:<16} {g['peak_growth_mib']:>6} MiB  ({g['bytes_per_extra_row']} bytes per extra row)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "catalog_stream", "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "arrow_memory_pool": "system", "results": results, "growth": growth,
    }, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
