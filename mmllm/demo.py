"""The Gradio demo: one listing in, its prediction out; a batch tab for small dumps; a review tab.

    mmllm demo --model MODEL_DIR_OR_ID [--index INDEX_DIR] [--schema S.yaml] [--port 7860]
        [--review labels.jsonl --review-dump dump.jsonl [--corrections C.jsonl] [--reviewer NAME]]
    python demo/app.py --model ...                            (the same, from a checkout)

It runs the predictor `mmllm label` runs (:func:`mmllm.label.load_predictor`), so whatever a model
folder is - LoRA adapter, merged model, classification heads, fusion - the demo shows its
records: keys it knows get a widget (category scores, modality weights, raw text), any other key
still shows in the prediction JSON. Grounded attributes (:mod:`mmllm.grounding`) show with their
evidence: the source and text of each value, its confidence, the values withheld or outvoted, and
where in the title and description the listing states them; records without evidence (folders
fitted before grounding) show the model's own answers. Every problem with the input is answered in
the status line, never with a stack trace; unexpected failures are logged with their traceback on
the server.

The review tab (:mod:`mmllm.review_tab`) steps through a labels file's review queue (``mmllm label
--review-below``) and saves each accepted or corrected label at once as a training row.

``build_app(predictor, ...)`` builds the Blocks app without launching it and ``launch(app, ...)``
serves it with the upload limits, so tests construct and drive it in-process.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr
from PIL import Image, ImageDraw

from mmllm.catalog import CatalogError, CatalogReader, Listing, RowError, RowLimits, detect_format, parse_row
from mmllm.config import at_least
from mmllm.grounding import GroundedPredictor
from mmllm.images import ImageError, ImagePolicy, load_image, resolve_image_path
from mmllm.host_memory import reuse_step_buffers
from mmllm.label import load_predictor
from mmllm.labelling.engine import LabelOptions, Summary, error_record, run_local
from mmllm.labelling.output import Output, OutputError
from mmllm.labelling.review import ReviewSession
from mmllm.predictor import model_kind
from mmllm.review_tab import ReviewDesk, build_review_tab
from mmllm.record_view import (ATTRIBUTE_HEADERS, attribute_rows, attribute_summary, category_view, cell,
                               evidence_highlights, seller_rows)

log = logging.getLogger("mmllm.demo")

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the drawn examples live beside the package
DEFAULT_EXAMPLES = ROOT / "examples" / "drawn" / "catalog.jsonl"
DUMP_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")  # plain text only: a .gz could expand without bound
FORM_ID = "demo"
# record keys with their own widget; any other key goes to "other outputs"
SHOWN_KEYS = {"id", "category", "attributes", "status", "error", "confidence", "top_k", "modality_weights", "raw",
              "source", "line", "evidence", "attribute_confidence", "conflicts", "withheld"}
MB = 2**20


class InputError(ValueError):
    """Something the user can fix: shown as is in the status line."""


@dataclass(frozen=True)
class Limits:
    """What one request may hand the demo (gradio refuses larger uploads before they reach us)."""

    max_image_bytes: int = 10 * MB
    max_image_pixels: int = 40_000_000  # decompression bombs are refused from the header, before decoding
    max_dump_bytes: int = 5 * MB
    max_dump_rows: int = 500  # the batch tab is for checking a sample; `mmllm label` is for catalogs

    @property
    def upload_bytes(self) -> int:
        return max(self.max_image_bytes, self.max_dump_bytes)


@dataclass
class ListingView:
    """Everything the one-listing tab shows for a prediction."""

    status: str
    record: dict[str, Any]
    category: dict[str, float] | str | None
    attributes: list[list[str]]  # ATTRIBUTE_HEADERS: attribute, value, source, evidence, confidence, note
    seller: list[list[Any]]  # [seller's attribute, value] as given
    highlights: list[tuple[str, str | None]] = field(default_factory=list)  # title + description, spans labelled
    modality_weights: dict[str, float] | None = None
    raw: str | None = None
    extras: dict[str, Any] | None = None
    similar: list[tuple[Image.Image, str]] | None = None


@dataclass
class BatchView:
    status: str
    out_path: Path
    preview: list[list[Any]]  # [line, id, status, category, attributes (source), error]
    summary: Summary


# ---------------------------------------------------------------------- similar listings
@dataclass
class SimilarListings:
    """A search index plus the model that embeds queries the way the index was built."""

    index: Any  # mmllm.search.SearchIndex
    bundle: Any  # a predictor: model, processor, schema, template, max_images
    k: int = 6
    thumbnails: dict[str, tuple[str, ImagePolicy]] = field(default_factory=dict)  # id -> (first image, its policy)

    @classmethod
    def load(cls, folder: str | Path, predictor: Any, model: str, k: int = 6) -> SimilarListings:
        from mmllm.model_dir import SCHEMA_FILE, is_model_dir
        from mmllm.prompts import TEMPLATE_FILE, PromptTemplate
        from mmllm.schema import LabelSchema
        from mmllm.search import SearchIndex, check_index_model, load_model, same_model_files

        index = SearchIndex.load(folder)
        schema, template = Path(folder) / SCHEMA_FILE, Path(folder) / TEMPLATE_FILE
        ref = str(Path(model).resolve()) if Path(model).exists() else model
        # the demo's model is the index's when it is the same folder, or the same files moved elsewhere
        same = ref == index.meta.get("model") or same_model_files(index, model) is True
        check_index_model(index, model if same else index.meta["model"])
        if not same:
            bundle = load_model(index.meta["model"], schema=schema, template=template)
        elif is_model_dir(model):
            bundle = predictor  # the same model folder: embed with it rather than load it twice
        else:  # the same base checkpoint: its weights, with the prompt the index was built with
            bundle = replace(predictor, schema=LabelSchema.from_yaml(schema), template=PromptTemplate.load(template))
        thumbnails: dict[str, tuple[str, ImagePolicy]] = {}
        catalog = Path(index.meta.get("catalog", ""))
        if catalog.is_file():  # one pass, keeping only the first image reference of each indexed listing
            reader = CatalogReader(catalog, check_duplicates=False)
            policy = ImagePolicy(root=index.meta.get("image_root") or reader.root)  # where the index read them
            ids = {r["id"] for r in index.records}
            seen: set[str] = set()
            for row in reader:  # the first row of an id, as the index kept it (a repeat is another listing)
                if isinstance(row, Listing) and row.id in ids and row.id not in seen:
                    seen.add(row.id)
                    if row.images:
                        thumbnails[row.id] = (row.images[0], policy)
        return cls(index, bundle, k, thumbnails)

    def query(self, listing: Listing, pictures: Sequence[Image.Image]) -> list[tuple[Image.Image, str]]:
        b = self.bundle  # any predictor: the pooled prompt state of a VLM, or the fused representation
        vectors = b.embed_encoded(b.encode([listing], [list(pictures)[: b.max_images]]), self.index.meta["pooling"])
        scores, positions = self.index.search_positions(vectors, self.k)
        hits = []
        for score, position in zip(scores[0], positions[0]):
            if position < 0:
                continue
            record = self.index.records[position]
            caption = f"{record.get('title', record['id'])} ({record.get('category') or 'no category'}; {score:.3f})"
            hits.append((self._thumbnail(record["id"]), caption))
        return hits

    def _thumbnail(self, listing_id: str) -> Image.Image:
        if listing_id in self.thumbnails:
            ref, policy = self.thumbnails[listing_id]
            try:
                image = load_image(ref, policy)
                image.thumbnail((256, 256))
                return image
            except ImageError as exc:
                log.warning("similar listing %r: thumbnail skipped: %s", listing_id, exc)
        return _placeholder("no image")


def _placeholder(text: str) -> Image.Image:
    image = Image.new("RGB", (256, 256), (236, 236, 236))
    ImageDraw.Draw(image).text((88, 120), text, fill=(120, 120, 120))
    return image


# ---------------------------------------------------------------------- the handlers
@dataclass
class Demo:
    """The app's behaviour, without Gradio: the UI calls these, and so do the unit tests."""

    predictor: Any
    limits: Limits = field(default_factory=Limits)
    examples: list[Listing] = field(default_factory=list)
    examples_root: Path | None = None  # example image paths must resolve inside it
    image_root: Path | None = None  # where image paths of an uploaded dump resolve
    similar: SimilarListings | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)  # one model call at a time
    _workdir: Any = field(default_factory=lambda: tempfile.TemporaryDirectory(prefix="mmllm-demo-"))  # removed with the app

    @property
    def schema(self) -> Any:
        return self.predictor.schema

    @property
    def max_images(self) -> int:
        return int(getattr(self.predictor, "max_images", 0))

    # ---------------------------------------------------------------- one listing
    def form_listing(self, images: Sequence[Any] | None, title: str | None, description: str | None,
                     table: Any) -> tuple[Listing, list[Image.Image]]:
        """The form as a listing (checked by the catalog's own row rules) and its decoded pictures."""
        paths = [_gallery_path(item) for item in images or []]
        title = (title or "").strip()
        if not paths and not title:
            raise InputError("Give the listing a title or at least one image (or click an example below).")
        if len(paths) > RowLimits.max_images:  # before anything is decoded: one request cannot fill the memory
            raise InputError(f"{len(paths)} images; the limit is {RowLimits.max_images}.")
        read = max(self.max_images, getattr(getattr(self.similar, "bundle", None), "max_images", 0) or 0)
        pictures = [self._load_upload(path, n) for n, path in enumerate(paths[:read], start=1)]  # what is read only
        raw = {"id": FORM_ID, "title": title or "(no title given)", "description": description or "",
               "attributes": _table_to_attributes(table), "images": [Path(p).name for p in paths]}
        row = parse_row(raw, source="form", line=1)
        if isinstance(row, RowError):
            raise InputError("; ".join(f"{where}: {message}" for where, message in row.problems))
        return row, pictures

    def _load_upload(self, path: str, n: int) -> Image.Image:
        file = Path(path)
        label = f"Image {n} ({file.name})"
        size = file.stat().st_size
        if size > self.limits.max_image_bytes:
            raise InputError(f"{label} is {_size(size)}; the limit is {_size(self.limits.max_image_bytes)}. "
                             "Shrink or re-export it.")
        policy = ImagePolicy(root=file.parent, max_bytes=self.limits.max_image_bytes, max_pixels=self.limits.max_image_pixels)
        try:
            return load_image(file.name, policy)
        except ImageError as exc:
            raise InputError(f"{label}: {exc.detail}") from None

    def predict(self, images: Sequence[Any] | None, title: str | None, description: str | None,
                table: Any) -> ListingView:
        listing, pictures = self.form_listing(images, title, description, table)
        started = time.perf_counter()
        notes = []
        with self._lock:
            record, raw = self._predict(listing, pictures)
            similar = None
            if self.similar:
                try:
                    similar = self.similar.query(listing, pictures)
                except Exception as exc:  # search is an extra: the prediction still stands
                    log.exception("similar-listing search failed")
                    notes.append(f"similar listings unavailable ({type(exc).__name__}: {exc})")
        notes.insert(0, f"{time.perf_counter() - started:.1f} s")
        if len(listing.images) > self.max_images:
            notes.append(f"this model reads the first {self.max_images} of the {len(listing.images)} images")
        if record.get("status") == "ok":
            check = self.schema.validate({"category": record.get("category"), "attributes": record.get("attributes")})
            verdict = (f"**ok**: the answer validates against schema '{self.schema.name}'" if check.ok
                       else f"**invalid**: {check.reason()}")
        else:
            verdict = f"**{record.get('status', 'error')}**: {record.get('error', 'no reason given')}"
        return ListingView(
            status=f"{verdict} ({'; '.join(notes)})",
            record={k: v for k, v in record.items() if k != "raw"},
            category=category_view(record),
            attributes=attribute_rows(record),
            seller=[[name, cell(value)] for name, value in listing.attributes.items()],
            highlights=evidence_highlights(listing.title, listing.description, record),
            modality_weights=record.get("modality_weights"),
            raw=raw,
            extras={k: v for k, v in record.items() if k not in SHOWN_KEYS} or None,
            similar=similar,
        )

    def _predict(self, listing: Listing, pictures: list[Image.Image]) -> tuple[dict[str, Any], str | None]:
        """One record like `mmllm label` writes (without source/line), plus the raw text of a generative model."""
        p = self.predictor
        try:
            enc = p.encode([listing], [pictures[: self.max_images]])
            record = {"id": listing.id, **p.predict_encoded(enc, raw=True)[0]}  # raw: a generative model's text
        except Exception as exc:  # the model's failure is this listing's answer, as in `mmllm label`
            log.exception("model failed on the form listing")
            return error_record(listing, "model", f"{type(exc).__name__}: {exc}"), None
        return record, record.get("raw")

    def example(self, position: int) -> tuple[list[str], str, str, list[list[Any]]]:
        """Form values of example ``position``: image paths (inside the examples folder), title, description, table."""
        listing = self.examples[position]
        policy = ImagePolicy(root=self.examples_root)
        paths = []
        for ref in listing.images:
            try:
                paths.append(str(resolve_image_path(ref, policy)))  # refuses '..', absolute paths and symlinks out
            except ImageError as exc:
                log.warning("example %r: image skipped: %s", listing.id, exc)
        return paths, listing.title, listing.description, seller_rows(listing.attributes)

    # ---------------------------------------------------------------- batch
    def label_dump(self, path: str | None, progress: Callable[..., Any] | None = None) -> BatchView:
        """Label an uploaded dump like `mmllm label` does; one output line per row, bad rows included."""
        if not path:
            raise InputError("Upload a .jsonl or .csv dump first.")
        dump = Path(path)
        if not dump.name.lower().endswith(DUMP_SUFFIXES):
            raise InputError(f"{dump.name}: the batch tab takes {', '.join(DUMP_SUFFIXES)} files; "
                             "label Parquet or compressed dumps with `mmllm label`.")
        size = dump.stat().st_size
        if size > self.limits.max_dump_bytes:
            raise InputError(f"{dump.name} is {_size(size)}; the batch tab takes at most "
                             f"{_size(self.limits.max_dump_bytes)}. Use `mmllm label` for larger dumps.")
        try:
            detect_format(dump)
            total = sum(1 for _ in CatalogReader(dump, check_duplicates=False))
        except CatalogError as exc:
            raise InputError(str(exc).replace(str(dump), dump.name)) from None
        if total == 0:
            raise InputError(f"{dump.name} has no rows.")
        if total > self.limits.max_dump_rows:
            raise InputError(f"{dump.name} has {total:,} rows; the batch tab labels at most {self.limits.max_dump_rows:,}. "
                             "Use `mmllm label` for larger dumps.")
        out_path = Path(tempfile.mkdtemp(dir=self._workdir.name)) / f"{dump.name.split('.')[0]}.labels.jsonl"
        batch_size = max(1, int(getattr(self.predictor, "batch_size", 4)))
        opts = LabelOptions(batch_size=batch_size, quiet=True, roots={dump.name: self.image_root or dump.parent},
                            max_image_bytes=self.limits.max_image_bytes, max_image_pixels=self.limits.max_image_pixels)
        records: list[dict[str, Any]] = []

        def seen(record: dict[str, Any]) -> None:
            records.append(record)
            if progress is not None:
                progress((len(records), total), desc=f"labelled {len(records)} of {total} rows", unit="rows")

        # The engine `mmllm label` runs: every row (a bad image, a row the processor refuses, a
        # broken line) becomes its own record and the others are still labelled.
        with Output(out_path, None, resume=False, inputs=[dump]) as output:
            summary = run_local(self.predictor, [dump], output, opts, on_record=seen, model_lock=self._lock)
        preview = [[r.get("line"), r.get("id"), r["status"], r.get("category"), attribute_summary(r),
                    r.get("error", "")]
                   for r in sorted(records, key=lambda r: r.get("line") or 0)]
        stages = ", ".join(f"{stage} {n}" for stage, n in sorted(summary.by_stage.items()))
        status = (f"**{summary.rows} rows**: {summary.ok} ok, {summary.invalid} invalid, {summary.failed} failed"
                  f"{f' ({stages})' if stages else ''} in {summary.wall_s:.1f} s. Download the labelled JSONL below.")
        return BatchView(status, out_path, preview, summary)


