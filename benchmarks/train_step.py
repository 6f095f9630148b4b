"""Training-step speed and memory.

CPU mode (default): the tiny config (``finetune/tiny_cpu.yaml``) through the real training loop
on the example catalog, reporting tokens/s, step time and peak memory per step.

GPU mode (``--gpu``): real-size Qwen2.5-VL-3B and Qwen2-VL-2B built from their published
configs with RANDOM weights (no download), LoRA in bf16 vs QLoRA (4-bit NF4), 448x448 images,
batch 4, gradient checkpointing, through mmllm's own model builder and loss. Step time,
tokens/s and peak CUDA memory are measured after warm-up steps.

    python benchmarks/train_step.py [--steps 8]
    python benchmarks/train_step.py --gpu [--models qwen2_5_vl_3b qwen2_vl_2b] [--modes lora qlora]

Prints a table and writes benchmarks/results/train_step[_gpu].json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

# Published sizes (config.json of the hub checkpoints), rebuilt here with random weights.
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
def build_config(name: str):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    spec = REAL[name]
    cls = Qwen2_5_VLConfig if spec["family"] == "qwen2_5_vl" else Qwen2VLConfig
    return cls(text_config=spec["text"], vision_config=spec["vision"], **IDS)


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


def gpu_run(name: str, mode: str, steps: int, warmup: int, image_side: int, batch: int) -> dict:
    from mmllm.models.generative import LoraSettings, ModelConfig, attach_lora, load_base_model
    from mmllm.training import causal_lm_loss
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        # random weights saved once, then loaded through mmllm's own builder (QLoRA quantizes on load)
        with torch.device("cuda"):
            model = AutoModelForImageTextToText.from_config(build_config(name), dtype=torch.bfloat16)
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        cfg = ModelConfig(base=tmp, dtype="bfloat16", attn_implementation="auto",
                          quantization="4bit" if mode == "qlora" else "none", gradient_checkpointing=True)
        model = load_base_model(cfg, device_map={"": 0})
    model = attach_lora(model, LoraSettings(rank=16, alpha=32), quantized=mode == "qlora", gradient_checkpointing=True)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    inputs = synthetic_batch(image_side, batch, text_tokens=400, answer_tokens=120, device="cuda")
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
    step_s = sum(times) / len(times)
    tokens = int(inputs["attention_mask"].sum())
    result = {
        "model": name, "mode": mode, "attention": model.config._attn_implementation if hasattr(model, "config") else "?",
        "batch": batch, "image": f"{image_side}x{image_side}", "seq_len": int(inputs["input_ids"].shape[1]),
        "step_s": round(step_s, 3), "tokens_per_s": round(tokens / step_s), "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "trainable_params_m": round(sum(p.numel() for p in trainable) / 1e6, 1), "loss": round(float(loss_sum / items), 3),
    }
    del model, optimizer, inputs
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="real-size models on a CUDA GPU")
    parser.add_argument("--models", nargs="+", default=list(REAL), choices=list(REAL))
    parser.add_argument("--modes", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    parser.add_argument("--steps", type=int, default=8, help="measured steps (GPU: after 2 warm-up steps)")
    parser.add_argument("--image-side", type=int, default=448)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    if args.gpu:
        if not torch.cuda.is_available():
            print("--gpu needs a CUDA device", file=sys.stderr)
            return 2
        rows = []
        for name in args.models:
            for mode in args.modes:
                try:
                    rows.append(gpu_run(name, mode, args.steps, 2, args.image_side, args.batch))
                except Exception as exc:  # one failing mode (e.g. no bitsandbytes) must not lose the others
                    rows.append({"model": name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(json.dumps(rows[-1]), flush=True)
        device = torch.cuda.get_device_name(0)
        columns = ["model", "mode", "attention", "batch", "image", "seq_len", "step_s", "tokens_per_s", "peak_mem_gb", "trainable_params_m"]
    else:
        rows = cpu_benchmark(args.steps)
        device = f"CPU {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        columns = ["run", "batch", "steps", "step_s", "tokens_per_s", "peak_mem_mb"]

    print(f"\n{device}")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row.get(c, row.get("error", ""))) for c in columns))
    out = args.out or HERE / "results" / ("train_step_gpu.json" if args.gpu else "train_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "train_step", "date": time.strftime("%Y-%m-%d"), "device": device,
                               "torch": torch.__version__, "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
