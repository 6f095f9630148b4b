"""Where a labelling pass spends its time: the device's kernels against the host's work around them.

One labelling job over the same rows, twice after a warm-up pass:

* under ``torch.profiler``: the time the device spends in kernels (on CPU: in the operators), the
  number of kernel launches, and the forward passes' wall time from hooks, per decoding step;
* under ``cProfile``: the host functions with the most time of their own (the model's Python per
  layer, ``generate``'s loop, the grammar, the confidence recorder, ...).

    python benchmarks/decode_profile.py              # CPU, tiny:qwen2_vl
    python benchmarks/decode_profile.py --gpu        # real-size Qwen2-VL-2B, random weights

Prints both tables and writes benchmarks/results/decode_profile[_gpu].json.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from label_throughput import ForwardTimer, load, make_dump, random_model_dir, run_job  # noqa: E402


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def device_time(profile, gpu: bool) -> tuple[float, int]:
    """Seconds of device kernels (CPU: of top-level operators) and how many kernels ran."""
    if gpu:
        kernels = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return sum(e.time_range.elapsed_us() for e in kernels) / 1e6, len(kernels)
    ops = profile.key_averages()
    return sum(e.self_cpu_time_total for e in ops) / 1e6, sum(e.count for e in ops)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="generation budget (constrained decoding raises it to the longest valid answer)")
    parser.add_argument("--template", default="listing_v1")
    parser.add_argument("--top", type=int, default=20, help="host functions listed")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        print("--gpu needs a CUDA device", file=sys.stderr)
        return 2
    os.environ.setdefault("MMLLM_CACHE", str(Path(tempfile.gettempdir()) / "mmllm-bench-cache"))
    from mmllm.tiny import resolve

    constrained = importlib.util.find_spec("xgrammar") is not None
    schema = ROOT / "examples/toys_schema.yaml"
    results: dict = {"constrained": constrained, "rows": args.rows, "batch": args.batch, "template": args.template,
                     "max_new_tokens": args.max_new_tokens}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp_name:
        tmp = Path(tmp_name)
        say("building / loading the model")
        model_dir = random_model_dir() if args.gpu else Path(resolve("tiny:qwen2_vl"))
        dump = make_dump(tmp / "rows", args.rows, with_images=True)
        predictor = load(str(model_dir), schema, constrained, args.batch, args.max_new_tokens, template=args.template)
        if args.gpu:
            from mmllm.collator import set_pixel_budget

            set_pixel_budget(predictor.processor, 128 * 28 * 28, 448 * 448)
        say("warm-up pass")
        run_job(predictor, dump, args.batch, tmp / "warm.jsonl")

        say("profiler pass")
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if args.gpu else [])
        with ForwardTimer(predictor.model) as timer, torch.profiler.profile(activities=activities) as profile:
            started = time.perf_counter()
            summary = run_job(predictor, dump, args.batch, tmp / "profiled.jsonl")
            wall = time.perf_counter() - started
        device_s, kernels = device_time(profile, args.gpu)
        steps = max(timer.steps, 1)
        results["profiler"] = {
            "wall_s": round(wall, 3), "model_s": round(summary.model_s, 3), "prefill_s": round(timer.prefill_s, 3),
            "decode_s": round(timer.decode_s, 3), "decode_steps": timer.steps, "forward_passes": timer.steps + timer.prefills,
            "device_kernel_s" if args.gpu else "operator_s": round(device_s, 3), "kernels" if args.gpu else "operators": kernels,
            "kernels_per_forward" if args.gpu else "operators_per_forward": round(kernels / max(timer.steps + timer.prefills, 1)),
            "decode_ms_per_step": round(timer.decode_s / steps * 1000, 2),
        }
        say(f"profiler pass: {results['profiler']}")

        say("cProfile pass")
        host = cProfile.Profile()
        host.enable()
        started = time.perf_counter()
        run_job(predictor, dump, args.batch, tmp / "cprofiled.jsonl")
        wall = time.perf_counter() - started
        host.disable()
    stats = pstats.Stats(host)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[: args.top]  # by time of their own
    results["host"] = {"wall_s": round(wall, 3), "top_own_time": [
        {"function": f"{Path(file).name}:{line}:{name}", "calls": calls, "own_s": round(own, 3), "cumulative_s": round(cum, 3)}
        for (file, line, name), (_, calls, own, cum, _) in rows]}

    device = torch.cuda.get_device_name(0) if args.gpu else f"CPU, {os.cpu_count()} cores"
    p = results["profiler"]
    print(f"\n{device}, torch {torch.__version__}; {args.rows} rows, batch {args.batch}, {args.template}, "
          f"{'constrained' if constrained else 'unconstrained'}")
    kind = "device kernels" if args.gpu else "operators (CPU)"
    print(f"labelling pass {p['wall_s']} s; forward passes {p['forward_passes']} ({p['decode_steps']} decoding steps, "
          f"{p['decode_ms_per_step']} ms each); {kind}: {device_s:.3f} s in {kernels:,} "
          f"({kernels / max(p['forward_passes'], 1):.0f} a forward pass)")
    print(f"\nhost functions by own time (cProfile pass, {results['host']['wall_s']} s)")
    print(f"{'own s':>8} {'cum s':>8} {'calls':>9}  function")
    for r in results["host"]["top_own_time"]:
        print(f"{r['own_s']:>8} {r['cumulative_s']:>8} {r['calls']:>9}  {r['function']}")
    out = args.out or HERE / "results" / ("decode_profile_gpu.json" if args.gpu else "decode_profile.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "decode_profile", "date": time.strftime("%Y-%m-%d"), "device": device,
                               "torch": torch.__version__, **results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
