"""The labelling engine: catalog rows in, one record per row out, whatever fails.

Every driver - the command line (``mmllm label``), the Ray engine and the demo's batch tab - runs
rows through these functions, so they share one contract: each input row gives exactly one
record, ``status`` ``ok`` (the prediction), ``invalid`` (an answer that failed validation) or
``error`` with the ``stage`` that failed:

- ``read``: the row could not be parsed, or the dump's stream broke there (a truncated ``.gz``, a
  corrupt Parquet file): one record names the file and position, the rows before it are labelled
  and the next dump goes on;
- ``image``: an image could not be loaded safely;
- ``encode``: the model's processor refused the row (an image of an extreme aspect ratio, ...);
- ``model``: the model failed on the row. A failing batch is retried row by row, so only the rows
  that fail themselves become errors.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from mmllm.catalog import CatalogReader, Listing, RowError, SeenIds, byte_total
from mmllm.host_memory import reuse_step_buffers
from mmllm.openmp import single_thread_team
from mmllm.images import ImageError, ImagePolicy, load_image
from mmllm.labelling.replicas import run_replicas
from mmllm.labelling.review import flag
from mmllm.progress import Progress

Record = dict[str, Any]
# What loading a model for labelling refuses with: a folder that is not there, a model or option that does not
# fit (OptionError and SchemaError are ValueErrors). A refused job exits 2 and leaves nothing, whatever the engine.
MODEL_REFUSALS = (FileNotFoundError, ValueError)


@dataclass
class LabelOptions:
    batch_size: int = 8
    window: int = 8  # batches read ahead and sorted by length together
    workers: int = 2  # threads decoding images and tokenizing
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)
    resume: bool = False
    image_root: Path | None = None
    allow_remote: bool = False
    quiet: bool = False
    log_every_s: float = 30.0
    log_every_rows: int = 1000
    roots: dict[str, Path] = field(default_factory=dict)  # dump file name -> its folder (image root)
    review_below: float | None = None  # flag records under this category confidence for review (labelling.review)
    replicas: int = 1  # > 1: the model forked into that many single-thread processes (labelling.replicas)
    max_image_bytes: int = ImagePolicy.max_bytes  # the image bounds (the demo's batch tab passes its own)
    max_image_pixels: int = ImagePolicy.max_pixels

    def __post_init__(self) -> None:
        for name in ("batch_size", "window", "workers", "replicas"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or unset), got {self.limit}")
        shard, shards = self.shard
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard}/{shards}: need 0 <= I < N")

    def policy(self, listing: Listing) -> ImagePolicy:
        """Images resolve in --image-root, else in the folder of the dump the row came from."""
        root = self.image_root or self.roots.get(listing.source)
        return ImagePolicy(root=root, allow_remote=self.allow_remote, max_bytes=self.max_image_bytes,
                           max_pixels=self.max_image_pixels)


@dataclass
class Summary:
    ok: int = 0
    invalid: int = 0
    failed: int = 0
    skipped: int = 0  # already done before --resume
    wall_s: float = 0.0
    model_s: float = 0.0  # inside generate
    prepare_s: float = 0.0  # images, prompts, tokens (in worker threads, overlapping the model)
    by_stage: dict[str, int] = field(default_factory=dict)
    replicas: int = 1  # > 1: model_s and prepare_s are summed over that many processes, each in turn

    @property
    def rows(self) -> int:
        return self.ok + self.invalid + self.failed

    def count(self, record: Record) -> None:
        if record["status"] == "ok":
            self.ok += 1
        elif record["status"] == "invalid":
            self.invalid += 1
        else:
            self.failed += 1
            self.by_stage[record["stage"]] = self.by_stage.get(record["stage"], 0) + 1

    def line(self) -> str:
        rate = self.rows / self.wall_s if self.wall_s else 0.0
        stages = ", ".join(f"{k} {v}" for k, v in sorted(self.by_stage.items()))
        return (f"{self.rows:,} rows: {self.ok:,} ok, {self.invalid:,} invalid, {self.failed:,} failed"
                f"{f' ({stages})' if stages else ''}; {rate:,.1f} rows/s, wall {self.wall_s:,.1f} s"
                f"{f'; {self.skipped:,} already done' if self.skipped else ''}"
                f"; model {self.model_s:,.1f} s, preparing {self.prepare_s:,.1f} s "
                + (f"(summed over {self.replicas} replicas)" if self.replicas > 1 else "(in parallel)"))


def error_record(row: Listing | RowError, stage: str, reason: str) -> Record:
    return {"id": row.id, "status": "error", "stage": stage, "error": reason, "source": row.source, "line": row.line}


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------- input
def iter_rows(dumps: Sequence[Path], opts: LabelOptions, is_done: Callable[[Listing | RowError], bool],
              summary: Summary | None = None, position: dict[str, int] | None = None,
              part: tuple[int, int] = (0, 1)) -> Iterator[Listing | RowError]:
    """Rows of all dumps for this shard (and part of it), minus those already done.

    ``position`` gets the bytes read so far (for the ETA); ``part`` splits a shard further
    between parallel readers (the Ray engine). A dump whose stream breaks ends with one
    :class:`RowError` at the position reached, and the next dump goes on.
    """
    index, taken, before = -1, 0, 0
    shard, shards = opts.shard
    seen = SeenIds()  # one job, one id space: an id repeated in another dump is a read error as within one
    for dump in dumps:
        reader = CatalogReader(dump, seen_ids=seen)
        for row in _guarded(reader, dump):
            if position is not None and reader.fmt in ("jsonl", "csv"):
                position["bytes"] = before + reader.progress()[0]
            index += 1
            if index % shards != shard:
                continue
            if opts.limit is not None and taken >= opts.limit:
                return
            taken += 1
            if position is not None:
                position["seen"] = taken  # rows of this shard read, done before or not (the rate per byte)
            if (taken - 1) % part[1] != part[0]:
                continue
            if opts.resume and is_done(row):
                if summary is not None:
                    summary.skipped += 1
                continue
            if position is not None:
                position["rows"] = position.get("rows", 0) + 1  # rows handed on, for the total estimate
            yield row
        before += dump.stat().st_size if dump.is_file() else 0


def _guarded(reader: CatalogReader, dump: Path) -> Iterator[Listing | RowError]:
    """The reader's rows; anything that escapes it ends this dump as one read error, not the job."""
    last = 0
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - the catalog's own errors come as RowError; this is the rest
            yield RowError(source=reader.name, line=last + 1, id=None, unit=reader.unit,
                           problems=(("row", f"{dump.name}: reading stopped after {reader.unit} {last}: {_reason(exc)}"),))
            return
        last = row.line
        yield row


