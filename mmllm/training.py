"""The training loop shared by every model variant: data order, steps, checkpoints, logging.

One code path for 1 CPU, 1 GPU and ``accelerate launch`` / ``torchrun`` with several processes
(DDP; FSDP and DeepSpeed through accelerate's own state saving). What differs between model
variants is passed in: the model, the collator and a ``loss_fn(model, batch) -> (loss_sum,
n_items)``.

Exact resume: the data order of epoch ``e`` is a permutation seeded by ``seed + e``; every
example gets its own augmentation seed from (seed, epoch, index); a checkpoint holds the
trainable weights, optimizer, scheduler and RNG states at an optimizer-step boundary. A run
resumed from step ``k`` therefore replays steps ``k+1...`` exactly as an uninterrupted run.
SIGINT / SIGTERM (a cluster pre-empting the job) save a checkpoint at the next step and stop.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmllm import interrupt
from mmllm.config import help_field
from mmllm.host_memory import return_large_frees_to_os
from mmllm.progress import Progress

LossFn = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
CountFn = Callable[[dict[str, torch.Tensor]], int]


def count_answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """What the generative loss averages over: supervised next-token targets."""
    return int((batch["labels"][:, 1:] != -100).sum())


class NonFiniteLoss(ValueError):
    """Training stopped: a step's loss was NaN or infinite (the weights it would give are no model)."""


class ResumeError(ValueError):
    """``train.resume`` cannot continue: no checkpoint, or one of another model (another config)."""


@dataclass
class TrainConfig:
    """Optimization, schedule, checkpoints."""

    output_dir: str = help_field("runs/finetune", "model folder to write (checkpoints under output_dir/checkpoints)")
    epochs: int = help_field(1, "passes over the training rows (ignored when max_steps is set)")
    max_steps: int | None = help_field(None, "optimizer steps in total; overrides epochs")
    batch_size: int = help_field(1, "listings per process per micro-batch")
    grad_accum: int = help_field(8, "micro-batches per optimizer step; effective batch = batch_size x grad_accum x processes")
    lr: float = help_field(2e-4, "peak learning rate; 1e-4 to 3e-4 is usual for LoRA")
    weight_decay: float = help_field(0.0, "AdamW weight decay on trainable weights")
    warmup_ratio: float = help_field(0.03, "share of steps with linear warmup")
    schedule: Literal["cosine", "linear", "constant"] = help_field("cosine", "learning-rate decay after warmup")
    max_grad_norm: float = help_field(1.0, "gradient clipping; 0 disables")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = help_field("auto", "auto = bf16 on GPUs that have it, none on CPU")
    seed: int = help_field(0, "seeds weights init of LoRA, data order and augmentation")
    log_every: int = help_field(10, "optimizer steps between metric lines")
    save_every: int = help_field(200, "optimizer steps between checkpoints; 0 = only at the end (and where a Ctrl-C "
                                      "stops the run)")
    keep_checkpoints: int = help_field(2, "most recent checkpoints kept on disk")
    resume: bool = help_field(False, "continue the run in output_dir from its latest checkpoint")
    num_workers: int = help_field(2, "data-loader processes decoding images while the model trains (0 = in-process)")

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "epochs", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1 (or null to use train.epochs), got {self.max_steps}")
        for name in ("save_every", "num_workers", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        # NaN compares false with everything, so each check is written to fail on it
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr must be a positive number (e.g. 2e-4), got {self.lr}")
        for name in ("weight_decay", "max_grad_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"train.{name} must be a number >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.output_dir or not str(self.output_dir).strip():
            raise ValueError("train.output_dir is empty: name the model folder to write")


# ---------------------------------------------------------------------- data order
@dataclass(frozen=True)
class StepPlan:
    """How rows become optimizer steps on this process."""

    rows: int
    batch_size: int
    grad_accum: int
    world: int
    rank: int
    seed: int

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.rows / self.rows_per_step))

    def micro_batches(self, start_step: int, total_steps: int) -> Iterator[tuple[int, list[tuple[int, int]]]]:
        """(step, [(row index, example seed), ...]) for this process, from ``start_step`` on."""
        step = start_step
        while step < total_steps:
            epoch, offset = divmod(step, self.steps_per_epoch)
            order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            need = self.steps_per_epoch * self.rows_per_step
            order = (order * math.ceil(need / len(order)))[:need]  # wrap around, like DistributedSampler
            for s in range(offset, self.steps_per_epoch):
                if step >= total_steps:
                    return
                chunk = order[s * self.rows_per_step:(s + 1) * self.rows_per_step]
                for micro in range(self.grad_accum):
                    first = (micro * self.world + self.rank) * self.batch_size
                    items = chunk[first:first + self.batch_size]
                    yield step, [(i, _example_seed(self.seed, epoch, i)) for i in items]
                step += 1


