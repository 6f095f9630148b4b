"""Catalog rows: the listing contract, streaming readers and per-row validation.

A catalog dump is JSONL (optionally gzipped), CSV (optionally gzipped), Parquet, a Hugging Face
``datasets`` Dataset (or a folder written by ``Dataset.save_to_disk``), or a list of dicts. Every
reader streams: it holds one row (Parquet: one small batch) at a time, so memory stays flat in
the number of rows. A bad row never stops the reader: it comes out as a :class:`RowError`
naming the file, the line (or row), the id when it can be found, and the field. A file that
cannot be read to its end (a truncated ``.gz``, a corrupt Parquet page) gives its rows up to
the damage, then one RowError with field ``read`` saying where it broke, and ends there.

Row contract (README.md, "The catalog")::

    id           string, required, unique
    title        string, required, non-empty
    description  string, optional
    attributes   object name -> string / number / bool / list of those: the seller's table
    images       list of paths relative to the dump's folder (may be empty)
    label        {"category": "A > B", "attributes": {...}}: gold, optional; without "attributes"
                 the row is labelled for its category only (its attributes unknown)

In CSV the nested columns hold JSON text (``images`` may also be one path or ``a.jpg|b.jpg``).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping

import numpy as np

FIELDS = ("id", "title", "description", "attributes", "images", "label")
_ID_IN_TEXT = re.compile(rb'"id"\s*:\s*"([^"\\]{1,200})"')
_BOM = b"\xef\xbb\xbf"  # Excel and Windows tools put it before the first row of "UTF-8" exports
# What a damaged file raises part-way: gzip cut short (EOFError), bad gzip data (BadGzipFile is
# an OSError, a bad deflate block a zlib.error), unreadable disk. Arrow's errors are added per format.
_BROKEN_STREAM: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)


class CatalogError(ValueError):
    """The whole catalog cannot be read (missing file, unknown format, bad CSV header)."""


@dataclass(frozen=True)
class RowLimits:
    """Bounds on one row; a row past any of them is a bad row, the others go on.

    They protect later stages (prompt building, tokenization) from dumps with a pasted
    HTML page in a title or a binary blob in a field.
    """

    max_line_bytes: int = 64 * 2**20  # one JSONL line / CSV field; longer ones are skipped unparsed
    max_id_chars: int = 256
    max_title_chars: int = 1_000
    max_description_chars: int = 100_000
    max_attributes: int = 500  # entries in the seller's table
    max_attribute_chars: int = 10_000  # one key or value of the seller's table
    max_images: int = 32
    max_image_ref_chars: int = 2_048


@dataclass(frozen=True)
class Listing:
    """One valid catalog row. ``source`` / ``line`` say where it came from, for messages."""

    id: str
    title: str
    description: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    images: tuple[str, ...] = ()
    label: dict[str, Any] | None = None
    source: str = ""
    line: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The row as the contract writes it (without ``source`` / ``line``)."""
        row: dict[str, Any] = {
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "attributes": self.attributes,
            "images": list(self.images),
        }
        if self.label is not None:
            row["label"] = self.label
        return row


@dataclass(frozen=True)
class RowError:
    """A bad row: where it is, which id (when known) and every problem found in it."""

    source: str
    line: int
    id: str | None
    problems: tuple[tuple[str, str], ...]  # (field, or "row" / "read" for the whole row / file, message)
    unit: str = "line"  # "line" for text files, "row" for Parquet / datasets

    @property
    def field(self) -> str:
        return self.problems[0][0]

    @property
    def message(self) -> str:
        return "; ".join(f"{f}: {m}" if f != "row" else m for f, m in self.problems)

    def __str__(self) -> str:
        who = f" (id {self.id!r})" if self.id is not None else ""
        return f"{self.source} {self.unit} {self.line}{who}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            self.unit: self.line,
            "id": self.id,
            "field": self.field,
            "error": self.message,
        }


Row = Listing | RowError


