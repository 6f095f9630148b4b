"""Check and describe a catalog: ``mmllm catalog validate`` and ``mmllm catalog stats``.

``validate`` checks every row against the contract, opens every image under the rules of
:mod:`mmllm.images`, and (with a label schema) checks gold labels; it names each bad row by
file, line and id, writes them all to an errors JSONL if asked, and exits 1 when any row is bad.
``stats`` counts rows, images, label coverage, categories and attribute coverage. A catalog or
schema that cannot be used at all (missing file, CSV header without ``id`` / ``title``, bad
schema file) raises CatalogError / SchemaError, even from inside the row loop (the CSV header
is read there); ``mmllm`` prints it as one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mmllm.catalog import CatalogError, CatalogReader, Listing, RowError, RowLimits, attributes_labelled, byte_total
from mmllm.config import positive
from mmllm.images import ImageError, ImagePolicy, load_image
from mmllm.output_paths import PathClash, check_writes
from mmllm.progress import Progress
from mmllm.schema import LabelSchema, clean_path


def check_images(listing: Listing, policy: ImagePolicy, unit: str = "line") -> RowError | None:
    """Open (fully decode) every image of a listing; a RowError naming each bad one."""
    problems = []
    for i, ref in enumerate(listing.images):
        try:
            load_image(ref, policy)
        except ImageError as exc:
            problems.append((f"images[{i}]", str(exc)))
    if not problems:
        return None
    return RowError(listing.source, listing.line, listing.id, tuple(problems), unit)


def check_label(listing: Listing, schema: LabelSchema, unit: str = "line") -> RowError | None:
    """Gold label against the schema (a label without category is allowed: attributes only)."""
    if listing.label is None:
        return None
    result = schema.validate(listing.label, require_category=False)
    if result.ok:
        return None
    problems = tuple((f"label.{e.field}", e.message) for e in result.errors)
    return RowError(listing.source, listing.line, listing.id, problems, unit)


def checked_rows(
    reader: CatalogReader,
    *,
    policy: ImagePolicy | None = None,
    schema: LabelSchema | None = None,
    progress: Progress | None = None,
    outside: Counter | None = None,
) -> Iterator[Listing | RowError]:
    """The reader's rows with image and label checks applied (each bad row once). With ``outside``,
    the gold categories not in the schema's taxonomy are counted there (one per row)."""
    for row in reader:
        if isinstance(row, Listing):
            found = [bad for bad in (check_images(row, policy, reader.unit) if policy and row.images else None,
                                     check_label(row, schema, reader.unit) if schema else None) if bad is not None]
            bad = (RowError(row.source, row.line, row.id, tuple(p for b in found for p in b.problems), reader.unit)
                   if found else None)  # every problem of the row at once: one rerun fixes it
            if outside is not None and schema is not None and row.label:
                category = row.label.get("category")
                if isinstance(category, str) and category.strip() and schema.canonical_category(category) is None:
                    outside[category.strip()] += 1
            row = bad or row
        if progress is not None:
            done, _ = reader.progress()
            progress.update(bytes_done=done if reader.fmt in ("jsonl", "csv") else None)
        yield row