def length_sorted_batches(rows: Iterable[Listing], batch_size: int, window: int) -> Iterator[list[Listing]]:
    """Batches of similar prompt length (less padding), from a bounded read-ahead window."""
    pending: list[Listing] = []

    def flush() -> Iterator[list[Listing]]:
        pending.sort(key=_length_estimate)
        for start in range(0, len(pending), batch_size):
            yield pending[start:start + batch_size]
        pending.clear()

    for row in rows:
        pending.append(row)
        if len(pending) >= batch_size * window:
            yield from flush()
    yield from flush()


def _length_estimate(listing: Listing) -> int:
    table = sum(len(str(k)) + len(str(v)) for k, v in listing.attributes.items())
    return len(listing.title) + min(len(listing.description), 1500) + min(table, 4000) + 1000 * len(listing.images)


# ---------------------------------------------------------------------- one batch
@dataclass
class Prepared:
    listings: list[Listing]
    encoded: Any
    errors: list[Record]
    seconds: float = 0.0
    split: bool = False  # the batch did not encode as a whole: label its rows one by one


def prepare(predictor: Any, batch: list[Listing], opts: LabelOptions) -> Prepared:
    """Images (strict: a bad one fails its row), prompts and tokens: runs in a worker thread."""
    started = time.perf_counter()
    ok, images, errors = [], [], []
    for listing in batch:
        try:
            images.append([load_image(ref, opts.policy(listing)) for ref in listing.images[: predictor.max_images]])
            ok.append(listing)
        except ImageError as exc:
            errors.append(error_record(listing, "image", str(exc)))
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one file fails that row only
            errors.append(error_record(listing, "image", _reason(exc)))
    encoded, split = None, False
    if ok:
        try:
            encoded = predictor.encode(ok, images)
        except Exception as exc:  # noqa: BLE001 - e.g. the processor refuses an image's aspect ratio
            if len(ok) == 1:
                errors.append(error_record(ok[0], "encode", _reason(exc)))
                ok = []
            else:
                split = True
    return Prepared(ok, encoded, errors, time.perf_counter() - started, split)


def finish(predictor: Any, prepared: Prepared, emit: Callable[[Record], None], opts: LabelOptions,
           summary: Summary | None = None, model_lock: threading.Lock | None = None) -> None:
    """Generate for a prepared batch and emit one record per row (errors included)."""
    for record in prepared.errors:
        emit(record)
    if not prepared.listings:
        return
    if prepared.split:
        for listing in prepared.listings:
            finish(predictor, prepare(predictor, [listing], opts), emit, opts, summary, model_lock)
        return
    started = time.perf_counter()
    try:
        if model_lock is None:
            predictions = predictor.predict_encoded(prepared.encoded)
        else:
            with model_lock:
                predictions = predictor.predict_encoded(prepared.encoded)
    except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the job: retry its rows one by one
        if len(prepared.listings) == 1:
            emit(error_record(prepared.listings[0], "model", _reason(exc)))
            return
        for listing in prepared.listings:
            finish(predictor, prepare(predictor, [listing], opts), emit, opts, summary, model_lock)
        return
    if summary is not None:
        summary.model_s += time.perf_counter() - started
        summary.prepare_s += prepared.seconds
    schema = getattr(predictor, "schema", None)
    ids = getattr(schema, "category_ids", None)
    for listing, prediction in zip(prepared.listings, predictions):
        if ids and prediction.get("category"):  # an imported standard taxonomy: its id beside the path
            prediction = {**prediction, "category_id": schema.category_id(prediction["category"])}
        if opts.review_below is not None:
            prediction = {**prediction, **flag(prediction, opts.review_below)}
        emit({"id": listing.id, **prediction, "source": listing.source, "line": listing.line})


