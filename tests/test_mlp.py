"""The fused MLP against the equivalent native nn.Sequential: values, gradients, memory, conversions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bpext
from bpext.activations import resolve
from conftest import (DEVICES, NON_DEFAULT_PARAMS, assert_close_to_reference, assert_same_step, device_dtype_params,
                      record_step)


def native_stack(widths, hidden, output=resolve("identity"), bias=True, dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        mods.append(nn.Linear(a, b, bias=bias, dtype=dtype, device=device))
        act = hidden if i < len(widths) - 2 else output
        if act.name != "identity":
            mods.append(bpext.nn.torch_activation(act))
    return nn.Sequential(*mods)


def compare(widths, hidden, output, dtype, device, batch=(5, 7), bias=True):
    native = native_stack(widths, hidden, output, bias, dtype=torch.float64, device=device)
    ours = bpext.nn.MLP.from_sequential(copy.deepcopy(native).to(dtype))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*batch, widths[0], dtype=torch.float64, generator=gen).to(device)
    g = torch.randn(*batch, widths[-1], dtype=torch.float64, generator=gen).to(device)
    xo = x.to(dtype).requires_grad_(True)
    y = ours(xo)
    y.backward(g.to(dtype))
    xr = xo.detach().double().requires_grad_(True)  # the exact answer for the rounded inputs
    ref = copy.deepcopy(native)
    for p, q in zip(ref.parameters(), ours.parameters()):
        p.data.copy_(q.detach().double())
    y_ref = ref(xr)
    y_ref.backward(g.to(dtype).double())
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert_close_to_reference(y, y_ref, dtype)
    assert_close_to_reference(xo.grad, xr.grad, dtype)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert_close_to_reference(p.grad, q.grad, dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("name", ["relu", "gelu", "tanh", "softplus", "identity"])
def test_matches_native(name, device, dtype):
    compare([6, 16, 16, 4], resolve(name), resolve("identity"), dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("widths", [[3, 1, 5], [1, 3, 129, 2], [129, 3], [8, 8, 8, 8, 8, 8]], ids=str)
@pytest.mark.parametrize("output", ["identity", "sigmoid", "silu"])
def test_depths_widths_and_output_activation(device, widths, output):
    compare(widths, resolve("elu", alpha=0.5), resolve(output), torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", bpext.ACTIVATIONS)
def test_gradcheck_float64(device, name):
    params = NON_DEFAULT_PARAMS.get(name, {})
    torch.manual_seed(0)
    ws = [torch.randn(5, 3), torch.randn(4, 5), torch.randn(2, 4)]
    bs = [torch.randn(5), None, torch.randn(2)]
    leaves = [t.double().to(device).requires_grad_(True) if t is not None else None for t in ws + bs]
    x = torch.randn(2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)

    def fn(x, *p):
        return bpext.functional.mlp(x, list(p[:3]), [p[3], None, p[4]], name, "tanh", **params)

    assert torch.autograd.gradcheck(fn, (x, *[t for t in leaves if t is not None]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [(0,), (1,), (2, 0)], ids=str)
def test_small_and_empty_batches(device, batch):
    compare([4, 6, 3], resolve("gelu"), resolve("identity"), torch.float32, device, batch=batch)


def saved_storage_bytes(model, x):
    """Bytes autograd keeps for backward beyond the parameters and the input itself."""
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), x]}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


@pytest.mark.parametrize("name,limit", [("gelu", 0.5), ("relu", 1.0)])
def test_saved_bytes_versus_native(name, limit):
    native = native_stack([32, 64, 64, 64, 16], resolve(name), dtype=torch.float32)
    ours = bpext.nn.MLP.from_sequential(copy.deepcopy(native))
    x = torch.randn(256, 32, requires_grad=True)
    ratio = saved_storage_bytes(ours, x) / saved_storage_bytes(native, x)
    assert ratio <= limit, ratio


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    torch.manual_seed(0)
    model = bpext.nn.MLP(8, [16, 16], 4, activation="gelu", output_activation="tanh", device=device)
    x = torch.randn(6, 8, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    comp = torch.autograd.grad(compiled(x).sum(), list(model.parameters()))
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a, b)


def test_state_dicts_convert_both_ways():
    native = native_stack([5, 7, 3], resolve("silu"), resolve("sigmoid"), dtype=torch.float32)
    mlp = bpext.nn.MLP(5, [7], 3, activation="silu", output_activation="sigmoid")
    mlp.load_state_dict(bpext.nn.MLP.from_sequential(native).state_dict())
    x = torch.randn(4, 5)
    torch.testing.assert_close(mlp(x), native(x))
    back = native_stack([5, 7, 3], resolve("silu"), resolve("sigmoid"), dtype=torch.float32, seed=1)
    back.load_state_dict(mlp.to_sequential().state_dict())
    torch.testing.assert_close(back(x), native(x))
    assert "widths=[5, 7, 3], activation=silu, output_activation=sigmoid" in repr(mlp)


def test_convert_fuses_chains_and_keeps_the_state_dict():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2),
                          nn.Tanh(), nn.Linear(2, 2))
    native = copy.deepcopy(model)
    bpext.convert(model)
    assert bpext.fusions(model) == {"": ["mlp(0, 2, 4, relu, tanh)"]}
    assert model.state_dict().keys() == native.state_dict().keys()
    assert isinstance(model[6], bpext.nn.Dense)
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), native(x))
    per_layer = bpext.convert(copy.deepcopy(native), fuse=False)
    assert bpext.fusions(per_layer) == {}


def test_bad_mlp_arguments():
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"weights\[1\] must be 2-D of shape \(out_features, 5\)"):
        bpext.functional.mlp(x, [torch.randn(5, 3), torch.randn(2, 4)])
    with pytest.raises(RuntimeError, match="weights must hold at least one layer"):
        torch.ops.bpext.mlp_forward(x, [], [], "relu", [], "identity", [], False)
    with pytest.raises(ValueError, match="got 1 weights but 2 biases"):
        bpext.functional.mlp(x, [torch.randn(5, 3)], [None, None])


@pytest.mark.parametrize("widths", [[300, 8, 4], [8, 300, 4]], ids=str)
def test_wide_networks_take_the_layerwise_path(widths):
    """Widths over the CPU's fused limit (256) run layer by layer; results are the same function."""
    compare(widths, resolve("gelu"), resolve("identity"), torch.float32, "cpu", batch=(70,))


