"""Every activation x device x dtype against torch.nn.functional, forward and backward."""

from __future__ import annotations

import pytest
import torch

import bpext
from bpext.activations import resolve
from conftest import DEVICES, NON_DEFAULT_PARAMS, assert_close, device_dtype_params

ACTS = bpext.ACTIVATIONS


def kink_inputs(dtype, device, params):
    """Random values plus the points where activations bend, saturate or overflow."""
    special = [0.0, -0.0, 1e-4, -1e-4, 1.0, -1.0, 3.0, -3.0, 2.999, -2.999, 3.001, -3.001, 10.0, -10.0, 30.0, -30.0,
               100.0, -100.0]
    beta, threshold = params.get("beta", 1.0), params.get("threshold", 20.0)
    special += [threshold / beta, threshold / beta + 1e-3, threshold / beta - 1e-3]
    torch.manual_seed(0)
    x = torch.cat([torch.randn(1000, dtype=torch.float64) * 3, torch.tensor(special, dtype=torch.float64)])
    return x.to(dtype=dtype, device=device)


def run_both(x, name, params, grad):
    """(bpext output, bpext grad) and (native output, native grad) for upstream grad `grad`."""
    results = []
    for fn in (lambda t: bpext.functional.activation(t, name, **params), resolve(name, **params).reference):
        xi = x.detach().clone().requires_grad_(True)
        y = fn(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad))
    return results


# Every activation with default parameters, and those with parameters once more with others.
NAME_PARAMS = [pytest.param(n, {}, id=n) for n in ACTS] + [
    pytest.param(n, p, id=f"{n}-" + "-".join(f"{k}{v}" for k, v in p.items())) for n, p in NON_DEFAULT_PARAMS.items()
]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("name,params", NAME_PARAMS)
def test_matches_native(name, params, device, dtype):
    x = kink_inputs(dtype, device, params)
    grad = torch.randn_like(x, dtype=torch.float32).to(dtype)
    (y, gx), (y_ref, gx_ref) = run_both(x, name, params, grad)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype)
    assert_close(gx, gx_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ACTS)
def test_gradcheck_float64(name, device):
    torch.manual_seed(1)
    x = torch.randn(7, 5, dtype=torch.float64, device=device)
    x = torch.where(x.abs() < 0.05, x + 0.1, x).requires_grad_(True)  # keep away from relu's kink
    params = NON_DEFAULT_PARAMS.get(name, {})
    assert torch.autograd.gradcheck(lambda t: bpext.functional.activation(t, name, **params), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ACTS)
def test_nan_and_inf_propagate_like_native(name, device):
    # 64 elements: native's vectorized path (its scalar tail can treat NaN otherwise, e.g. hardswish's gradient)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5], device=device).repeat(16)
    grad = torch.tensor([1.0, 1.0, 1.0, float("nan")], device=device).repeat(16)
    (y, gx), (y_ref, gx_ref) = run_both(x, name, {}, grad)
    # A NaN input or upstream gradient gives NaN (index 0, and 3 for the gradient) where native's does.
    assert y[0].isnan() and torch.equal(gx[[0, 3]].isnan(), gx_ref[[0, 3]].isnan())
    # At +-inf bpext equals native, or gives the mathematical limit where native gives NaN
    # (native CPU gelu(inf) is NaN; bpext's is inf), never NaN where native has a number.
    for ours, ref in ((y, y_ref), (gx, gx_ref)):
        assert not (ours.isnan() & ~ref.isnan()).any()
        same = ~ref.isnan()
        torch.testing.assert_close(ours[same], ref[same])


# act(-0) where native's is +0 but x * (a positive factor) is -0 in IEEE arithmetic, as bpext's is
# (native CPU gelu(-0) is +0; x * Phi(x) at -0 is -0).
SIGNED_ZERO_EXACT = {"gelu": -0.0}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ACTS)
def test_signed_zeros_like_native(name, dtype, device):
    """act(+0) and act(-0), in the vectorized body and in the tail, carry native's sign (tanh(-0) is
    -0), or the exact one (SIGNED_ZERO_EXACT)."""
    x = torch.tensor([0.0, -0.0], dtype=dtype, device=device).repeat(37)
    y = bpext.functional.activation(x, name)
    ref = resolve(name).reference(x)
    if name in SIGNED_ZERO_EXACT:
        ref[1::2] = SIGNED_ZERO_EXACT[name]
    assert torch.equal(y, ref) and torch.equal(y.signbit(), ref.signbit())


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_non_contiguous(device):
    x = torch.randn(4, 6, 8, device=device).transpose(0, 2)[::2]  # non-contiguous, 3-D
    assert not x.is_contiguous()
    for name in ("gelu", "relu", "softplus"):
        xi = x.clone().requires_grad_(True)
        y = bpext.functional.activation(xi, name)
        y_ref = resolve(name).reference(x)
        torch.testing.assert_close(y, y_ref)
        y.sum().backward()
        xr = x.clone().requires_grad_(True)
        resolve(name).reference(xr).sum().backward()
        torch.testing.assert_close(xi.grad, xr.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0,), (3, 0, 2)])
def test_empty(device, shape):
    x = torch.zeros(shape, device=device, requires_grad=True)
    y = bpext.functional.activation(x, "gelu")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_vector_tail_lengths(device):
    """Lengths around the SIMD width take the padded-tail path; every element must be right."""
    for n in (1, 7, 8, 9, 15, 16, 17, 31, 33, 1023, 1025):
        x = torch.randn(n, device=device)
        torch.testing.assert_close(bpext.functional.activation(x, "silu"), torch.nn.functional.silu(x))


@pytest.mark.parametrize("device", DEVICES)
def test_unaligned_input(device):
    """A view that starts one element in cannot take 16-byte loads; results must not change."""
    x = torch.randn(1 + 4096, device=device)[1:]
    torch.testing.assert_close(bpext.functional.activation(x, "tanh"), torch.tanh(x))


@pytest.mark.parametrize("name", ACTS)
def test_saved_tensor_policy(name):
    """Each activation saves exactly the tensor its policy names: y, x, or nothing (identity)."""
    x = torch.randn(10, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = bpext.functional.activation(x, name)
    expected = {"output": [y], "input": [x], "nothing": []}[resolve(name).saves]
    assert [t.data_ptr() for t in saved] == [t.data_ptr() for t in expected]


@pytest.mark.parametrize("name", ["leaky_relu", "elu", "gelu", "hardswish"])
def test_in_place_on_output_like_native(name):
    """Activations that save their input let the output be changed in place before backward, as native does."""
    results = []
    for fn in (lambda t: bpext.functional.activation(t, name), resolve(name).reference):
        x = torch.randn(6, requires_grad=True, generator=torch.Generator().manual_seed(0))
        y = fn(x)
        y.mul_(2.0)
        y.sum().backward()
        results.append((y.detach(), x.grad))
    torch.testing.assert_close(results[0], results[1])