def _example_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_000_019 + index) % (2**31)


class _MicroBatches(torch.utils.data.Dataset):
    """Precomputed micro-batches as a map-style dataset so DataLoader workers can collate them."""

    def __init__(self, plan: list[list[tuple[int, int]]], rows: Sequence[Any], collate: Callable) -> None:
        self.plan, self.rows, self.collate = plan, rows, collate

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.collate([(self.rows[j], seed) for j, seed in self.plan[i]])


# ---------------------------------------------------------------------- loss
def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over supervised tokens, and their count.

    The output layer runs only where a label is supervised (``logits_to_keep``: the positions
    whose next token is an answer token in any row of the batch), so a 1,400-token prompt over a
    151,936-entry vocabulary never becomes a [batch, tokens, vocabulary] float32 tensor: the
    answer is a few dozen tokens. Models whose forward takes no ``logits_to_keep`` get every
    position, with the same loss. No decoding cache is built (``use_cache=False``): training never
    reads one, and under gradient checkpointing transformers would turn it off with a warning.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    shift_labels = labels[:, 1:]  # the logit at position t predicts token t + 1
    if _takes_logits_to_keep(model):
        keep = (shift_labels != -100).any(0).nonzero().squeeze(-1)  # [K] positions, shared by the batch
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # [B, K, V]
        shift_labels = shift_labels[:, keep.to(shift_labels.device)]
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1]  # [B, T - 1, V]
    shift_labels = shift_labels.to(logits.device)
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, (shift_labels != -100).sum()


def _takes_logits_to_keep(model: Any) -> bool:
    """Whether the causal LM under any wrapper (DDP / FSDP ``module``, PEFT) has ``logits_to_keep``."""
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


# ---------------------------------------------------------------------- the loop
@dataclass
class LoopResult:
    steps: int
    interrupted: bool
    wall_s: float
    last_metrics: dict[str, Any]