def test_cpu_results_do_not_depend_on_thread_count():
    torch.manual_seed(0)
    model = bpext.nn.MLP(16, [32, 32], 8, activation="silu", output_activation="sigmoid")
    x = torch.randn(1000, 16)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            y = model(x)
            grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
            results.append((y, grads))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


def _native_mlp(x, weights, biases, hidden, output):
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = resolve(output if i == len(weights) - 1 else hidden).reference(torch.nn.functional.linear(x, w, b))
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hidden,output", [("gelu", "identity"), ("relu", "sigmoid"), ("tanh", "gelu"),
                                           ("leaky_relu", "relu"), ("identity", "identity")])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("needs", ["all", "x", "weights"])
def test_one_autograd_saves_what_backward_reads(device, hidden, output, bias, needs):
    """The MLP's one autograd (MLPBackward, kernels/autograd.cpp) keeps one tensor per hidden layer, x
    only where the first weight needs a gradient, a weight only where something below its layer does,
    the output where the last activation's derivative reads it, never a bias; its output and
    gradients are native's."""
    widths = [5, 8, 6, 3]
    grad = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(2)).to(device)
    records = []
    for layer in (lambda x, w, b: bpext.functional.mlp(x, w, b, hidden, output),
                  lambda x, w, b: _native_mlp(x, w, b, hidden, output)):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 5, generator=g).to(device).requires_grad_(needs in ("all", "x"))
        weights = [torch.randn(b_, a, generator=g).to(device).requires_grad_(needs in ("all", "weights"))
                   for a, b_ in zip(widths[:-1], widths[1:])]
        biases = [torch.randn(b_, generator=g).to(device).requires_grad_(needs == "all") if bias else None
                  for b_ in widths[1:]]
        records.append(record_step(layer, (x, weights, biases), grad))
    (node, y, grads, saved), (_, y_native, grads_native, _) = records
    assert node == "MLPBackward"
    expected = ([(2, 4, 5)] * (needs in ("all", "weights")) + [(8, 5)] * (needs in ("all", "x")) + [(6, 8), (3, 6)]
                + [(2, 4, 8), (2, 4, 6)] + [(2, 4, 3)] * (resolve(output).saves != "nothing"))
    assert saved == sorted(expected)
    torch.testing.assert_close(y, y_native)
    for a, b in zip(grads, grads_native):
        torch.testing.assert_close(a, b)


def test_the_mlp_op_itself_serves_torch_func():
    """bpext::mlp's autograd is the op's own: torch.func differentiates the op called directly."""
    x, w = torch.randn(3, 4, dtype=torch.float64), [torch.randn(2, 4, dtype=torch.float64)]
    b = [torch.randn(2, dtype=torch.float64)]
    grads = [torch.func.grad(lambda t: fn(t).sum())(x) for fn in (
        lambda t: torch.ops.bpext.mlp(t, w, b, "tanh", [], "tanh", []),
        lambda t: torch.tanh(torch.nn.functional.linear(t, w[0], b[0])))]
    torch.testing.assert_close(grads[0], grads[1])
