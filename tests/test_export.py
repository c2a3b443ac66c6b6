"""torch.export (and legacy torch.jit.trace) of bpext models: the exported program runs, its
backward gives eager's gradients, and it saves and loads."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import bpext


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = bpext.nn.MLP(8, [16], 6, activation="gelu")
        self.mlp.layers[1].bias = None  # a layer without bias in the stack
        self.dense = bpext.nn.Dense(6, 6, activation="tanh")
        self.act = bpext.nn.SiLU()
        self.gated = bpext.nn.GatedMLP(6, 12, 4)

    def forward(self, x):
        return self.gated(self.act(self.dense(self.mlp(x))))


def eager_and(fn):
    torch.manual_seed(0)
    model = Model()
    x = torch.randn(5, 8)
    results = []
    for m in (model, fn(model, x)):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        params = list(m.parameters()) if isinstance(m, nn.Module) else list(model.parameters())
        assert len(params) == len(list(model.parameters()))
        grads = torch.autograd.grad(y.square().sum(), [xi, *params], allow_unused=True)
        results.append((y.detach(), grads))
    return results


def assert_same(results):
    (y, grads), (y2, grads2) = results
    torch.testing.assert_close(y2, y)
    for g, g2 in zip(grads, grads2):
        assert g2 is not None
        torch.testing.assert_close(g2, g)


def test_exported_program_runs_and_differentiates_like_eager():
    assert_same(eager_and(lambda m, x: torch.export.export(m, (x,)).module()))


def test_exported_program_saves_and_loads():
    def round_trip(m, x):
        buffer = io.BytesIO()
        torch.export.save(torch.export.export(m, (x,)), buffer)
        buffer.seek(0)
        loaded = torch.export.load(buffer).module()
        # the loaded module holds its own parameters: give it the model's, to compare gradients
        for (name, p), q in zip(loaded.named_parameters(), m.parameters()):
            assert p.shape == q.shape, name
        return lambda t: torch.func.functional_call(loaded, dict(zip(
            [n for n, _ in loaded.named_parameters()], m.parameters())), (t,))
    assert_same(eager_and(round_trip))


def test_export_for_inference_has_no_autograd_ops():
    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(5, 8)
    program = torch.export.export(model, (x,)).run_decompositions({})
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"bpext.mlp.default", "bpext.dense.default", "bpext.activation_forward.default",
            "bpext.gated_mlp_forward.default"} <= targets
    torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_jit_trace_and_save():
    """TorchScript is legacy, but tracing records the ops themselves, whose autograd is registered."""
    def traced(m, x):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            script = torch.jit.trace(m, (x,))
        buffer = io.BytesIO()
        torch.jit.save(script, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)
    assert_same(eager_and(traced))