@dataclass
class CatalogStats:
    """Counts over a catalog; memory grows with distinct categories / attribute names only."""

    source: str = ""
    rows: int = 0
    valid: int = 0
    invalid: int = 0
    with_images: int = 0
    images: int = 0
    labelled: int = 0
    with_category: int = 0
    category_only: int = 0  # labels without attributes: the category alone (attributes unknown)
    categories: Counter = field(default_factory=Counter)
    seller_attributes: Counter = field(default_factory=Counter)
    label_attributes: Counter = field(default_factory=Counter)
    errors_by_field: Counter = field(default_factory=Counter)
    outside_taxonomy: Counter = field(default_factory=Counter)  # gold categories the schema lacks (with --schema)
    schema: Any = None  # with --schema: categories counted as the taxonomy spells them ("games>chess" is Games > Chess)

    def add(self, row: Listing | RowError) -> None:
        self.rows += 1
        if isinstance(row, RowError):
            self.invalid += 1
            self.errors_by_field.update({f.split("[")[0] for f, _ in row.problems})
            return
        self.valid += 1
        if row.images:
            self.with_images += 1
            self.images += len(row.images)
        self.seller_attributes.update(row.attributes.keys())
        if row.label is not None:
            self.labelled += 1
            if row.label.get("category"):
                self.with_category += 1
                category = row.label["category"]
                self.categories[(self.schema.canonical_category(category) if self.schema is not None else None)
                                or clean_path(category)] += 1
            if attributes_labelled(row.label):
                self.label_attributes.update(row.label["attributes"].keys())
            else:
                self.category_only += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "valid": self.valid,
            "invalid": self.invalid,
            "with_images": self.with_images,
            "without_images": self.valid - self.with_images,
            "images": self.images,
            "labelled": self.labelled,
            "label_coverage": _share(self.labelled, self.valid),
            "with_category": self.with_category,
            "category_only": self.category_only,
            "categories": dict(self.categories.most_common()),
            "label_attribute_coverage": {k: _share(v, self.labelled - self.category_only)
                                         for k, v in self.label_attributes.most_common()},
            "seller_attribute_coverage": {k: _share(v, self.valid) for k, v in self.seller_attributes.most_common()},
            "errors_by_field": dict(self.errors_by_field.most_common()),
            "outside_taxonomy": dict(self.outside_taxonomy.most_common()),
        }

    def format(self, top: int = 15) -> str:
        """A plain-text report for the terminal."""
        d = self.to_dict()
        lines = [
            f"catalog            {self.source}",
            f"rows               {self.rows:,}",
            f"  valid            {self.valid:,} (by the row contract; photos are not opened: `catalog validate` opens them)",
            f"  invalid          {self.invalid:,}",
            f"with images        {self.with_images:,} ({self.images:,} images)",
            f"without images     {d['without_images']:,}",
            f"labelled           {self.labelled:,} ({d['label_coverage']:.1%} of valid rows)",
            *([f"  category only    {self.category_only:,} (no attributes in the label: left out of attribute fits)"]
              if self.category_only else []),
            f"distinct categories {len(self.categories):,}",
        ]
        sections = [
            ("top categories", [(k, f"{v:,}") for k, v in self.categories.most_common(top)]),
            ("label attribute coverage (share of rows labelled for attributes)",
             [(k, f"{v:.1%}") for k, v in list(d["label_attribute_coverage"].items())[:top]]),
            ("seller attribute coverage (share of valid rows)",
             [(k, f"{v:.1%}") for k, v in list(d["seller_attribute_coverage"].items())[:top]]),
            ("bad rows by field", [(k, f"{v:,}") for k, v in self.errors_by_field.most_common(top)]),
            ("categories outside the schema's taxonomy (rows)",
             [(k, f"{v:,}") for k, v in self.outside_taxonomy.most_common(top)]),
        ]
        for title, items in sections:
            if items:
                width = max(len(k) for k, _ in items)
                lines.append(f"\n{title}:")
                lines.extend(f"  {k:<{width}}  {v:>8}" for k, v in items)
        return "\n".join(lines)


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


# ---------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser, *, images: bool) -> None:
    parser.add_argument("catalog", type=Path, help="catalog dump: .jsonl[.gz], .csv[.gz], .tsv, .parquet or a save_to_disk folder")
    parser.add_argument("--schema", type=Path, help="label schema YAML: also check gold labels against it")
    parser.add_argument("--max-title-chars", type=int, default=RowLimits.max_title_chars, help="longest allowed title")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    if images:
        parser.add_argument("--image-root", type=Path, help="folder image paths resolve in (default: the catalog's folder)")
        parser.add_argument("--allow-remote", action="store_true", help="fetch http(s) image URLs (refused by default)")
        parser.add_argument("--max-image-mb", type=positive(float), default=20.0, help="largest image file accepted")
        parser.add_argument("--max-pixels", type=positive(int), default=ImagePolicy.max_pixels,
                            help="largest width*height accepted (bomb guard)")
        parser.add_argument("--no-images", action="store_true", help="check rows only, do not open images")
        parser.add_argument("--errors-out", type=Path, help="write every bad row as JSONL here")
        parser.add_argument("--show", type=int, default=50, help="print at most this many bad rows")


