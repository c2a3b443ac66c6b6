"""Dense against act(F.linear(...)): forward, every gradient, gradcheck, shapes, autocast."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from torch.utils._python_dispatch import TorchDispatchMode

import bpext
from bpext.activations import resolve
from conftest import (DEVICES, NON_DEFAULT_PARAMS, assert_close_to_reference, assert_same_step, device_dtype_params,
                      record_step)


def native_dense(x, w, b, name, **params):
    return resolve(name, **params).reference(F.linear(x, w, b))


def make(shape, out_features, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    in_features = shape[-1]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(out_features, in_features, generator=g, dtype=torch.float64) / in_features**0.5
    b = torch.randn(out_features, generator=g, dtype=torch.float64) if bias else None
    conv = lambda t: None if t is None else t.to(dtype=dtype, device=device).requires_grad_(True)  # noqa: E731
    return conv(x), conv(w), conv(b)


def grads_of(fn, tensors, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    y = fn(*leaves)
    y.backward(grad_out)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("name", bpext.ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_native(name, device, dtype, bias):
    params = NON_DEFAULT_PARAMS.get(name, {})
    x, w, b = make((5, 3, 24), 40, dtype, device, bias)
    grad = torch.randn(5, 3, 40, dtype=torch.float64).to(dtype=dtype, device=device)
    y, grads = grads_of(lambda *t: bpext.functional.dense(*t, activation=name, **params), (x, w, b), grad)
    y_nat, grads_nat = grads_of(lambda *t: native_dense(*t, name, **params), (x, w, b), grad)
    # The exact answer for these (rounded) inputs: native autograd in float64.
    as64 = [t.double() if t is not None else None for t in (x, w, b)]
    y_ref, grads_ref = grads_of(lambda *t: native_dense(*t, name, **params), as64, grad.double())
    assert y.shape == (5, 3, 40) and y.dtype == dtype
    assert_close_to_reference(y, y_ref, dtype, y_nat)
    for g, g_nat, g_ref in zip(grads, grads_nat, grads_ref):
        if g_ref is not None:
            assert g.dtype == dtype
            assert_close_to_reference(g, g_ref, dtype, g_nat)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", bpext.ACTIVATIONS)
@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_float64(name, device, shape, bias):
    x, w, b = make(shape, 4, torch.float64, device, bias, seed=3)
    params = NON_DEFAULT_PARAMS.get(name, {})
    inputs = (x, w, b) if bias else (x, w)
    assert torch.autograd.gradcheck(lambda *t: bpext.functional.dense(*t, activation=name, **params), inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,in_features,out_features", [(1, 1, 1), (3, 7, 9), (130, 17, 33), (257, 64, 129)])
def test_odd_shapes(device, rows, in_features, out_features):
    x, w, b = make((rows, in_features), out_features, torch.float32, device)
    grad = torch.randn(rows, out_features, device=device)
    y, grads = grads_of(lambda *t: bpext.functional.dense(*t, activation="gelu"), (x, w, b), grad)
    y_ref, grads_ref = grads_of(lambda *t: native_dense(*t, "gelu"), (x, w, b), grad)
    assert_close_to_reference(y, y_ref, torch.float32)
    for g, g_ref in zip(grads, grads_ref):
        assert_close_to_reference(g, g_ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["x", "w", "b", "xw", "wb"])
def test_only_requested_gradients(device, which):
    x, w, b = make((8, 6), 5, torch.float64, device)
    for t, key in ((x, "x"), (w, "w"), (b, "b")):
        t.requires_grad_(key in which)
    bpext.functional.dense(x, w, b, activation="tanh").sum().backward()
    for t, key in ((x, "x"), (w, "w"), (b, "b")):
        assert (t.grad is not None) == (key in which)
    ref = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    native_dense(*ref, "tanh").sum().backward()
    for t, r, key in zip((x, w, b), ref, "xwb"):
        if key in which:
            torch.testing.assert_close(t.grad, r.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x, w, b = make((6, 10), 12, torch.float32, device)
    xt = x.detach().t().contiguous().t().requires_grad_(True)  # column-major
    wt = w.detach()[:, ::1].t().contiguous().t().requires_grad_(True)
    grad = torch.randn(12, 6, device=device).t()  # non-contiguous upstream gradient
    y, grads = grads_of(lambda *t: bpext.functional.dense(*t, activation="silu"), (xt, wt, b), grad)
    y_ref, grads_ref = grads_of(lambda *t: native_dense(*t, "silu"), (xt, wt, b), grad)
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)], ids=["rows0", "lead0"])
def test_empty_batch(device, shape):
    x, w, b = make(shape, 5, torch.float32, device)
    y = bpext.functional.dense(x, w, b, activation="gelu")
    assert y.shape == (*shape[:-1], 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_in_features(device):
    x, w, b = make((4, 0), 3, torch.float32, device)
    y = bpext.functional.dense(x, w, b, activation="relu")
    torch.testing.assert_close(y, torch.relu(b).expand(4, 3))


class OpCalls(TorchDispatchMode):
    """Records the arguments of every bpext op called inside it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "bpext":
            self.calls.append((func.__name__.split(".")[0], args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_inference_saves_nothing_and_skips_preact(device):
    x, w, b = make((4, 8), 3, torch.float32, device)
    saved = []
    with torch.no_grad(), OpCalls() as calls, torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        y = bpext.functional.dense(x, w, b, activation="gelu")
    torch.testing.assert_close(y, native_dense(x, w, b, "gelu").detach())
    assert saved == [] and y.grad_fn is None
    [(name, args)] = [c for c in calls.calls if not c[0].startswith("_")]
    assert name == "dense_forward" and args[-1] is False  # return_preact: no pre-activation written
    with OpCalls() as calls:
        bpext.functional.dense(x, w, b, activation="gelu")
    assert calls.calls[0][1][-1] is True  # with a graph, gelu's backward reads z


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gelu", "relu", "identity"])
def test_saved_tensors(device, name):
    """x (for grad_weight) and one of y / z: never both of y and z."""
    x, w, b = make((16, 8), 32, torch.float32, device)
    x = x.detach().clone().requires_grad_(True)  # a non-leaf-like activation input
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        bpext.functional.dense(x, w, b, activation=name)
    shapes = sorted(tuple(t.shape) for t in saved if t is not w)
    expected = [(16, 8)] + ([] if name == "identity" else [(16, 32)])
    assert shapes == sorted(expected)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_like_linear(device):
    dtype = torch.bfloat16
    layer = bpext.nn.Dense(16, 8, activation="gelu", device=device)
    native = torch.nn.Linear(16, 8, device=device)
    native.load_state_dict(layer.state_dict())
    x = torch.randn(4, 16, device=device)
    with torch.autocast(device, dtype=dtype):
        y = layer(x)
        y_lin = native(x)
        y_act = bpext.functional.activation(x, "gelu")
    assert y.dtype == y_lin.dtype == dtype
    assert y_act.dtype == torch.float32  # activations keep their input dtype
    torch.testing.assert_close(y, torch.nn.functional.gelu(y_lin), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("layer", ["dense", "mlp", "gated", "gated_mlp", "linear_cross_entropy"])
def test_autocast_leaves_float64_as_native_does(layer):
    """autocast casts float32 and 16-bit tensors, never float64 (torch's own rule): every layer computes
    a float64 model in float64 under autocast, and its loss is float64."""
    torch.manual_seed(0)
    x, w, v, u = (torch.randn(*s, dtype=torch.float64) for s in ((5, 4), (6, 4), (6, 4), (4, 6)))
    native = {
        "dense": lambda: torch.nn.functional.gelu(torch.nn.functional.linear(x, w)),
        "mlp": lambda: torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w)), u),
        "gated": lambda: torch.nn.functional.silu(torch.nn.functional.linear(x, w)) * torch.nn.functional.linear(x, v),
        "gated_mlp": lambda: torch.nn.functional.linear(
            torch.nn.functional.silu(torch.nn.functional.linear(x, w)) * torch.nn.functional.linear(x, v), u),
        "linear_cross_entropy": lambda: torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w),
                                                                         torch.arange(5)),
    }[layer]
    ours = {
        "dense": lambda: bpext.functional.dense(x, w, None, "gelu"),
        "mlp": lambda: bpext.functional.mlp(x, [w, u], None, "relu"),
        "gated": lambda: bpext.functional.gated(x, w, v, activation="silu"),
        "gated_mlp": lambda: bpext.functional.gated_mlp(x, w, v, u, activation="silu"),
        "linear_cross_entropy": lambda: bpext.functional.linear_cross_entropy(x, w, torch.arange(5)),
    }[layer]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = native(), ours()
    assert got.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("fuse", [False, True])
