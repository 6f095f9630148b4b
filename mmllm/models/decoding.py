"""How a ``generate`` call is set up for labelling: plain greedy decoding whatever the checkpoint
ships (:func:`greedy_config`, :func:`greedy_generation`), how a static cache's decoding step is
compiled, the attention kernels a CUDA model decodes with (:func:`decoding_kernels`), and telling a
compile failure from any other (:func:`compile_failed`)."""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from mmllm.models import cuda_graphs
from mmllm.predictor import STATIC_COMPILE


def compile_failed(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) comes from ``torch.compile`` (dynamo, inductor)."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__module__.startswith(("torch._dynamo", "torch._inductor")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False

def decoding_kernels(device: torch.device) -> Any:
    """SDPA without its cuDNN kernel while a CUDA model decodes; elsewhere nothing changes.

    cuDNN plans its attention per shape, and a growing cache gives every decoding step a key length
    it has not seen: on an H200 (torch 2.11, random Qwen2-VL-2B, 16 rows at batch 8) a first pass
    took 31.4 s with it and 11.2 s without, and a second pass over the same rows, every shape known,
    6.7 s against 7.1 s (two passes in a fresh process each, an ad-hoc script; benchmarks/RESULTS.md, "cuDNN's attention plans").
    A static cache has one key length, but it keeps the same kernels, so that its answers are the
    growing cache's: a kernel of another family sums in another order."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

def greedy_config(model: Any, stops: list[int], pad_token_id: int | None, compile: str | None = None) -> Any:
    """The clean greedy ``GenerationConfig`` for ``model``: no sampling, no penalties, our stop ids, and,
    for a static cache on a GPU, how ``generate`` compiles the decoding step (:data:`STATIC_COMPILE`):
    ``cudagraphs`` captures the eager kernels into CUDA graphs (no code generation, the same arithmetic),
    ``inductor`` transformers' default (fused kernels, CUDA graphs), ``eager`` no compile. ``None``:
    nothing said (a growing cache is never compiled; a compile setting there only draws a warning)."""
    from transformers import CompileConfig, GenerationConfig

    if compile is not None and compile not in STATIC_COMPILE:
        raise ValueError(f"static cache compile {compile!r}: one of {', '.join(STATIC_COMPILE)}")
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    how: dict[str, Any] = {}
    if compile == "eager":
        how["disable_compile"] = True
    elif compile == "cudagraphs":  # the stock backend would copy every weight before every replay
        how["compile_config"] = CompileConfig(backend=cuda_graphs.cudagraphs, mode="default")
    elif compile is not None:
        how["compile_config"] = CompileConfig(backend=compile, mode="reduce-overhead")
    return GenerationConfig(do_sample=False, num_beams=1, repetition_penalty=1.0, pad_token_id=pad_token_id,
                            eos_token_id=stops, bos_token_id=getattr(hf_model.generation_config, "bos_token_id", None), **how)

@contextmanager
def greedy_generation(model: Any, stops: list[int], pad_token_id: int | None, config: Any = None) -> Iterator[None]:
    """Plain greedy decoding for the duration of a ``generate`` call, whatever the checkpoint ships.

    A checkpoint's ``generation_config.json`` (Qwen's: sampling flags, ``repetition_penalty``
    1.05) fills every value a caller leaves unset, so a penalty would act on repeated JSON pieces
    (``null``, ``true``, ``","``) ahead of the grammar, and the ignored sampling flags print a
    warning. The model's own config is swapped for a clean one (``config``, built once by the
    caller, or :func:`greedy_config`) and restored afterwards; ``generate`` copies what it is given."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    shipped = hf_model.generation_config
    hf_model.generation_config = config if config is not None else greedy_config(model, stops, pad_token_id)
    try:
        yield
    finally:
        hf_model.generation_config = shipped