# ---------------------------------------------------------------------- form helpers
def _gallery_path(item: Any) -> str:
    """Gallery values are (path, caption) pairs, or paths."""
    return str(item[0] if isinstance(item, (tuple, list)) else item)


def _table_to_attributes(table: Any) -> dict[str, Any]:
    """The editable table's rows -> the seller's attribute object (a JSON list in a cell stays a list)."""
    rows = table.values.tolist() if hasattr(table, "values") else list(table or [])
    attributes: dict[str, Any] = {}
    for n, row in enumerate(rows, start=1):
        cells = ["" if c is None else str(c).strip() for c in list(row)[:2]] + ["", ""]
        name, value = cells[0], cells[1]
        if name in ("", "nan") and value in ("", "nan"):
            continue  # an empty row of the editable table
        if name in ("", "nan"):
            raise InputError(f"Attribute table row {n}: the value {value!r} has no attribute name.")
        if name in attributes:
            raise InputError(f"Attribute table row {n}: '{name}' appears twice; keep one row per attribute.")
        if value.startswith("["):
            try:
                parsed = json.loads(value)
                value = parsed if isinstance(parsed, list) else value
            except json.JSONDecodeError:
                pass
        attributes[name] = value
    return attributes


def _size(n: float) -> str:
    return f"{n / MB:.3g} MB" if n >= MB else f"{n / 1024:.3g} KB"