def test_a_sparse_input_runs_as_native(fuse):
    """nn.Linear takes a sparse COO input: a converted model (Dense alone, or the fused MLP) computes it
    natively, outputs and weight gradients equal."""
    torch.manual_seed(0)
    native = torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).double()
    ours = bpext.convert(copy.deepcopy(native), fuse=fuse)
    x = torch.zeros(4, 20, dtype=torch.float64)
    x[0, 3], x[2, 7] = 1.0, 2.0
    results = []
    for model in (native, ours):
        y = model(x.to_sparse())
        results.append((y, torch.autograd.grad(y.square().sum(), list(model.parameters()))))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_second_device():
    x, w, b = make((8, 16), 4, torch.float32, "cuda:1")
    y = bpext.functional.dense(x, w, b, activation="gelu")
    assert y.device == torch.device("cuda:1")
    torch.testing.assert_close(y, native_dense(x, w, b, "gelu"))
    y.sum().backward()
    assert w.grad.device == torch.device("cuda:1")


@pytest.mark.parametrize("device", DEVICES)
def test_zero_out_features(device):
    """Dense(4, 0): an empty output, and gradients like nn.Linear's (zeros for x)."""
    layer = bpext.nn.Dense(4, 0, device=device)
    x = torch.randn(5, 4, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (5, 0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and layer.weight.grad.shape == (0, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_in_features_double_backward(device):
    x, w, b = make((4, 0), 3, torch.float64, device)
    assert torch.autograd.gradgradcheck(lambda *t: bpext.functional.dense(*t, activation="tanh"), (x, w, b))


def test_weight_changed_in_place_when_only_weight_grad_is_needed():
    """x needs no gradient: the weight is not saved, so editing it before backward is fine (as natively)."""
    results = []
    for fn in (lambda *t: bpext.functional.dense(*t, activation="tanh"), lambda *t: native_dense(*t, "tanh")):
        x, w, b = make((6, 5), 4, torch.float32, "cpu")
        x.requires_grad_(False)
        y = fn(x, w, b)
        with torch.no_grad():
            w.add_(1.0)
        y.sum().backward()
        results.append((w.grad, b.grad))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("name", ["identity", "gelu", "leaky_relu"])
@pytest.mark.parametrize("idiom", ["add_", "relu_inplace", "dropout_inplace", "mul_"])
def test_in_place_ops_on_the_output(name, idiom):
    """Output edits that work on nn.Linear (+ an activation that saves its input) work on Dense, with the same gradients."""
    ops = {
        "add_": lambda y, skip: y.add_(skip),
        "relu_inplace": lambda y, skip: torch.nn.functional.relu(y, inplace=True),
        "dropout_inplace": lambda y, skip: torch.nn.functional.dropout(y, 0.0, training=True, inplace=True),
        "mul_": lambda y, skip: y.mul_(skip),
    }
    results = []
    for layer_fn in (lambda *t: bpext.functional.dense(*t, activation=name), lambda *t: native_dense(*t, name)):
        x, w, b = make((2, 3, 6), 5, torch.float64, "cpu")
        skip = torch.randn(2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        out = ops[idiom](layer_fn(x, w, b), skip)
        out.square().sum().backward()
        results.append((out.detach(), x.grad, w.grad, b.grad))
    torch.testing.assert_close(results[0], results[1])


def test_version_counter_still_guards_what_backward_reads():
    """A tensor backward reads (relu's output, as natively) edited in place: the same error as native."""
    for fn in (lambda *t: bpext.functional.dense(*t, activation="relu"), lambda *t: native_dense(*t, "relu")):
        y = fn(*make((3, 4), 2, torch.float32, "cpu"))
        y.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_modules_take_input_by_keyword_like_torch_nn():
    x = torch.randn(2, 4)
    assert bpext.nn.Dense(4, 3)(input=x).shape == (2, 3)
    assert bpext.nn.GELU()(input=x).shape == (2, 4)
    assert bpext.nn.MLP(4, [5], 3)(input=x).shape == (2, 3)
    assert isinstance(bpext.nn.Dense(4, 3), torch.nn.Linear)


@pytest.mark.parametrize("device", DEVICES)
def test_transposed_weight_view(device):
    """A weight stored (in, out), as GPT-2's Conv1D keeps it, passed as its .t() view: no copy needed."""
    x, w, b = make((5, 6), 4, torch.float32, device)
    w_in_out = w.detach().t().contiguous().requires_grad_(True)
    y, grads = grads_of(lambda x, w_io, b: bpext.functional.dense(x, w_io.t(), b, activation="gelu"),
                        (x, w_in_out, b), torch.ones(5, 4, device=device))
    y_ref, grads_ref = grads_of(lambda x, w_io, b: native_dense(x, w_io.t(), b, "gelu"), (x, w_in_out, b),
                                torch.ones(5, 4, device=device))
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", bpext.ACTIVATIONS)
@pytest.mark.parametrize("needs", ["all", "x", "weight", "bias"])
def test_one_autograd_saves_what_backward_reads(device, name, needs):
    """The layer's one autograd (DenseBackward, kernels/autograd.cpp) keeps x only where the weight
    needs a gradient, the weight only where x does, the tensor its activation's derivative reads (y, or
    z), never the bias; its output and gradients are native's."""
    params = NON_DEFAULT_PARAMS.get(name, {})
    grad = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(2)).to(device)
    records = []
    for layer in (bpext.functional.dense, native_dense):
        x, w, b = make((2, 3, 5), 7, torch.float32, device, seed=1)
        for t, which in ((x, "x"), (w, "weight"), (b, "bias")):
            t.requires_grad_(needs in ("all", which))
        records.append(record_step(lambda *t: layer(*t, name, **params), (x, w, b), grad))
    (node, y, grads, saved), (_, y_native, grads_native, _) = records
    assert node == "DenseBackward"
    expected = [(2, 3, 5)] * (needs in ("all", "weight")) + [(7, 5)] * (needs in ("all", "x")) + [
        (2, 3, 7)] * (resolve(name).saves != "nothing")
    assert saved == sorted(expected)
    torch.testing.assert_close(y, y_native)
    for g, g_native in zip(grads, grads_native):
        torch.testing.assert_close(g, g_native)


def test_the_op_itself_serves_torch_func_and_forward_ad():
    """bpext::dense's autograd is the op's own: torch.func and forward-mode AD differentiate the op called
    directly, with native's derivatives, through the same node as plain eager mode."""
    x, w, b = make((3, 4), 2, torch.float64, "cpu")
    op = lambda t, w, b, name: torch.ops.bpext.dense(t, w, b, name, [])  # noqa: E731
    for name in ("tanh", "gelu", "identity"):
        grads = [torch.func.grad(lambda t: layer(t, w, b, name).sum())(x) for layer in (op, native_dense)]
        torch.testing.assert_close(grads[0], grads[1])
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x.clone().requires_grad_(), torch.ones_like(x))
            y, y_native = op(dual, w, b, name), native_dense(dual, w, b, name)
            assert y.grad_fn.name() == "DenseBackward"
            torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(y).tangent,
                                       torch.autograd.forward_ad.unpack_dual(y_native).tangent)
