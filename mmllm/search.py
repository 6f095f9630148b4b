"""Similar-product search: listing embeddings from the VLM backbone, a faiss index, Recall@K / NDCG@K.

A listing is embedded by running the vision-language model over the SAME prompt the generative
path uses (photos, title, description, seller table and schema, up to the assistant's turn) and
pooling the last layer's hidden states, so a fine-tuned model folder gives embeddings shaped by
its fine-tuning and a base checkpoint works zero-shot. Vectors are L2-normalized, so the inner
product of the faiss index is the cosine similarity.

    mmllm search index --model MODEL --catalog FILE --out INDEX_DIR [--schema S] [--index-type flat|hnsw]
    mmllm search query INDEX_DIR (--id ID | --listing JSON_OR_FILE | --image PATH | --text "...") [-k 10] [--json]
    mmllm search evaluate INDEX_DIR [--k 1 5 10] [--level full|1] [--json]

An index folder holds ``index.faiss``, ``ids.jsonl`` (id, title, gold category when known, in
index order), ``meta.json`` (model, pooling, dim, count, index type) and copies of the label
schema and prompt template, so queries are embedded with the very prompt the catalog was.

Memory: the vectors are held once, inside the faiss index (count x dim x 4 bytes: 100k listings
x 2,048 dims = 800 MB; HNSW adds about 256 bytes of links per vector), plus the id records.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from mmllm.catalog import CatalogError, CatalogReader, Listing, RowError, byte_total, parse_row
from mmllm.file_lock import Held, hold
from mmllm.images import ImageError, ImagePolicy, load_image
from mmllm.model_dir import SCHEMA_FILE, looks_like_path
from mmllm.output_paths import check_folder
from mmllm.predictor import Predictor, embed_in_batches
from mmllm.progress import Progress
from mmllm.prompts import DEFAULT_TEMPLATE, TEMPLATE_FILE
from mmllm.schema import SEPARATOR

POOLINGS = ("last", "mean")
INDEX_TYPES = ("flat", "hnsw")
# An index folder: the vectors, one record per vector, its meta, and the schema + template its prompts used
# (SCHEMA_FILE and TEMPLATE_FILE are the model folder's names: the same files, copied).
INDEX_FILE, IDS_FILE, INDEX_META_FILE = "index.faiss", "ids.jsonl", "meta.json"
HNSW_LINKS = 32  # neighbours per node: the usual recall / memory trade-off for dims in the thousands


# ---------------------------------------------------------------------- embeddings
# Vectors come from the model's own ``embed_encoded`` (mmllm.predictor): the pooled prompt state
# of a VLM (``--pooling``: the last real token, or the mean over the real tokens), or the fusion
# model's fused representation.


def load_model(model: str, *, schema: str | Path | None, template: str | Path | None) -> Predictor:
    """A fine-tuned model folder (its own schema and template) or a base checkpoint (zero-shot,
    with ``schema``): :func:`mmllm.model_dir.load`, with ``tiny:`` names resolved."""
    from mmllm import model_dir
    from mmllm.tiny import resolve

    if model_dir.is_model_dir(model):
        return model_dir.load(model, resolve=resolve)
    if schema is None:
        raise ValueError(f"{model} is a base checkpoint: zero-shot embedding needs --schema (the label schema YAML)")
    return model_dir.load(model, schema=schema, template=template, resolve=resolve)


# ---------------------------------------------------------------------- the index
class SearchIndex:
    """A faiss inner-product index over normalized vectors (= cosine) plus one record per vector.

    ``records[i]`` (``{"id", "title", "category"?}``) describes vector ``i``; ``meta`` is what
    ``meta.json`` holds. Exact search (``flat``) or HNSW graph search (``hnsw``: approximate,
    for large catalogs).
    """

    def __init__(self, index: Any, records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
        self.index, self.records, self.meta = index, records, meta
        self._positions = {r["id"]: i for i, r in enumerate(records)}

    @classmethod
    def empty(cls, dim: int, meta: Mapping[str, Any], index_type: str = "flat") -> "SearchIndex":
        import faiss

        if index_type == "flat":
            index = faiss.IndexFlatIP(dim)
        elif index_type == "hnsw":
            index = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        else:
            raise ValueError(f"index type must be one of {INDEX_TYPES}, got {index_type!r}")
        return cls(index, [], {**meta, "dim": dim, "index_type": index_type})

    @classmethod
    def build(cls, vectors: np.ndarray, ids: Sequence[str | Mapping[str, Any]], meta: Mapping[str, Any],
              index_type: str = "flat") -> "SearchIndex":
        """An index over ``vectors`` [N, D]; ``ids`` are listing ids or full records."""
        index = cls.empty(vectors.shape[1], meta, index_type)
        index.add(vectors, ids)
        return index

    def add(self, vectors: np.ndarray, ids: Sequence[str | Mapping[str, Any]]) -> None:
        """Append vectors (faiss copies them: the caller can drop its batch)."""
        if len(vectors) != len(ids):
            raise ValueError(f"{len(vectors)} vectors for {len(ids)} ids")
        records = [dict(r) if isinstance(r, Mapping) else {"id": r} for r in ids]
        new_ids = [r["id"] for r in records]
        if len(set(new_ids)) != len(new_ids) or not self._positions.keys().isdisjoint(new_ids):
            repeated = next(i for n, i in enumerate(new_ids) if i in self._positions or i in new_ids[:n])
            raise ValueError(f"id {repeated!r} is already in the index; ids must be unique")
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self._positions.update((i, len(self.records) + n) for n, i in enumerate(new_ids))
        self.records.extend(records)

    def __len__(self) -> int:
        return self.index.ntotal

    def __contains__(self, listing_id: object) -> bool:
        return listing_id in self._positions

    def vector(self, listing_id: str) -> np.ndarray:
        """The stored vector of an indexed listing (both index types keep the raw vectors)."""
        if listing_id not in self._positions:
            raise KeyError(f"id {listing_id!r} is not in the index")
        return self.index.reconstruct(self._positions[listing_id])

    def search_positions(self, vectors: np.ndarray, k: int, ef_search: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """faiss's answer: scores and row positions [Q, k'], k' = min(k, size); -1 marks a missing hit."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.shape[1] != self.index.d:
            raise ValueError(f"query vectors have {vectors.shape[1]} dims, the index {self.index.d} "
                             f"(built with {self.meta.get('model')!r}); embed queries with the same model")
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = max(ef_search, k)  # the candidate list must hold at least k hits
        return self.index.search(vectors, min(k, len(self)))

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Cosine scores [Q, k'] and the listing ids of the k nearest vectors per query, best first."""
        scores, positions = self.search_positions(vectors, k)
        ids = [[self.records[p]["id"] for p in row if p >= 0] for row in positions]
        return scores, ids

    def save(self, folder: str | Path) -> Path:
        """Write the index folder; meta.json goes last, so its presence means the folder is complete."""
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / INDEX_FILE))
        with open(folder / IDS_FILE, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in self.records)
        self.meta["count"] = len(self)
        (folder / INDEX_META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "SearchIndex":
        """The index in ``folder``; one being replaced by a build meanwhile is read old or new, never half-way
        (the build swaps its files in under ``.index.swap``, held exclusively; a load holds it shared)."""
        with _swap_lock(Path(folder), shared=True):
            return cls._load(Path(folder))

    @classmethod
    def _load(cls, folder: Path) -> "SearchIndex":
        import faiss

        if not (folder / INDEX_META_FILE).is_file():
            raise FileNotFoundError(f"{folder}: not a search index (no {INDEX_META_FILE}); build one with `mmllm search index`")
        for name in (INDEX_FILE, IDS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: {name} is missing; rebuild the index")

        def damaged(name: str, why: Any) -> ValueError:
            return ValueError(f"{folder / name}: cannot be read ({why}); rebuild the index")

        try:
            meta = json.loads((folder / INDEX_META_FILE).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise damaged(INDEX_META_FILE, exc) from None
        if not isinstance(meta, dict) or not isinstance(meta.get("count"), int):
            raise damaged(INDEX_META_FILE, "not an object with a count")
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
        except RuntimeError as exc:  # faiss's own error on a torn or foreign file
            raise damaged(INDEX_FILE, str(exc).strip().splitlines()[-1] if str(exc).strip() else "faiss refused it") from None
        try:
            with open(folder / IDS_FILE, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
        except (ValueError, UnicodeDecodeError) as exc:
            raise damaged(IDS_FILE, exc) from None
        if not all(isinstance(r, dict) and isinstance(r.get("id"), str) for r in records):
            raise damaged(IDS_FILE, "a line is not a record with an id")
        if not index.ntotal == len(records) == meta["count"]:
            raise ValueError(f"{folder}: {INDEX_FILE} holds {index.ntotal} vectors, {IDS_FILE} {len(records)} rows, "
                             f"{INDEX_META_FILE} says {meta['count']}; rebuild the index")
        return cls(index, records, meta)


# ---------------------------------------------------------------------- retrieval metrics
def recall_at_k(ranked_relevance: Sequence[bool], n_relevant: int, k: int) -> float:
    """Recall@K as a hit rate: 1.0 if at least one relevant item is in the top K, else 0.0.

    Averaged over queries it is the share of queries with a relevant item in their top K (the
    usual "Recall@K" of product search). 0.0 when nothing relevant exists.
    """
    return 1.0 if n_relevant > 0 and any(ranked_relevance[:k]) else 0.0


def capped_recall_at_k(ranked_relevance: Sequence[bool], n_relevant: int, k: int) -> float:
    """Classic recall capped at K: relevant items in the top K / min(K, relevant items available)."""
    if n_relevant <= 0:
        return 0.0
    return sum(map(bool, ranked_relevance[:k])) / min(k, n_relevant)


def ndcg_at_k(ranked_relevance: Sequence[bool], n_relevant: int, k: int) -> float:
    """NDCG@K with binary gains and a log2(rank + 1) discount; the ideal DCG puts
    min(K, n_relevant) relevant items first. 0.0 when nothing relevant exists."""
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(k, n_relevant)))
    if ideal == 0:
        return 0.0
    return sum(1.0 / math.log2(rank + 2) for rank, rel in enumerate(ranked_relevance[:k]) if rel) / ideal


def relevance_key(category: str | None, level: int | None) -> str | None:
    """The category path, or its first ``level`` levels (``level=1``: the top-level node)."""
    if not category or level is None:
        return category or None
    return SEPARATOR.join(category.split(SEPARATOR)[:level])


def evaluate_index(index: SearchIndex, ks: Sequence[int] = (1, 5, 10), level: int | None = None,
                   chunk: int = 1024) -> dict[str, Any]:
    """Leave-one-out retrieval: every listing with a gold category queries the index.

    Its own vector is removed from its results; relevant = same category key
    (:func:`relevance_key`). Queries whose category has no other listing in the index cannot
    score and are counted in ``skipped``. Vectors are read back ``chunk`` at a time.
    """
    keys = [relevance_key(r.get("category"), level) for r in index.records]
    counts = Counter(k for k in keys if k is not None)
    depth = max(ks)
    totals = {f"{name}@{k}": 0.0 for k in ks for name in ("recall", "capped_recall", "ndcg")}
    queries = skipped = 0
    for start in range(0, len(index), chunk):
        rows = [i for i in range(start, min(start + chunk, len(index))) if keys[i] is not None]
        if not rows:
            continue
        block = index.index.reconstruct_n(start, min(chunk, len(index) - start))
        _, positions = index.search_positions(block[[i - start for i in rows]], depth + 1)
        for row, hits in zip(rows, positions):
            n_relevant = counts[keys[row]] - 1
            if n_relevant == 0:
                skipped += 1
                continue
            # drop the query itself wherever it ranks (ties with duplicates may put it second)
            hits = [h for h in hits if h >= 0 and h != row][:depth]
            relevance = [keys[h] == keys[row] for h in hits]
            queries += 1
            for k in ks:
                totals[f"recall@{k}"] += recall_at_k(relevance, n_relevant, k)
                totals[f"capped_recall@{k}"] += capped_recall_at_k(relevance, n_relevant, k)
                totals[f"ndcg@{k}"] += ndcg_at_k(relevance, n_relevant, k)
    metrics = {name: (value / queries if queries else None) for name, value in totals.items()}  # None: nothing to score
    return {"level": "full" if level is None else level, "k": list(ks), "queries": queries, "skipped": skipped,
            "indexed": len(index), **metrics}


# ---------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (CatalogError, OSError, ValueError, KeyError) as exc:  # OSError: a model that cannot be loaded, ...
        message = exc.args[0] if isinstance(exc, KeyError) else exc
        print(f"error: {message}", file=sys.stderr)
        return 2


def _run_index(args: argparse.Namespace) -> int:
    """Embed the catalog into ``OUT/.partial`` (the vectors in chunk files as they are computed, so an
    interrupted build keeps its work and ``--resume`` goes on from it, never embedding a listing twice), then
    write the index there and move it into ``--out`` last: an old index in ``--out`` stays whole until the new
    one is complete. The staging folder is inside ``--out``, so the moves are renames on one file system."""
    written = (INDEX_FILE, IDS_FILE, INDEX_META_FILE, SCHEMA_FILE, TEMPLATE_FILE)
    inputs = [args.catalog, Path(args.model), *(Path(p) for p in (args.schema, args.template) if p)]
    check_folder(inputs, "--out", args.out, (*written, BUILD_LOCK, SWAP_LOCK))  # the model folder, the schema: never written over
    staging = args.out / STAGING_DIR
    if any(staging.resolve() == p.resolve() or staging.resolve() in p.resolve().parents for p in inputs):
        raise FileExistsError(f"{staging} is where the index is built and holds an input; choose another --out")
    _check_out(args, staging, written)
    reader = CatalogReader(args.catalog)
    policy = ImagePolicy(root=args.image_root or reader.root, allow_remote=args.allow_remote)
    bundle = load_model(args.model, schema=args.schema, template=args.template)
    with _build_lock(args.out):
        _check_out(args, staging, written)  # again: a build that ended while the model loaded may have written
        return _build(args, staging, written, reader, policy, bundle)


def _check_out(args: argparse.Namespace, staging: Path, written: Sequence[str]) -> None:
    """``--out`` holds no index (or ``--overwrite``, or ``--resume`` of the build staged there) and no file of the
    user's that the index would write over."""
    if staging.exists() and not (staging / JOB_FILE).is_file():
        raise FileExistsError(f"{staging} exists and is not a build of `mmllm search index` (no {JOB_FILE}); move "
                              "it, or choose another --out")
    interrupted = args.resume and (staging / JOB_FILE).is_file()  # the first run's checks of --out passed
    ours = _index_meta(args.out / INDEX_META_FILE)  # a meta.json an index wrote, not a user's file of that name
    if ours and not args.overwrite and not interrupted:
        raise FileExistsError(f"{args.out} already holds an index; pass --overwrite to replace it")
    theirs = [name for name in written if not ours and not interrupted and (args.out / name).exists()]
    if theirs:  # not an index this command wrote: those files are the user's
        raise FileExistsError(f"{args.out} holds {', '.join(theirs)}, which the index would write over; "
                              "choose a new or empty folder")


def _build(args: argparse.Namespace, staging: Path, written: Sequence[str], reader: CatalogReader,
           policy: ImagePolicy, bundle: Predictor) -> int:
    """The build itself, under ``--out``'s build lock (:func:`_run_index` checked the paths)."""
    bundle.batch_size = args.batch_size
    template = getattr(bundle, "template", None)
    job = {"format": 1, "model": _model_ref(args.model), "model_sha256": _model_files(args.model),
           "pooling": args.pooling, "catalog": str(args.catalog.resolve()),
           "image_root": str(Path(policy.root).resolve()) if policy.root else None,
           "schema_sha256": _digest(bundle.schema.to_dict()),  # the prompt a listing is embedded with
           "template_sha256": _digest(_template_key(template)) if template is not None else None}
    done_ids = _staged_ids(staging, job, args.resume)
    meta = {**{k: v for k, v in job.items() if k not in ("schema_sha256", "template_sha256")},
            "template": getattr(template, "version", None), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    total_bytes = byte_total([args.catalog])
    text_file = total_bytes is not None
    progress = Progress("index", total_bytes=total_bytes,
                        unit="listings", enabled=not args.quiet)
    chunks = _Chunks(staging, len(done_ids))
    batch: list[Listing] = []
    bad = resumed = 0

    def flush() -> None:
        chunks.add(embed_in_batches(bundle, batch, policy, args.pooling), [_record(listing) for listing in batch])
        progress.update(len(batch), bytes_done=reader.progress()[0] if text_file else None)
        batch.clear()

    try:
        for row in reader:
            if isinstance(row, RowError):
                print(f"BAD  {row}; skipped", file=sys.stderr)
                bad += 1
                continue
            if row.id in done_ids:  # embedded before the interruption: kept in the staging folder
                resumed += 1
                continue
            batch.append(row)
            if len(batch) == args.batch_size:
                flush()
        if batch:
            flush()
        chunks.write()
    except KeyboardInterrupt:
        chunks.write()  # what was embedded is kept: --resume goes on from it
        progress.close()
        print(f"\ninterrupted: {chunks.rows:,} listings embedded and kept in {staging}; run the same command with "
              "--resume to go on", file=sys.stderr)
        return 130
    progress.close()
    if resumed:
        print(f"resumed: {resumed:,} listings were embedded before, {chunks.rows - resumed:,} now", file=sys.stderr)
    if not chunks.rows:
        print(f"error: {args.catalog}: no valid listing to index ({bad} bad rows)", file=sys.stderr)
        return 1
    try:
        index = chunks.index(meta, args.index_type)
        bundle.schema.to_yaml(staging / SCHEMA_FILE)  # queries must render the very prompt the catalog did
        if template is not None:
            template.save_to(staging)
        index.save(staging)
        _swap_in(staging, args.out, written)
    except KeyboardInterrupt:
        print(f"\ninterrupted while writing the index: the {chunks.rows:,} embedded listings are kept in {staging}; "
              "run the same command with --resume to write it", file=sys.stderr)
        return 130
    print(f"indexed {len(index):,} listings ({bad} bad rows skipped), {index.meta['dim']} dims, {args.index_type}, "
          f"{progress.rate:,.1f} listings/s -> {args.out}")
    return 0


STAGING_DIR = ".partial"  # inside --out: a build in progress (job.json + chunk files), removed when it is done
CHUNK_ROWS = 4096  # vectors per chunk file of a build in progress
CHUNK_SECONDS = 60.0  # ... or fewer, at least this often: an interruption loses at most a minute of embedding
JOB_FILE = "job.json"


class _Chunks:
    """The vectors of a build in progress, written to ``staging`` as ``chunk-N.npy`` + ``chunk-N.jsonl`` (the
    records; written last, so its presence means the chunk is whole)."""

    def __init__(self, staging: Path, rows: int) -> None:
        self.staging, self.rows = staging, rows
        self.vectors: list[np.ndarray] = []
        self.records: list[dict[str, Any]] = []
        self.since = time.monotonic()

    def add(self, vectors: np.ndarray, records: list[dict[str, Any]]) -> None:
        self.vectors.append(np.asarray(vectors, dtype=np.float32))
        self.records.extend(records)
        self.rows += len(records)
        if len(self.records) >= CHUNK_ROWS or time.monotonic() - self.since >= CHUNK_SECONDS:
            self.write()

    def write(self) -> None:
        """The pending vectors as the next chunk. The buffers are emptied first: a Ctrl-C half-way leaves an
        incomplete chunk (its rows embedded again on resume), never a second copy of a whole one."""
        self.since = time.monotonic()
        vectors, records = self.vectors, self.records
        self.vectors, self.records = [], []
        if not records:
            return
        number = max((int(f.name[6:12]) for f in self.staging.glob("chunk-*.jsonl")), default=0) + 1
        stem = self.staging / f"chunk-{number:06d}"
        with open(stem.with_suffix(".npy.tmp"), "wb") as f:
            np.save(f, np.concatenate(vectors), allow_pickle=False)
        os.replace(stem.with_suffix(".npy.tmp"), stem.with_suffix(".npy"))
        part = stem.with_suffix(".jsonl.tmp")
        part.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        os.replace(part, stem.with_suffix(".jsonl"))

    def index(self, meta: Mapping[str, Any], index_type: str) -> "SearchIndex":
        """Every chunk, in the order written: the index."""
        index: SearchIndex | None = None
        for records_file in sorted(self.staging.glob("chunk-*.jsonl")):
            vectors = np.load(records_file.with_suffix(".npy"), allow_pickle=False)
            records = _chunk_records(records_file)
            index = index or SearchIndex.empty(vectors.shape[1], meta, index_type)
            new = [i for i, r in enumerate(records) if r["id"] not in index]  # a chunk written twice
            index.add(vectors[new], [records[i] for i in new])
        assert index is not None
        return index


def _chunk_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _staged_ids(staging: Path, job: Mapping[str, Any], resume: bool) -> set[str]:
    """The listing ids a staging folder holds for this job (``--resume``), after checking it is the same job;
    a new build starts an empty one. A staging folder left by another build is never removed silently."""
    job_file = staging / JOB_FILE
    if not resume:
        if any(staging.glob("chunk-*.jsonl")):
            raise FileExistsError(f"{staging} holds an interrupted build: pass --resume to go on from it, or remove "
                                  "the folder to start over")
        shutil.rmtree(staging, ignore_errors=True)  # ours (job.json), stopped before its first chunk: nothing to keep
        staging.mkdir(parents=True)
        job_file.write_text(json.dumps(job, indent=2) + "\n")
        return set()
    if not job_file.is_file():
        raise FileNotFoundError(f"--resume: {staging} holds no interrupted build of {job['catalog']}; run without "
                                "--resume")
    before = json.loads(job_file.read_text())
    changed = [k for k in job if before.get(k) != job[k]]
    if changed:
        raise ValueError(f"--resume: the interrupted build in {staging} was made with other {', '.join(changed)} "
                         f"({', '.join(f'{k}={before.get(k)!r}' for k in changed)}): its vectors would not compare; "
                         "rerun it with those, or remove the folder to start over")
    for stale in staging.glob("*.tmp"):
        stale.unlink()  # a chunk cut off mid-write
    ids: set[str] = set()
    for records_file in sorted(staging.glob("chunk-*.jsonl")):
        ids.update(r["id"] for r in _chunk_records(records_file))
    for orphan in staging.glob("chunk-*.npy"):  # vectors whose records never got written: embedded again
        if not orphan.with_suffix(".jsonl").exists():
            orphan.unlink()
    return ids


def _swap_in(staging: Path, out: Path, names: Sequence[str]) -> None:
    """Move the finished index from ``staging`` into ``out``: an old index's meta.json goes first (a folder
    without it is no index, never an old meta.json over new vectors), the new one last; then the staging
    folder (its chunks) is removed. The staging folder is inside ``out``: each move is a rename, no copy.
    Loads wait the moves out (``.index.swap``): they read the old index or the new one."""
    out.mkdir(parents=True, exist_ok=True)
    with _swap_lock(out, shared=False):
        (out / INDEX_META_FILE).unlink(missing_ok=True)
        for name in names:
            if name != INDEX_META_FILE:
                if (staging / name).exists():
                    os.replace(staging / name, out / name)
                else:
                    (out / name).unlink(missing_ok=True)  # e.g. an old template a model without one leaves behind
        os.replace(staging / INDEX_META_FILE, out / INDEX_META_FILE)
    shutil.rmtree(staging, ignore_errors=True)


BUILD_LOCK = ".index.lock"  # in --out: held by the build running there (a second build into it is refused)
SWAP_LOCK = ".index.swap"  # in --out: held by a build while it moves the new index in, shared by loads


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    try:
        fd = hold(out / BUILD_LOCK)
    except Held:
        raise FileExistsError(f"{out} is being built into by another `mmllm search index` (it holds {BUILD_LOCK}); "
                              "wait for it to end, or choose another --out") from None
    try:
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _swap_lock(folder: Path, *, shared: bool) -> Iterator[None]:
    """``.index.swap`` held shared (a load) or exclusively (a build's swap). An index folder without it (built
    before it existed) or one the reader may not write to is read without it."""
    try:
        fd = os.open(folder / SWAP_LOCK, os.O_RDONLY if shared else os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def _run_query(args: argparse.Namespace) -> int:
    index = SearchIndex.load(args.index_dir)
    if args.id is not None:
        vector = index.vector(args.id)
    else:
        listing, policy = _query_listing(args)
        model = args.model or index.meta["model"]
        folder = Path(args.index_dir)
        if not args.model and looks_like_path(model) and not Path(model).exists():
            raise FileNotFoundError(f"the index was built with the model folder {model}, which is not here (moved, or "
                                    "another machine): pass --model with that folder or the same checkpoint")
        if not check_index_model(index, model) and args.model and _model_ref(args.model) != index.meta["model"]:
            raise ValueError(f"the index was built with {index.meta['model']}, not {_model_ref(args.model)}: vectors "
                             "of another model do not compare (the scores would be noise); query with that model, "
                             "or rebuild the index with `mmllm search index --model ...`")
        _check_same_prompt(folder, args.schema, args.template)
        bundle = load_model(model, schema=args.schema or folder / SCHEMA_FILE, template=args.template or folder / TEMPLATE_FILE)
        if listing.images and not getattr(bundle, "max_images", 0):
            raise ValueError(f"the model {_model_ref(model)} reads no images, so an image query would be answered "
                             "from nothing: query with --text or --listing, or index with a model that reads photos")
        vector = embed_in_batches(bundle, [listing], policy, index.meta["pooling"])[0]
    scores, positions = index.search_positions(vector, args.k)
    hits = [{"rank": rank, "score": round(float(score), 6), **index.records[p]}
            for rank, (score, p) in enumerate(zip(scores[0], positions[0]), start=1) if p >= 0]
    if args.json:
        print(json.dumps(hits, ensure_ascii=False, indent=2))
    else:
        print(f"{'rank':>4}  {'score':>7}  {'id':<20} {'category':<32} title")
        for hit in hits:
            print(f"{hit['rank']:>4}  {hit['score']:>7.4f}  {hit['id']:<20} {hit.get('category') or '-':<32} "
                  f"{_clip(hit.get('title', ''), 60)}")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    result = evaluate_index(SearchIndex.load(args.index_dir), sorted(set(args.k)), args.level)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.index_dir}: {result['queries']} queries (relevant = same category, level {result['level']}); "
          f"{result['skipped']} skipped (no other listing of their category)")
    print(f"{'K':>4}  {'Recall@K':>9}  {'capped recall':>13}  {'NDCG@K':>7}")
    if not result["queries"]:
        print("nothing to score: no listing has a gold category shared by another listing of the index")
        return 0
    for k in result["k"]:
        print(f"{k:>4}  {result[f'recall@{k}']:>9.4f}  {result[f'capped_recall@{k}']:>13.4f}  {result[f'ndcg@{k}']:>7.4f}")
    return 0


def _query_listing(args: argparse.Namespace) -> tuple[Listing, ImagePolicy]:
    """The query as a pseudo-listing, with the image policy its pictures resolve under."""
    if args.text is not None:
        if not args.text.strip():
            raise ValueError("--text is empty")
        return Listing(id="query", title=" ".join(args.text.split())), ImagePolicy()
    if args.image is not None:
        path = Path(args.image).absolute()
        policy = ImagePolicy(root=path.parent, allow_remote=False)  # the image's own folder is its root
        try:
            load_image(path.name, policy)  # an image query without its image would be meaningless
        except ImageError as exc:
            raise ValueError(f"{args.image}: {exc}") from None
        return Listing(id="query", title="", images=(path.name,)), policy  # the picture alone, no words
    text, source, root = args.listing, "--listing", Path.cwd()
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"{text}: no such listing file (or pass the listing as JSON text)")
        text, source, root = path.read_text(encoding="utf-8"), str(path), path.resolve().parent
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON: {exc.msg} at column {exc.colno}") from None
    row = parse_row({"id": "query", **raw} if isinstance(raw, dict) else raw, source=source, line=1)
    if isinstance(row, RowError):
        raise ValueError(str(row))
    return row, ImagePolicy(root=args.image_root or root, allow_remote=args.allow_remote)


def _record(listing: Listing) -> dict[str, Any]:
    record = {"id": listing.id, "title": listing.title}
    if listing.label and listing.label.get("category"):
        record["category"] = listing.label["category"]
    return record


def _index_meta(path: Path) -> bool:
    """Whether ``path`` is the meta file of an index this command wrote (its format, model and pooling)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == 1 and {"model", "pooling"} <= set(meta)


def check_index_model(index: SearchIndex, model: str) -> bool:
    """Refuse a model folder whose files differ from those the index was built with (vectors of another
    model do not compare: the results would be noise). True when the folder was checked, False when it
    cannot be (a hub id, an index written before its model's fingerprint was kept)."""
    same = same_model_files(index, model)
    if same is None:
        return False
    if not same:
        raise ValueError(f"the model folder {_model_ref(model)} is not the one the index was built with (its files "
                         "differ: retrained, or another model): rebuild the index with `mmllm search index`, or "
                         "give the folder it was built with")
    return True


def _check_same_prompt(folder: Path, schema: str | None, template: str | None) -> None:
    """A query must render the prompt the catalog was indexed with: a --schema or --template other than the
    index's copies (another taxonomy, another wording) embeds the query somewhere else, silently."""
    from mmllm.prompts import PromptTemplate
    from mmllm.schema import LabelSchema

    if schema and (folder / SCHEMA_FILE).is_file():
        if LabelSchema.from_yaml(schema).to_dict() != LabelSchema.from_yaml(folder / SCHEMA_FILE).to_dict():
            raise ValueError(f"--schema {schema} is not the schema {folder} was indexed with ({folder / SCHEMA_FILE}): "
                             "a query must be embedded as the catalog was; leave --schema out, or rebuild the index")
    if template and (folder / TEMPLATE_FILE).is_file():
        if _template_key(PromptTemplate.load(template)) != _template_key(PromptTemplate.load(folder / TEMPLATE_FILE)):
            raise ValueError(f"--template {template} is not the template {folder} was indexed with "
                             f"({folder / TEMPLATE_FILE}): leave --template out, or rebuild the index")


def _template_key(template: Any) -> list[str]:
    """What a template renders (its version and texts, its budget), not where its file lies."""
    return [template.version, template.system, template.user, repr(template.budget)]


def same_model_files(index: SearchIndex, model: str) -> bool | None:
    """Whether ``model`` is a folder with the very files the index was built with (wherever it now is); None
    when that cannot be told (a hub id, an index written before its model's fingerprint was kept)."""
    built, now = index.meta.get("model_sha256"), _model_files(model)
    return built == now if built and now else None


def _model_files(model: str) -> str | None:
    """A model folder's content fingerprint (``mmllm label`` keeps the same for --resume), so an index knows
    its model wherever the folder moves and whatever it is renamed to; None for a hub id."""
    from mmllm.labelling.output import fingerprint

    return fingerprint(Path(model))["sha256"] if Path(model).is_dir() else None


def _model_ref(model: str) -> str:
    """A local folder as an absolute path (the index may be queried from elsewhere); a hub id as is."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _level(text: str) -> int | None:
    return None if text == "full" else _positive(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmllm search", description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ix = commands.add_parser("index", help="embed a catalog and write a faiss index folder")
    ix.add_argument("--model", required=True, help="model folder from `mmllm finetune`, or a base hub id / folder (zero-shot)")
    ix.add_argument("--catalog", type=Path, required=True, help="catalog dump (.jsonl[.gz], .csv, .parquet, ...)")
    ix.add_argument("--out", type=Path, required=True, help="index folder to write")
    ix.add_argument("--schema", help="label schema YAML (zero-shot with a base checkpoint only)")
    ix.add_argument("--template", help=f"prompt template (zero-shot only; default {DEFAULT_TEMPLATE})")
    ix.add_argument("--batch-size", type=_positive, default=8, help="listings per forward pass")
    ix.add_argument("--pooling", choices=POOLINGS, default="last", help="last real token, or masked mean over tokens")
    ix.add_argument("--index-type", choices=INDEX_TYPES, default="flat",
                    help="flat = exact; hnsw = approximate graph search for large catalogs")
    ix.add_argument("--image-root", type=Path, help="folder image paths are relative to (default: the catalog's)")
    ix.add_argument("--allow-remote", action="store_true", help="fetch http(s) images (off: untrusted catalogs)")
    ix.add_argument("--overwrite", action="store_true", help="replace an existing index in --out (kept whole "
                                                                "until the new one is complete)")
    ix.add_argument("--resume", action="store_true", help="go on from an interrupted build (OUT/.partial): the "
                                                          "listings embedded before are not embedded again")
    ix.add_argument("--quiet", action="store_true", help="no progress output")
    ix.set_defaults(run=_run_index)

    q = commands.add_parser("query", help="the k listings most similar to a listing, an image or a text")
    q.add_argument("index_dir", type=Path)
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--id", help="an indexed listing (its stored vector; no model needed)")
    what.add_argument("--listing", help="a listing as JSON text or a file holding one JSON object")
    what.add_argument("--image", help="an image file")
    what.add_argument("--text", help="free text, embedded as a listing with this title")
    q.add_argument("--model", help="model to embed the query (default: the index's own)")
    q.add_argument("--schema", help="label schema for a base model (default: the index's copy)")
    q.add_argument("--template", help="prompt template for a base model (default: the index's copy)")
    q.add_argument("-k", type=_positive, default=10, help="results to show")
    q.add_argument("--image-root", type=Path, help="--listing: folder its image paths are relative to")
    q.add_argument("--allow-remote", action="store_true", help="--listing: fetch http(s) images")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(run=_run_query)

    ev = commands.add_parser("evaluate", help="leave-one-out Recall@K / NDCG@K over the gold categories")
    ev.add_argument("index_dir", type=Path)
    ev.add_argument("--k", type=_positive, nargs="+", default=[1, 5, 10], help="cut-offs")
    ev.add_argument("--level", type=_level, default=None, metavar="full|N",
                    help="relevance: same full category path (default), or same first N levels (1 = top level)")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.set_defaults(run=_run_evaluate)
    return p


if __name__ == "__main__":
    from mmllm import interrupt

    interrupt.run(main)