# ---------------------------------------------------------------------- one row
def parse_row(raw: Any, *, source: str, line: int, limits: RowLimits = RowLimits(), unit: str = "line") -> Row:
    """Check one raw row against the contract; return a Listing or a RowError with every problem."""
    if not isinstance(raw, Mapping):
        return RowError(source, line, None, (("row", f"expected a JSON object, got {type(raw).__name__}"),), unit)
    problems: list[tuple[str, str]] = []

    def bad(where: str, message: str) -> None:
        problems.append((where, message))

    row_id = raw.get("id")
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        row_id = str(row_id)  # numeric ids are common in shop exports; the contract keeps strings
    elif isinstance(row_id, float) and row_id.is_integer() and abs(row_id) < 2**53:
        row_id = str(int(row_id))  # pandas stores an integer id column with one gap as floats: 101.0 is id 101
    elif _is_nan(row_id):
        row_id = None  # pandas' missing value: the id is missing
    if row_id is None or row_id == "":
        bad("id", "missing; every row needs a unique string id")
        row_id = None
    elif not isinstance(row_id, str):
        bad("id", f"expected a string, got {_kind(row_id)}")
        row_id = None
    elif not row_id.strip():
        bad("id", f"blank ({row_id!r}); every row needs a unique string id")
        row_id = None
    else:
        row_id = row_id.strip()
        if len(row_id) > limits.max_id_chars:
            bad("id", f"{len(row_id):,} characters, limit {limits.max_id_chars:,}")

    title = raw.get("title")
    if title is None:
        bad("title", "missing; every row needs a non-empty title")
    elif not isinstance(title, str):
        bad("title", f"expected a string, got {_kind(title)}")
    elif not title.strip():
        bad("title", "empty; every row needs a non-empty title")
    elif len(title) > limits.max_title_chars:
        bad("title", f"{len(title):,} characters, limit {limits.max_title_chars:,}")

    description = raw.get("description")
    if description is None or _is_nan(description):  # NaN: pandas' missing value (to_dict("records"))
        description = ""
    elif not isinstance(description, str):
        bad("description", f"expected a string, got {_kind(description)}")
    elif len(description) > limits.max_description_chars:
        bad("description", f"{len(description):,} characters, limit {limits.max_description_chars:,}")

    attributes = _check_attributes(raw.get("attributes"), limits, bad)
    images = _check_images(raw.get("images"), limits, bad)
    label = _check_label(raw.get("label"), bad)

    unreadable = list(_unreadable({k: raw[k] for k in FIELDS  # a missing id or description read above as missing
                                   if k in raw and not (k in ("id", "description") and _is_nan(raw[k]))}))
    for where, message in unreadable:
        bad(where, message)
    if any(where == "id" for where, _ in unreadable):
        row_id = None  # an id no output file can hold: the error record names the line instead
    if problems:
        return RowError(source, line, row_id, tuple(problems), unit)
    return Listing(
        id=row_id,
        title=" ".join(title.split()),
        description=description.strip(),
        attributes=attributes,
        images=images,
        label=label,
        source=source,
        line=line,
    )


def _check_attributes(value: Any, limits: RowLimits, bad) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        bad("attributes", f"expected an object of name -> value, got {_kind(value)}")
        return {}
    if len(value) > limits.max_attributes:
        bad("attributes", f"{len(value):,} entries, limit {limits.max_attributes:,}")
        return {}
    out: dict[str, Any] = {}
    for key, item in value.items():
        where = f"attributes.{key}"
        if not isinstance(key, str) or not key.strip():
            bad("attributes", f"attribute names must be non-empty strings, got {key!r}")
            continue
        if len(key) > limits.max_attribute_chars:
            bad("attributes", f"an attribute name has {len(key):,} characters, limit {limits.max_attribute_chars:,}")
            continue
        if isinstance(item, list):
            item = [s for s in item if not _is_nan(s)]
        if item is None or _is_nan(item):
            continue  # null cells (Parquet structs, CSV exports) and NaN (pandas' missing number) mean "not given"
        scalars = item if isinstance(item, list) else [item]
        if isinstance(item, Mapping) or any(not isinstance(s, (str, int, float, bool)) for s in scalars):
            bad(where, f"expected a string, number, boolean or list of those, got {_kind(item)}")
            continue
        if sum(len(str(s)) for s in scalars) > limits.max_attribute_chars:
            bad(where, f"value longer than {limits.max_attribute_chars:,} characters")
            continue
        out[key.strip()] = item
    return out


