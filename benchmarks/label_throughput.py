"""Labelling throughput: batching, constrained-decoding overhead, pipeline cost, memory.

CPU mode (default), a tiny random Qwen2-VL (``tiny:qwen2_vl``) zero-shot with the toy schema:

* rows/s at batch 1, 8 and 32 on the same rows (constrained decoding, as shipped), with the
  compact template of fine-tuned models and with the two zero-shot templates that carry the
  whole taxonomy: ``listing_v1`` (listing first, then the schema) and ``listing_v2`` (the schema
  first: its ~2,400 shared tokens are encoded once, ``mmllm/models/prefix_cache.py``);
* where a batch of 8 spends its time: prefill (the prompt's forward pass), decoding steps, and
  ``generate``'s own loop (grammar, stopping) around them; the shared prompt prefix per template;
* the prefix cache off vs on at batch 8 for both zero-shot templates, with the outputs compared
  row by row (they must be identical);
* the masked SDPA kernel vs each row of the padded batch alone (``sdpa_unpadded``, the CPU default:
  ``mmllm/models/unpadded_attention.py``) at batch 8 for every template, outputs compared the same way;
* batch 8 once more in two forked one-thread replicas (``mmllm label --replicas 2``,
  ``mmllm/labelling/replicas.py``) for every template, outputs compared the same way;
* constrained vs unconstrained decoding: time per decoding step (the answers differ in length,
  so per-step time is the fair comparison);
* time per row outside the model: reading, images, prompt, tokens (worker threads) and
  parsing, validation and writing (main thread), from the job's own timers;
* peak memory labelling 1k vs 50k rows (a short prompt and one new token, so the pipeline and
  not the model dominates; each size in a fresh process).

Real-size CPU mode (``--real-size``): the Qwen2.5-VL-3B widths with one text layer and one vision
block (446M parameters, random weights, the 151,936-row output layer) and the real-size-vocabulary
tiny tokenizer; one batch of 8 rows, constrained, ``listing_v1`` and ``listing_v2`` with the prefix
cache off and on, and ``listing_v1`` once more with the masked SDPA kernel instead of each row alone
(``mmllm/models/unpadded_attention.py``): where prefill and decoding costs stand when the weights,
not the attention, are the work (several minutes).

GPU mode (``--gpu``): a real-size Qwen2-VL-2B built from its config with random weights, rows/s,
prefill seconds and ms per decoding step at batch 1 / 8 / 32; constrained when xgrammar is installed,
else unconstrained (said, and recorded as ``constrained`` in the JSON). With ``--static-cache``: batch 8
with the static decoding cache against the growing cache, its decoding step compiled each way of
``--compile`` (none; the eager kernels captured as CUDA graphs; inductor's own kernels), two passes
over the same rows each (the first compiles), the answers compared row by row.

Against older code (``--against DIR``, on the CPU's tiny checkpoint or with ``--gpu`` the real-size
model): ``listing_v1`` at batch 8 (the template and batch of issue #16's throughput point) labelled by
this checkout and by the ``mmllm/`` and ``prompts/`` in DIR, alternately, each run a fresh ``mmllm
label`` process on the same rows and model folder: the rows/s each run prints and its answers against
this checkout's, each turn's ratio (its two runs follow each other), their geometric mean and the ratio
of the medians; with ``--replicas N`` a third run per turn, this checkout with ``mmllm label --replicas N``
(the model forked into N single-thread processes). For the code the issue was filed against: ``mkdir -p T && git archive ba0d89d mmllm
prompts | tar -x -C T`` (``benchmarks/gpu_wheels.sh`` packs it for the GPU machine).

    python benchmarks/label_throughput.py [--rows 64] [--memory-rows 1000 50000]
    python benchmarks/label_throughput.py --real-size [--rows 8]
    python benchmarks/label_throughput.py --gpu [--static-cache]
    python benchmarks/label_throughput.py [--gpu] --against DIR [--rows 32] [--against-runs 2] [--replicas 2]

Prints a table and writes benchmarks/results/label_throughput[_gpu|_static_gpu|_against[_gpu]].json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def make_dump(folder: Path, rows: int, with_images: bool) -> Path:
    """Real listing text (the Amazon examples, cycled) and drawn pictures on every third row."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    source = [json.loads(line) for line in (ROOT / "examples/amazon_uk_toys/dev.jsonl").read_text().splitlines()]
    if with_images:
        (folder / "img").mkdir(exist_ok=True)
        for k in range(8):
            image = Image.new("RGB", (320, 320), "white")
            ImageDraw.Draw(image).ellipse([40 + k * 5, 60, 280, 260], fill=(30 * k, 120, 200 - 20 * k))
            image.save(folder / "img" / f"{k}.png")
    with open(folder / "dump.jsonl", "w", encoding="utf-8") as f:
        for i in range(rows):
            row = dict(source[i % len(source)], id=f"row-{i}")
            row.pop("label", None)
            row["images"] = [f"img/{i % 8}.png"] if with_images and i % 3 == 0 else []
            f.write(json.dumps(row) + "\n")
    return folder / "dump.jsonl"


