"""Autograd functions and the functional API. Forward and backward call only
torch.ops.bpext.* (through bpext._ops); each saves the least backward needs."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _ops
from .activations import REGISTRY, ResolvedActivation, resolve

__all__ = ["ActivationFunction", "DenseFunction", "MLPFunction", "activation", "dense", "mlp"]


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


class MLPFunction(torch.autograd.Function):
    """A whole multi-layer perceptron: ``act_out(L_n(...act(L_1(x))))`` in one op each way.

    Keeps one tensor per layer (y where the derivative follows from it, else z) plus x
    and the output; backward recomputes act(z) where it needs a layer's input.
    ``params`` are the n_layers weights followed by the n_layers biases (None allowed).
    """

    @staticmethod
    def forward(ctx, x, activation: str, p0: float, p1: float, output_activation: str, q0: float, q1: float,
                n_layers: int, *params):
        weights, biases = params[:n_layers], params[n_layers:]
        training = any(ctx.needs_input_grad)
        y, saved = _ops.mlp_forward(x, weights, biases, activation, p0, p1, output_activation, q0, q1, training)
        ctx.config = (activation, p0, p1, output_activation, q0, q1)
        ctx.n_layers = n_layers
        ctx.has_bias = [b is not None for b in biases]
        if training:
            # The output is needed only when the last activation's derivative comes from it.
            keep_y = output_activation != "identity" and REGISTRY[output_activation].saves_output
            ctx.save_for_backward(x, y if keep_y else None, *weights, *saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        n = ctx.n_layers
        x, y, *rest = ctx.saved_tensors
        y = y if y is not None else grad_y.new_empty(0)
        weights, saved = rest[:n], rest[n:]
        biases = [grad_y.new_empty(0) if has else None for has in ctx.has_bias]  # only presence matters
        needs = ctx.needs_input_grad
        grad_x, grad_w, grad_b = _ops.mlp_backward(grad_y, x, y, weights, biases, saved, *ctx.config, needs[0])
        first = 8  # index of the first weight among forward's inputs
        grad_w = [g if needs[first + i] else None for i, g in enumerate(grad_w)]
        grad_b = [g if has and needs[first + n + i] else None for i, (g, has) in enumerate(zip(grad_b, ctx.has_bias))]
        return (grad_x if needs[0] else None, None, None, None, None, None, None, None, *grad_w, *grad_b)


def _resolved(activation: str | ResolvedActivation, params: dict) -> ResolvedActivation:
    return resolve(activation, **params)


def activation(x: torch.Tensor, activation: str | ResolvedActivation = "relu", **params: float) -> torch.Tensor:
    """Applies an activation by name, e.g. ``activation(x, "leaky_relu", negative_slope=0.1)``.

    Parameters take ``torch.nn.functional``'s names and defaults. The output has x's
    shape and dtype (autocast leaves activations in their input dtype).
    """
    act = _resolved(activation, params)
    return ActivationFunction.apply(x, act.name, act.p0, act.p1)


def _autocast(x, weights, biases):
    """Under torch.autocast, casts inputs to the autocast dtype as nn.Linear does (gradients
    flow back through the casts); otherwise returns them unchanged."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weights, biases
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    return cast(x), [cast(w) for w in weights], [cast(b) for b in biases]


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
    x, (weight,), (bias,) = _autocast(x, [weight], [bias])
    return DenseFunction.apply(x, weight, bias, act.name, act.p0, act.p1)


def mlp(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None] | None = None,
    activation: str | ResolvedActivation = "relu",
    output_activation: str | ResolvedActivation = "identity",
    **params: float,
) -> torch.Tensor:
    """A stack of dense layers in one op: ``weights[l]``: (W[l+1], W[l]), ``biases[l]``: (W[l+1]) or None.

    Hidden layers apply ``activation`` (with ``params``), the last ``output_activation``
    (a name, or ``bpext.resolve(name, **its_params)``). Equal to the same stack of
    ``F.linear`` + activations, but keeps one tensor per layer for backward.
    """
    hidden = _resolved(activation, params)
    out = resolve(output_activation)
    biases = list(biases) if biases is not None else [None] * len(weights)
    if len(biases) != len(weights):
        raise ValueError(f"mlp: got {len(weights)} weights but {len(biases)} biases")
    x, weights, biases = _autocast(x, weights, biases)
    return MLPFunction.apply(x, hidden.name, hidden.p0, hidden.p1, out.name, out.p0, out.p1, len(weights),
                             *weights, *biases)