def _check_images(value: Any, limits: RowLimits, bad) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        bad("images", f"expected a list of path strings, got {_kind(value)}")
        return ()
    if len(value) > limits.max_images:
        bad("images", f"{len(value)} images, limit {limits.max_images}")
        return ()
    for i, ref in enumerate(value):
        if not ref.strip():
            bad(f"images[{i}]", "empty path")
        elif len(ref) > limits.max_image_ref_chars:
            bad(f"images[{i}]", f"path of {len(ref):,} characters, limit {limits.max_image_ref_chars:,}")
    return tuple(v.strip() for v in value)


def _check_label(value: Any, bad) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        bad("label", f"expected an object with 'category' and 'attributes', got {_kind(value)}")
        return None
    unknown = set(value) - {"category", "attributes"}
    if unknown:
        bad("label", f"unknown key(s) {sorted(unknown)}; expected 'category' and 'attributes'")
    category = value.get("category")
    if category is not None and (not isinstance(category, str) or not category.strip()):
        bad("label.category", f"expected a non-empty taxonomy path string, got {_kind(category)}")
    attrs = value.get("attributes")
    if attrs is None and category is None:  # `{}`: says nothing, an unlabelled row (not a category-only one)
        return None
    if attrs is None:  # a category-only label: its attributes are unknown, not "not stated"
        return {"category": category, "attributes": None}
    if not isinstance(attrs, Mapping):
        bad("label.attributes", f"expected an object, got {_kind(attrs)}")
        attrs = {}
    return {"category": category, "attributes": {k: v for k, v in attrs.items() if v is not None}}


def attributes_labelled(label: Mapping[str, Any] | None) -> bool:
    """Whether a gold label speaks for the attributes: ``"attributes": {...}`` does (a field absent or
    null in it is "not stated"); a label without ``attributes`` (or with ``null``) gives the category
    only, and its attributes are unknown: left out of every attribute fit and metric, never taken
    for "not stated"."""
    return label is not None and isinstance(label.get("attributes"), Mapping)


