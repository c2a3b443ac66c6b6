"""Autograd functions and the functional API. Forward and backward call only
torch.ops.bpext.* (through bpext._ops); each saves the least backward needs. Double
backward, which only create_graph=True reaches, composes bpext ops with matrix products."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _ops
from .activations import REGISTRY, ResolvedActivation, resolve

__all__ = [
    "ActivationFunction", "ActivationBackwardFunction", "DenseFunction", "DenseBackwardFunction", "MLPFunction",
    "activation", "dense", "mlp",
]


class ActivationFunction(torch.autograd.Function):
    """y = act(x). Saves y or x, whichever the activation's derivative is computed from.

    Its backward is itself differentiable (ActivationBackwardFunction), so second
    derivatives (gradgradcheck, gradient penalties) work.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, activation: str, p0: float, p1: float) -> torch.Tensor:
        y = _ops.activation_forward(x, activation, p0, p1)
        ctx.activation = (activation, p0, p1)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(y if REGISTRY[activation].saves_output else x)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (saved,) = ctx.saved_tensors
        # Building a graph of the backward (create_graph=True) only when one is asked for.
        backward = ActivationBackwardFunction.apply if torch.is_grad_enabled() else _ops.activation_backward
        return backward(grad_y, saved, *ctx.activation), None, None, None


class ActivationBackwardFunction(torch.autograd.Function):
    """grad_x = grad_y * act'(s), differentiable in grad_y and in the saved s (y or x).

    When s is the output y, autograd carries its gradient on through y's own graph.
    """

    @staticmethod
    def forward(ctx, grad_y: torch.Tensor, saved: torch.Tensor, activation: str, p0: float, p1: float):
        ctx.activation = (activation, p0, p1)
        ctx.save_for_backward(grad_y, saved)
        return _ops.activation_backward(grad_y, saved, activation, p0, p1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_grad_x: torch.Tensor):
        grad_y, saved = ctx.saved_tensors
        grad_grad_y, grad_saved = _ops.activation_double_backward(grad_grad_x, grad_y, saved, *ctx.activation)
        needs = ctx.needs_input_grad
        return (grad_grad_y if needs[0] else None, grad_saved if needs[1] else None, None, None, None)