def random_model_dir(out: Path | None = None, *, text_layers: int | None = None, vision_depth: int | None = None,
                     device: str = "cuda") -> Path:
    """A real-size Qwen2-VL-2B with random weights (bf16), built on ``device`` and saved to ``out``
    (default: a folder under ``MMLLM_CACHE``, which ``classify_vs_generate.py --gpu`` and
    ``decode_profile.py --gpu`` then reuse: a folder finished earlier, its ``.complete`` marker written
    last, is not built again). ``text_layers`` / ``vision_depth`` keep fewer layers (the CPU test).

    It borrows the tokenizer and processor of ``tiny:qwen2_vl:real``: the real vocabulary's size
    (151,665 tokens, so the grammar's mask and the answer's decoding cost what they cost with the real
    one) and its special tokens at the real ids; the real tokenizer cannot be downloaded here, and
    speed depends on shapes, not on words.
    """
    sys.path.insert(0, str(HERE))
    from train_step import IDS, saved_random_model

    from mmllm.tiny import resolve

    cut = "" if text_layers is None and vision_depth is None else f"-{text_layers}-layers-{vision_depth}-blocks"
    out = out or Path(os.environ.get("MMLLM_CACHE", tempfile.gettempdir())) / f"random-qwen2_vl_2b{cut}-real-vocab"
    if (out / ".complete").exists():
        return out
    source = Path(resolve("tiny:qwen2_vl:real"))
    ids = json.loads((source / "config.json").read_text())
    wrong = {k: ids.get(k) for k, v in IDS.items() if ids.get(k) != v}
    if wrong:
        raise ValueError(f"{source}: special tokens not at the real ids: {wrong}")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        if (source / name).exists():  # first: the weights' .complete marker is what makes the folder finished
            (out / name).write_bytes((source / name).read_bytes())
    return saved_random_model("qwen2_vl_2b", out, text_layers, vision_depth, device)


def load(model: str, schema: Path, constrained: bool, batch: int, max_new_tokens: int, template: str | None = None):
    from mmllm.label import load_predictor

    return load_predictor(model, schema=str(schema), template=template, constrained=constrained,
                          max_new_tokens=max_new_tokens, batch_size=batch, min_pixels=None, max_pixels=None)


def run_job(predictor, dump: Path, batch: int, out: Path, replicas: int = 1):
    from mmllm.labelling.engine import LabelOptions, run_local
    from mmllm.labelling.output import Output

    out.unlink(missing_ok=True)
    with Output(out, None, resume=False, inputs=[dump]) as output:
        return run_local(predictor, [dump], output, LabelOptions(batch_size=batch, quiet=True, replicas=replicas,
                                                                 roots={dump.name: dump.parent.resolve()}))


class ForwardTimer:
    """Seconds in the model's forward passes, split into prefill (more than one new token per row)
    and decoding steps (one), counted by hooks while the ``with`` block runs."""

    def __init__(self, model) -> None:
        self.model, self.prefill_s, self.decode_s, self.prefills, self.steps = model, 0.0, 0.0, 0, 0

    def __enter__(self) -> "ForwardTimer":
        cuda = next(self.model.parameters()).is_cuda  # kernels run asynchronously: wait for them at both ends

        def before(module, args, kwargs):
            ids = kwargs.get("input_ids")
            if cuda:
                torch.cuda.synchronize()
            self._tokens, self._started = (ids.shape[1] if ids is not None else 1), time.perf_counter()

        def after(module, args, output):
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self._started
            if self._tokens > 1:
                self.prefill_s, self.prefills = self.prefill_s + seconds, self.prefills + 1
            else:
                self.decode_s, self.steps = self.decode_s + seconds, self.steps + 1

        from mmllm.models.greedy_loop import decoding_step

        # mmllm's greedy loop runs its decoding steps through a module of its own, beside the model
        modules = [self.model] + [m for m in [decoding_step(self.model)] if m is not None]
        self._hooks = [hook for module in modules for hook in (module.register_forward_pre_hook(before, with_kwargs=True),
                                                                module.register_forward_hook(after))]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()


def prompt_tokens(predictor, dump: Path) -> dict:
    """Mean prompt tokens of ``dump``'s rows (text only) and how many of them every row shares."""
    from mmllm.catalog import load_listings
    from mmllm.models.prefix_cache import shared_prefix_ids

    rows = load_listings(dump)
    enc = predictor.encode(rows, [[] for _ in rows])
    return {"mean_prompt_tokens": round(float(enc["attention_mask"].sum(1).float().mean()), 1),
            "shared_prefix_tokens": len(shared_prefix_ids(predictor.processor, predictor.schema, predictor.template))}


def same_outputs(a: Path, b: Path) -> tuple[int, int]:
    """(rows whose category and attributes agree, rows) between two label files, matched by id."""
    def answers(path: Path) -> dict:
        return {r["id"]: (r.get("category"), r.get("attributes")) for r in map(json.loads, path.read_text().splitlines())}

    left, right = answers(a), answers(b)
    return sum(left[k] == right.get(k) for k in left), len(left)


def decode_steps(predictor, dump: Path, batch: int, tmp: Path, out: Path | None = None) -> tuple[float, int]:
    """(seconds inside generate, decoding steps) for labelling ``dump``; steps counted by a hook."""
    steps = {"n": 0}
    original = predictor.model.generate

    def counting_generate(*args, **kwargs):
        out = original(*args, **kwargs)
        steps["n"] += out.shape[1] - kwargs["input_ids"].shape[1]
        return out

    from mmllm.models.greedy_loop import decoding_step

    predictor.model.generate = counting_generate  # mmllm's loop asks generate for the first token only
    step = decoding_step(predictor.model)  # and runs the others through its own step module
    hook = step.register_forward_hook(lambda *_: steps.__setitem__("n", steps["n"] + 1)) if step is not None else None
    try:
        summary = run_job(predictor, dump, batch, out or tmp / "steps.jsonl")
    finally:
        predictor.model.generate = original
        if hook is not None:
            hook.remove()
    return summary.model_s, steps["n"]


