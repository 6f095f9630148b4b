"""Batch JSON labelling of catalog dumps: one output line per input row, always.

    python -m mmllm.label DUMP [DUMP ...] --model MODEL_DIR_OR_ID --out labels.jsonl
        [--errors errors.jsonl] [--batch-size 8] [--resume] [--shard I/N] [--limit N]
        [--engine local|ray] [--no-constrained] [--schema S.yaml --template listing_v1]

Every input row produces exactly one line in ``--out``: the prediction (``status: ok``), an
answer that failed validation (``status: invalid``, unconstrained decoding only) or an error
record (``status: error`` with the ``stage`` - read, image or model - and the reason), the last
two also in ``--errors``. Lines are written whole and flushed; ``--resume`` skips rows already
written (by id, or by file and line for rows without a usable id), so an interrupted run - kill
-9 included - ends with exactly one line per row.

Dumps are read streaming; rows are grouped into batches of similar prompt length; images are
decoded and prompts tokenized in worker threads while the model generates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from mmllm.catalog import CatalogError, CatalogReader, Listing, RowError
from mmllm.images import ImageError, ImagePolicy, load_image
from mmllm.progress import Progress


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

    def policy(self, listing: Listing) -> ImagePolicy:
        """Images resolve in --image-root, else in the folder of the dump the row came from."""
        root = self.image_root or self.roots.get(listing.source)
        return ImagePolicy(root=root, allow_remote=self.allow_remote)


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

    @property
    def rows(self) -> int:
        return self.ok + self.invalid + self.failed

    def count(self, record: dict[str, Any]) -> None:
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
                f"; model {self.model_s:,.1f} s, preparing {self.prepare_s:,.1f} s (in parallel)")


# ---------------------------------------------------------------------- output
class Output:
    """Append-only JSONL output (+ errors file); knows which rows are done for --resume."""

    def __init__(self, path: Path, errors: Path | None, resume: bool) -> None:
        self.done_ids: set[str] = set()
        self.done_positions: set[tuple[str, int]] = set()
        if path.exists() and path.stat().st_size and not resume:
            raise FileExistsError(f"{path} exists: pass --resume to continue it, or choose another --out")
        if resume and path.exists():
            _drop_partial_last_line(path)
            with open(path, encoding="utf-8") as f:
                for line in f:
                    record = json.loads(line)
                    self.done_positions.add((record["source"], record["line"]))
                    if record.get("id") is not None and record.get("stage") != "read":
                        self.done_ids.add(record["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        self.out = open(path, "a", encoding="utf-8")
        self.errors = open(errors, "a", encoding="utf-8") if errors else None

    def is_done(self, row: Listing | RowError) -> bool:
        if (row.source, row.line) in self.done_positions:
            return True
        return isinstance(row, Listing) and row.id in self.done_ids

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        self.out.write(line)  # one write per whole line, flushed: a kill leaves at most a partial last line
        self.out.flush()
        if self.errors is not None and record["status"] != "ok":
            self.errors.write(line)
            self.errors.flush()

    def close(self) -> None:
        self.out.close()
        if self.errors:
            self.errors.close()


def _drop_partial_last_line(path: Path) -> None:
    """A kill -9 during a write can leave half a line; it is cut off and that row redone."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        block, pos = 1 << 16, size
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            pos = start
        f.truncate(0)


def error_record(row: Listing | RowError, stage: str, reason: str) -> dict[str, Any]:
    return {"id": row.id, "status": "error", "stage": stage, "error": reason, "source": row.source, "line": row.line}


# ---------------------------------------------------------------------- input
def iter_rows(dumps: Sequence[Path], opts: LabelOptions, is_done: Callable[[Listing | RowError], bool],
              summary: Summary | None = None, position: dict[str, int] | None = None,
              part: tuple[int, int] = (0, 1)) -> Iterator[Listing | RowError]:
    """Rows of all dumps for this shard (and part of it), minus those already done.

    ``position`` gets the bytes read so far (for the ETA); ``part`` splits a shard further
    between parallel readers (the Ray engine).
    """
    index, taken, before = -1, 0, 0
    shard, shards = opts.shard
    for dump in dumps:
        reader = CatalogReader(dump)
        for row in reader:
            if position is not None and reader.fmt in ("jsonl", "csv"):
                position["bytes"] = before + reader.progress()[0]
            index += 1
            if index % shards != shard:
                continue
            if opts.limit is not None and taken >= opts.limit:
                return
            taken += 1
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


# ---------------------------------------------------------------------- the job
@dataclass
class Prepared:
    listings: list[Listing]
    encoded: Any
    errors: list[dict[str, Any]]
    seconds: float = 0.0


