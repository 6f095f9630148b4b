"""What one ``generate`` call costs outside the model, at the real-size vocabulary (issue #16).

The tiny Qwen2-VL with the real-size toy tokenizer (``tiny:qwen2_vl:real``: 151,665 tokens, a
151,936-row output layer, small elsewhere) labels the same 8 Amazon rows (``listing_compact_v1``,
one batch) many times; each call's wall time is split three ways:

* the model's forward passes (timed by hooks around the model);
* ``generate``'s own work around them: its set-up, its loop, the logits processors (the grammar's
  mask, the confidence recorder) and the greedy pick, per step over the whole vocabulary;
* mmllm's own work around ``generate`` (``GenerativePredictor.generate_scored``: moving the batch,
  the prefix cache for it, the grammar's processor, the answer's token spans and log-probabilities),
  per call: mean, median and largest. The batch is encoded once, as the labelling engine's workers
  encode it (with the prefix cache on, that includes laying its tokens out behind the prefix).

Unconstrained with 1 and 8 new tokens (answers of a fixed length: what a call costs before its
steps, and what each step adds), and constrained (the grammar raises the budget to its bound and the
random model's answers run long).

Under the labelling engine's malloc setting (``mmllm.host_memory.reuse_step_buffers``) unless
``--malloc`` says otherwise: a step's scores over the vocabulary are blocks of MBs, and mapping them
afresh every step (the training setting) costs page faults.

    python benchmarks/generate_overhead.py [--calls 20] [--malloc labelling|training|default]

Prints a table and writes benchmarks/results/generate_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def measure(constrained: bool, new_tokens: int, calls: int, rows: int = 8, own_loop: bool = True) -> dict:
    """Mean milliseconds per call: whole, in forward passes, in generate around them, in mmllm around generate."""
    from mmllm.catalog import load_listings
    from mmllm.label import load_predictor

    listings = load_listings(ROOT / "examples/amazon_uk_toys/dev.jsonl")[:rows]
    predictor = load_predictor("tiny:qwen2_vl:real", schema=str(ROOT / "examples/toys_schema.yaml"),
                               template="listing_compact_v1", batch_size=rows, constrained=constrained,
                               max_new_tokens=new_tokens)
    predictor.own_loop = own_loop
    enc = predictor.encode(listings, [[] for _ in listings])
    model = predictor.model
    spent = {"forward": 0.0, "generate": 0.0, "passes": 0, "in_generate": 0.0, "inside": False}

    def before(module, args, kwargs):
        spent["started"] = time.perf_counter()

    def after(module, args, output):
        seconds = time.perf_counter() - spent["started"]
        spent["forward"] += seconds
        spent["in_generate"] += seconds if spent["inside"] else 0.0
        spent["passes"] += 1

    from mmllm.models.greedy_loop import decoding_step

    step = decoding_step(model)  # mmllm's loop: generate prefills and picks the first token, the loop the rest
    modules = [model] + ([step] if step is not None else [])
    hooks = [h for m in modules for h in (m.register_forward_pre_hook(before, with_kwargs=True), m.register_forward_hook(after))]
    generate = model.generate

    def timed_generate(*args, **kwargs):
        started, spent["inside"] = time.perf_counter(), True
        try:
            return generate(*args, **kwargs)
        finally:
            spent["generate"] += time.perf_counter() - started
            spent["inside"] = False

    model.generate = timed_generate
    own = []  # per call: its wall time less generate's and the loop's forward passes, ms
    try:
        predictor.generate_scored(enc)  # warm-up: the grammar, the prefix cache, the answer pieces
        spent.update(forward=0.0, generate=0.0, passes=0, in_generate=0.0)
        started = time.perf_counter()
        for _ in range(calls):
            before, in_generate = time.perf_counter(), spent["generate"]
            loop_forward = spent["forward"] - spent["in_generate"]
            predictor.generate_scored(enc)
            loop_forward = spent["forward"] - spent["in_generate"] - loop_forward
            own.append((time.perf_counter() - before - (spent["generate"] - in_generate) - loop_forward) * 1000)
        whole = time.perf_counter() - started
    finally:
        model.generate = generate
        for hook in hooks:
            hook.remove()
    ms = 1000 / calls
    return {"constrained": constrained, "max_new_tokens": new_tokens, "rows": rows, "calls": calls,
            "steps_per_call": round(spent["passes"] / calls, 1), "call_ms": round(whole * ms, 2),
            "forward_ms": round(spent["forward"] * ms, 2),
            "generate_outside_forward_ms": round((spent["generate"] - spent["in_generate"]) * ms, 2),
            "mmllm_outside_generate_ms": round((whole - spent["generate"] - (spent["forward"] - spent["in_generate"])) * ms, 2),
            "outside_forward_per_step_ms": round((whole - spent["forward"]) / max(spent["passes"], 1) * 1000, 3),
            "mmllm_outside_generate_median_ms": round(statistics.median(own), 2),
            "mmllm_outside_generate_max_ms": round(max(own), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20, help="timed calls per setting (after one warm-up call)")
    parser.add_argument("--malloc", choices=["labelling", "training", "default"], default="labelling",
                        help="glibc malloc setting (mmllm.host_memory): labelling, as mmllm label sets it; training, "
                             "as train_loop sets it on the CPU; default, glibc's own (one setting per process)")
    parser.add_argument("--generate", action="store_true",
                        help="every step by transformers' generate (mmllm's greedy loop off), for comparison")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from mmllm.host_memory import return_large_frees_to_os, reuse_step_buffers

    if args.malloc != "default":
        {"labelling": reuse_step_buffers, "training": return_large_frees_to_os}[args.malloc]()
    os.environ.setdefault("MMLLM_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "mmllm-bench-cache"))
    own = not args.generate
    rows = [measure(False, 1, args.calls, own_loop=own), measure(False, 8, args.calls, own_loop=own),
            measure(True, 8, max(args.calls // 2, 5), own_loop=own)]
    device = f"CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"\n{device}; tiny:qwen2_vl:real (151,936 output rows), batch 8, listing_compact_v1, malloc {args.malloc}, "
          f"decoding by {'generate' if args.generate else 'mmllm loop'}; ms per generate call")
    print("forward: the model's passes (generate's prefill and, where mmllm's loop decodes, its steps); generate, rest: "
          "generate around its passes; mmllm, rest: the rest (its loop's grammar, argmax and stops per step included)")
    print(f"{'decoding':<14} {'new tokens':>10} {'calls':>6} {'steps':>6} {'call':>8} {'forward':>8} {'generate, rest':>14} "
          f"{'mmllm, rest (mean / median / max)':>34} {'outside the model, per step':>28}")
    for r in rows:
        mmllm = (f"{r['mmllm_outside_generate_ms']} / {r['mmllm_outside_generate_median_ms']} / "
                 f"{r['mmllm_outside_generate_max_ms']}")
        print(f"{'constrained' if r['constrained'] else 'free':<14} {r['max_new_tokens']:>10} {r['calls']:>6} "
              f"{r['steps_per_call']:>6} {r['call_ms']:>8} {r['forward_ms']:>8} {r['generate_outside_forward_ms']:>14} "
              f"{mmllm:>34} {r['outside_forward_per_step_ms']:>28}")
    out = args.out or HERE / "results" / "generate_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "generate_overhead", "date": time.strftime("%Y-%m-%d"), "device": device,
                               "torch": torch.__version__, "malloc": args.malloc, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
