"""The CUDA-graph backend of a static decoding cache (mmllm.models.cuda_graphs): the graph reads the
inputs dynamo knows to be fixed (weights, a static cache) in place instead of copying them before
every replay. The recording itself needs a GPU (benchmarks/gpu_check.sh step 5); here, which inputs
it is told are static, and that the backend compiles a module on this machine's torch."""

from __future__ import annotations

import types

import torch
from torch._inductor import cudagraph_trees

from mmllm.models import cuda_graphs


def _context(static):
    return types.SimpleNamespace(fw_metadata=types.SimpleNamespace(static_input_indices=static))


def test_the_static_inputs_are_the_tracing_contexts(monkeypatch):
    assert cuda_graphs.static_input_indices(range(2)) == [0, 1]  # no tracing context: what the caller counted
    monkeypatch.setattr(torch._guards.TracingContext, "try_get", staticmethod(lambda: _context([5, 2])))
    assert cuda_graphs.static_input_indices(range(0)) == [2, 5]  # inlined modules: the stock count is 0
    assert cuda_graphs.static_input_indices(range(3)) == [0, 1, 2, 5]
    monkeypatch.setattr(torch._guards.TracingContext, "try_get", staticmethod(lambda: _context(None)))
    assert cuda_graphs.static_input_indices(range(1)) == [0]


def test_the_recording_is_told_the_static_inputs_and_the_stock_function_comes_back(monkeypatch):
    from torch._dynamo.backends import cudagraphs as stock_module

    told = []
    real_record = cudagraph_trees.cudagraphify_impl

    def record(model, inputs, static_input_idxs, *args, **kwargs):
        told.append(list(static_input_idxs))
        return "recorded"

    def stock(graph, inputs):  # what the stock backend does once aot_autograd has the graph: fixed = 0
        return cudagraph_trees.cudagraphify_impl(graph, inputs, range(0), device_index=0)

    monkeypatch.setattr(cudagraph_trees, "cudagraphify_impl", record)
    monkeypatch.setattr(stock_module, "cudagraphs", stock)
    monkeypatch.setattr(torch._guards.TracingContext, "try_get", staticmethod(lambda: _context([0, 3, 4])))
    assert cuda_graphs.cudagraphs("graph", ["inputs"]) == "recorded"
    assert told == [[0, 3, 4]]
    assert cudagraph_trees.cudagraphify_impl is record  # the patch lived only for the call
    monkeypatch.undo()
    assert cudagraph_trees.cudagraphify_impl is real_record


def test_the_backend_compiles_a_module_with_this_torch():
    torch._dynamo.reset()
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = layer(x)
        compiled = torch.compile(layer, backend=cuda_graphs.cudagraphs)
        got = compiled(x)  # on a CPU the stock backend records nothing and runs the traced graph
    assert torch.equal(got, expected)
    torch._dynamo.reset()


def test_through_torchs_own_backend_the_recording_is_told_the_weights(monkeypatch):
    """The stock backend end to end (dynamo, aot_autograd, its compiler), with only its CPU refusal and
    the recording itself replaced: the patch must reach the recording where torch calls it."""
    from torch._dynamo.backends import cudagraphs as stock_module

    told = []

    def record(model, inputs, static_input_idxs, *args, **kwargs):
        told.append((list(static_input_idxs), [tuple(x.shape) if torch.is_tensor(x) else x for x in inputs]))
        return model  # the traced graph, run as is (boxed, as the stock backend marks it)

    monkeypatch.setattr(stock_module, "check_for_skip", lambda *args: None)  # a GPU's answer
    monkeypatch.setattr(stock_module, "get_device_index", lambda graph: 0)
    monkeypatch.setattr(cudagraph_trees, "cudagraphify_impl", record)
    torch._dynamo.reset()
    layer = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.GELU(), torch.nn.Linear(6, 3)).eval()
    x = torch.randn(4, 8)
    try:
        with torch.no_grad():
            got = torch.compile(layer, backend=cuda_graphs.cudagraphs)(x)
            expected = layer(x)
            [(static, shapes)] = told
            torch._dynamo.reset()
            torch.compile(layer, backend="cudagraphs")(x)  # the stock backend: no input is fixed
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, expected)
    weights = {tuple(p.shape) for p in layer.parameters()}
    assert {shapes[i] for i in static} == weights and len(static) == 4  # both layers' weights and biases
    assert all(shapes[i] not in weights for i in range(len(shapes)) if i not in static)  # the input is not static
    assert told[1][0] == []