def prepare(predictor: Any, batch: list[Listing], opts: LabelOptions) -> Prepared:
    """Images (strict: a bad one fails its row), prompts and tokens: runs in a worker thread."""
    started = time.perf_counter()
    ok, images, errors = [], [], []
    for listing in batch:
        try:
            policy = opts.policy(listing)
            images.append([load_image(ref, policy) for ref in listing.images[: predictor.max_images]])
            ok.append(listing)
        except ImageError as exc:
            errors.append(error_record(listing, "image", str(exc)))
    encoded = predictor.encode(ok, images) if ok else None
    return Prepared(ok, encoded, errors, time.perf_counter() - started)


def run_local(predictor: Any, dumps: Sequence[Path], output: Output, opts: LabelOptions) -> Summary:
    summary = Summary()
    started = time.perf_counter()
    text_dumps = all(p.is_file() and p.suffix in (".jsonl", ".csv", ".tsv", ".ndjson", ".json") for p in dumps)
    total_bytes = sum(p.stat().st_size for p in dumps) if text_dumps else None
    progress = Progress("label", total_bytes=total_bytes, enabled=not opts.quiet, log_every_s=opts.log_every_s,
                        log_every_rows=opts.log_every_rows)
    position = {"bytes": 0}

    def emit(record: dict[str, Any]) -> None:
        output.write(record)
        summary.count(record)
        progress.update(1, bytes_done=position["bytes"] or None, rows_read=position.get("rows"))

    def good_rows() -> Iterator[Listing]:
        for row in iter_rows(dumps, opts, output.is_done, summary, position):
            if isinstance(row, RowError):
                emit(error_record(row, "read", row.message))
            else:
                yield row

    with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="label-prep") as pool:
        queue: deque[Future] = deque()
        for batch in length_sorted_batches(good_rows(), opts.batch_size, opts.window):
            queue.append(pool.submit(prepare, predictor, batch, opts))
            while len(queue) > opts.workers + 1:  # keep the workers a little ahead of the model
                _finish(predictor, queue.popleft().result(), emit, opts, summary)
        while queue:
            _finish(predictor, queue.popleft().result(), emit, opts, summary)
    progress.close()
    summary.wall_s = time.perf_counter() - started
    return summary


def _finish(predictor: Any, prepared: Prepared, emit: Callable[[dict], None], opts: LabelOptions,
            summary: Summary | None = None) -> None:
    """Generate for a prepared batch and emit one record per row (errors included)."""
    for record in prepared.errors:
        emit(record)
    if not prepared.listings:
        return
    started = time.perf_counter()
    try:
        predictions = predictor.predict_encoded(prepared.encoded)
        if summary is not None:
            summary.model_s += time.perf_counter() - started
            summary.prepare_s += prepared.seconds
    except Exception as exc:  # one bad batch must not stop the job: retry its rows one by one
        if len(prepared.listings) == 1:
            emit(error_record(prepared.listings[0], "model", f"{type(exc).__name__}: {exc}"))
            return
        for listing in prepared.listings:
            _finish(predictor, prepare(predictor, [listing], opts), emit, opts)
        return
    for listing, prediction in zip(prepared.listings, predictions):
        emit({"id": listing.id, **prediction, "source": listing.source, "line": listing.line})


def label_batch(predictor: Any, batch: list[Listing], opts: LabelOptions) -> list[dict[str, Any]]:
    """Records for one batch, synchronously (the Ray engine's unit of work)."""
    records: list[dict[str, Any]] = []
    _finish(predictor, prepare(predictor, batch, opts), records.append, opts)
    return records


# ---------------------------------------------------------------------- models
def load_predictor(model: str, *, schema: str | None, template: str | None, constrained: bool,
                   max_new_tokens: int, batch_size: int, min_pixels: int | None, max_pixels: int | None,
                   trust_remote_code: bool = False) -> Any:
    """A model folder from `mmllm finetune`, or a base checkpoint (hub id / folder) for zero-shot."""
    from mmllm.collator import set_pixel_budget
    from mmllm.models.generative import (META_FILE, GenerativePredictor, ModelConfig, load_base_model, load_model_dir,
                                         load_processor)
    from mmllm.prompts import DEFAULT_TEMPLATE, PromptTemplate
    from mmllm.schema import LabelSchema

    if (Path(model) / META_FILE).is_file():
        predictor = load_model_dir(model, trust_remote_code=trust_remote_code)
        if schema or template:
            print("note: --schema / --template are ignored for a fine-tuned model folder: it uses its own", file=sys.stderr)
    else:
        if not schema:
            raise SystemExit("error: zero-shot labelling with a base checkpoint needs --schema (the label schema YAML)")
        cfg = ModelConfig(base=model, trust_remote_code=trust_remote_code)
        import torch

        base = load_base_model(cfg)
        base.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        predictor = GenerativePredictor(base, load_processor(model, cfg), LabelSchema.from_yaml(schema),
                                        PromptTemplate.load(template or DEFAULT_TEMPLATE), cfg.max_images)
    predictor.constrained = constrained
    predictor.max_new_tokens = max_new_tokens
    predictor.batch_size = batch_size
    if min_pixels or max_pixels:
        size = predictor.processor.image_processor.size
        set_pixel_budget(predictor.processor, min_pixels or size["shortest_edge"], max_pixels or size["longest_edge"])
    return predictor