def _kind(value: Any) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _has_surrogates(text: str) -> bool:
    # A lone surrogate has no UTF-8 form: CSV is decoded with errors="surrogateescape" (undecodable bytes
    # become U+DC80..U+DCFF), and JSON may escape one ("\ud83d" without its pair)
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _unreadable(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(field, message) for every string in ``value`` (names included, at any depth) that no UTF-8 file
    can hold, and every number that is not finite (NaN, Infinity, 1e400) or beyond a float: each would
    break whatever reads or writes the row later (an output line, a schema, a plot), so the row is refused
    here, naming the field. A seller-table NaN is left to ``_check_attributes`` (pandas' missing cell)."""
    if isinstance(value, str):
        if _has_surrogates(value):
            yield where, "contains text that is not valid UTF-8 (undecodable bytes or a lone surrogate); re-encode the file as UTF-8"
    elif isinstance(value, bool):
        return
    elif isinstance(value, float):
        if not math.isfinite(value) and not (where.startswith("attributes.") and math.isnan(value)):
            yield where, f"{value} is not a finite number"
    elif isinstance(value, int):
        if abs(value) > sys.float_info.max:
            yield where, f"a number of {len(str(abs(value)))} digits is beyond any measurement"
    elif isinstance(value, Mapping):
        for key, item in value.items():
            name = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and _has_surrogates(key):
                yield where or name, "a name contains text that is not valid UTF-8; re-encode the file as UTF-8"
            else:
                yield from _unreadable(item, name)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _unreadable(item, f"{where}[{i}]")


# ---------------------------------------------------------------------- readers
class CatalogReader:
    """Iterate a catalog as Listing / RowError values, streaming.

    ``check_duplicates`` remembers an 8-byte hash and the line of every id (about 32 bytes
    per row in a compact hash table, the one thing that grows with the catalog) to report a
    repeated id with the line where it was first seen. ``progress()`` gives (done, total) in bytes or rows for a
    progress bar. ``unknown_fields`` counts columns outside the contract (ignored).
    """

    def __init__(
        self,
        source: str | Path | Any,
        *,
        fmt: str | None = None,
        limits: RowLimits = RowLimits(),
        check_duplicates: bool = True,
        seen_ids: SeenIds | None = None,
    ) -> None:
        self.source = source
        self.limits = limits
        self.check_duplicates = check_duplicates
        self.seen_ids = seen_ids  # shared by the readers of one job's dumps: an id repeated across them is caught too
        self.unknown_fields: Counter[str] = Counter()
        self._done = 0
        self._reached = 0  # last line / row read, for the message when the file breaks off
        self._total: int | None = None
        if isinstance(source, (str, Path)):
            self.path: Path | None = Path(source)
            if not self.path.exists():
                raise CatalogError(f"{self.path}: no such catalog file")
            self.fmt = fmt or detect_format(self.path)
            self.name = self.path.name
        else:
            self.path = None
            if type(source).__name__ in ("DatasetDict", "IterableDatasetDict"):  # what load_dataset returns
                raise CatalogError(f"a datasets {type(source).__name__} of splits {sorted(source)}: give one split "
                                   f"(e.g. dataset[{sorted(source)[0]!r}])")
            self.fmt = fmt or ("records" if isinstance(source, list) else "dataset")
            self.name = _dataset_name(source)

    @property
    def root(self) -> Path | None:
        """The folder image paths are relative to (the catalog file's folder)."""
        if self.path is None:
            return None
        return (self.path if self.path.is_dir() else self.path.parent).resolve()

    @property
    def unit(self) -> str:
        """How positions are counted: text lines, or rows of a table."""
        return "line" if self.fmt in ("jsonl", "csv") else "row"

    def progress(self) -> tuple[int, int | None]:
        return self._done, self._total

    def __iter__(self) -> Iterator[Row]:
        raw_rows = {
            "jsonl": self._jsonl,
            "csv": self._csv,
            "parquet": self._parquet,
            "dataset": self._dataset,
            "records": self._records,
        }[self.fmt]()
        seen = self.seen_ids if self.seen_ids is not None else SeenIds()
        for item in self._until_broken(raw_rows):
            row = item if isinstance(item, RowError) else parse_row(
                item[0], source=self.name, line=item[1], limits=self.limits, unit=item[2]
            )
            if isinstance(item, tuple) and isinstance(item[0], Mapping):
                self.unknown_fields.update(
                    str(k) for k, v in item[0].items() if k not in FIELDS and v not in (None, "")
                )
            if self.check_duplicates and row.id is not None:
                first = seen.add(row.id, row.line, self.name)
                if first is not None and isinstance(row, Listing):
                    row = RowError(row.source, row.line, row.id, (("id", f"duplicate id, first seen at {self.unit} {first}"),), self.unit)
            yield row

    def _until_broken(self, raw_rows: Iterator[Any]) -> Iterator[Any]:
        """The raw rows until the file cannot be read further, then one RowError saying where.

        Everything before the damage has been yielded by then; nothing after it is guessed at.
        """
        broken = _BROKEN_STREAM
        if self.fmt in ("parquet", "dataset"):
            import pyarrow

            broken += (pyarrow.ArrowException,)
        self._reached = 0
        try:
            yield from raw_rows
        except broken as exc:
            what = "stream ended early" if isinstance(exc, EOFError) else "cannot read further"
            where = f"after {self.unit} {self._reached}" if self._reached else "before the first row"
            kind = "zlib.error" if isinstance(exc, zlib.error) else type(exc).__name__  # plain "error" says nothing
            detail = " ".join(f"{kind}: {exc}".split())  # Arrow's messages span lines
            message = f"{self.name}: {what} {where} ({detail}); the rest of the file was not read, re-copy or re-export it"
            yield RowError(self.name, self._reached + 1, None, (("read", message),), self.unit)

    # Each raw reader yields (raw dict, position, unit) or a RowError for a row that never parsed,
    # and keeps self._reached at the last line (or row) it has read, for _until_broken's message.
    def _jsonl(self) -> Iterator[tuple[Any, int, str] | RowError]:
        limit = self.limits.max_line_bytes
        with _open_binary(self.path) as f:
            self._total = _size_for_progress(self.path)
            for number, line in enumerate(_bounded_lines(f, limit), start=1):
                self._done, self._reached = _position(f), number
                if number == 1 and line is not None:
                    line = line.removeprefix(_BOM)
                if line is None:
                    yield RowError(self.name, number, None, (("row", f"line longer than {limit:,} bytes; skipped"),))
                    continue
                if not line.strip():
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield RowError(
                        self.name, number, _id_from_bytes(line),
                        (("row", f"not valid UTF-8 (byte 0x{line[exc.start]:02x} at offset {exc.start}); re-encode the file as UTF-8"),),
                    )
                    continue
                try:
                    raw = json.loads(text)
                except json.JSONDecodeError as exc:
                    hint = ("; the file looks like one JSON array, and a catalog is JSON Lines (one object per "
                            "line): convert it, e.g. jq -c '.[]' FILE" if number == 1 and text.lstrip().startswith("[")
                            else "")
                    yield RowError(
                        self.name, number, _id_from_bytes(line),
                        (("row", f"not valid JSON: {exc.msg} at column {exc.colno}{hint}"),),
                    )
                    continue
                yield raw, number, "line"

    def _csv(self) -> Iterator[tuple[Any, int, str] | RowError]:
        # csv's field limit is process-wide: set it to this reader's line limit (a field within it is reported
        # by the row checks with its field name; one past it is a bad row, below)
        csv.field_size_limit(self.limits.max_line_bytes)
        with _open_binary(self.path) as fb:
            self._total = _size_for_progress(self.path)
            text = io.TextIOWrapper(fb, encoding="utf-8-sig", errors="surrogateescape", newline="")
            dialect = "excel-tab" if self.path.name.lower().endswith((".tsv", ".tsv.gz")) else "excel"
            lines = _LineStarts(text)
            reader = csv.DictReader(lines, dialect=dialect)
            header = reader.fieldnames or []
            missing = [c for c in ("id", "title") if c not in header]
            if missing:
                raise CatalogError(f"{self.path}: CSV header lacks column(s) {missing} (it has {header}); "
                                   "add them, or rename the columns that hold them")
            self._reached = reader.line_num
            records = iter(reader)
            while True:
                lines.mark()  # the record's first line: the first non-blank line the reader takes for it
                try:
                    record = next(records)
                except StopIteration:
                    break
                except csv.Error as exc:  # a field past the line limit: that row is skipped, the others read on
                    self._done, self._reached = _position(fb), reader.line_num
                    yield RowError(self.name, lines.first or reader.line_num, None,
                                   (("row", f"a field longer than {self.limits.max_line_bytes:,} bytes ({exc}); row "
                                            "skipped unparsed"),))
                    continue
                self._done, self._reached = _position(fb), reader.line_num
                line = lines.first or reader.line_num
                if None in record:  # more cells than header columns
                    yield RowError(self.name, line, record.get("id") or None, (("row", f"{len(header) + len(record[None])} cells for {len(header)} header columns"),))
                    continue
                raw, problems = _decode_csv_record(record)
                if problems:
                    yield RowError(self.name, line, raw.get("id") or None, tuple(problems))
                    continue
                yield raw, line, "line"

    def _parquet(self) -> Iterator[tuple[Any, int, str]]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.path, pre_buffer=False)
        self._total = pf.metadata.num_rows
        number = 0
        # One row group at a time, without read-ahead threads: pre-buffering and threaded
        # iteration hold several row groups and made memory grow with the file.
        for group in range(pf.num_row_groups):
            for batch in pf.iter_batches(batch_size=256, row_groups=[group], use_threads=False):
                for record in batch.to_pylist():
                    number += 1
                    self._done = self._reached = number
                    yield _decode_nested(record), number, "row"

    def _dataset(self) -> Iterator[tuple[Any, int, str]]:
        dataset = self.source
        if self.path is not None:  # a folder written by Dataset.save_to_disk: memory-mapped
            import datasets

            dataset = datasets.load_from_disk(str(self.path))
        try:
            self._total = len(dataset)
        except TypeError:  # IterableDataset
            self._total = None
        for number, record in enumerate(dataset, start=1):
            self._done = self._reached = number
            yield _decode_nested(dict(record)), number, "row"

    def _records(self) -> Iterator[tuple[Any, int, str]]:
        self._total = len(self.source)
        for number, record in enumerate(self.source, start=1):
            self._done = number
            yield record, number, "row"


def iter_catalog(source: str | Path | Any, **kwargs: Any) -> Iterator[Row]:
    """Stream a catalog as Listing / RowError values (see :class:`CatalogReader`)."""
    return iter(CatalogReader(source, **kwargs))


def load_listings(source: str | Path | Any, *, max_errors_shown: int = 10, **kwargs: Any) -> list[Listing]:
    """Read a whole (small) catalog; raise CatalogError listing the bad rows if there are any."""
    good, bad = [], []
    for row in iter_catalog(source, **kwargs):
        (bad if isinstance(row, RowError) else good).append(row)
    if bad:
        shown = "\n  ".join(str(e) for e in bad[:max_errors_shown])
        more = f"\n  ... and {len(bad) - max_errors_shown} more" if len(bad) > max_errors_shown else ""
        raise CatalogError(f"{len(bad)} bad row(s); fix them or run `mmllm catalog validate`:\n  {shown}{more}")
    return good


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return "dataset"
        if (path / "dataset_dict.json").exists():  # DatasetDict.save_to_disk: one folder per split
            splits = sorted(p.name for p in path.iterdir() if (p / "dataset_info.json").exists())
            raise CatalogError(f"{path}: a datasets DatasetDict of splits {splits}: give one split's folder "
                               f"(e.g. {path / (splits[0] if splits else 'train')})")
        raise CatalogError(f"{path}: a folder is only read as a catalog when written by datasets' save_to_disk")
    for suffixes, fmt in (
        ((".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".json"), "jsonl"),
        ((".csv", ".csv.gz", ".tsv", ".tsv.gz"), "csv"),
        ((".parquet", ".pq"), "parquet"),
    ):
        if name.endswith(suffixes):
            return fmt
    raise CatalogError(f"{path}: unknown catalog format; use .jsonl, .csv, .tsv or .parquet (optionally .gz for text)")


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    """Write rows as JSONL (UTF-8, one object per line); returns the count."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


# ---------------------------------------------------------------------- reader helpers
class SeenIds:
    """Ids seen so far -> line (and file) of first sight, as 64-bit hashes in an open-addressing table.

    A dict would cost ~150 bytes per row; two NumPy arrays at <= 50% load cost ~32, which keeps
    the duplicate check affordable on catalogs of tens of millions of rows. A false duplicate
    needs two ids with the same 64-bit hash: at ten million rows, a chance of about 3 in 10^6.
    """

    def __init__(self, capacity: int = 1 << 12) -> None:
        self.keys = np.zeros(capacity, dtype=np.uint64)  # 0 marks an empty slot
        self.lines = np.zeros(capacity, dtype=np.int64)  # (file number << 40) + line
        self.sources: dict[str, int] = {}
        self.used = 0

    def add(self, row_id: str, line: int, source: str = "") -> str | None:
        """Record ``row_id`` at ``line`` of ``source``; if it is a repeat, where it was first seen ("3", or
        "3 of shop_a.jsonl" when that was another file)."""
        key = int.from_bytes(hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little") or 1
        slot = self._slot(key)
        if source not in self.sources:
            self.sources[source] = len(self.sources)
        if self.keys[slot]:
            first_source, first_line = divmod(int(self.lines[slot]), 1 << 40)
            named = list(self.sources)[first_source]
            return str(first_line) if named == source else f"{first_line} of {named}"
        self.keys[slot], self.lines[slot] = key, (self.sources[source] << 40) + line
        self.used += 1
        if self.used * 2 > len(self.keys):
            self._grow()
        return None

    def _slot(self, key: int) -> int:
        mask = len(self.keys) - 1
        slot = key & mask
        while self.keys[slot] and int(self.keys[slot]) != key:
            slot = (slot + 1) & mask  # linear probing
        return slot

    def _grow(self) -> None:
        keys, lines = self.keys, self.lines
        self.keys = np.zeros(len(keys) * 2, dtype=np.uint64)
        self.lines = np.zeros(len(keys) * 2, dtype=np.int64)
        for start in range(0, len(keys), 1 << 14):  # in chunks: a full .tolist() would double the peak
            chunk_keys, chunk_lines = keys[start:start + (1 << 14)], lines[start:start + (1 << 14)]
            used = chunk_keys != 0
            for key, line in zip(chunk_keys[used].tolist(), chunk_lines[used].tolist()):
                slot = self._slot(key)
                self.keys[slot], self.lines[slot] = key, line



def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _size_for_progress(path: Path) -> int | None:
    """The total of :func:`_position`: the file's size on disk (compressed, for a .gz)."""
    return path.stat().st_size


def byte_total(paths: Iterable[Path]) -> int | None:
    """The bytes a progress line counts through reading ``paths`` (its ETA and row estimate), or None: JSONL /
    CSV dumps, a .jsonl.gz too (in bytes of the compressed file, as :func:`_position` counts), but not a mix
    of gzipped and plain dumps, whose bytes hold rows at rates ten times apart (one rate over both put the
    end of 8,773 rows at 2,092)."""
    paths = [Path(p) for p in paths]
    try:
        text = all(p.is_file() and detect_format(p) in ("jsonl", "csv") for p in paths)
    except CatalogError:
        return None
    if not paths or not text or len({p.name.lower().endswith(".gz") for p in paths}) > 1:
        return None
    return sum(p.stat().st_size for p in paths)


class _LineStarts:
    """The lines of a text, counted, for csv's reader: ``first`` is the number of the first non-blank line read
    since ``mark()``, so a record is named by the line it starts on, even one csv cannot finish (a field past
    the limit) and even after blank lines, which the reader skips."""

    def __init__(self, text: Iterable[str]) -> None:
        self._lines = iter(text)
        self.number = 0
        self.first: int | None = None

    def __iter__(self) -> "_LineStarts":
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.number += 1
        if self.first is None and line.strip("\r\n"):
            self.first = self.number
        return line

    def mark(self) -> None:
        self.first = None


GZIP_SETTLED = 1 << 20  # compressed bytes before a gzip stream's position says how far it is (below: 0, no ETA)


def _position(f: IO[bytes]) -> int:
    """How far into the file a reader is, in bytes on disk: a gzip stream's own position counts decompressed
    bytes, so its compressed file's is taken, which the file size totals. That one runs ahead of the rows
    by the decompressor's read buffer (8-128 KiB by Python version): on the first MiB it would put the end
    of the file far too near (61 rows after the first of 8,173), so it counts from there on (or at the end)."""
    try:
        if isinstance(f, gzip.GzipFile):
            at = f.fileobj.tell()
            return at if at >= GZIP_SETTLED or at >= os.fstat(f.fileobj.fileno()).st_size else 0
        return f.tell()
    except (OSError, ValueError, AttributeError):
        return 0


def _bounded_lines(f: IO[bytes], limit: int) -> Iterator[bytes | None]:
    """Lines of at most ``limit`` bytes; a longer line is skipped whole and yields None."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(1 << 20)
            yield None
            continue
        yield line


def _id_from_bytes(line: bytes) -> str | None:
    match = _ID_IN_TEXT.search(line[:4096])
    return match.group(1).decode("utf-8", "replace") if match else None


def _decode_csv_record(record: dict[str, str]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """CSV cells are text: parse the nested columns (JSON), keep the others as strings."""
    raw: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for key, cell in record.items():
        cell = cell if cell is not None else ""
        if key in ("attributes", "label"):
            if cell.strip():
                try:
                    raw[key] = json.loads(cell)
                except json.JSONDecodeError as exc:
                    problems.append((key, f"CSV cell is not valid JSON ({exc.msg} at column {exc.colno})"))
        elif key == "images":
            text = cell.strip()
            if text.startswith("["):
                try:
                    raw[key] = json.loads(text)
                except json.JSONDecodeError as exc:
                    problems.append((key, f"CSV cell is not a valid JSON list ({exc.msg})"))
            elif text:
                raw[key] = [p for p in text.split("|") if p.strip()]
        else:
            raw[key] = cell
    return raw, problems


def _decode_nested(record: dict[str, Any]) -> dict[str, Any]:
    """Parquet / Arrow columns may hold JSON text, maps (lists of pairs) or structs."""
    out = dict(record)
    for key in ("attributes", "label"):
        value = out.get(key)
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:
                pass  # left as a string: parse_row reports the wrong type with the field name
        elif isinstance(value, list) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
            out[key] = dict(value)
    images = out.get("images")
    if isinstance(images, str) and images.strip().startswith("["):
        try:
            out["images"] = json.loads(images)
        except json.JSONDecodeError:
            pass
    return out


def _dataset_name(source: Any) -> str:
    info = getattr(source, "info", None)
    name = getattr(info, "dataset_name", None) if info is not None else None
    return name or ("records" if isinstance(source, list) else "dataset")