def run_validate(args: argparse.Namespace) -> int:
    if args.errors_out:  # before anything is read or opened: the catalog and schema are never written over
        try:
            check_writes([args.catalog, args.schema], {"--errors-out": args.errors_out})
        except PathClash as exc:
            raise CatalogError(str(exc)) from None
    reader, schema = _open(args)
    policy = None
    if not args.no_images:
        policy = ImagePolicy(
            root=(args.image_root or reader.root),
            max_bytes=int(args.max_image_mb * 2**20),
            max_pixels=args.max_pixels,
            allow_remote=args.allow_remote,
        )
    stats = CatalogStats(source=str(args.catalog), schema=schema)
    errors_tmp = args.errors_out.with_name(args.errors_out.name + ".tmp") if args.errors_out else None
    try:
        errors_file = open(errors_tmp, "w", encoding="utf-8") if errors_tmp else None
    except OSError as exc:
        raise CatalogError(f"--errors-out {args.errors_out}: cannot write it ({exc.strerror})") from None
    shown = 0
    try:
        with _progress(reader, args, "validate") as progress:
            for row in checked_rows(reader, policy=policy, schema=schema, progress=progress,
                                    outside=stats.outside_taxonomy):
                stats.add(row)
                if isinstance(row, RowError):
                    if shown < args.show:
                        print(f"BAD  {row}", file=sys.stdout)
                        shown += 1
                    if errors_file:
                        errors_file.write(json.dumps(row.to_dict(), ensure_ascii=False) + "\n")
        if errors_file:
            errors_file.close()
            os.replace(errors_tmp, args.errors_out)  # whole or not at all: a stopped run leaves the old file
    finally:
        if errors_file and not errors_file.closed:
            errors_file.close()
            errors_tmp.unlink(missing_ok=True)
    if stats.invalid > shown:
        print(f"... and {stats.invalid - shown:,} more bad rows" + (f" (all in {args.errors_out})" if args.errors_out else ""))
    if reader.unknown_fields:
        names = ", ".join(f"{k} ({v:,} rows)" for k, v in reader.unknown_fields.most_common(10))
        print(f"note: ignored field(s) outside the row contract: {names}")
    if stats.outside_taxonomy:
        counts = stats.outside_taxonomy
        shown_categories = ", ".join(f"'{c}' ({n:,})" for c, n in counts.most_common(10))
        more = f" and {len(counts) - 10:,} more" if len(counts) > 10 else ""
        print(f"{sum(counts.values()):,} rows have a category outside schema '{schema.name}' "
              f"({len(counts):,} categories): {shown_categories}{more}; training skips them: add the categories "
              "to the taxonomy or relabel the rows")
    images_note = "rows only" if args.no_images else f"{stats.images:,} images opened"
    verdict = "OK" if stats.invalid == 0 else "FAILED"
    print(f"{verdict}: {stats.valid:,} valid, {stats.invalid:,} invalid of {stats.rows:,} rows ({images_note}) in {args.catalog}")
    return 0 if stats.invalid == 0 else 1


def run_stats(args: argparse.Namespace) -> int:
    reader, schema = _open(args)
    stats = CatalogStats(source=str(args.catalog), schema=schema)
    with _progress(reader, args, "stats") as progress:
        for row in checked_rows(reader, schema=schema, progress=progress, outside=stats.outside_taxonomy):
            stats.add(row)
    if args.json:
        print(json.dumps(stats.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(stats.format())
    return 0


def _open(args: argparse.Namespace) -> tuple[CatalogReader, LabelSchema | None]:
    schema = LabelSchema.from_yaml(args.schema) if args.schema else None
    limits = RowLimits(max_title_chars=args.max_title_chars)
    return CatalogReader(args.catalog, limits=limits), schema


def _progress(reader: CatalogReader, args: argparse.Namespace, desc: str) -> Progress:
    return Progress(desc, total_bytes=byte_total([reader.path]), enabled=not args.quiet)
