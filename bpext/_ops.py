"""Typed wrappers over torch.ops.bpext.* and one fake (meta) implementation per op,
so that torch.compile traces through bpext and opcheck passes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .activations import REGISTRY

_ops = torch.ops.bpext


def activation_forward(x: torch.Tensor, activation: str, p0: float, p1: float) -> torch.Tensor:
    """x: (*) -> y: (*)"""
    return _ops.activation_forward.default(x, activation, p0, p1)


def activation_backward(
    grad_y: torch.Tensor, saved: torch.Tensor, activation: str, p0: float, p1: float
) -> torch.Tensor:
    """grad_y, saved: (*) -> grad_x: (*). ``saved`` is y or z, as the activation's policy says."""
    return _ops.activation_backward.default(grad_y, saved, activation, p0, p1)


def activation_double_backward(
    grad_grad_x: torch.Tensor, grad_y: torch.Tensor, saved: torch.Tensor, activation: str, p0: float, p1: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of activation_backward -> (grad of grad_y, grad of saved), each (*)."""
    return _ops.activation_double_backward.default(grad_grad_x, grad_y, saved, activation, p0, p1)


def dense_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    p0: float,
    p1: float,
    return_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (*, IN), weight: (OUT, IN), bias: (OUT) -> y: (*, OUT), preact: (*, OUT) or (0)."""
    return _ops.dense_forward.default(x, weight, bias, activation, p0, p1, return_preact)


def dense_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor,
    saved: torch.Tensor,
    activation: str,
    p0: float,
    p1: float,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> grad_x: (*, IN), grad_weight: (OUT, IN), grad_bias: (OUT); each (0) unless asked for."""
    return _ops.dense_backward.default(grad_y, x, weight, saved, activation, p0, p1, list(output_mask))


def mlp_forward(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activation: str,
    p0: float,
    p1: float,
    output_activation: str,
    q0: float,
    q1: float,
    save: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x: (*, W0), weights[l]: (W[l+1], W[l]) -> y: (*, W[L]), saved: one tensor per layer when ``save``."""
    return _ops.mlp_forward.default(x, list(weights), list(biases), activation, p0, p1, output_activation, q0, q1, save)


def mlp_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    saved: Sequence[torch.Tensor],
    activation: str,
    p0: float,
    p1: float,
    output_activation: str,
    q0: float,
    q1: float,
    input_grad: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """-> grad_x ((0) unless input_grad), grad_weights, grad_biases ((0) for layers without bias)."""
    return _ops.mlp_backward.default(grad_y, x, y, list(weights), list(biases), list(saved), activation, p0, p1,
                                     output_activation, q0, q1, input_grad)


def set_cublaslt_epilogue(enabled: bool) -> bool:
    """CUDA dense forward: use cuBLASLt's bias/ReLU epilogue where it applies (default True).
    Returns the previous setting. Exposed so benchmarks can time both paths."""
    return _ops._set_cublaslt_epilogue(enabled)


# Fake implementations: output metadata only, matching the real kernels' (contiguous) outputs.


@torch.library.register_fake("bpext::activation_forward")
def _(x, activation, p0, p1):
    return x.new_empty(x.shape)


@torch.library.register_fake("bpext::activation_backward")
def _(grad_y, saved, activation, p0, p1):
    torch._check(grad_y.shape == saved.shape, lambda: "bpext.activation_backward: grad_y and saved shapes differ")
    return grad_y.new_empty(grad_y.shape)


@torch.library.register_fake("bpext::activation_double_backward")
def _(grad_grad_x, grad_y, saved, activation, p0, p1):
    torch._check(grad_y.shape == saved.shape == grad_grad_x.shape,
                 lambda: "bpext.activation_double_backward: shapes differ")
    return grad_y.new_empty(grad_y.shape), grad_y.new_empty(grad_y.shape)


@torch.library.register_fake("bpext::dense_forward")
def _(x, weight, bias, activation, p0, p1, return_preact):
    torch._check(weight.dim() == 2, lambda: "bpext.dense_forward: weight must be 2-D")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "bpext.dense_forward: in_features mismatch")
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if return_preact else (0,))


@torch.library.register_fake("bpext::dense_backward")
def _(grad_y, x, weight, saved, activation, p0, p1, output_mask):
    out_features, in_features = weight.shape
    grad_x = grad_y.new_empty((*grad_y.shape[:-1], in_features) if output_mask[0] else (0,))
    grad_weight = grad_y.new_empty((out_features, in_features) if output_mask[1] else (0,))
    grad_bias = grad_y.new_empty((out_features,) if output_mask[2] else (0,))
    return grad_x, grad_weight, grad_bias


def _keeps_output(name: str) -> bool:
    return REGISTRY[name].saves_output


@torch.library.register_fake("bpext::mlp_forward")
def _(x, weights, biases, activation, p0, p1, output_activation, q0, q1, save):
    lead = x.shape[:-1]
    saved = []
    if save:
        for layer, w in enumerate(weights):
            last = layer == len(weights) - 1
            keeps_y = _keeps_output(output_activation if last else activation)
            # The last layer's y is the op's output; nothing more is kept for it then.
            saved.append(x.new_empty((0,)) if last and keeps_y else x.new_empty((*lead, w.shape[0])))
    return x.new_empty((*lead, weights[-1].shape[0])), saved


@torch.library.register_fake("bpext::mlp_backward")
def _(grad_y, x, y, weights, biases, saved, activation, p0, p1, output_activation, q0, q1, input_grad):
    grad_x = grad_y.new_empty(x.shape if input_grad else (0,))
    grad_weights = [grad_y.new_empty(w.shape) for w in weights]
    grad_biases = [grad_y.new_empty((w.shape[0],) if b is not None else (0,)) for w, b in zip(weights, biases)]
    return grad_x, grad_weights, grad_biases