def load_examples(path: Path | None, limit: int = 50) -> list[Listing]:
    if path is None or not path.is_file():
        return []
    return [row for row in CatalogReader(path) if isinstance(row, Listing)][:limit]


def guarded(fn: Callable[..., Any], on_error: Callable[[str], tuple[Any, ...]]) -> Callable[..., Any]:
    """A handler that answers InputError and unexpected errors through ``on_error(message)`` (the status
    line, other outputs cleared so no stale result stands next to it), never with a traceback."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            message = f"**Error:** {exc}"
        except Exception as exc:
            log.exception("demo handler %s failed", fn.__name__)
            message = f"**Error:** something went wrong ({type(exc).__name__}: {exc}). The details are in the server log."
        return on_error(message)

    return run


# ---------------------------------------------------------------------- the app
def build_app(predictor: Any, *, limits: Limits = Limits(), examples: Path | None = DEFAULT_EXAMPLES,
              image_root: Path | None = None, similar: SimilarListings | None = None,
              review: ReviewDesk | None = None, title: str = "mmllm demo") -> gr.Blocks:
    """The Blocks app over ``predictor`` (not launched). ``image_root``: where images of an uploaded
    dump resolve (default: the examples' folder); ``review``: the review tab's queue and corrections."""
    examples_root = examples.resolve().parent if examples else None
    demo = Demo(predictor, limits, load_examples(examples), examples_root, image_root or examples_root, similar)
    schema = demo.schema
    kind = model_kind(predictor) or "model"
    grounding = ", grounded attributes" if isinstance(predictor, GroundedPredictor) else ""

    # delete_cache: uploads and served copies older than an hour go, checked hourly (a demo runs for days)
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        app.mmllm_demo = demo  # launch() and the tests reach the handlers through the app
        gr.Markdown(f"# {title}\n{kind} model{grounding} · schema **{schema.name}** v{schema.version} · "
                    f"{len(schema.categories)} categories, {len(schema.attributes)} attributes")
        with gr.Tab("One listing"):
            with gr.Row():
                with gr.Column(scale=5):
                    reads = f"this model reads {demo.max_images}" if demo.max_images else "this model reads none"
                    images = gr.Gallery(label=f"Product images (upload or paste; {reads})",
                                        type="filepath", sources=["upload", "clipboard"], file_types=["image"],
                                        interactive=True, columns=4, height=220, elem_id="images")
                    title_box = gr.Textbox(label="Title", lines=1, max_lines=3, elem_id="title")
                    description = gr.Textbox(label="Description", lines=4, elem_id="description")
                    table = gr.Dataframe(headers=["attribute", "value"], datatype=["str", "str"], type="array",
                                         value=[["", ""]] * 3, column_count=2, interactive=True,
                                         label="Seller's attribute table (as given)", elem_id="table")
                    with gr.Row():
                        submit = gr.Button("Label it", variant="primary", elem_id="submit")
                        clear = gr.Button("Clear", elem_id="clear")
                    example_set = gr.Dataset(components=[gr.Textbox(visible=False)], label="Examples (click one to fill the form)",
                                             samples=[[e.title] for e in demo.examples], type="index",
                                             elem_id="examples", visible=bool(demo.examples))
                with gr.Column(scale=6):
                    status = gr.Markdown("Fill the form or click an example, then **Label it**.", elem_id="status")
                    category = gr.Label(label="Category", num_top_classes=5, elem_id="category")
                    weights = gr.Label(label="Modality weights (fusion)", visible=False, elem_id="modality-weights")
                    predicted = gr.Dataframe(headers=ATTRIBUTE_HEADERS, interactive=False, wrap=True,
                                             column_widths=["19%", "10%", "21%", "17%", "11%", "22%"],
                                             label="Normalized attributes, with their evidence (- = null)",
                                             elem_id="predicted")
                    with gr.Row():
                        highlights = gr.HighlightedText(label="Where the title and description state them",
                                                        show_legend=True, elem_id="evidence")
                        seller = gr.Dataframe(headers=["seller's attribute", "value"], interactive=False,
                                              label="Seller's values", elem_id="seller")
                    prediction = gr.Code(language="json", label="Prediction JSON", interactive=False, max_lines=22,
                                         elem_id="prediction-json")
                    raw = gr.Textbox(label="Raw model text", lines=3, interactive=False, visible=False, elem_id="raw")
                    extras = gr.JSON(label="Other model outputs", visible=False, elem_id="extras")
                    similar_gallery = gr.Gallery(label="Most similar listings", columns=3, height=300,
                                                 visible=similar is not None, elem_id="similar")

        with gr.Tab("Batch"):
            gr.Markdown(f"Upload a small dump (JSONL or CSV, the catalog row contract; at most "
                        f"{limits.max_dump_rows:,} rows and {_size(limits.max_dump_bytes)}) and download one "
                        "labelled line per row, bad rows included with the reason. Image paths in the dump resolve in "
                        f"`{demo.image_root or 'nowhere (start the demo with --image-root)'}`.")
            dump = gr.File(label="Catalog dump", file_types=list(DUMP_SUFFIXES), type="filepath", elem_id="dump")
            run_batch = gr.Button("Label the dump", variant="primary", elem_id="batch-submit")
            batch_status = gr.Markdown(elem_id="batch-status")
            labelled = gr.File(label="Labelled JSONL", interactive=False, elem_id="batch-out")
            preview = gr.Dataframe(headers=["line", "id", "status", "category", "attributes (source)", "error"],
                                   interactive=False, wrap=True,
                                   label="Rows", elem_id="batch-preview")

        with gr.Tab("Review", elem_id="review-tab"):
            build_review_tab(review, app)

        gr.Markdown(f"Uploads: images up to {_size(limits.max_image_bytes)} and "
                    f"{limits.max_image_pixels / 1e6:.0f} megapixels (JPEG, PNG, WebP, GIF, BMP, TIFF).")

        listing_outputs = [status, category, weights, predicted, seller, highlights, prediction, raw, extras,
                           similar_gallery]

        def show(images_in, title_in, description_in, table_in):
            view = demo.predict(images_in, title_in, description_in, table_in)
            return (view.status, view.category,
                    gr.update(value=view.modality_weights, visible=view.modality_weights is not None),
                    view.attributes, view.seller, view.highlights, json.dumps(view.record, indent=2, ensure_ascii=False),
                    gr.update(value=view.raw, visible=view.raw is not None),
                    gr.update(value=view.extras, visible=view.extras is not None),
                    gr.update(value=view.similar, visible=view.similar is not None))

        def batch(file, progress=gr.Progress()):  # noqa: B008  (gradio finds the progress bar by this default)
            view = demo.label_dump(file, progress)
            return view.status, str(view.out_path), view.preview

        def fill(position):
            paths, title_value, description_value, rows = demo.example(position)
            return paths, title_value, description_value, rows or [["", ""]]

        def listing_error(message):
            hidden = gr.update(value=None, visible=False)
            return (message, None, hidden, None, None, None, "", hidden, hidden,
                    gr.update(value=None, visible=similar is not None))

        submit.click(guarded(show, listing_error), [images, title_box, description, table], listing_outputs,
                     concurrency_limit=1)
        run_batch.click(guarded(batch, lambda message: (message, None, None)), [dump], [batch_status, labelled, preview],
                        concurrency_limit=1)
        example_set.click(fill, [example_set], [images, title_box, description, table])
        clear.click(lambda: (None, "", "", [["", ""]] * 3, "Fill the form or click an example, then **Label it**."),
                    None, [images, title_box, description, table, status])
    return app


def launch(app: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, limits: Limits = Limits(),
           block: bool = True) -> str:
    """Serve ``app`` with the upload limit and an offline theme; returns the local URL."""
    demo: Demo = app.mmllm_demo
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # no Google Fonts: works offline
                              font_mono=["ui-monospace", "monospace"])
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                           max_file_size=limits.upload_bytes, show_error=False, theme=theme, footer_links=[],
                           allowed_paths=[str(demo.examples_root)] if demo.examples_root else None,
                           ssr_mode=False)
    return url


# ---------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if args.host not in ("127.0.0.1", "localhost"):
        print(f"warning: serving on {args.host}: anyone who can reach this machine can use the demo", file=sys.stderr)
    limits = Limits(max_image_bytes=int(args.max_image_mb * MB), max_dump_bytes=int(args.max_dump_mb * MB),
                    max_dump_rows=args.max_batch_rows)
    model_args = {"model": args.model, "schema": args.schema, "template": args.template,
                  "constrained": False if args.no_constrained else None, "max_new_tokens": args.max_new_tokens,
                  "batch_size": args.batch_size, "min_pixels": args.min_pixels, "max_pixels": args.max_pixels,
                  "trust_remote_code": args.trust_remote_code}
    if bool(args.review) != bool(args.review_dump):
        print("error: --review and --review-dump go together: the labels file and the dump(s) it labelled", file=sys.stderr)
        return 2
    reuse_step_buffers()  # the demo labels: a decoding step's blocks are reused, as in mmllm label (host_memory)
    try:
        predictor = load_predictor(**model_args)
        similar = SimilarListings.load(args.index, predictor, args.model, args.k) if args.index else None
        session = (ReviewSession.open(args.review, args.review_dump, predictor.schema, args.corrections)
                   if args.review else None)
    except (OSError, ValueError, KeyError, OutputError, CatalogError) as exc:  # OptionError and SchemaError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    review = ReviewDesk(session, args.reviewer) if session else None
    if session:
        print(f"review: {len(session.queue):,} rows in the queue, {session.decided:,} decided; corrections go to "
              f"{session.corrections.path}", file=sys.stderr)
        for note in session.notes:
            print(f"note: {note}", file=sys.stderr)
    examples = None if args.examples == "none" else Path(args.examples)
    app = build_app(predictor, limits=limits, examples=examples, image_root=args.image_root, similar=similar,
                    review=review, title=f"mmllm demo: {Path(args.model).name}")
    launch(app, host=args.host, port=args.port, limits=limits)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmllm demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder from `mmllm finetune`, or a base hub id / folder (zero-shot)")
    p.add_argument("--index", type=Path, help="search index folder (`mmllm search index`): show the most similar listings")
    p.add_argument("-k", type=at_least(1), default=6, help="similar listings to show")
    p.add_argument("--examples", default=str(DEFAULT_EXAMPLES), help="catalog of example listings ('none' for no examples)")
    p.add_argument("--image-root", type=Path, help="folder image paths of uploaded dumps resolve in (default: the examples' folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 shares it with the network)")
    p.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    p.add_argument("--max-image-mb", type=float, default=Limits.max_image_bytes / MB, help="largest image upload")
    p.add_argument("--max-dump-mb", type=float, default=Limits.max_dump_bytes / MB, help="largest dump upload (batch tab)")
    p.add_argument("--max-batch-rows", type=int, default=Limits.max_dump_rows, help="most rows the batch tab labels")
    p.add_argument("--batch-size", type=int, default=4, help="listings per model call (batch tab)")
    p.add_argument("--max-new-tokens", type=int, help="generation budget, default 256 (constrained decoding raises it)")
    p.add_argument("--min-pixels", type=int, help="smallest image area after resizing (default: the model's)")
    p.add_argument("--max-pixels", type=int, help="largest image area after resizing: caps image tokens")
    p.add_argument("--no-constrained", action="store_true", help="free decoding: invalid answers are shown, not prevented")
    p.add_argument("--schema", help="label schema YAML (zero-shot with a base checkpoint only)")
    p.add_argument("--template", help="prompt template (zero-shot with a base checkpoint only; default listing_v1)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the checkpoint")
    p.add_argument("--review", type=Path, help="labels file (mmllm label --out) whose review queue the review tab steps through")
    p.add_argument("--review-dump", type=Path, nargs="+", help="the dump(s) --review labelled (photos, text, table)")
    p.add_argument("--corrections", type=Path,
                   help="where decisions are appended (default: DUMP.corrections.jsonl beside the first dump)")
    p.add_argument("--reviewer", default="", help="name saved with each decision")
    return p


if __name__ == "__main__":
    sys.exit(main())