def label_timed(predictor: Any, batch: list[Listing], opts: LabelOptions) -> tuple[list[Record], float, float]:
    """Records for one batch, synchronously, with its seconds in the model and preparing (a replica's or a Ray
    actor's unit of work)."""
    records: list[Record] = []
    summary = Summary()
    finish(predictor, prepare(predictor, batch, opts), records.append, opts, summary)
    return records, summary.model_s, summary.prepare_s


# ---------------------------------------------------------------------- the job
def record_writer(output: Any, summary: Summary, progress: Progress, opts: LabelOptions, position: dict[str, int],
                  on_record: Callable[[Record], None] | None = None) -> Callable[[Record], None]:
    """What each engine does with a record: written, counted, and shown by the progress line (the dump's bytes
    read, from ``position`` as :func:`iter_rows` keeps it); ``on_record`` sees it after."""
    def emit(record: Record) -> None:
        output.write(record)
        summary.count(record)
        at_most = opts.limit - summary.skipped if opts.limit is not None else None  # --limit counts skipped rows too
        progress.update(1, bytes_done=position["bytes"] or None, rows_read=position.get("rows"),
                        rows_seen=position.get("seen"), at_most=at_most)
        if on_record is not None:
            on_record(record)

    return emit


def run_local(predictor: Any, dumps: Sequence[Path], output: Any, opts: LabelOptions, *,
              on_record: Callable[[Record], None] | None = None,
              model_lock: threading.Lock | None = None) -> Summary:
    """Label every row of ``dumps`` into ``output`` (an :class:`~mmllm.labelling.output.Output`).

    Worker threads load images and encode ahead of the model; ``on_record`` sees every record
    after it is written (the demo's progress); ``model_lock`` serialises the model with other users.
    With ``opts.replicas`` > 1 the batches go to that many forked single-thread copies of the model
    instead (:mod:`mmllm.labelling.replicas`). A write error (:class:`~mmllm.labelling.output.WriteError`) ends the run.
    """
    reuse_step_buffers()  # a decoding step's blocks of MBs are reused, not mapped afresh; larger ones go back (host_memory)
    summary = Summary(replicas=opts.replicas)
    started = time.perf_counter()
    total_bytes = byte_total(dumps)
    progress = Progress("label", total_bytes=total_bytes, enabled=not opts.quiet, log_every_s=opts.log_every_s,
                        log_every_rows=opts.log_every_rows)
    position = {"bytes": 0}

    emit = record_writer(output, summary, progress, opts, position, on_record)

    def good_rows() -> Iterator[Listing]:
        for row in iter_rows(dumps, opts, output.is_done, summary, position):
            if isinstance(row, RowError):
                emit(error_record(row, "read", row.message))
            else:
                yield row

    if opts.replicas > 1:
        if model_lock is not None:
            raise ValueError("replicas label in processes of their own: they cannot share a model lock")
        try:
            run_replicas(predictor, functools.partial(label_timed, predictor, opts=opts),
                         length_sorted_batches(good_rows(), opts.batch_size, opts.window), emit, opts.replicas,
                         error_record, summary)
        finally:
            progress.close()
            summary.wall_s = time.perf_counter() - started
        return summary
    try:
        # where encoding is light host work and the model runs here, the workers run torch single-threaded:
        # a team of their own would slow every small operation of the model in this thread (mmllm/openmp.py)
        light = getattr(predictor, "light_encode", False)
        with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="label-prep",
                                initializer=single_thread_team if light else None) as pool:
            queue: deque[Future] = deque()
            try:
                for batch in length_sorted_batches(good_rows(), opts.batch_size, opts.window):
                    queue.append(pool.submit(prepare, predictor, batch, opts))
                    while len(queue) > opts.workers + 1:  # keep the workers a little ahead of the model
                        finish(predictor, queue.popleft().result(), emit, opts, summary, model_lock)
                while queue:
                    finish(predictor, queue.popleft().result(), emit, opts, summary, model_lock)
            finally:
                for future in queue:  # a write error: do not wait for batches nobody will write
                    future.cancel()
    finally:
        progress.close()
        summary.wall_s = time.perf_counter() - started
    return summary