# ---------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    dumps = [Path(d) for d in args.dumps]
    for dump in dumps:
        if not dump.exists():
            print(f"error: {dump}: no such dump", file=sys.stderr)
            return 2
    shard = _parse_shard(args.shard)
    names = [d.name for d in dumps]
    if len(set(names)) != len(names):
        print("error: two dumps share a file name; rows are identified by file name and line", file=sys.stderr)
        return 2
    opts = LabelOptions(batch_size=args.batch_size, workers=args.workers, limit=args.limit, shard=shard,
                        resume=args.resume, image_root=args.image_root.resolve() if args.image_root else None,
                        allow_remote=args.allow_remote, quiet=args.quiet,
                        roots={d.name: d.resolve().parent for d in dumps})
    try:
        output = Output(args.out, args.errors, args.resume)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_args = {"model": args.model, "schema": args.schema, "template": args.template,
                  "constrained": not args.no_constrained, "max_new_tokens": args.max_new_tokens,
                  "batch_size": args.batch_size, "min_pixels": args.min_pixels, "max_pixels": args.max_pixels,
                  "trust_remote_code": args.trust_remote_code}
    try:
        if args.engine == "ray":
            from mmllm.label_ray import RayOptions, run_ray

            ray_opts = RayOptions(args.ray_actors, args.ray_cpus_per_actor, args.ray_gpus_per_actor, args.ray_address)
            summary = run_ray(model_args, dumps, output, opts, ray_opts)
        else:
            summary = run_local(load_predictor(**model_args), dumps, output, opts)
    except CatalogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        output.close()
    print(summary.line())
    return 1 if summary.failed else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmllm.label", description=__doc__.split("\n\n")[0])
    p.add_argument("dumps", nargs="+", help="catalog dumps (.jsonl[.gz], .csv, .parquet, save_to_disk folder)")
    p.add_argument("--model", required=True, help="model folder from `mmllm finetune`, or a base hub id / folder (zero-shot)")
    p.add_argument("--out", type=Path, required=True, help="output JSONL: one line per input row")
    p.add_argument("--errors", type=Path, help="also write error and invalid records here")
    p.add_argument("--batch-size", type=int, default=8, help="listings per generate call")
    p.add_argument("--workers", type=int, default=2, help="threads decoding images / tokenizing ahead of the model")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="generation budget (constrained decoding raises it to the longest valid answer)")
    p.add_argument("--min-pixels", type=int, help="smallest image area after resizing (default: the model's)")
    p.add_argument("--max-pixels", type=int, help="largest image area after resizing: caps image tokens")
    p.add_argument("--limit", type=int, help="label only the first N rows (of this shard)")
    p.add_argument("--resume", action="store_true", help="continue --out: skip rows already written")
    p.add_argument("--shard", default="0/1", help="I/N: this job labels rows I, I+N, I+2N, ... (job arrays)")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="ray: Ray Data actors, one model each")
    p.add_argument("--ray-actors", type=int, default=2, help="--engine ray: model replicas")
    p.add_argument("--ray-gpus-per-actor", type=float, default=0.0, help="--engine ray: GPUs per replica (0 = CPU)")
    p.add_argument("--ray-cpus-per-actor", type=float, default=1.0, help="--engine ray: CPUs per replica")
    p.add_argument("--ray-address", help="--engine ray: an existing cluster (default: start a local Ray instance)")
    p.add_argument("--no-constrained", action="store_true", help="free decoding: invalid answers are reported, not prevented")
    p.add_argument("--schema", help="label schema YAML (zero-shot with a base checkpoint only)")
    p.add_argument("--template", help="prompt template (zero-shot with a base checkpoint only; default listing_v1)")
    p.add_argument("--image-root", type=Path, help="folder image paths resolve in (default: each dump's folder)")
    p.add_argument("--allow-remote", action="store_true", help="fetch http(s) image URLs (refused by default)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"error: --shard {text!r} is not I/N (e.g. 0/4)") from None
    if not 0 <= i < n:
        raise SystemExit(f"error: --shard {text!r}: need 0 <= I < N")
    return i, n


if __name__ == "__main__":
    sys.exit(main())