_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def train_loop(
    cfg: TrainConfig,
    accelerator: Any,
    model: Any,
    rows: Sequence[Any],
    collate: Callable,
    loss_fn: LossFn,
    out_dir: Path,
    evaluate: Callable[[Any, int], dict[str, Any]] | None = None,
    eval_every: int = 0,
    count_items: CountFn = count_answer_tokens,
    final_checkpoint: bool = True,
) -> LoopResult:
    """Train ``model`` on ``rows``; metrics go to ``out_dir/metrics.jsonl``.

    A checkpoint is saved every ``cfg.save_every`` steps, where a Ctrl-C stops the run, and at the last
    step (``final_checkpoint``): a run stopped while its model folder is written resumes from there.

    ``count_items(batch)`` says what the loss is averaged over (answer tokens for generation,
    rows for classification), so every item weighs the same across micro-batches and processes.
    """
    plan = StepPlan(len(rows), cfg.batch_size, cfg.grad_accum, accelerator.num_processes, accelerator.process_index, cfg.seed)
    if accelerator.device.type == "cpu":
        return_large_frees_to_os()  # freed activations leave the heap: ~850 MB less at a real-size step (host_memory)
    total_steps = cfg.max_steps or cfg.epochs * plan.steps_per_epoch
    trainable = [p for p in model.parameters() if p.requires_grad]
    # on the CPU the fused kernel takes a fifth of the default per-tensor loop's time (51 -> 10 ms a step
    # for the fusion recipe's 6 M parameters); elsewhere PyTorch's own default (foreach on CUDA)
    fused = accelerator.device.type == "cpu" and all(p.dtype in _FUSED_DTYPES for p in trainable) or None
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    scheduler = _scheduler(cfg, optimizer, total_steps)
    sharded = accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")
    if accelerator.distributed_type.name == "DEEPSPEED":
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    # the scheduler is stepped by hand once per optimizer step, so it is not handed to prepare()
    model, optimizer = accelerator.prepare(model, optimizer)

    ckpt_root = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    # what decides which rows each step reads: a resume under another plan would not continue this run (its
    # steps would read other rows); more steps (train.max_steps, epochs) may be asked of a resumed run
    data_plan = {"rows": len(rows), "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
                 "processes": accelerator.num_processes}
    start_step, trained_s, window = 0, 0.0, None  # trained_s: the seconds spent on the steps before a resume
    if cfg.resume:
        start_step, trained_s, window = _restore(ckpt_root, accelerator, model, optimizer, scheduler, sharded,
                                                 data_plan)
        if accelerator.is_main_process:
            _truncate_metrics(metrics_path, start_step)
    stop = _StopFlag()
    micro_plan = [items for _, items in plan.micro_batches(start_step, total_steps)]
    loader = torch.utils.data.DataLoader(
        _MicroBatches(micro_plan, rows, collate), batch_size=None, shuffle=False,
        num_workers=cfg.num_workers, persistent_workers=False, prefetch_factor=2 if cfg.num_workers else None,
        # its own generator: creating the iterator would otherwise draw from the global torch
        # RNG, and a resumed run (which creates it later) would then see other dropout masks
        generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=_ignore_interrupts if cfg.num_workers else None,
    )
    batches = iter(loader)
    model.train()
    progress = Progress("train", total_rows=total_steps - start_step, enabled=accelerator.is_main_process,
                        log_every_s=30, unit="steps")
    # the steps since the last logged line (a resume restores them: its first line averages the same steps)
    window = window or _empty_window()
    last: dict[str, Any] = {}
    step = start_step
    started = time.perf_counter()
    interrupted = False
    try:  # the Ctrl-C handler goes back whatever ends the loop (a NaN loss, an error in a step)
        while step < total_steps:
            tick = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            # Normalize by the supervised tokens of the whole step on all processes, so every token
            # weighs the same however the padding and accumulation fall.
            local_items = sum(count_items(m) for m in micro)
            items = accelerator.reduce(torch.tensor(float(local_items), device=accelerator.device), reduction="sum")
            scale = accelerator.num_processes / items.clamp(min=1.0)
            step_loss = 0.0
            for i, batch in enumerate(micro):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                sync = i == len(micro) - 1
                with (accelerator.no_sync(model) if not sync and accelerator.num_processes > 1 else _nullcontext()):
                    with accelerator.autocast():
                        loss_sum, _ = loss_fn(model, batch)
                    accelerator.backward(loss_sum * scale)
                step_loss += float(loss_sum.detach())
                window["tokens"] += int(batch["attention_mask"].sum())
            step_total = float(accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), reduction="sum"))
            if not math.isfinite(step_total):  # before the step (the weights stay the last finite ones), on every process
                raise NonFiniteLoss(f"step {step + 1}: the loss is {step_total} (not a finite number); lower train.lr, check "
                                    "the data and the lora / fusion settings, then train.resume=true from the last "
                                    "checkpoint or start again; no model folder was written")
            grad_norm = accelerator.clip_grad_norm_(trainable if not sharded else model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            lr = optimizer.param_groups[0]["lr"]  # the rate this step takes (after it the scheduler moves to the next)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            window["loss_sum"] += step_total
            window["items"] += float(items)
            window["time"] += time.perf_counter() - tick
            window["steps"] += 1
            if step % cfg.log_every == 0 or step == total_steps:
                last = {
                    "step": step, "epoch": round(step / plan.steps_per_epoch, 3),
                    "loss": round(window["loss_sum"] / max(window["items"], 1.0), 5),  # per item (token / row)
                    "lr": float(f"{lr:.6g}"),
                    "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
                    "tokens_per_s": round(window["tokens"] * accelerator.num_processes / max(window["time"], 1e-9), 1),
                    "step_s": round(window["time"] / window["steps"], 4),
                    "peak_mem_mb": _peak_memory_mb(),
                }
                window = _empty_window()
                _log(accelerator, metrics_path, last, progress)
            if evaluate is not None and eval_every and step % eval_every == 0 and step < total_steps:
                _log(accelerator, metrics_path, {"step": step, **evaluate(accelerator.unwrap_model(model), step)}, progress)
                model.train()
            interrupted = stop.requested  # at the last step too: what follows the loop may take minutes
            if (cfg.save_every and step % cfg.save_every == 0) or interrupted or (final_checkpoint and step == total_steps):
                _save_checkpoint(ckpt_root, step, accelerator, model, optimizer, scheduler, sharded,
                                 cfg.keep_checkpoints, data_plan, trained_s + time.perf_counter() - started, window)
            if interrupted:
                break
    finally:
        progress.close()
        stop.restore()
    return LoopResult(step, interrupted, trained_s + time.perf_counter() - started, last)


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(total_steps * cfg.warmup_ratio), num_training_steps=total_steps)


