"""Search index speed: build rate and query latency of the flat and HNSW faiss indexes.

Random L2-normalized float32 vectors of dim 1536 (Qwen2-VL-2B's hidden size) at 10k and 100k
vectors go through :class:`mmllm.search.SearchIndex` (so the id records are part of the build):

* build rate: vectors added per second (flat: a copy; HNSW: graph construction, M=32);
* query latency: one batch of 100 queries at k=10, in ms per query (median of 5 runs);
* HNSW recall@1 and recall@10 against the exact flat answer for the same queries (efSearch 64,
  as shipped): the share of the exact top 1 / top 10 that HNSW returns.

The queries are indexed vectors plus noise, so each has a true nearest neighbour (recall@1 asks
whether HNSW finds it); their other neighbours are near-orthogonal noise. Uniformly
random vectors are HNSW's hardest case (no cluster structure), so its recall here is a lower
bound; real listing embeddings cluster by category. Embedding cost is not measured here: it is
a model forward pass per listing (see ``benchmarks/label_throughput.py`` for model speed).

    python benchmarks/search.py [--sizes 10000 100000] [--dim 1536]

Prints a table and writes benchmarks/results/search.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mmllm.search import SearchIndex  # noqa: E402

QUERIES, K, REPEATS = 100, 10, 5


def normalized(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def measure(vectors: np.ndarray, queries: np.ndarray, index_type: str) -> tuple[dict, np.ndarray]:
    """Build one index over ``vectors`` and time it; also return its top-K positions per query."""
    ids = [f"v{i}" for i in range(len(vectors))]
    started = time.perf_counter()
    index = SearchIndex.build(vectors, ids, {"model": "random"}, index_type)
    build_s = time.perf_counter() - started
    timings = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        _, positions = index.search_positions(queries, K)
        timings.append(time.perf_counter() - started)
    row = {"vectors": len(vectors), "index": index_type, "build_s": round(build_s, 2),
           "build_vectors_per_s": round(len(vectors) / build_s),
           "query_ms_per_query": round(statistics.median(timings) / len(queries) * 1000, 3)}
    return row, positions


def main(argv: list[str] | None = None) -> int:
    import faiss

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "search.json")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    results = []
    for n in args.sizes:
        vectors = normalized(rng, n, args.dim)
        picked = rng.choice(n, QUERIES, replace=False)
        queries = vectors[picked] + 0.5 / np.sqrt(args.dim) * rng.standard_normal((QUERIES, args.dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        flat, exact = measure(vectors, queries, "flat")
        hnsw, approx = measure(vectors, queries, "hnsw")
        hnsw["recall_at_1_vs_exact"] = round(float(np.mean(approx[:, 0] == exact[:, 0])), 3)
        hnsw["recall_at_10_vs_exact"] = round(float(np.mean([len(set(a) & set(e)) / K for a, e in zip(approx, exact)])), 3)
        flat["memory_mb"] = hnsw["memory_mb"] = round(n * args.dim * 4 / 2**20)  # the vectors; HNSW adds ~256 B/vector
        results += [flat, hnsw]
        del vectors  # the indexes hold their own copy; free everything before the next size

    print(f"dim {args.dim}, {faiss.omp_get_max_threads()} faiss threads, batch of {QUERIES} queries, k={K}")
    print(f"{'vectors':>8} {'index':<5} {'build s':>8} {'vectors/s':>10} {'ms/query':>9} {'recall@1':>9} {'recall@10':>10}")
    for r in results:
        print(f"{r['vectors']:>8,} {r['index']:<5} {r['build_s']:>8} {r['build_vectors_per_s']:>10,} "
              f"{r['query_ms_per_query']:>9} {r.get('recall_at_1_vs_exact', 'exact'):>9} "
              f"{r.get('recall_at_10_vs_exact', 'exact'):>10}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "search", "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(), "dim": args.dim, "queries": QUERIES, "k": K,
        "results": results,
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
