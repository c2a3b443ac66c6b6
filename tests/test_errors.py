"""Bad input gets a clear Python exception naming the op, the argument and the expectation."""

from __future__ import annotations

import pytest
import torch

import bpext
from bpext import _ops
from conftest import DEVICES, requires_cuda

F = bpext.functional


@pytest.mark.parametrize("device", DEVICES)
def test_unknown_activation(device):
    x = torch.randn(3, device=device)
    with pytest.raises(ValueError, match="unknown activation 'swish'.*expected one of: identity, relu"):
        F.activation(x, "swish")
    with pytest.raises(ValueError, match="bpext.activation_forward: unknown activation 'swish'"):
        _ops.ops.activation_forward(x, "swish", [])
    with pytest.raises(ValueError, match="bpext.dense_forward: unknown activation"):
        _ops.ops.dense_forward(torch.randn(2, 3, device=device), torch.randn(4, 3, device=device), None, "nope", [],
                               False)


def test_bad_activation_params():
    x = torch.randn(3)
    with pytest.raises(TypeError, match="'relu' takes no parameters; got unexpected alpha"):
        F.activation(x, "relu", alpha=1.0)
    with pytest.raises(TypeError, match="takes negative_slope; got unexpected slope"):
        F.activation(x, "leaky_relu", slope=1.0)
    with pytest.raises(ValueError, match="negative_slope must be finite"):
        F.activation(x, "leaky_relu", negative_slope=float("nan"))
    with pytest.raises(ValueError, match="elu alpha must be finite"):
        F.activation(x, "elu", alpha=float("inf"))
    with pytest.raises(ValueError, match="softplus beta must be finite and nonzero"):
        F.activation(x, "softplus", beta=0.0)
    with pytest.raises(ValueError, match=r"GELU\(approximate='fast'\): bpext computes it with approximate='none' or "
                                         r"approximate='tanh'"):
        bpext.nn.GELU("fast")
    with pytest.raises(ValueError, match="activation 'relu' takes 0 parameter"):
        _ops.ops.activation_forward(x, "relu", [1.0])


@pytest.mark.parametrize("device", DEVICES)
def test_dense_shape_errors(device):
    x, w, b = torch.randn(4, 3, device=device), torch.randn(5, 3, device=device), torch.randn(5, device=device)
    with pytest.raises(RuntimeError, match=r"weight must be 2-D of shape \(out_features, 2\), got shape \[5, 3\]"):
        F.dense(torch.randn(4, 2, device=device), w, b)
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        F.dense(x, torch.randn(5, 3, 1, device=device), b)
    with pytest.raises(RuntimeError, match="bias must be 1-D of size out_features"):
        F.dense(x, w, torch.randn(4, device=device))
    with pytest.raises(RuntimeError, match="input must have at least 1 dimension"):
        _ops.ops.dense_forward(torch.tensor(1.0, device=device), w, b, "relu", [], False)


@pytest.mark.parametrize("device", DEVICES)
def test_dtype_errors(device):
    x, w = torch.randn(4, 3, device=device), torch.randn(5, 3, device=device)
    with pytest.raises(TypeError, match="weight must have the dtype of input"):
        F.dense(x, w.double())
    with pytest.raises(TypeError, match="bias must have the dtype of input"):
        F.dense(x, w, torch.randn(5, device=device, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        F.activation(torch.arange(4, device=device), "relu")
    with pytest.raises(TypeError, match="saved must have the dtype of grad_y"):
        _ops.ops.activation_backward(x, x.double(), "relu", [])
    with pytest.raises(RuntimeError, match="saved must have the shape of grad_y"):
        _ops.ops.activation_backward(x, x[:2], "relu", [])


def test_backward_arg_errors():
    gy, x, w = torch.randn(4, 5), torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="x is required to compute grad_weight"):
        _ops.ops.dense_backward(gy, None, w, gy, "relu", [], [False, True, False])
    with pytest.raises(RuntimeError, match=r"weight must be 2-D of shape \(2, in_features\) to match grad_y"):
        _ops.ops.dense_backward(gy[:, :2], x, w, gy[:, :2], "relu", [], [True, False, False])
    with pytest.raises(RuntimeError, match="weight is required to compute grad_x"):
        _ops.ops.dense_backward(gy, x, None, gy, "relu", [], [True, False, False])
    with pytest.raises(RuntimeError, match="x must have shape .* with as many rows as grad_y"):
        _ops.ops.dense_backward(gy, x[:2], w, gy, "relu", [], [False, True, False])


@requires_cuda
def test_device_mix_errors():
    x, w = torch.randn(4, 3), torch.randn(5, 3, device="cuda")
    with pytest.raises(RuntimeError, match="weight must be on the device of input"):
        F.dense(x.cuda(), w.cpu())
    with pytest.raises(RuntimeError, match="must be on the device"):
        F.dense(x, w)