class DenseFunction(torch.autograd.Function):
    """(y, z) = (act(x @ weight.T + bias), x @ weight.T + bias), bias and activation fused
    into the GEMM's epilogue; z is (0) unless backward reads it (``dense`` returns y only).

    Saves x only when the weight needs a gradient, and one of y or z (per the
    activation's policy; nothing for identity) only when any gradient is needed. z is an
    output so that double backward can send a gradient into it: its backward is
    differentiable (DenseBackwardFunction).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, activation: str, p0: float, p1: float):
        needs = ctx.needs_input_grad[:3]
        training = any(needs)
        saves_output = REGISTRY[activation].saves_output
        y, preact = _ops.dense_forward(x, weight, bias, activation, p0, p1, training and not saves_output)
        ctx.activation = (activation, p0, p1)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        # z carries gradients only for eager double backward; compiled graphs would
        # otherwise send it zeros on every step.
        ctx.preact_differentiable = preact.numel() > 0 and not torch.compiler.is_compiling()
        if not ctx.preact_differentiable:
            ctx.mark_non_differentiable(preact)
        if training:
            saved = None if activation == "identity" else (y if saves_output else preact)
            ctx.save_for_backward(x if needs[1] else None, weight, saved)
        return y, preact

    @staticmethod
    def backward(ctx, grad_y, grad_preact):
        x, weight, saved = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = (needs[0], needs[1], needs[2] and ctx.has_bias)
        if not ctx.preact_differentiable:
            grad_preact = None
        if grad_y is None and grad_preact is None:
            return None, None, None, None, None, None
        if grad_preact is None:  # the usual case
            if saved is None:  # identity: backward reads nothing saved
                saved = grad_y.new_empty(0)
            backward = DenseBackwardFunction.apply if torch.is_grad_enabled() else _ops.dense_backward
            grads = backward(grad_y, x, weight, saved, *ctx.activation, mask)
        else:  # a gradient arriving at z: only in double backward, through the saved z
            dz = grad_preact
            if grad_y is not None:
                dz = dz + _ops.activation_backward(grad_y, saved, *ctx.activation)
            grads = _ops.dense_backward(dz, x, weight, dz.new_empty(0), "identity", 0.0, 0.0, mask)
        return (*(g if m else None for g, m in zip(grads, mask)), None, None, None)


class DenseBackwardFunction(torch.autograd.Function):
    """(grad_x, grad_weight, grad_bias) of a dense layer, differentiable in grad_y, x,
    weight and the saved y or z: with dz = grad_y * act'(s),
    grad_x = dz W, grad_weight = dz^T x, grad_bias = sum(dz)."""

    @staticmethod
    def forward(ctx, grad_y, x, weight, saved, activation: str, p0: float, p1: float, mask):
        ctx.activation = (activation, p0, p1)
        ctx.mask = mask
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_y, x, weight, saved)
        return _ops.dense_backward(grad_y, x, weight, saved, activation, p0, p1, mask)

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_x, gg_weight, gg_bias):
        grad_y, x, weight, saved = ctx.saved_tensors
        identity = ctx.activation[0] == "identity"
        out_features, in_features = weight.shape
        g2 = grad_y.reshape(-1, out_features)
        s2 = None if identity else saved.reshape(-1, out_features)
        x2 = x.reshape(-1, in_features) if x is not None else None
        gg_x = gg_x if ctx.mask[0] else None
        gg_weight = gg_weight if ctx.mask[1] else None
        gg_bias = gg_bias if ctx.mask[2] else None
        # The gradient reaching dz from the three outputs.
        g_dz = g2.new_zeros(g2.shape)
        if gg_x is not None:  # grad_x = dz W
            g_dz = g_dz + gg_x.reshape(-1, in_features) @ weight.t()
        if gg_weight is not None:  # grad_weight = dz^T x
            g_dz = g_dz + x2 @ gg_weight.t()
        if gg_bias is not None:  # grad_bias = sum over rows of dz
            g_dz = g_dz + gg_bias
        dz = g2 if identity else _ops.activation_backward(g2, s2, *ctx.activation)
        if identity:
            grad_grad_y, grad_saved = g_dz, None
        else:
            grad_grad_y, grad_saved = _ops.activation_double_backward(g_dz, g2, s2, *ctx.activation)
        needs = ctx.needs_input_grad
        grad_x = (dz @ gg_weight).reshape(x.shape) if needs[1] and gg_weight is not None else None
        grad_weight = dz.t() @ gg_x.reshape(-1, in_features) if needs[2] and gg_x is not None else None
        return (grad_grad_y.reshape(grad_y.shape) if needs[0] else None, grad_x, grad_weight,
                grad_saved.reshape(saved.shape) if needs[3] and grad_saved is not None else None,
                None, None, None, None)


class MLPFunction(torch.autograd.Function):
    """A whole multi-layer perceptron: ``act_out(L_n(...act(L_1(x))))`` in one op each way.

    Keeps one tensor per layer (y where the derivative follows from it, else z) plus x
    and the output; backward recomputes act(z) where it needs a layer's input. Under
    create_graph=True, backward differentiates the same network built from Dense layers,
    so second derivatives work too. ``params`` are the n_layers weights followed by the
    n_layers biases (None allowed).
    """

    @staticmethod
    def forward(ctx, x, activation: str, p0: float, p1: float, output_activation: str, q0: float, q1: float,
                n_layers: int, *params):
        weights, biases = params[:n_layers], params[n_layers:]
        training = any(ctx.needs_input_grad)
        y, saved = _ops.mlp_forward(x, weights, biases, activation, p0, p1, output_activation, q0, q1, training)
        ctx.config = (activation, p0, p1, output_activation, q0, q1)
        ctx.n_layers = n_layers
        if training:
            # The output is needed only when the last activation's derivative comes from it.
            keep_y = output_activation != "identity" and REGISTRY[output_activation].saves_output
            # The biases (parameters, no extra memory) only for double backward's rebuild.
            ctx.save_for_backward(x, y if keep_y else None, *weights, *biases, *saved)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        n = ctx.n_layers
        x, y, *rest = ctx.saved_tensors
        weights, biases, saved = rest[:n], rest[n:2 * n], rest[2 * n:]
        needs = ctx.needs_input_grad
        first = 8  # index of the first weight among forward's inputs
        if torch.is_grad_enabled():  # create_graph=True
            grads = _differentiable_mlp_grads(grad_y, x, weights, biases, ctx.config, needs[0], needs[first:])
            return (grads[0], None, None, None, None, None, None, None, *grads[1:])
        y = y if y is not None else grad_y.new_empty(0)
        grad_x, grad_w, grad_b = _ops.mlp_backward(grad_y, x, y, weights, biases, saved, *ctx.config, needs[0])
        grad_w = [g if needs[first + i] else None for i, g in enumerate(grad_w)]
        grad_b = [g if b is not None and needs[first + n + i] else None for i, (g, b) in enumerate(zip(grad_b, biases))]
        return (grad_x if needs[0] else None, None, None, None, None, None, None, None, *grad_w, *grad_b)


def _differentiable_mlp_grads(grad_y, x, weights, biases, config, x_needs_grad, params_need_grad):
    """The gradients of an MLP as a graph in grad_y, x and the parameters (for double backward):
    rebuilds the network from Dense layers, whose backward is differentiable, and
    differentiates that. Returns (grad_x, *grad_weights, *grad_biases), None where not needed."""
    activation, p0, p1, output_activation, q0, q1 = config
    inputs = [x, *weights, *biases]
    wanted = [x_needs_grad, *params_need_grad]
    with torch.enable_grad():
        h = x
        for i, (w, b) in enumerate(zip(weights, biases)):
            act = (output_activation, q0, q1) if i + 1 == len(weights) else (activation, p0, p1)
            h, _ = DenseFunction.apply(h, w, b, *act)
        needed = [t for t, want in zip(inputs, wanted) if want and t is not None]
        grads = iter(torch.autograd.grad(h, needed, grad_y, create_graph=True))
    return [next(grads) if want and t is not None else None for t, want in zip(inputs, wanted)]


def activation(x: torch.Tensor, activation: str | ResolvedActivation = "relu", **params: float) -> torch.Tensor:
    """Applies an activation by name, e.g. ``activation(x, "leaky_relu", negative_slope=0.1)``.

    Parameters take ``torch.nn.functional``'s names and defaults. The output has x's
    shape and dtype (autocast leaves activations in their input dtype).
    """
    act = resolve(activation, **params)
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
    act = resolve(activation, **params)
    x, (weight,), (bias,) = _autocast(x, [weight], [bias])
    y, _ = DenseFunction.apply(x, weight, bias, act.name, act.p0, act.p1)
    return y


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
    hidden = resolve(activation, **params)
    out = resolve(output_activation)
    biases = list(biases) if biases is not None else [None] * len(weights)
    if len(biases) != len(weights):
        raise ValueError(f"mlp: got {len(weights)} weights but {len(biases)} biases")
    x, weights, biases = _autocast(x, weights, biases)
    return MLPFunction.apply(x, hidden.name, hidden.p0, hidden.p1, out.name, out.p0, out.p1, len(weights),
                             *weights, *biases)
