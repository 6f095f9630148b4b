"""CUDA graphs of the eager kernels, with the weights left where they are.

A decoding step of a 2B model launches ~1,400 kernels, and eager decoding on a GPU waits on the host
that launches them. A CUDA graph records the launches once and replays them with one call. Dynamo's
stock ``cudagraphs`` backend records the eager kernels themselves (no code generation: the same
arithmetic, so the same greedy answers, where inductor's fused kernels round differently), but since
dynamo inlines ``nn.Module`` calls it counts no input as fixed: every weight is then copied into the
graph's own memory before every replay. On an H200 (torch 2.11, random Qwen2-VL-2B, batch 8, a
static cache) that was 515 copies a step, ~3 ms of device time, and a step of 21.3 ms against 24.3 ms
for the static cache uncompiled and 23.5 ms for the growing one (``benchmarks/label_throughput.py --gpu
--static-cache``, 2026-12-04); with the weights read in place, 20.2 ms against the growing cache's 31.7
on another machine, the same 16 / 16 answers.

:func:`cudagraphs` is the stock backend told which inputs have fixed addresses: the tracing
context's static inputs, the ones inductor's own CUDA graphs use (parameters, buffers, and tensors
marked static, as transformers marks a ``StaticCache``'s keys and values). The graph reads them in
place; a static input at a new address (a new model, a new cache) is re-recorded, not copied, which
is why :class:`~mmllm.models.generative.GenerativePredictor` keeps one static cache per batch shape.
Only the forward (inference) graph is changed: a backward graph keeps the stock backend's inputs.
"""

from __future__ import annotations

from typing import Any, Sequence
from unittest import mock

import torch


def static_input_indices(fixed: Sequence[int]) -> list[int]:
    """The graph inputs with fixed addresses: the tracing context's static inputs when dynamo traced
    the graph (parameters, buffers, ``mark_static_address`` tensors), else ``fixed`` (what the stock
    backend counted)."""
    context = torch._guards.TracingContext.try_get()
    metadata = getattr(context, "fw_metadata", None) if context is not None else None
    if metadata is None or getattr(metadata, "static_input_indices", None) is None:
        return list(fixed)
    return sorted(set(fixed) | set(metadata.static_input_indices))


def cudagraphs(graph: torch.fx.GraphModule, inputs: Sequence[Any], **_: Any) -> Any:
    """Dynamo backend: ``torch._dynamo.backends.cudagraphs.cudagraphs`` with the weights static."""
    from torch._dynamo.backends.cudagraphs import cudagraphs as stock
    from torch._inductor import cudagraph_trees

    record = cudagraph_trees.cudagraphify_impl

    def with_static_weights(model: Any, model_inputs: Any, static_input_idxs: Sequence[int], *args: Any,
                            **kwargs: Any) -> Any:
        if kwargs.get("is_backward"):  # the tracing context's indices are the forward graph's
            return record(model, model_inputs, static_input_idxs, *args, **kwargs)
        return record(model, model_inputs, static_input_indices(static_input_idxs), *args, **kwargs)

    # the stock backend compiles the graph at once (aot_autograd), inside this call and its tracing context
    with mock.patch.object(cudagraph_trees, "cudagraphify_impl", with_static_weights):
        return stock(graph, inputs)
