"""Generative fine-tuning end to end on tiny checkpoints: LoRA placement, learning, reload in a
new process, text-only rows, exact resume, two CPU processes, QLoRA, merge, configs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmllm.catalog import load_listings
from mmllm.config import ConfigError
from mmllm.finetune import RECIPES, finetune, load_recipe_config, main
from mmllm.models.generative import LANGUAGE_LORA, LoraSettings, ModelConfig, attach_lora, load_base_model, lora_module_names
from mmllm.schema import LabelSchema

from helpers import ROOT, reload_in_fresh_process, require
from listings import write_catalog

TINY = ROOT / "finetune" / "tiny_cpu.yaml"


def overrides(tmp: Path, catalog: Path, arch: str = "qwen2_vl", **extra: object) -> list[str]:
    base = {
        "model.base": f"tiny:{arch}", "data.train": catalog, "data.dev": catalog, "data.schema": catalog.parent / "schema.yaml",
        "data.max_train_rows": "null", "data.max_dev_rows": "null", "train.output_dir": tmp / "out",
        "train.batch_size": 4, "train.grad_accum": 1, "train.lr": 0.01, "lora.rank": 16, "lora.alpha": 32,
        "train.save_every": 0, "train.log_every": 20, "eval.every": 0, "eval.generate_rows": 4, "eval.loss_rows": 4,
        "eval.max_new_tokens": 64,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_lora_goes_on_the_language_model_only_by_default(tiny_checkpoint):
    model = load_base_model(ModelConfig(base=str(tiny_checkpoint("qwen2_5_vl")), dtype="float32"))
    peft_model = attach_lora(model, LoraSettings(rank=4))
    names = lora_module_names(peft_model)
    suffixes = sorted({n.split("layers.")[1].split(".", 1)[1] for n in names})
    assert suffixes == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                        "self_attn.q_proj", "self_attn.v_proj"]
    assert len(names) == 7 * 2 and all(".language_model.layers." in n for n in names)
    assert not any("visual" in n for n in names)  # Qwen2.5-VL's vision MLP reuses gate/up/down_proj names
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_vision_lora_and_merger_training_are_opt_in(tiny_checkpoint):
    model = load_base_model(ModelConfig(base=str(tiny_checkpoint("qwen3_vl")), dtype="float32"))
    peft_model = attach_lora(model, LoraSettings(rank=4, vision=True, train_merger=True))
    names = lora_module_names(peft_model)
    assert any(".visual.blocks.0.attn.qkv" in n for n in names) and any(".visual.blocks.1.mlp.linear_fc2" in n for n in names)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("merger" in n and "lora_" not in n for n in trainable)
    with pytest.raises(ValueError, match="matches no module"):
        attach_lora(load_base_model(ModelConfig(base=str(tiny_checkpoint("qwen2_vl")), dtype="float32")),
                    LoraSettings(target=r".*no_such_layer"))


def test_every_shipped_config_loads_and_says_how_to_run_it():
    configs = sorted((ROOT / "finetune").glob("*.yaml"))
    names = {p.name for p in configs}
    assert {"tiny_cpu.yaml", "qwen2_5_vl_3b_lora.yaml", "qwen2_5_vl_3b_qlora.yaml", "qwen2_vl_2b_lora.yaml",
            "qwen3_vl_4b_lora.yaml"} <= names
    tasks = set()
    for path in configs:
        cfg = load_recipe_config(path)
        tasks.add(cfg.task)
        assert isinstance(cfg, RECIPES[cfg.task][0]), path
        head = path.read_text().split("\n", 1)[0]
        assert head.startswith("#"), path
        assert "mmllm.finetune --config finetune/" + path.name in path.read_text(), path
        if hasattr(cfg, "lora"):
            # LoRA on the language-model linears only: attach_lora adds the vision blocks when lora.vision is on
            assert (cfg.lora.target, cfg.lora.vision) == (LANGUAGE_LORA, False), path
    assert tasks == set(RECIPES)
    assert load_recipe_config(ROOT / "finetune/qwen2_5_vl_3b_qlora.yaml").model.quantization == "4bit"


def test_each_recipe_config_holds_only_the_keys_its_recipe_reads(capsys):
    fusion = ROOT / "finetune/fusion_minilm_cpu.yaml"
    cfg = load_recipe_config(fusion)
    assert [f.name for f in dataclasses.fields(cfg)] == ["task", "model", "data", "train", "eval", "heads", "fusion", "anchor",
                                                   "lexicon", "vote", "grounding"]
    assert (cfg.heads.label_smoothing, cfg.heads.bins, cfg.model.max_images) == (0.05, 32, 2)
    with pytest.raises(ConfigError, match=rf"^{fusion}: unknown key 'lora'; known: task, model, data, train, eval, "
                                          "heads, fusion, anchor, lexicon, vote, grounding$"):
        load_recipe_config(fusion, ["lora.rank=8"])
    with pytest.raises(ConfigError, match=r"unknown key 'heads.label_smothing'; did you mean 'heads.label_smoothing'\?"):
        load_recipe_config(fusion, ["heads.label_smothing=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key 'eval.generate_rows'; known: every, loss_rows"):
        load_recipe_config(ROOT / "finetune/tiny_cpu_classify.yaml", ["eval.generate_rows=4"])
    assert type(load_recipe_config(None, ["task=fusion"])).__name__ == "FusionRecipeConfig"  # task= overrides too
    assert main(["--config", str(TINY), "task=fusio"]) == 2
    assert f"{TINY}: 'task' must be one of ['generate', 'classify', 'fusion'], got 'fusio'" in capsys.readouterr().err
    assert main(["--config", str(fusion), "--print-config"]) == 0
    keys = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert {"heads.bins", "fusion.method", "model.max_images", "eval.loss_rows"} <= keys
    assert not any(k.startswith(("lora.", "augment.", "classify.", "model.base")) for k in keys)
    with pytest.raises(TypeError, match="not a recipe config"):
        finetune(object())


def test_bad_config_exits_with_a_clear_message(capsys):
    assert main(["--config", str(TINY), "train.lr=fast"]) == 2
    assert "'train.lr' must be a number" in capsys.readouterr().err
    assert main(["--config", str(TINY), "--print-config"]) == 0
    assert "lora.alpha" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 240 steps + a reload in a new process: about 7 min (qwen2_vl) measured on 2 busy cores
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_learns_exact_json_and_reloads_in_a_new_process(tmp_path, arch):
    catalog = write_catalog(tmp_path / "data", n=12)  # every 4th: 3 of 12 listings have no image
    cfg = load_recipe_config(TINY, overrides(tmp_path, catalog, arch, **{"train.max_steps": 240}))
    summary = finetune(cfg)
    out = tmp_path / "out"
    assert summary["steps"] == 240 and summary["json_valid"] == 1.0
    for name in ("adapter_model.safetensors", "adapter_config.json", "prompt_template.yaml", "label_schema.yaml",
                 "config.yaml", "metrics.jsonl", "training_curves.png", "README.md", "mmllm_model.json",
                 "tokenizer.json", "processor_config.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    meta = json.loads((out / "mmllm_model.json").read_text())
    assert meta["kind"] == "generative-lora" and meta["template"] == "listing_v1"
    records = reload_in_fresh_process(out, catalog)
    rows = load_listings(catalog)
    schema = LabelSchema.from_yaml(out / "label_schema.yaml")  # the folder's own, as the reloaded model uses
    golds = [schema.validate(row.label).value for row in rows]
    exact = sum(r["status"] == "ok" and r["category"] == g["category"] and r["attributes"] == g["attributes"]
                for r, g in zip(records, golds))
    assert len(records) == len(rows) and exact >= 0.9 * len(rows), records
    text_only = [r for r, row in zip(records, rows) if not row.images]
    assert len(text_only) == 3 and all(r["status"] == "ok" for r in text_only)


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.slow
def test_resume_after_kill_or_ctrl_c_gives_the_same_weights(tmp_path):
    catalog = write_catalog(tmp_path / "data", n=12)
    extra = {"train.max_steps": 60, "train.save_every": 5, "train.batch_size": 2, "train.grad_accum": 2,
             "lora.dropout": 0.1, "augment.image_flip": 0.5, "augment.title_perturb": 0.3, "data.dev": "null"}
    straight = tmp_path / "straight"
    finetune(load_recipe_config(TINY, overrides(straight, catalog, **extra)))
    reference = _adapter(straight / "out")

    for how in (signal.SIGKILL, signal.SIGINT):
        run = tmp_path / f"run-{how.name}"
        args = [sys.executable, "-m", "mmllm.finetune", "--config", str(TINY), *overrides(run, catalog, **extra)]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.monotonic() + 800  # a hang guard only (pytest-timeout is 900 s): a loaded machine is slow
        while not list((run / "out" / "checkpoints").glob("step-00000005")):
            assert proc.poll() is None, "the run ended before it could be interrupted"
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("step 5 was never checkpointed")
            time.sleep(0.02)
        proc.send_signal(how)
        code = proc.wait(timeout=120)
        assert not (run / "out" / "adapter_model.safetensors").exists()
        if how == signal.SIGINT:
            assert code == 130  # checkpointed at the next step boundary, then stopped
        steps_done = max(int(p.name.split("-")[1]) for p in (run / "out" / "checkpoints").glob("step-*"))
        assert 5 <= steps_done < 60
        finetune(load_recipe_config(TINY, overrides(run, catalog, **extra, **{"train.resume": "true"})))
        resumed = _adapter(run / "out")
        assert resumed.keys() == reference.keys()
        for name in reference:
            assert torch.equal(resumed[name], reference[name]), (how.name, name)
        steps = [json.loads(line)["step"] for line in (run / "out" / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == 60  # resumed metrics: no duplicates
        # the logged losses too: the steps since the last line before the stop count in the first line after it
        losses = [(r["step"], r["loss"]) for r in map(json.loads, (run / "out" / "metrics.jsonl").read_text()
                                                      .splitlines()) if "loss" in r]
        assert losses == [(r["step"], r["loss"]) for r in map(json.loads, (straight / "out" / "metrics.jsonl")
                                                               .read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_two_cpu_processes_train_together(tmp_path):
    catalog = write_catalog(tmp_path / "data", n=8)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # `accelerate launch --cpu --num_processes 2` silently runs ONE process; torchrun with
    # ACCELERATE_USE_CPU=1 gives a real two-process gloo group.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mmllm.finetune",
           "--config", str(TINY), *overrides(tmp_path, catalog, **{"train.max_steps": 4, "train.batch_size": 2,
                                                                      "data.dev": "null"})]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((tmp_path / "out" / "mmllm_model.json").read_text())
    assert meta["training"]["distributed_type"] == "MULTI_CPU" and meta["training"]["num_processes"] == 2
    assert len(list((tmp_path / "out").glob("adapter_model*.safetensors"))) == 1
    assert "MULTI_CPU x 2 process(es)" in result.stdout


@pytest.mark.slow
def test_qlora_4bit_trains_on_cpu(tmp_path, tiny_checkpoint):
    bnb = require("bitsandbytes", "qlora")
    model = load_base_model(ModelConfig(base=str(tiny_checkpoint("qwen2_vl")), quantization="4bit"))
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all("language_model" in n for n in quantized)  # vision tower and lm_head skipped
    catalog = write_catalog(tmp_path / "data", n=4)
    cfg = load_recipe_config(TINY, overrides(tmp_path, catalog, **{
        "model.quantization": "4bit", "train.max_steps": 3, "data.dev": "null", "train.log_every": 1}))
    summary = finetune(cfg)
    assert summary["steps"] == 3
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert json.loads((tmp_path / "out" / "mmllm_model.json").read_text())["model"]["quantization"] == "4bit"
    assert (tmp_path / "out" / "adapter_model.safetensors").stat().st_size > 0


def test_a_4bit_base_keeps_its_other_weights_in_bf16_and_trains_lora_only(tiny_checkpoint):
    """peft's kbit preparation would copy the vision tower and the embedding to float32 (on the GPU,
    Qwen2.5-VL-3B QLoRA peaked at 9.93 GiB with it); attach_lora leaves them as loaded."""
    bnb = require("bitsandbytes", "qlora")
    model = load_base_model(ModelConfig(base=str(tiny_checkpoint("qwen2_5_vl")), dtype="bfloat16", quantization="4bit"))
    loaded = {n: p.dtype for n, p in model.named_parameters()}
    peft_model = attach_lora(model, LoraSettings(rank=4, dropout=0.0), gradient_checkpointing=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in peft_model.modules())
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and param.dtype == torch.float32, name
        else:
            assert not param.requires_grad, name
            assert param.dtype == loaded[name.replace("base_model.model.", "", 1).replace(".base_layer", "")], name
    assert {p.dtype for n, p in peft_model.named_parameters() if ".visual." in n} == {torch.bfloat16}
    assert peft_model.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = torch.randint(0, 1000, (2, 12))
    peft_model.train()
    out = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert torch.isfinite(out.loss) and grads and all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_a_float16_4bit_base_keeps_peft_preparation_float32_outside_4bit(tiny_checkpoint):
    """float16 (GPUs without bf16) keeps the float32 copies: float16's range, and a trained merger
    whose gradients float16 mixed precision must unscale."""
    bnb = require("bitsandbytes", "qlora")
    model = load_base_model(ModelConfig(base=str(tiny_checkpoint("qwen2_5_vl")), dtype="float16", quantization="4bit"))
    peft_model = attach_lora(model, LoraSettings(rank=4, train_merger=True), gradient_checkpointing=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in peft_model.modules())
    assert {p.dtype for n, p in peft_model.named_parameters() if ".visual." in n} == {torch.float32}
    trainable = {n: p.dtype for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("merger" in n and "lora_" not in n for n in trainable) and set(trainable.values()) == {torch.float32}


@pytest.mark.slow
def test_merge_writes_a_standalone_model_that_answers_the_same(tmp_path):
    from transformers import AutoModelForImageTextToText

    from mmllm.images import ImagePolicy
    from listings import load_model_dir

    catalog = write_catalog(tmp_path / "data", n=4)
    finetune(load_recipe_config(TINY, overrides(tmp_path, catalog, **{"train.max_steps": 30, "data.dev": "null"})))
    assert main(["merge", str(tmp_path / "out"), str(tmp_path / "merged")]) == 0
    merged_dir = tmp_path / "merged"
    assert not (tmp_path / "merged.merging").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "config"}')
    adapter_files = sorted(p.name for p in (tmp_path / "out").iterdir())
    for target in (mine, tmp_path / "out"):  # a folder of the user's, the adapter's own: never written over
        assert main(["merge", str(tmp_path / "out"), str(target)]) == 2
    assert (mine / "config.json").read_text() == '{"my": "config"}' and sorted(p.name for p in mine.iterdir()) == ["config.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == adapter_files
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    AutoModelForImageTextToText.from_pretrained(merged_dir)  # plain transformers loads it
    rows = load_listings(catalog)
    policy = ImagePolicy(root=catalog.parent)
    adapter_texts = load_model_dir(tmp_path / "out").generate(rows, policy)
    merged_texts = load_model_dir(merged_dir).generate(rows, policy)
    assert merged_texts == adapter_texts
