"""Never less accurate than native: for every op, activation and dtype, over a spread of inputs
(both signs, tiny to large magnitudes, subnormals, kinks), bpext's error against an exact answer
is at most native's, beyond one rounding of noise (bpext.testing.accuracy_excess)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bpext
from bpext.testing import accuracy_excess
from conftest import DEVICES, NON_DEFAULT_PARAMS

LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)

# float64 formulas where torch's own cancels in float64 too (1 + erf(-6) is 0 there): the exact
# answers must be better than both implementations judged against them.
EXACT = {
    "gelu": lambda x: x * 0.5 * torch.special.erfc(-x / math.sqrt(2)),
    "gelu_tanh": lambda x: x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)),
}


def exact(act: bpext.activations.ResolvedActivation, x64: torch.Tensor) -> torch.Tensor:
    return EXACT[act.name](x64) if act.name in EXACT else act.reference(x64)


def spread(dtype, device, params) -> torch.Tensor:
    info = torch.finfo(dtype)
    magnitudes = torch.logspace(math.log10(info.smallest_normal) - 2, math.log10(min(info.max, 1e30)) - 1, 300,
                                dtype=torch.float64)
    threshold = params.get("threshold", 20.0) / params.get("beta", 1.0)
    kinks = torch.tensor([0.0, 3.0, 2.99, 3.01, threshold, threshold * 1.001, threshold * 0.999], dtype=torch.float64)
    dense = torch.linspace(-12, 12, 1201, dtype=torch.float64)
    x = torch.cat([magnitudes, -magnitudes, kinks, -kinks, dense])
    return x.to(dtype=dtype, device=device)


def values_and_grads(fn, x, grad):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x, grad)
    return y.detach(), gx


def condition(act, x64, grad64):
    """|x f'(x)| and |x g f''(x)|: how far one rounding of x moves the exact output and gradient."""
    x64 = x64.detach().clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(exact(act, x64).sum(), x64, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x64, materialize_grads=True) if d1.requires_grad else (torch.zeros_like(d1),)
    return (x64 * d1).abs().detach(), (x64 * grad64 * d2).abs().detach()


NAME_PARAMS = [pytest.param(n, {}, id=n) for n in bpext.ACTIVATIONS] + [
    pytest.param(n, p, id=f"{n}-params") for n, p in NON_DEFAULT_PARAMS.items()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name,params", NAME_PARAMS)
def test_activation_no_less_accurate_than_native(name, params, dtype, device):
    act = bpext.resolve(name, **params)
    x = spread(dtype, device, params)
    for grad in (torch.ones_like(x), torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x)):
        ours = values_and_grads(lambda t: bpext.functional.activation(t, act), x, grad)
        native = values_and_grads(act.reference, x, grad)
        exact_ = values_and_grads(lambda t: exact(act, t), x.double(), grad.double())
        for what, o, n, e, c in zip(("output", "gradient"), ours, native, exact_, condition(act, x.double(),
                                                                                           grad.double())):
            excess = accuracy_excess(o, n, e, dtype, scale=c)
            assert excess <= 1.0, f"{name} {what}: {excess:.3g} times the noise beyond native's error"


@pytest.mark.parametrize("device", DEVICES)
def test_gelu_near_zero_every_ten_thousandth(device):
    """GELU's Phi near 0, where 1/2 - Phi(-|z|) would cancel the tail's roundings: a grid 200 times finer
    than the spread above (its step, 0.02, missed the float32 points where bpext's forward was 1.7 noise
    units and its derivative 2.0 beyond native's error, at z = -0.75 and z = 4.4e-4)."""
    act = bpext.resolve("gelu")
    x = torch.linspace(-1.2, 1.2, 24001, dtype=torch.float32, device=device)
    grad = torch.ones_like(x)
    ours = values_and_grads(lambda t: bpext.functional.activation(t, act), x, grad)
    native = values_and_grads(act.reference, x, grad)
    exact_ = values_and_grads(lambda t: exact(act, t), x.double(), grad.double())
    for what, o, n, e, c in zip(("output", "gradient"), ours, native, exact_, condition(act, x.double(), grad.double())):
        excess = accuracy_excess(o, n, e, torch.float32, scale=c)
        assert excess <= 1.0, f"gelu {what}: {excess:.3g} times the noise beyond native's error"


def test_the_yardstick_catches_a_cancelling_formula():
    """The ELU derivative taken from the rounded output (y + alpha) cancels: the check must say so."""
    alpha = 0.8
    x = torch.tensor([-10.0, -8.0, -6.0], dtype=torch.bfloat16)
    y = F.elu(x, alpha)
    from_output = (y.float() + alpha).to(torch.bfloat16)
    native = values_and_grads(lambda t: F.elu(t, alpha), x, torch.ones_like(x))[1]
    exact_ = alpha * torch.exp(x.double())
    assert accuracy_excess(from_output, native, exact_, torch.bfloat16) > 100
    ours = values_and_grads(lambda t: bpext.functional.activation(t, "elu", alpha=alpha), x, torch.ones_like(x))[1]
    assert accuracy_excess(ours, native, exact_, torch.bfloat16) <= 1.0


def gemm_scale(x, w, b):
    """Per output element, the magnitudes a GEMM sums (its rounding noise scales with them)."""
    out = x.double().abs() @ w.double().abs().t()
    return out + b.double().abs() if b is not None else out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", bpext.ACTIVATIONS)