MEMORY_CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from mmllm.label import main
code = main([{dump!r}, "--model", "tiny:qwen2_vl", "--schema", {schema!r}, "--template", {template!r}, "--out", {out!r},
             "--batch-size", "32", "--no-constrained", "--max-new-tokens", "1", "--quiet"])
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(json.dumps({{"peak_mib": int(line.split()[1]) / 1024, "code": code}}))
"""


def memory_run(tmp: Path, rows: int, schema: Path, template: Path) -> dict:
    dump = make_dump(tmp / f"mem{rows}", rows, with_images=False)
    out = tmp / f"mem{rows}.jsonl"
    code = MEMORY_CHILD.format(root=str(ROOT), dump=str(dump), schema=str(schema), template=str(template), out=str(out))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    peak = json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]
    lines = sum(1 for _ in open(out))
    return {"rows": rows, "lines": lines, "peak_mib": round(peak, 1), "rows_per_s": round(rows / wall, 1)}


TEMPLATES = ("listing_compact_v1", "listing_v1", "listing_v2")


def cpu(args: argparse.Namespace) -> dict:
    from mmllm.models import unpadded_attention

    schema = ROOT / "examples/toys_schema.yaml"
    results: dict = {"batching": [], "phases": [], "prefix_cache": [], "attention": [], "replicas": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        dump = make_dump(tmp / "rows", args.rows, with_images=True)
        for template in TEMPLATES:
            batches = []
            predictor = load("tiny:qwen2_vl", schema, True, 1, 256, template=template)
            run_job(predictor, dump, 8, tmp / "warm.jsonl")  # compile the grammar, encode the shared prefix, warm the caches
            results.setdefault("prompts", {})[template] = prompt_tokens(predictor, dump)
            for batch in (1, 8, 32):
                predictor.batch_size = batch
                with ForwardTimer(predictor.model) as timer:
                    summary = run_job(predictor, dump, batch, tmp / f"{template}-b{batch}.jsonl")
                outside = (summary.wall_s - summary.model_s) / summary.rows * 1000
                batches.append({"template": template, "batch": batch, "rows": summary.rows, "ok": summary.ok,
                                "rows_per_s": round(summary.rows / summary.wall_s, 2), "model_s": round(summary.model_s, 2),
                                "main_thread_outside_model_ms_per_row": round(outside, 2),
                                "prepare_ms_per_row": round(summary.prepare_s / summary.rows * 1000, 2)})
                if batch == 8:
                    results["phases"].append({
                        "template": template, "batch": batch, "model_s": round(summary.model_s, 2),
                        "prefill_s": round(timer.prefill_s, 2), "prefill_ms_per_batch": round(timer.prefill_s / timer.prefills * 1000),
                        "decode_s": round(timer.decode_s, 2), "decode_steps": timer.steps,
                        "decode_ms_per_step": round(timer.decode_s / timer.steps * 1000, 2),
                        "generate_loop_s": round(summary.model_s - timer.prefill_s - timer.decode_s, 2)})
            # the same batches of 8 in two forked one-thread replicas (mmllm label --replicas 2), same rows
            predictor.batch_size = 8
            summary = run_job(predictor, dump, 8, tmp / f"{template}-b8-r2.jsonl", replicas=2)
            agree, rows = same_outputs(tmp / f"{template}-b8.jsonl", tmp / f"{template}-b8-r2.jsonl")
            results["replicas"].append({"template": template, "batch": 8, "replicas": 2,
                                        "rows_per_s_one_process": next(b for b in batches if b["batch"] == 8)["rows_per_s"],
                                        "rows_per_s_replicas": round(summary.rows / summary.wall_s, 2),
                                        "identical_rows": agree, "rows": rows})
            results["batching"].extend(batches)
            results[f"speedup_32_vs_1/{template}"] = round(batches[2]["rows_per_s"] / batches[0]["rows_per_s"], 2)
            if template != "listing_compact_v1":  # the prefix cache off, same rows, same batch: the outputs must agree
                predictor.batch_size, predictor.prefix_cache = 8, False
                summary = run_job(predictor, dump, 8, tmp / f"{template}-b8-plain.jsonl")
                agree, rows = same_outputs(tmp / f"{template}-b8.jsonl", tmp / f"{template}-b8-plain.jsonl")
                on = next(b for b in batches if b["batch"] == 8)["rows_per_s"]
                results["prefix_cache"].append({"template": template, "batch": 8, "rows_per_s_off": round(summary.rows / summary.wall_s, 2),
                                                "rows_per_s_on": on, "identical_rows": agree, "rows": rows})
            # the masked SDPA kernel instead of each row alone (mmllm/models/unpadded_attention.py), same rows, batch 8
            predictor.batch_size, predictor.prefix_cache = 8, True  # as in the batch-8 run it is compared with
            predictor.model.set_attn_implementation("sdpa")
            with ForwardTimer(predictor.model) as timer:
                summary = run_job(predictor, dump, 8, tmp / f"{template}-b8-sdpa.jsonl")
            predictor.model.set_attn_implementation(unpadded_attention.NAME)
            agree, rows = same_outputs(tmp / f"{template}-b8.jsonl", tmp / f"{template}-b8-sdpa.jsonl")
            unpadded = next(p for p in results["phases"] if p["template"] == template)
            results["attention"].append({"template": template, "batch": 8, "rows_per_s_sdpa": round(summary.rows / summary.wall_s, 2),
                                         "rows_per_s_unpadded": next(b for b in batches if b["batch"] == 8)["rows_per_s"],
                                         "prefill_s_sdpa": round(timer.prefill_s, 2), "prefill_s_unpadded": unpadded["prefill_s"],
                                         "identical_rows": agree, "rows": rows})

        predictor = load("tiny:qwen2_vl", schema, True, 8, 256, template="listing_compact_v1")
        constrained_s, constrained_steps = decode_steps(predictor, dump, 8, tmp)
        predictor.constrained = False
        predictor.max_new_tokens = 96
        free_s, free_steps = decode_steps(predictor, dump, 8, tmp)
        per_step_c = constrained_s / max(constrained_steps, 1) * 1000
        per_step_f = free_s / max(free_steps, 1) * 1000
        results["constrained"] = {"constrained_ms_per_step": round(per_step_c, 3), "unconstrained_ms_per_step": round(per_step_f, 3),
                                  "overhead": round(per_step_c / per_step_f - 1, 3),
                                  "constrained_steps": constrained_steps, "unconstrained_steps": free_steps}

        template = tmp / "short.yaml"
        template.write_text("version: short\nsystem: Label the listing as JSON.\nuser: 'Title: $title'\nbudget: {schema: none}\n")
        results["memory"] = [memory_run(tmp, n, schema, template) for n in args.memory_rows]
    return results


def real_size(args: argparse.Namespace) -> dict:
    """One batch of ``args.rows`` on the one-layer real-size model, per template and prefix-cache setting."""
    sys.path.insert(0, str(HERE))
    from train_step import REAL_VOCAB_TINY, build_config
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmllm.models.generative import GenerativePredictor, resolve_attention
    from mmllm.prompts import PromptTemplate
    from mmllm.schema import LabelSchema
    from mmllm.tiny import resolve

    processor = AutoProcessor.from_pretrained(resolve(REAL_VOCAB_TINY))
    attention = resolve_attention("auto")  # on CPU: each row of the padded batch alone (models/unpadded_attention.py)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(build_config("qwen2_5_vl_3b", text_layers=1, vision_depth=1),
                                                    dtype=torch.float32, attn_implementation=attention).eval()
    schema = LabelSchema.from_yaml(ROOT / "examples/toys_schema.yaml")
    results: dict = {"real_size": [], "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6)}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        dump = make_dump(tmp / "rows", args.rows, with_images=True)
        runs = (("listing_v1", False, "sdpa"), ("listing_v1", False, attention), ("listing_v1", True, attention),
                ("listing_v2", False, attention), ("listing_v2", True, attention))
        for template, cached, kernel in runs:  # the masked kernel once, for a same-run comparison
            model.set_attn_implementation(kernel)
            predictor = GenerativePredictor(model, processor, schema, PromptTemplate.load(template), constrained=True,
                                            batch_size=args.rows, prefix_cache=cached)
            predictor._grammar_factory()  # compiled and encoded once per loaded model, outside the timing
            predictor._prefix_cache()
            name = f"{template}-{cached}-{kernel}"
            with ForwardTimer(model) as timer:
                summary = run_job(predictor, dump, args.rows, tmp / f"{name}.jsonl")
            results["real_size"].append({
                "template": template, "prefix_cache": cached, "attention": kernel, "batch": args.rows, "rows": summary.rows,
                "rows_per_s": round(summary.rows / summary.wall_s, 3), "model_s": round(summary.model_s, 1),
                "prefill_s": round(timer.prefill_s, 1), "decode_s": round(timer.decode_s, 1), "decode_steps": timer.steps,
                "shared_prefix_tokens": prompt_tokens(predictor, dump)["shared_prefix_tokens"] if cached else 0})
            baseline = f"{template}-False-{attention}" if cached else (f"{template}-False-sdpa" if kernel != "sdpa" else None)
            if baseline and (tmp / f"{baseline}.jsonl").exists():
                agree, rows = same_outputs(tmp / f"{name}.jsonl", tmp / f"{baseline}.jsonl")
                results["real_size"][-1]["identical_rows"] = f"{agree}/{rows}"
    return results


def gpu(args: argparse.Namespace) -> dict:
    schema = ROOT / "examples/toys_schema.yaml"
    results: dict = {"batching": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp_name:
        tmp = Path(tmp_name)
        model_dir = random_model_dir()
        dump = make_dump(tmp / "rows", args.rows, with_images=True)
        # the GPU machine may lack xgrammar (wheels/ can carry it): then the answers are decoded freely
        constrained = importlib.util.find_spec("xgrammar") is not None
        if not constrained:
            print("note: xgrammar is not installed: labelling runs unconstrained", file=sys.stderr)
        results["constrained"] = constrained
        predictor = load(str(model_dir), schema, constrained, 1, 256)
        from mmllm.collator import set_pixel_budget

        set_pixel_budget(predictor.processor, 128 * 28 * 28, 448 * 448)  # real photos: up to 256 image tokens
        for batch in (1, 8, 32):
            predictor.batch_size = batch
            with ForwardTimer(predictor.model) as timer:
                summary = run_job(predictor, dump, batch, tmp / f"b{batch}.jsonl")
            results["batching"].append({"batch": batch, "rows": summary.rows, "rows_per_s": round(summary.rows / summary.wall_s, 2),
                                        "model_s": round(summary.model_s, 2), "prefill_s": round(timer.prefill_s, 2),
                                        "decode_steps": timer.steps,
                                        "decode_ms_per_step": round(timer.decode_s / max(timer.steps, 1) * 1000, 2)})
            print(f"batch {batch}: {results['batching'][-1]}", file=sys.stderr, flush=True)
        results["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return results


def gpu_static(args: argparse.Namespace) -> dict:
    """Batch 8 with a static decoding cache (``GenerativePredictor.static_cache``) in each way of
    compiling its decoding step (``--compile``: ``eager`` none, ``cudagraphs`` the eager kernels
    captured as CUDA graphs, ``inductor`` transformers' default, kernels of its own) against the
    growing cache: rows/s of a first pass (which compiles) and a second one, the answers compared row
    by row with the growing cache's second pass, and whether any CUDA graph was skipped."""
    from mmllm.collator import set_pixel_budget
    from torch._dynamo.utils import counters

    schema = ROOT / "examples/toys_schema.yaml"
    results: dict = {"passes": [], "profiles": [], "compile": list(args.compile)}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp_name:
        tmp = Path(tmp_name)
        dump = make_dump(tmp / "rows", args.rows, with_images=True)
        constrained = importlib.util.find_spec("xgrammar") is not None
        results["constrained"] = constrained
        predictor = load(str(random_model_dir()), schema, constrained, 8, 256)
        set_pixel_budget(predictor.processor, 128 * 28 * 28, 448 * 448)
        hf_model = predictor.model.get_base_model() if hasattr(predictor.model, "get_base_model") else predictor.model
        for cache, compile in [("growing", None)] + [("static", c) for c in args.compile]:
            predictor.static_cache = cache == "static"
            predictor.static_compile = compile or predictor.static_compile
            torch._dynamo.reset()  # each way compiles from scratch
            if hasattr(hf_model, "_compiled_call"):
                del hf_model._compiled_call
            counters.clear()
            for n in range(1 if compile == "eager" else 2):  # nothing to compile: one pass says it
                out = tmp / f"{cache}-{compile}{n}.jsonl"
                torch.cuda.synchronize()
                started = time.perf_counter()
                model_s, steps = decode_steps(predictor, dump, 8, tmp, out)
                wall = time.perf_counter() - started
                row = {"cache": cache, "compile": compile or "-", "pass": n + 1, "rows": args.rows,
                       "rows_per_s": round(args.rows / wall, 2), "model_s": round(model_s, 2), "decode_steps": steps,
                       "model_ms_per_step": round(model_s / max(steps, 1) * 1000, 2)}
                if cache == "static":
                    if not predictor.static_cache:  # the predictor fell back to the growing cache (its warning says why)
                        row["failed"] = True
                        results["passes"].append(row)
                        print(f"static cache, {compile}: compiling failed", file=sys.stderr, flush=True)
                        break
                    row["identical_rows"], _ = same_outputs(tmp / "growing-None1.jsonl", out)
                    row["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
                results["passes"].append(row)
                print(f"{cache} cache {compile or ''}, pass {n + 1}: {row}", file=sys.stderr, flush=True)
            if args.profile and not (cache == "static" and not predictor.static_cache):
                results["profiles"].append({"cache": cache, "compile": compile or "-",
                                            **profiled_pass(predictor, make_dump(tmp / f"p-{cache}-{compile}", 8, True), tmp)})
                print(f"{cache} cache {compile or ''}, profiled: {results['profiles'][-1]}", file=sys.stderr, flush=True)
        results["static_len"] = predictor._static_len
        results["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return results


def profiled_pass(predictor, dump: Path, tmp: Path) -> dict:
    """One labelling pass over ``dump`` (one batch) under PyTorch's profiler, after the passes that
    compiled: per decoding step, the copies (``aten::copy_`` and ``aten::_foreach_copy_`` calls and
    their device time: a CUDA graph's inputs copied in, a cache's writes copied back) and all device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        _, steps = decode_steps(predictor, dump, 8, tmp, tmp / "profiled.jsonl")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    per_step = max(steps, 1)
    totals = {e.key: e for e in prof.key_averages()}

    def device_ms(key: str) -> float:
        event = totals.get(key)
        return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)) / 1000 if event else 0.0

    copies = ("aten::copy_", "aten::_foreach_copy_")
    device_total = sum(device_ms(key) for key in totals)
    return {"decode_steps": steps,
            "copy_calls_per_step": round(sum(totals[k].count for k in copies if k in totals) / per_step, 1),
            "copy_device_ms_per_step": round(sum(device_ms(k) for k in copies) / per_step, 3),
            "memcpy_calls_per_step": round(totals["cudaMemcpyAsync"].count / per_step, 1) if "cudaMemcpyAsync" in totals else 0,
            "device_ms_per_step": round(device_total / per_step, 3)}


# runs ``mmllm label`` from the checkout given first (its mmllm/ and prompts/), whatever is installed
AGAINST_CHILD = """
import runpy, sys
code = sys.argv[1]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # an editable install's hook
sys.path.insert(0, code)
import mmllm
print("mmllm from", mmllm.__file__, file=sys.stderr, flush=True)
sys.argv = ["mmllm.label", *sys.argv[2:]]
runpy.run_module("mmllm.label", run_name="__main__", alter_sys=True)
"""


def against(args: argparse.Namespace) -> dict:
    """``listing_v1`` at batch 8, labelled by this checkout and by an older one (``--against``: a folder
    with its ``mmllm/`` and ``prompts/``, e.g. ``git archive ba0d89d mmllm prompts``, the code issue #16
    was filed against), alternately, ``--against-runs`` times each, each run a fresh ``mmllm label``
    process on the same model folder and rows: the rows/s each prints, and every run's answers
    compared with this checkout's first."""
    import re

    from mmllm.tiny import resolve

    schema = ROOT / "examples/toys_schema.yaml"
    code_then = args.against.resolve()
    if not (code_then / "mmllm" / "label.py").exists():
        raise SystemExit(f"--against {args.against}: no mmllm/label.py there")
    constrained = importlib.util.find_spec("xgrammar") is not None
    model = str(random_model_dir()) if args.gpu else resolve("tiny:qwen2_vl")
    pixels = ["--min-pixels", str(128 * 28 * 28), "--max-pixels", str(448 * 448)] if args.gpu else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT)}
    results: dict = {"against": str(args.against), "constrained": constrained, "template": "listing_v1", "batch": 8,
                     "rows": args.rows, "runs": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp_name:
        tmp = Path(tmp_name)
        dump = make_dump(tmp / "rows", args.rows, with_images=True)
        variants = [("then", code_then, []), ("now", ROOT, [])]
        if args.replicas > 1:  # this checkout once more, its model forked into single-thread replicas
            variants.append((f"now-r{args.replicas}", ROOT, ["--replicas", str(args.replicas)]))
        for turn in range(args.against_runs):
            for who, code, extra in variants:
                out = tmp / f"{who}-{turn}.jsonl"
                command = [sys.executable, "-c", AGAINST_CHILD, str(code), str(dump), "--model", model,
                           "--schema", str(schema), "--template", "listing_v1", "--batch-size", "8", "--out", str(out),
                           *pixels, *([] if constrained else ["--no-constrained"]), *extra]
                started = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp)
                process_s = time.perf_counter() - started  # start-up, loading (the grammar, where compiled there), job
                origin = re.search(r"mmllm from (\S+)", done.stderr)
                rate = re.search(r"([0-9][0-9,.]*) rows/s", done.stdout + done.stderr)  # the job's summary line
                if done.returncode or rate is None or origin is None or not Path(origin.group(1)).resolve().is_relative_to(code):
                    raise SystemExit(f"{who} run {turn} (exit {done.returncode}, mmllm from "
                                     f"{origin.group(1) if origin else '?'}):\n{done.stdout[-1000:]}{done.stderr[-2000:]}")
                results["runs"].append({"code": who, "turn": turn, "rows_per_s": float(rate.group(1).replace(",", "")),
                                        "process_s": round(process_s, 2)})
                print(f"{who} {turn}: {results['runs'][-1]['rows_per_s']} rows/s", file=sys.stderr, flush=True)
        for run in results["runs"]:
            run["identical_rows"], _ = same_outputs(tmp / "now-0.jsonl", tmp / f"{run['code']}-{run['turn']}.jsonl")
    codes = [who for who, _, _ in variants]
    mean = {who: sum(r["rows_per_s"] for r in results["runs"] if r["code"] == who) / args.against_runs
            for who in codes}
    for who in codes:
        results[f"process_s_{who}"] = round(sum(r["process_s"] for r in results["runs"] if r["code"] == who)
                                            / args.against_runs, 2)
    results.update(rows_per_s_then=round(mean["then"], 2), rows_per_s_now=round(mean["now"], 2),
                   speedup=round(mean["now"] / mean["then"], 2), **paired_ratios(results["runs"]))
    if args.replicas > 1:
        who = f"now-r{args.replicas}"
        results["replicas"] = {"replicas": args.replicas, "rows_per_s": round(mean[who], 2),
                               "speedup": round(mean[who] / mean["then"], 2), **paired_ratios(results["runs"], who)}
    return results


def paired_ratios(runs: list[dict], code: str = "now") -> dict:
    """Each turn's ``now / then`` rows/s (the two runs of a turn follow each other, so they share the
    machine's state), their geometric mean, and the ratio of the two medians: the old code's rows/s
    moves with the machine's memory state far more than this checkout's, so one slow or fast ``then``
    run moves the plain ratio of means."""
    rate = {(r["code"], r["turn"]): r["rows_per_s"] for r in runs}
    turns = sorted(turn for who, turn in rate if who == code and ("then", turn) in rate)
    if not turns:
        return {}
    now, then = [rate[code, t] for t in turns], [rate["then", t] for t in turns]
    ratios = [a / b for a, b in zip(now, then)]
    return {"turn_ratios": [round(r, 2) for r in ratios],
            "speedup_geometric_mean": round(statistics.geometric_mean(ratios), 2),
            "speedup_of_medians": round(statistics.median(now) / statistics.median(then), 2)}


def report_against(args: argparse.Namespace, results: dict) -> int:
    device = torch.cuda.get_device_name(0) if args.gpu else f"CPU {platform.machine()}, {os.cpu_count()} cores"
    print(f"\n{device}, torch {torch.__version__}; listing_v1, batch 8, {results['rows']} rows, "
          f"constrained {results['constrained']}; this checkout against {results['against']}")
    print(f"{'code':<8} {'run':>3} {'rows/s':>7} {'process s':>9} {'identical to now, run 0':>24}")
    for r in results["runs"]:
        print(f"{r['code']:<8} {r['turn']:>3} {r['rows_per_s']:>7} {r.get('process_s', ''):>9} "
              f"{r['identical_rows']:>21}/{results['rows']}")
    print(f"mean rows/s: {results['rows_per_s_then']} -> {results['rows_per_s_now']} ({results['speedup']}x); "
          f"whole process, start-up and loading included: {results['process_s_then']} -> {results['process_s_now']} s")
    for label, part in (("now", results), (f"now, {results.get('replicas', {}).get('replicas')} replicas",
                                            results.get("replicas", {}))):
        if part.get("turn_ratios"):
            print(f"each turn's {label} / then: {', '.join(f'{r:.2f}' for r in part['turn_ratios'])}x; geometric mean "
                  f"{part['speedup_geometric_mean']}x, ratio of the medians {part['speedup_of_medians']}x")
    if results.get("replicas"):
        print(f"with --replicas {results['replicas']['replicas']}: {results['replicas']['rows_per_s']} rows/s "
              f"({results['replicas']['speedup']}x the old code's mean)")
    out = args.out or HERE / "results" / ("label_throughput_against_gpu.json" if args.gpu else "label_throughput_against.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "label_throughput", "mode": "against", "date": time.strftime("%Y-%m-%d"),
                               "device": device, "torch": torch.__version__, **results}, indent=2))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--real-size", action="store_true", help="one batch on the one-layer real-size model (CPU)")
    parser.add_argument("--rows", type=int, help="rows for the batching and decoding comparisons "
                                                 "(default 64; --real-size: 8, one batch)")
    parser.add_argument("--memory-rows", type=int, nargs="+", default=[1000, 50000])
    parser.add_argument("--static-cache", action="store_true",
                        help="with --gpu: batch 8 with a static decoding cache, compiled each way of --compile, "
                             "vs the growing one")
    from mmllm.predictor import STATIC_COMPILE

    parser.add_argument("--compile", nargs="+", choices=STATIC_COMPILE,
                        default=["eager", "cudagraphs", "inductor"], help="with --static-cache: the ways compared")
    parser.add_argument("--profile", action="store_true",
                        help="with --static-cache: one more pass per way under the profiler: copies and device time per step")
    parser.add_argument("--against", type=Path,
                        help="an older checkout's folder (its mmllm/ and prompts/): listing_v1 at batch 8 labelled by it "
                             "and by this one, alternately, in fresh processes: rows/s and the answers compared")
    parser.add_argument("--against-runs", type=int, default=2, help="with --against: runs of each")
    parser.add_argument("--replicas", type=int, default=1,
                        help="with --against: also run this checkout with `mmllm label --replicas N` in each turn")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.static_cache and not args.gpu:
        parser.error("--static-cache compares compiled decoding on a GPU: add --gpu")
    args.rows = args.rows or (8 if args.real_size else 32 if args.against else 64)
    os.environ.setdefault("MMLLM_CACHE", str(Path(tempfile.gettempdir()) / "mmllm-bench-cache"))
    if args.gpu and not torch.cuda.is_available():
        print("--gpu needs a CUDA device", file=sys.stderr)
        return 2
    if args.against:
        return report_against(args, against(args))
    if args.real_size:
        return report_real_size(args, real_size(args))
    if args.static_cache:
        return report_static(args, gpu_static(args))
    results = gpu(args) if args.gpu else cpu(args)
    device = torch.cuda.get_device_name(0) if args.gpu else f"CPU {platform.machine()}, {os.cpu_count()} cores"
    print(f"\n{device}, torch {torch.__version__}")
    print(f"{'template':<19} {'batch':>5} {'rows':>5} {'rows/s':>8} {'model s':>8}"
          + (f" {'prefill s':>9} {'ms/step':>8}" if args.gpu else f" {'outside-model ms/row':>21} {'prepare ms/row':>15}"))
    for b in results["batching"]:
        extra = (f" {b['prefill_s']:>9} {b['decode_ms_per_step']:>8}" if args.gpu
                 else f" {b['main_thread_outside_model_ms_per_row']:>21} {b['prepare_ms_per_row']:>15}")
        print(f"{b.get('template', 'listing_v1'):<19} {b['batch']:>5} {b['rows']:>5} {b['rows_per_s']:>8} {b['model_s']:>8}{extra}")
    if not args.gpu:
        c = results["constrained"]
        for key, value in results.items():
            if key.startswith("speedup"):
                print(f"speed-up batch 32 vs 1 ({key.split('/')[1]}): {value}x")
        print(f"\nbatch 8, where the model time goes   {'prompt':>7} {'shared':>7} {'model s':>8} {'prefill s':>9} "
              f"{'ms/prefill':>10} {'decode s':>8} {'steps':>6} {'ms/step':>8} {'loop s':>7}")
        for p in results["phases"]:
            tokens = results["prompts"][p["template"]]
            print(f"{p['template']:<35} {tokens['mean_prompt_tokens']:>7} {tokens['shared_prefix_tokens']:>7} {p['model_s']:>8} "
                  f"{p['prefill_s']:>9} {p['prefill_ms_per_batch']:>10} {p['decode_s']:>8} {p['decode_steps']:>6} "
                  f"{p['decode_ms_per_step']:>8} {p['generate_loop_s']:>7}")
        for p in results["prefix_cache"]:
            print(f"prefix cache, batch 8, {p['template']}: {p['rows_per_s_off']} -> {p['rows_per_s_on']} rows/s "
                  f"({p['rows_per_s_on'] / p['rows_per_s_off']:.2f}x), identical outputs {p['identical_rows']}/{p['rows']} rows")
        for p in results["replicas"]:
            print(f"replicas, batch 8, {p['template']}: one process {p['rows_per_s_one_process']} -> {p['replicas']} "
                  f"one-thread replicas {p['rows_per_s_replicas']} rows/s "
                  f"({p['rows_per_s_replicas'] / p['rows_per_s_one_process']:.2f}x), identical outputs "
                  f"{p['identical_rows']}/{p['rows']} rows")
        for p in results["attention"]:
            print(f"attention, batch 8, {p['template']}: masked sdpa {p['rows_per_s_sdpa']} -> each row alone {p['rows_per_s_unpadded']} "
                  f"rows/s ({p['rows_per_s_unpadded'] / p['rows_per_s_sdpa']:.2f}x; prefill {p['prefill_s_sdpa']} -> "
                  f"{p['prefill_s_unpadded']} s), identical outputs {p['identical_rows']}/{p['rows']} rows")
        v1, v2 = (next(b["rows_per_s"] for b in results["batching"] if b["template"] == t and b["batch"] == 8)
                  for t in ("listing_v1", "listing_v2"))
        print(f"batch 8: listing_v2 with its prefix cached vs listing_v1: {v2 / v1:.2f}x")
        print(f"decoding step: constrained {c['constrained_ms_per_step']} ms, unconstrained {c['unconstrained_ms_per_step']} ms "
              f"-> overhead {c['overhead']:+.1%}")
        print("memory: " + ", ".join(f"{m['rows']:,} rows -> peak {m['peak_mib']} MiB ({m['rows_per_s']} rows/s, {m['lines']:,} lines)"
                                     for m in results["memory"]))
    out = args.out or HERE / "results" / ("label_throughput_gpu.json" if args.gpu else "label_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "label_throughput", "date": time.strftime("%Y-%m-%d"), "device": device,
                               "torch": torch.__version__, **results}, indent=2))
    print(f"wrote {out}")
    return 0