def _log(accelerator: Any, path: Path, record: dict[str, Any], progress: Progress) -> None:
    if not accelerator.is_main_process:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    shown = ", ".join(f"{k}={v}" for k, v in record.items() if k != "step" and v is not None)
    text = f"step {record['step']}: {shown}"
    if progress._bar is not None:
        progress._bar.write(text)
    else:
        print(text, flush=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the resumed step, so a resumed run has no duplicates; and a line the stopped
    run left unfinished (killed mid-write)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if (isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step
                and not record.get("final")):  # the final evaluation is done again after any resume
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _empty_window() -> dict[str, Any]:
    """What the loop adds up between two logged lines."""
    return {"loss_sum": 0.0, "items": 0.0, "tokens": 0, "time": 0.0, "steps": 0}


def _ignore_interrupts(worker_id: int) -> None:
    """In a data-loader worker: a terminal's Ctrl-C reaches every process of the group, and the main process
    alone saves the checkpoint and stops (each worker printed the stop message too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _StopFlag:
    """SIGINT / SIGTERM ask the loop to checkpoint and stop at the next step boundary (the last step
    included: the folder is then left unfinished, for ``train.resume=true``). Under
    :func:`mmllm.interrupt.run` a second Ctrl-C stops at once (``os._exit(130)``) and the run leaves as an
    interrupted command; called in-process, a second signal raises ``KeyboardInterrupt``."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        self._handed_over = False  # SIGINT went back to mmllm.interrupt's "stop now"
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal stops at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nsignal {signum}: saving a checkpoint at the end of this step, then stopping", flush=True)
        if signum == signal.SIGINT:
            self._handed_over = interrupt.taken()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            if sig == signal.SIGINT and self._handed_over:
                continue  # the next Ctrl-C stops at once, after the loop too
            signal.signal(sig, handler)


# ---------------------------------------------------------------------- checkpoints
def _save_checkpoint(root: Path, step: int, accelerator: Any, model: Any, optimizer: Any, scheduler: Any,
                     sharded: bool, keep: int, data_plan: dict[str, Any] | None = None, trained_s: float = 0.0,
                     window: dict[str, Any] | None = None) -> None:
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    if sharded:
        accelerator.save_state(str(tmp))
    elif accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        weights = {n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    _save_rng_state(tmp, accelerator.process_index)  # every process has its own dropout RNG
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "processes": accelerator.num_processes,
                                                    "plan": data_plan or {}, "trained_s": round(trained_s, 3),
                                                    "log_window": window or {}}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # a checkpoint exists whole or not at all
        for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def latest_checkpoint(root: Path) -> Path | None:
    done = [p for p in sorted(root.glob("step-*")) if (p / "state.json").exists()]
    return done[-1] if done else None


def _restore(root: Path, accelerator: Any, model: Any, optimizer: Any, scheduler: Any, sharded: bool,
             data_plan: dict[str, Any] | None = None) -> tuple[int, float, dict[str, Any] | None]:
    """The latest checkpoint's weights, optimizer, schedule and RNG states; its step, training seconds and
    the steps since its last logged line."""
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        raise ResumeError(f"train.resume=true but {root} holds no finished checkpoint")
    saved = json.loads((ckpt / "state.json").read_text()).get("plan") or {}  # none in checkpoints from before it
    changed = [f"{k}: {saved[k]} then, {data_plan[k]} now" for k in saved if data_plan and saved[k] != data_plan.get(k)]
    if changed:
        raise ResumeError(f"{ckpt}: the run was started with another data plan ({'; '.join(changed)}): a resume must "
                          "read the same rows in the same order (train.batch_size, grad_accum, seed, the training "
                          "rows, the processes); resume with the run's own config, or start a new run")
    if sharded:
        accelerator.load_state(str(ckpt))
    else:
        weights = load_file(str(ckpt / "trainable.safetensors"))
        unwrapped = accelerator.unwrap_model(model)
        missing = set(weights) - {n for n, _ in unwrapped.named_parameters()}
        if missing:
            raise ResumeError(f"{ckpt}: checkpoint does not match the model (unknown weights {sorted(missing)[:3]}): "
                              "resume with the run's own config, or start a new run")
        params = dict(unwrapped.named_parameters())
        absent = sorted(n for n, p in params.items() if p.requires_grad and n not in weights)
        if absent:
            raise ResumeError(f"{ckpt}: checkpoint does not match the model (trainable weights it does not hold: "
                              f"{absent[:3]}): resume with the run's own config, or start a new run")
        reshaped = [n for n, t in weights.items() if tuple(t.shape) != tuple(params[n].shape)]
        if reshaped:
            name = reshaped[0]
            raise ResumeError(f"{ckpt}: checkpoint does not match the model ({name}: {tuple(weights[name].shape)} saved, "
                             f"{tuple(params[name].shape)} now): resume with the run's own config "
                             "(output_dir/config.yaml or the first command), or start a new run")
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor.to(params[name].device))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
    _load_rng_state(ckpt, accelerator.process_index)
    state = json.loads((ckpt / "state.json").read_text())
    step = state["step"]
    if accelerator.is_main_process:
        print(f"resumed from {ckpt} (step {step})", flush=True)
    return step, float(state.get("trained_s", 0.0)), state.get("log_window") or None


def _save_rng_state(folder: Path, rank: int) -> None:
    """RNG states without pickle: tensors in safetensors, Python / NumPy states as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(folder / f"rng-{rank}.safetensors"))
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    (folder / f"rng-{rank}.json").write_text(json.dumps({
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }))


def _load_rng_state(folder: Path, rank: int) -> None:
    if not (folder / f"rng-{rank}.json").exists():  # resumed with more processes than saved
        rank = 0
    tensors = load_file(str(folder / f"rng-{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    state = json.loads((folder / f"rng-{rank}.json").read_text())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