def test_dense_no_less_accurate_than_native(name, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 48, generator=g, dtype=torch.float64) * 2).to(dtype=dtype, device=device)
    w = (torch.randn(40, 48, generator=g, dtype=torch.float64) / 7).to(dtype=dtype, device=device)
    b = torch.randn(40, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    act = bpext.resolve(name, **NON_DEFAULT_PARAMS.get(name, {}))
    grad = torch.randn(64, 40, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    results = {}
    for key, fn, cast in (("ours", lambda *t: bpext.functional.dense(*t, activation=act), dtype),
                          ("native", lambda *t: act.reference(F.linear(*t)), dtype),
                          ("exact", lambda *t: exact(act, F.linear(*t)), torch.float64)):
        leaves = [t.detach().to(cast).requires_grad_(True) for t in (x, w, b)]
        y = fn(*leaves)
        results[key] = [y.detach(), *torch.autograd.grad(y, leaves, grad.to(cast))]
    scale = gemm_scale(x, w, b)
    dz_scale = grad.double().abs() * 2  # |act'| <= 2 for every activation here (softplus params: beta)
    scales = [scale, dz_scale @ w.double().abs(), dz_scale.t() @ x.double().abs(), dz_scale.sum(0)]
    for what, o, n, e, s in zip(("output", "grad x", "grad weight", "grad bias"), *results.values(), scales):
        excess = accuracy_excess(o, n, e, dtype, scale=s)
        assert excess <= 1.0, f"dense {name} {what}: {excess:.3g} beyond native's error"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,x,w,b", [
    (torch.bfloat16, 1.0078125, 1.0078125, -1.015625),
    (torch.float16, 1.0009765625, 1.0009765625, -1.001953125),
], ids=["bfloat16", "float16"])
def test_dense_bias_rounded_once(dtype, x, w, b, device):
    """The bias is added before the 16-bit rounding, as native does: x w + b = 6.1e-5 (bfloat16), not 0."""
    t = lambda v: torch.tensor([[v]], dtype=dtype, device=device)  # noqa: E731
    for name in ("identity", "relu", "gelu"):
        ours = bpext.functional.dense(t(x), t(w), t(b)[0], activation=name)
        native = bpext.resolve(name).reference(F.linear(t(x), t(w), t(b)[0]))
        assert ours.item() != 0 and ours.item() == native.item(), name
    layer = bpext.nn.MLP(1, [1], 1, activation="relu", device=device, dtype=dtype)
    with torch.no_grad():
        for dense in layer.layers:
            dense.weight.fill_(w)
            dense.bias.fill_(b)
    native = layer.to_sequential()
    assert layer(t(x)).item() == native(t(x)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("kind", ["mlp", "gated", "gated_mlp"])
def test_stacks_no_less_accurate_than_native(kind, dtype, device):
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, w1, w2, w3 = rnd(32, 24), rnd(40, 24) / 5, rnd(40, 24) / 5, rnd(16, 40) / 6
    b1, b2, b3 = rnd(40), rnd(40), rnd(16)
    act = bpext.resolve("gelu")
    ours_fn = {
        "mlp": lambda x, w1, w2, w3, b1, b2, b3: bpext.functional.mlp(x, [w1, w3], [b1, b3], act),
        "gated": lambda x, w1, w2, w3, b1, b2, b3: bpext.functional.gated(x, w1, w2, b1, b2, act),
        "gated_mlp": lambda x, w1, w2, w3, b1, b2, b3: bpext.functional.gated_mlp(x, w1, w2, w3, b1, b2, b3, act),
    }[kind]

    def reference(gelu):
        return {
            "mlp": lambda x, w1, w2, w3, b1, b2, b3: F.linear(gelu(F.linear(x, w1, b1)), w3, b3),
            "gated": lambda x, w1, w2, w3, b1, b2, b3: gelu(F.linear(x, w1, b1)) * F.linear(x, w2, b2),
            "gated_mlp": lambda x, w1, w2, w3, b1, b2, b3:
                F.linear(gelu(F.linear(x, w1, b1)) * F.linear(x, w2, b2), w3, b3),
        }[kind]

    inputs = [t.to(dtype=dtype, device=device) for t in (x, w1, w2, w3, b1, b2, b3)]
    results = {}
    for key, fn, cast in (("ours", ours_fn, dtype), ("native", reference(F.gelu), dtype),
                          ("exact", reference(EXACT["gelu"]), torch.float64)):
        leaves = [t.detach().to(cast).requires_grad_(True) for t in inputs]
        y = fn(*leaves)
        grad = torch.ones_like(y)
        results[key] = [y.detach(), *(gr if gr is not None else torch.zeros_like(t) for gr, t in zip(
            torch.autograd.grad(y, leaves, grad, allow_unused=True), leaves))]
    # The noise scale of every result: a stack sums through two GEMMs; judge each against its
    # largest exact magnitude, per tensor.
    for i, (o, n, e) in enumerate(zip(*results.values())):
        scale = torch.full_like(e, e.abs().max().item() * 8)
        excess = accuracy_excess(o, n, e, dtype, scale=scale)
        assert excess <= 1.0, f"{kind} result {i}: {excess:.3g} beyond native's error"