def report_static(args: argparse.Namespace, results: dict) -> int:
    device = torch.cuda.get_device_name(0)
    print(f"\n{device}, torch {torch.__version__}, batch 8, constrained {results['constrained']}, "
          f"static cache {results['static_len']} tokens, peak {results['peak_mem_gb']} GiB")
    print(f"{'cache':<8} {'compile':<10} {'pass':>4} {'rows/s':>7} {'model s':>8} {'steps':>6} {'ms/step':>8} "
          f"{'identical':>9} {'graph skips':>11}")
    for r in results["passes"]:
        print(f"{r['cache']:<8} {r['compile']:<10} {r['pass']:>4} {r['rows_per_s']:>7} {r['model_s']:>8} "
              f"{r['decode_steps']:>6} {r['model_ms_per_step']:>8} {'failed' if r.get('failed') else r.get('identical_rows', ''):>9} "
              f"{r.get('cudagraph_skips', ''):>11}")
    for r in results.get("profiles", []):
        print(f"profiled, {r['cache']} {r['compile']}: {r['copy_calls_per_step']} copies a step "
              f"({r['copy_device_ms_per_step']} ms of device time; {r['memcpy_calls_per_step']} cudaMemcpyAsync), "
              f"{r['device_ms_per_step']} ms of device time a step in all")
    out = args.out or HERE / "results" / "label_throughput_static_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "label_throughput_static", "date": time.strftime("%Y-%m-%d"), "device": device,
                               "torch": torch.__version__, **results}, indent=2))
    print(f"wrote {out}")
    return 0


def report_real_size(args: argparse.Namespace, results: dict) -> int:
    device = f"CPU {platform.machine()}, {os.cpu_count()} cores"
    print(f"\n{device}, torch {torch.__version__}; Qwen2.5-VL-3B widths, 1 text layer, {results['params_m']}M parameters")
    print(f"{'template':<12} {'attention':>13} {'prefix cache':>12} {'shared':>7} {'batch':>5} {'rows/s':>7} {'model s':>8} {'prefill s':>9} "
          f"{'decode s':>8} {'steps':>6} {'identical':>9}")
    for r in results["real_size"]:
        print(f"{r['template']:<12} {r['attention']:>13} {'on' if r['prefix_cache'] else 'off':>12} {r['shared_prefix_tokens']:>7} {r['batch']:>5} "
              f"{r['rows_per_s']:>7} {r['model_s']:>8} {r['prefill_s']:>9} {r['decode_s']:>8} {r['decode_steps']:>6} "
              f"{r.get('identical_rows', ''):>9}")
    out = args.out or HERE / "results" / "label_throughput_real_size.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "label_throughput", "mode": "real_size", "date": time.strftime("%Y-%m-%d"),
                               "device": device, "torch": torch.__version__, **results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
