"""Autograd functions and the functional API. Forward and backward call only
torch.ops.bpext.* (through bpext._ops); each saves the least backward needs."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _ops
from .activations import REGISTRY, ResolvedActivation, resolve

__all__ = ["ActivationFunction", "DenseFunction", "activation", "dense"]


class ActivationFunction(torch.autograd.Function):
    """y = act(x). Saves y or x, whichever the activation's derivative is computed from."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, activation: str, p0: float, p1: float) -> torch.Tensor:
        y = _ops.activation_forward(x, activation, p0, p1)
        ctx.activation = (activation, p0, p1)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(y if REGISTRY[activation].saves_output else x)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        (saved,) = ctx.saved_tensors
        return _ops.activation_backward(grad_y, saved, *ctx.activation), None, None, None


class DenseFunction(torch.autograd.Function):
    """y = act(x @ weight.T + bias), bias and activation fused into the GEMM's epilogue.

    Saves x only when the weight needs a gradient, and one of y or the pre-activation
    z (per the activation's policy; nothing for identity) only when any gradient is needed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, activation: str, p0: float, p1: float) -> torch.Tensor:
        needs = ctx.needs_input_grad[:3]
        training = any(needs)
        saves_output = REGISTRY[activation].saves_output
        y, preact = _ops.dense_forward(x, weight, bias, activation, p0, p1, training and not saves_output)
        ctx.activation = (activation, p0, p1)
        ctx.has_bias = bias is not None
        if training:
            saved = None if activation == "identity" else (y if saves_output else preact)
            ctx.save_for_backward(x if needs[1] else None, weight, saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, saved = ctx.saved_tensors
        if saved is None:  # identity: backward reads nothing saved
            saved = grad_y.new_empty(0)
        needs = ctx.needs_input_grad
        mask = (needs[0], needs[1], needs[2] and ctx.has_bias)
        grads = _ops.dense_backward(grad_y, x, weight, saved, *ctx.activation, mask)
        return (*(g if m else None for g, m in zip(grads, mask)), None, None, None)


def _resolved(activation: str | ResolvedActivation, params: dict) -> ResolvedActivation:
    return resolve(activation, **params)


def activation(x: torch.Tensor, activation: str | ResolvedActivation = "relu", **params: float) -> torch.Tensor:
    """Applies an activation by name, e.g. ``activation(x, "leaky_relu", negative_slope=0.1)``.

    Parameters take ``torch.nn.functional``'s names and defaults. The output has x's
    shape and dtype (autocast leaves activations in their input dtype).
    """
    act = _resolved(activation, params)
    return ActivationFunction.apply(x, act.name, act.p0, act.p1)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def dense(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | ResolvedActivation = "identity",
    **params: float,
) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))`` in one fused op. x: (*, in), weight: (out, in), bias: (out).

    Under ``torch.autocast`` the inputs are cast to the autocast dtype first, as
    ``nn.Linear``'s are, and gradients flow back through the casts.
    """
    act = _resolved(activation, params)
    dtype = _autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return DenseFunction.apply(x, weight, bias, act.name, act.p0, act.p1)
