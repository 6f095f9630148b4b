"""Classification heads vs generative labelling: listings/s on the same backbone and batch size.

The head needs one forward pass over the prompt; generation needs that prefill plus one step per
answer token. Both run through the same labelling job (``mmllm.labelling.engine.run_local``), same rows,
same compact prompt, same batch size; generation is schema-constrained as shipped (unconstrained,
with a note, where xgrammar is not installed: then every answer runs to ``--max-new-tokens``).

    python benchmarks/classify_vs_generate.py [--rows 64] [--batch 8]          # CPU, tiny:qwen2_vl
    python benchmarks/classify_vs_generate.py --gpu [--rows 16]                 # real-size Qwen2-VL-2B, random weights

Prints a table and writes benchmarks/results/classify_vs_generate[_gpu].json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from label_throughput import make_dump, random_model_dir, run_job  # noqa: E402  (benchmark helpers, same folder)


STARTED = time.perf_counter()


def say(message: str) -> None:
    """A progress line on stderr, with the seconds since the start."""
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def build_backbone(gpu: bool, tmp: Path) -> str:
    """A model folder: the tiny checkpoint on CPU; a real-size Qwen2-VL-2B with random weights on GPU."""
    from mmllm.tiny import resolve

    return str(random_model_dir()) if gpu else resolve("tiny:qwen2_vl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--rows", type=int, help="listings labelled by each variant (default: 64; --gpu 16)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="generation budget (constrained decoding raises it to the longest valid answer)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        print("--gpu needs a CUDA device", file=sys.stderr)
        return 2
    rows = args.rows or (16 if args.gpu else 64)
    constrained = importlib.util.find_spec("xgrammar") is not None
    if not constrained:
        say(f"note: xgrammar is not installed, generation runs unconstrained ({args.max_new_tokens} new tokens a row)")
    os.environ.setdefault("MMLLM_CACHE", str(Path(tempfile.gettempdir()) / "mmllm-bench-cache"))
    from mmllm.label import load_predictor
    from mmllm.models.classifier import ClassifierPredictor, ListingClassifier
    from mmllm.models.heads import head_specs, hidden_size

    schema_path = ROOT / "examples/toys_schema.yaml"
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp_name:
        tmp = Path(tmp_name)
        say("building the model" + (" (real-size Qwen2-VL-2B, random weights)" if args.gpu else ""))
        model_dir = build_backbone(args.gpu, tmp)
        dump = make_dump(tmp / "rows", rows, with_images=True)
        generative = load_predictor(model_dir, schema=str(schema_path), template="listing_compact_v1", constrained=constrained,
                                    max_new_tokens=args.max_new_tokens, batch_size=args.batch, min_pixels=None, max_pixels=None)
        labels = [json.loads(line)["label"] for line in (ROOT / "examples/amazon_uk_toys/train.jsonl").read_text().splitlines()]
        heads = ListingClassifier(generative.model, hidden_size(generative.model), head_specs(generative.schema, labels))
        heads.heads.to(next(generative.model.parameters()).device)
        classifier = ClassifierPredictor(heads.eval(), generative.processor, generative.schema, generative.template,
                                         generative.max_images, args.batch)
        say(f"model loaded; warming up both variants on {rows} rows")
        run_job(classifier, dump, args.batch, tmp / "warm.jsonl")  # warm caches and the grammar compiler
        run_job(generative, dump, args.batch, tmp / "warm.jsonl")
        generative_name = "generative (constrained)" if constrained else "generative (unconstrained)"
        for name, predictor in (("classification heads", classifier), (generative_name, generative)):
            summary = run_job(predictor, dump, args.batch, tmp / f"{name[:4]}.jsonl")
            results.append({"variant": name, "rows": summary.rows, "ok": summary.ok, "batch": args.batch,
                            "rows_per_s": round(summary.rows / summary.wall_s, 2), "model_s": round(summary.model_s, 3)})
            say(f"{name}: {summary.rows} rows, {results[-1]['rows_per_s']} rows/s")
    ratio = round(results[0]["rows_per_s"] / results[1]["rows_per_s"], 1)
    device = torch.cuda.get_device_name(0) if args.gpu else f"CPU, {os.cpu_count()} cores"
    print(f"\n{device}, torch {torch.__version__}, batch {args.batch}, {rows} rows (1 in 3 with an image)")
    print(f"{'variant':<26} {'rows/s':>8} {'model s':>8}")
    for r in results:
        print(f"{r['variant']:<26} {r['rows_per_s']:>8} {r['model_s']:>8}")
    print(f"classification heads are {ratio}x faster")
    out = args.out or HERE / "results" / ("classify_vs_generate_gpu.json" if args.gpu else "classify_vs_generate.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "classify_vs_generate", "date": time.strftime("%Y-%m-%d"), "device": device,
                               "constrained": constrained, "max_new_tokens": args.max_new_tokens, "results": results, "speedup": ratio}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
