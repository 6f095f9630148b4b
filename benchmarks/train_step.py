"""Training-step speed and memory.

CPU mode (default): the tiny config (``finetune/tiny_cpu.yaml``) through the real training loop
on the example catalog, reporting tokens/s, step time and peak memory per step.

Real-size CPU mode (``--real-size``): the published Qwen2.5-VL-3B config with ONE text layer and
ONE vision block (about 446M parameters: the 151,936 x 2048 embedding, tied to the LM head, is
most of it), RANDOM weights, the real-size-vocabulary tiny tokenizer (``mmllm.tiny``,
``vocab="real"``: special tokens at the real ids), the real image-processor bounds, batch 2 of
real catalog rows through the ``listing_v1`` template with one 448x448 picture each, LoRA on the
language model, mmllm's own collators, loss and an AdamW step. What the vocabulary costs
(logits, their float32 copy, the loss) is as at full size; the other 35 layers are not there.
Each variant (generative, classification heads) runs in a fresh process, so the peak resident
memory of one cannot hide the other's; ``--mlp-chunks 1 4`` runs each variant with the language
model's MLPs whole and in 4 mini-sequence slices (``model.mlp_chunks``, mmllm/models/mini_sequence.py).

GPU mode (``--gpu``): real-size Qwen2.5-VL-3B and Qwen2-VL-2B built from their published
configs with RANDOM weights (no download), LoRA in bf16 vs QLoRA (4-bit NF4), 448x448 images,
batch 4, gradient checkpointing, through mmllm's own model builder and loss. Step time,
tokens/s and peak CUDA memory are measured after warm-up steps.

    python benchmarks/train_step.py [--steps 8]
    python benchmarks/train_step.py --real-size [--steps 3] [--variants generative classify] [--mlp-chunks 1 4]
    python benchmarks/train_step.py --gpu [--models qwen2_5_vl_3b qwen2_vl_2b] [--modes lora qlora]

Prints a table and writes benchmarks/results/train_step[_real_cpu|_gpu].json.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

# Published sizes (config.json of the hub checkpoints), rebuilt here with random weights.
# The special-token ids are those of the real tokenizers (and of mmllm.tiny's vocab="real").
IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653}
REAL = {
    "qwen2_5_vl_3b": {
        "family": "qwen2_5_vl",
        "text": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                     num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
                     tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}),
        "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu"),
    },
    "qwen2_vl_2b": {
        "family": "qwen2_vl",
        "text": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}),
        "vision": dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu"),
    },
}
# Shapes of the real-size modes: a listing_v1 prompt of a catalog row is about 1,400 tokens with the
# real tokenizer (the taxonomy is most of it), its canonical JSON answer about 60.
PROMPT_TOKENS = 1400
ANSWER_TOKENS = 60
REAL_PIXELS = (56 * 56, 28 * 28 * 16384)  # min_pixels / max_pixels of Qwen2.5-VL's preprocessor_config.json
REAL_VOCAB_TINY = "tiny:qwen2_5_vl:real"  # tokenizer + processor with the real vocabulary size and ids
VARIANTS = ("generative", "classify")


def say(message: str) -> None:
    """A progress line on stderr (a child process's stdout carries only its JSON result)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- CPU: tiny config, real loop
def cpu_benchmark(steps: int) -> list[dict]:
    from mmllm.finetune import finetune, load_recipe_config

    rows = []
    for name, catalog, batch in (("tiny qwen2_vl, drawn listings (images)", "examples/drawn/catalog.jsonl", 4),
                                 ("tiny qwen2_vl, amazon listings (text)", "examples/amazon_uk_toys/train.jsonl", 4)):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_recipe_config(ROOT / "finetune/tiny_cpu.yaml", [
                f"data.train={ROOT / catalog}", "data.dev=null", f"data.schema={ROOT / 'examples/toys_schema.yaml'}",
                f"train.output_dir={tmp}/out", f"train.max_steps={steps}", f"train.batch_size={batch}", "train.grad_accum=1",
                "train.log_every=1", "train.save_every=0"])
            finetune(cfg)
            metrics = [json.loads(line) for line in (Path(tmp) / "out/metrics.jsonl").read_text().splitlines()]
        measured = metrics[1:] or metrics  # the first step pays for lazy initialization
        rows.append({
            "run": name, "batch": batch, "steps": len(measured),
            "step_s": round(sum(m["step_s"] for m in measured) / len(measured), 3),
            "tokens_per_s": round(sum(m["tokens_per_s"] for m in measured) / len(measured)),
            "peak_mem_mb": max(m["peak_mem_mb"] for m in measured),
        })
    return rows


# ---------------------------------------------------------------------- GPU: real sizes, random weights
def build_config(name: str, text_layers: int | None = None, vision_depth: int | None = None):
    """The published config of ``name``; ``text_layers`` / ``vision_depth`` keep only that many text
    layers / vision blocks (every width, the vocabulary and the rotary settings stay real)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    spec = REAL[name]
    text, vision = dict(spec["text"]), dict(spec["vision"])
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
    if vision_depth is not None:
        vision["depth"] = vision_depth
        if "fullatt_block_indexes" in vision:  # Qwen2.5-VL: blocks 0-6 of the real tower are windowed
            vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision_depth]
    cls = Qwen2_5_VLConfig if spec["family"] == "qwen2_5_vl" else Qwen2VLConfig
    return cls(text_config=text, vision_config=vision, **IDS)


def synthetic_batch(image_side: int, batch: int, text_tokens: int, answer_tokens: int, device: str) -> dict:
    """A batch shaped like real listings: one photo each, a prompt, a supervised answer."""
    import numpy as np
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    processor = Qwen2VLImageProcessor(size={"shortest_edge": 28 * 28, "longest_edge": image_side * image_side})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (image_side, image_side, 3), dtype=np.uint8)) for _ in range(batch)]
    vision = processor(images=images, return_tensors="pt")
    grid = vision["image_grid_thw"]  # [B, 3]
    n_image_tokens = int(grid[0].prod()) // 4  # 2 x 2 patches merge into one token
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        text = torch.randint(0, 151000, (text_tokens + answer_tokens,), generator=gen)
        rows.append(torch.cat([torch.tensor([IDS["vision_start_token_id"]]),
                               torch.full((n_image_tokens,), IDS["image_token_id"]),
                               torch.tensor([IDS["vision_end_token_id"]]), text]))
    input_ids = torch.stack(rows)  # [B, T]
    labels = torch.full_like(input_ids, -100)
    labels[:, -answer_tokens:] = input_ids[:, -answer_tokens:]
    batch_inputs = {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
        "mm_token_type_ids": (input_ids == IDS["image_token_id"]).long(),
        "pixel_values": vision["pixel_values"], "image_grid_thw": grid,
    }
    return {k: v.to(device) for k, v in batch_inputs.items()}


def saved_random_model(name: str, folder: Path, text_layers: int | None = None, vision_depth: int | None = None,
                       device: str = "cuda") -> Path:
    """The real-size ``name`` with random weights (bf16, built on ``device``; ``text_layers`` /
    ``vision_depth`` as in :func:`build_config`), saved as safetensors in ``folder``; a folder finished by
    an earlier call (its ``.complete`` marker, written last) is reused. It stays on disk (7.5 GB for
    Qwen2.5-VL-3B; gpu_check.sh puts it under its own MMLLM_CACHE): delete it when done."""
    from transformers import AutoModelForImageTextToText

    if (folder / ".complete").exists():
        return folder
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(build_config(name, text_layers, vision_depth), dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    (folder / ".complete").write_text(name)
    say(f"{name}: random weights built and saved in {time.perf_counter() - started:.0f} s")
    return folder


def gpu_run(name: str, mode: str, steps: int, warmup: int, image_side: int, batch: int, prompt_tokens: int,
            mlp_chunks: int = 1) -> dict:
    from mmllm.models.generative import LoraSettings, ModelConfig, attach_lora, load_base_model
    from mmllm.models.mini_sequence import chunk_mlps
    from mmllm.training import causal_lm_loss

    torch.manual_seed(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    # random weights saved once per model (every mode loads the same folder), then loaded through
    # mmllm's own builder (QLoRA quantizes on load)
    folder = saved_random_model(name, Path(os.environ.get("MMLLM_CACHE", tempfile.gettempdir())) / f"random-{name}")
    cfg = ModelConfig(base=str(folder), dtype="bfloat16", attn_implementation="auto",
                      quantization="4bit" if mode == "qlora" else "none", gradient_checkpointing=True)
    model = load_base_model(cfg, device_map={"": 0})
    say(f"{name} {mode}: random weights ready and loaded in {time.perf_counter() - started:.0f} s")
    model = attach_lora(model, LoraSettings(rank=16, alpha=32), gradient_checkpointing=True)
    chunk_mlps(model, mlp_chunks)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    inputs = synthetic_batch(image_side, batch, text_tokens=prompt_tokens, answer_tokens=ANSWER_TOKENS, device="cuda")
    say(f"{name} {mode}: model loaded, {warmup} warm-up + {steps} steps of {tuple(inputs['input_ids'].shape)} tokens")
    times = []
    for step in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum, items = causal_lm_loss(model, inputs)
        (loss_sum / items).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
        say(f"{name} {mode}: step {step + 1}/{warmup + steps} {time.perf_counter() - start:.2f} s, "
            f"loss {float(loss_sum.detach() / items):.6f}, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    step_s = sum(times) / len(times)
    tokens = int(inputs["attention_mask"].sum())
    result = {
        "model": name, "mode": mode, "mlp_chunks": mlp_chunks, "attention": model.config._attn_implementation if hasattr(model, "config") else "?",
        "batch": batch, "image": f"{image_side}x{image_side}", "seq_len": int(inputs["input_ids"].shape[1]),
        "step_s": round(step_s, 3), "tokens_per_s": round(tokens / step_s), "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "trainable_params_m": round(sum(p.numel() for p in trainable) / 1e6, 1), "loss": round(float(loss_sum.detach() / items), 6),
    }
    del model, optimizer, inputs
    gc.collect()
    torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------- CPU: real widths and vocabulary, one layer
def listing_rows(batch: int, image_side: int, folder: Path) -> tuple[list, object]:
    """The first ``batch`` Amazon training rows (real text and labels), each with one drawn
    ``image_side`` x ``image_side`` picture saved in ``folder``; and the image policy for it."""
    import dataclasses

    from PIL import Image, ImageDraw

    from mmllm.catalog import load_listings
    from mmllm.images import ImagePolicy

    rows = load_listings(ROOT / "examples/amazon_uk_toys/train.jsonl")[:batch]
    for i in range(len(rows)):
        image = Image.new("RGB", (image_side, image_side), "white")
        ImageDraw.Draw(image).ellipse([image_side // 8, image_side // 6, image_side * 7 // 8, image_side * 5 // 6],
                                      fill=(40 * i % 256, 120, 200))
        image.save(folder / f"{i}.png")
    return [dataclasses.replace(row, images=(f"{i}.png",)) for i, row in enumerate(rows)], ImagePolicy(root=folder)


def cut_prompts(batch: dict, prompt_tokens: int, tokenizer, left_padded: bool, keep_tail: int = 64) -> dict:
    """Each row's prompt cut to ``prompt_tokens`` text tokens (image tokens not counted), re-padded.

    The tiny tokenizer's 1,280-entry BPE splits English into about twice as many tokens as Qwen's,
    so a rendered ``listing_v1`` conversation is ~2,800 tokens where the real one is ~1,400. One
    span goes from the middle of the user text (inside the taxonomy): the title, description and
    seller table before it and the last ``keep_tail`` prompt tokens (the end of the attribute list,
    the assistant header) stay; the image tokens and the supervised answer are never cut.
    """
    from mmllm.collator import IGNORE_INDEX

    ids, mask = batch["input_ids"], batch["attention_mask"].bool()  # [B, T]
    labels = batch.get("labels")
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    vision_end_id = tokenizer.convert_tokens_to_ids("<|vision_end|>")
    kept = []
    for row in range(ids.shape[0]):
        present = mask[row].nonzero().squeeze(-1)  # [n] positions of the row's tokens (either padding side)
        start = int(present[0])
        end = int((labels[row] != IGNORE_INDEX).nonzero()[0]) if labels is not None else int(present[-1]) + 1
        text = (end - start) - int((ids[row, start:end] == image_id).sum())
        excess = text - prompt_tokens
        vision_end = (ids[row, :end] == vision_end_id).nonzero().squeeze(-1)
        floor = int(vision_end[-1]) + 1 if len(vision_end) else start
        cut = end - keep_tail - excess
        if excess < 0 or cut <= floor:
            raise ValueError(f"row {row}: a prompt of {text} text tokens cannot be cut to {prompt_tokens} "
                             f"(pass a smaller --prompt-tokens)")
        keep = mask[row].clone()
        keep[cut:cut + excess] = False
        kept.append(keep.nonzero().squeeze(-1))
    length = max(len(k) for k in kept)
    pads = {"input_ids": tokenizer.pad_token_id, "labels": IGNORE_INDEX}
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        if key not in batch:
            continue
        value = torch.full((ids.shape[0], length), pads.get(key, 0), dtype=batch[key].dtype)  # [B, T']
        for row, keep in enumerate(kept):
            span = slice(length - len(keep), length) if left_padded else slice(0, len(keep))
            value[row, span] = batch[key][row, keep]
        out[key] = value
    return out


def _max_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> bool:
    """Restart the peak-resident-memory count here (Linux >= 4.0: ``/proc/self/clear_refs`` 5), so
    the steps' peak is not the one of building the model; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def real_cpu_run(variant: str, steps: int, batch_size: int, prompt_tokens: int, image_side: int,
                 text_layers: int, vision_depth: int, mlp_chunks: int = 1, malloc_fix: bool = True) -> dict:
    """``steps`` training steps of one variant on the one-layer real-size model, in THIS process;
    ``malloc_fix=False`` leaves glibc's dynamic mmap threshold as it is (mmllm.host_memory).

    The peak resident memory is read twice with ``getrusage``: after building (model, LoRA,
    optimizer, batch) and, after restarting the count, over the steps; ``delta_mb`` is the steps'
    peak above the resident memory of the loaded model.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmllm.collator import TrainCollator, set_pixel_budget
    from mmllm.host_memory import return_large_frees_to_os
    from mmllm.models import classifier, heads
    from mmllm.models.generative import LoraSettings, attach_lora
    from mmllm.models.mini_sequence import chunk_mlps
    from mmllm.prompts import PromptTemplate
    from mmllm.schema import load_schema
    from mmllm.tiny import resolve
    from mmllm.training import causal_lm_loss

    started = time.perf_counter()
    if malloc_fix:
        return_large_frees_to_os()  # as mmllm.training.train_loop does on the CPU
    processor = AutoProcessor.from_pretrained(resolve(REAL_VOCAB_TINY))
    set_pixel_budget(processor, *REAL_PIXELS)
    tokenizer = processor.tokenizer
    for key, token in (("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
                       ("vision_end_token_id", "<|vision_end|>")):
        if tokenizer.convert_tokens_to_ids(token) != IDS[key]:
            raise ValueError(f"{REAL_VOCAB_TINY}: {token} is not at the real id {IDS[key]}")

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(build_config("qwen2_5_vl_3b", text_layers, vision_depth),
                                                    dtype=torch.float32, attn_implementation="sdpa")
    params = sum(p.numel() for p in model.parameters())
    lm_head_rows: list[int] = []  # positions the output layer ran on, per forward
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: lm_head_rows.append(o.shape[:-1].numel()))
    # LoRA as the recipes attach it; no dropout, so every step's loss is reproducible to the last digit
    model = attach_lora(model, LoraSettings(rank=16, alpha=32, dropout=0.0), gradient_checkpointing=True)
    chunk_mlps(model, mlp_chunks)  # 1: whole

    schema, template = load_schema(ROOT / "examples/toys_schema.yaml"), PromptTemplate.load("listing_v1")
    with tempfile.TemporaryDirectory() as tmp:
        rows, policy = listing_rows(batch_size, image_side, Path(tmp))
        if variant == "generative":
            net, loss_fn = model, causal_lm_loss
            batch = TrainCollator(processor, schema, template, policy, max_images=1)([(r, 0) for r in rows])
        else:
            labels = [json.loads(line)["label"] for line in (ROOT / "examples/amazon_uk_toys/train.jsonl").read_text().splitlines()]
            specs = heads.head_specs(schema, labels, null_class=True)
            net = classifier.ListingClassifier(model, heads.hidden_size(model), specs)

            def loss_fn(m, b):
                return heads.classification_loss(m(**b), b, specs), torch.tensor(heads.count_rows(b))

            batch = classifier.ClassifyCollator(processor, schema, template, policy, 1, specs)([(r, 0) for r in rows])
    rendered = int(batch["attention_mask"].sum(1).max())
    batch = cut_prompts(batch, prompt_tokens, tokenizer, left_padded=variant == "classify")
    net.train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)  # as mmllm.training.train_loop
    gc.collect()
    loaded_mb, build_peak_mb = _rss_mb(), _max_rss_mb()
    reset = _reset_peak()
    tokens = int(batch["attention_mask"].sum())
    say(f"{variant}: {params / 1e6:.0f}M parameters, batch {tuple(batch['input_ids'].shape)} "
        f"(rendered {rendered} tokens per row), built in {time.perf_counter() - started:.0f} s, "
        f"resident {loaded_mb:.0f} MB")
    per_step = []
    for step in range(steps):
        lm_head_rows.clear()
        start = time.perf_counter()
        loss_sum, items = loss_fn(net, batch)
        (loss_sum / items).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        per_step.append({"step": step + 1, "loss": round(float(loss_sum.detach() / items), 6), "step_s": round(elapsed, 2),
                         "tokens_per_s": round(tokens / elapsed, 1), "peak_mb": round(_max_rss_mb()),
                         "lm_head_rows": sum(lm_head_rows)})
        say(f"{variant}: step {step + 1}/{steps} loss {per_step[-1]['loss']:.6f}, {elapsed:.1f} s, "
            f"{tokens / elapsed:.0f} tokens/s, peak {per_step[-1]['peak_mb']} MB")
    steps_peak_mb = max(s["peak_mb"] for s in per_step)
    return {
        "variant": variant, "mlp_chunks": mlp_chunks, "malloc": "fixed" if malloc_fix else "default",
        "params_m": round(params / 1e6, 1),
        "trainable_params_m": round(sum(p.numel() for p in trainable) / 1e6, 2),
        "batch": batch_size, "seq_len": int(batch["input_ids"].shape[1]), "tokens": tokens,
        "prompt_text_tokens": prompt_tokens, "rendered_tokens": rendered, "image": f"{image_side}x{image_side}",
        "image_tokens": int((batch["input_ids"] == IDS["image_token_id"]).sum()),
        "supervised": int(items), "steps": per_step,
        "process_peak_mb": round(max(build_peak_mb, steps_peak_mb) if reset else steps_peak_mb),
        "loaded_mb": round(loaded_mb), "build_peak_mb": round(build_peak_mb),
        "steps_peak_mb": steps_peak_mb, "delta_mb": round(steps_peak_mb - loaded_mb), "peak_reset": reset,
    }


REAL_CPU_CHILD = """
import json, sys
sys.path.insert(0, {here!r})
from train_step import real_cpu_run
print(json.dumps(real_cpu_run(**{kwargs!r})))
"""


def real_cpu_benchmark(variants: list[str], steps: int, batch: int, prompt_tokens: int, image_side: int,
                       text_layers: int, vision_depth: int, mlp_chunks: list[int] = (1,),
                       mallocs: list[str] = ("fixed",)) -> list[dict]:
    """Each variant in a fresh process (its stdout: one JSON line; its progress: stderr); ``mallocs``:
    ``fixed`` (glibc's mmap threshold fixed, as mmllm trains on the CPU) and / or ``default``."""
    # the real-vocabulary tokenizer folder is built once, in a process of its own, so that neither
    # its build nor this process's memory (which a child's ru_maxrss can start from) counts
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                    f"from mmllm.tiny import resolve; resolve({REAL_VOCAB_TINY!r})"], check=True)
    rows = []
    for variant, chunks, malloc in itertools.product(variants, mlp_chunks, mallocs):
        kwargs = dict(variant=variant, steps=steps, batch_size=batch, prompt_tokens=prompt_tokens, image_side=image_side,
                      text_layers=text_layers, vision_depth=vision_depth, mlp_chunks=chunks, malloc_fix=malloc == "fixed")
        done = subprocess.run([sys.executable, "-c", REAL_CPU_CHILD.format(here=str(HERE), kwargs=kwargs)],
                              stdout=subprocess.PIPE, text=True)
        if done.returncode:
            rows.append({"variant": variant, "mlp_chunks": chunks, "malloc": malloc,
                         "error": f"exit {done.returncode} (see the lines above)"})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def print_real_cpu(rows: list[dict]) -> None:
    """One line per step, then the memory of each variant."""
    def name(row: dict) -> str:
        return f"{row['variant']:<11} {row.get('mlp_chunks', 1):>10} {row.get('malloc', 'default'):>7}"

    print(f"{'variant':<11} {'MLP chunks':>10} {'malloc':>7} {'step':>4} {'loss':>10} {'step s':>7} {'tokens/s':>9} "
          f"{'peak MB':>8} {'LM-head rows':>12}")
    for row in rows:
        for s in row.get("steps", []):
            print(f"{name(row)} {s['step']:>4} {s['loss']:>10.6f} {s['step_s']:>7} "
                  f"{s['tokens_per_s']:>9} {s['peak_mb']:>8} {s['lm_head_rows']:>12}")
        if "error" in row:
            print(f"{name(row)} {row['error']}")
    print(f"\n{'variant':<11} {'MLP chunks':>10} {'malloc':>7} {'params M':>8} {'batch x seq':>11} {'process peak MB':>15} "
          f"{'loaded MB':>9} {'steps peak MB':>13} {'delta MB':>8}")
    for row in rows:
        if "error" not in row:
            print(f"{name(row)} {row['params_m']:>8} {row['batch']:>4} x "
                  f"{row['seq_len']:<4} {row['process_peak_mb']:>15} {row['loaded_mb']:>9} {row['steps_peak_mb']:>13} "
                  f"{row['delta_mb']:>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="real-size models on a CUDA GPU")
    mode.add_argument("--real-size", action="store_true",
                      help="CPU: the real Qwen2.5-VL-3B widths and vocabulary with one text layer and one vision block")
    parser.add_argument("--models", nargs="+", default=list(REAL), choices=list(REAL), help="--gpu: which models")
    parser.add_argument("--modes", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"],
                        help="--gpu: LoRA in bf16 and / or QLoRA (skipped, with a note, without bitsandbytes)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="--real-size: the generative loss and / or classification heads, each in a fresh process")
    parser.add_argument("--steps", type=int,
                        help="measured steps (default 8; --gpu: after 2 warm-up steps; --real-size: 3, each reported)")
    parser.add_argument("--image-side", type=int, default=448, help="one square picture per row (real sizes)")
    parser.add_argument("--batch", type=int, help="rows per step (default: --gpu 4, --real-size 2)")
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                        help="prompt text tokens per row, image tokens not counted (real sizes)")
    parser.add_argument("--text-layers", type=int, default=1, help="--real-size: text layers kept")
    parser.add_argument("--vision-depth", type=int, default=1, help="--real-size: vision blocks kept")
    parser.add_argument("--mlp-chunks", nargs="+", type=int, default=[1],
                        help="mini-sequence MLP slices (model.mlp_chunks); several = each variant / mode at each")
    parser.add_argument("--malloc", nargs="+", choices=["fixed", "default"], default=["fixed"],
                        help="--real-size: glibc's mmap threshold fixed as mmllm trains (mmllm/host_memory.py), "
                             "or glibc's dynamic default; both = each variant at each")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.mlp_chunks):
        parser.error("--mlp-chunks must be >= 1")

    if args.gpu:
        if not torch.cuda.is_available():
            print("--gpu needs a CUDA device", file=sys.stderr)
            return 2
        rows = []
        for name in args.models:
            for mode in args.modes:
                if mode == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
                    say(f"{name} qlora: skipped, bitsandbytes is not installed")
                    rows.append({"model": name, "mode": mode, "error": "skipped: bitsandbytes is not installed"})
                    continue
                for chunks in args.mlp_chunks:
                    try:
                        rows.append(gpu_run(name, mode, args.steps or 8, 2, args.image_side, args.batch or 4,
                                            args.prompt_tokens, chunks))
                    except Exception as exc:  # one failing mode must not lose the others
                        rows.append({"model": name, "mode": mode, "mlp_chunks": chunks,
                                     "error": f"{type(exc).__name__}: {exc}"[:300]})
                    print(json.dumps(rows[-1]), flush=True)
                    write_results(args, rows, torch.cuda.get_device_name(0))  # kept if a later run is cut short
        device = torch.cuda.get_device_name(0)
        columns = ["model", "mode", "mlp_chunks", "attention", "batch", "image", "seq_len", "step_s", "tokens_per_s", "peak_mem_gb",
                   "trainable_params_m", "loss"]
    elif args.real_size:
        os.environ.setdefault("MMLLM_CACHE", str(Path(tempfile.gettempdir()) / "mmllm-bench-cache"))
        rows = real_cpu_benchmark(args.variants, args.steps or 3, args.batch or 2, args.prompt_tokens, args.image_side,
                                  args.text_layers, args.vision_depth, args.mlp_chunks, args.malloc)
        device = f"CPU {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    else:
        rows = cpu_benchmark(args.steps or 8)
        device = f"CPU {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        columns = ["run", "batch", "steps", "step_s", "tokens_per_s", "peak_mem_mb"]

    print(f"\n{device}")
    if args.real_size:
        print_real_cpu(rows)
    else:
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(str(row.get(c, row.get("error", ""))) for c in columns))
    print(f"wrote {write_results(args, rows, device)}")
    return 0


def write_results(args: argparse.Namespace, rows: list[dict], device: str) -> Path:
    name = "train_step_gpu.json" if args.gpu else "train_step_real_cpu.json" if args.real_size else "train_step.json"
    out = args.out or HERE / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "train_step", "mode": "gpu" if args.gpu else "real_size_cpu" if args.real_size else "cpu",
                               "date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__,
                               "transformers": transformers.__version__, "results": rows}, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(main())
