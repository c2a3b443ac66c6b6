"""What torch needs to know about bpext's ops beyond their kernels: a fake (meta)
implementation per op, so that torch.compile and torch.export trace through bpext, a vmap rule
per op, so that torch.func.vmap batches them, and a sharding rule per op, so that they run on
DTensors' shards. The schemas are in kernels/registration.cpp; autograd is registered beside the
Functions in functional.py."""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from .activations import REGISTRY

class _Ops:
    """torch.ops.bpext's overloads (``.default``): calling an overload skips the packet's overload
    resolution, a few microseconds per call."""

    def __getattr__(self, name: str):
        overload = getattr(torch.ops.bpext, name).default
        setattr(self, name, overload)
        return overload


ops = _Ops()

# The ops with a kernel per device.
OPS = (
    "activation_forward", "activation_backward", "activation_double_backward", "dense_forward", "dense_backward",
    "gated_forward", "gated_backward", "gated_mlp_forward", "gated_mlp_backward", "mlp_forward", "mlp_backward",
    "linear_cross_entropy_forward", "linear_cross_entropy_backward",
)


def set_gemm_epilogue(enabled: bool) -> bool:
    """Dense forward of a ReLU layer with a bias: finish it inside the GEMM
    (``torch._addmm_activation``, cuBLASLt's epilogue on CUDA) when True, the default, or
    run a plain GEMM and bpext's activation pass. Returns the previous setting."""
    return ops._set_gemm_epilogue(enabled)


# ---- fake implementations: output metadata only --------------------------------------------


def _one_device(op: str, *tensors) -> None:
    """A real tensor mixed with meta tensors reaches the fake kernel (Meta wins the dispatch);
    refuse it as the real kernels would, instead of returning uninitialized memory."""
    devices = {t.device for t in pytree.tree_leaves(tensors) if isinstance(t, torch.Tensor)}
    torch._check(len(devices) <= 1, lambda: f"bpext.{op}: expected all tensors on one device, got "
                                            f"{', '.join(sorted(str(d) for d in devices))}")


def _check_bias(op: str, bias, features) -> None:
    """A bias is (features) or none, as the real kernels check."""
    torch._check(bias is None or tuple(bias.shape) == (features,),
                 lambda: f"bpext.{op}: a bias must be 1-D of size out_features ({features}), got {list(bias.shape)}")


def _rows_like(x: torch.Tensor, features: int) -> tuple[int, ...]:
    return (*x.shape[:-1], features)


@torch.library.register_fake("bpext::activation_forward")
def _(x, activation, params):
    return x.new_empty(x.shape)


@torch.library.register_fake("bpext::activation_backward")
def _(grad_y, saved, activation, params):
    _one_device("activation_backward", grad_y, saved)
    torch._check(grad_y.shape == saved.shape, lambda: "bpext.activation_backward: grad_y and saved shapes differ")
    return grad_y.new_empty(grad_y.shape)


@torch.library.register_fake("bpext::activation_double_backward")
def _(grad_grad_x, grad_y, saved, activation, params):
    _one_device("activation_double_backward", grad_grad_x, grad_y, saved)
    torch._check(grad_y.shape == saved.shape == grad_grad_x.shape,
                 lambda: "bpext.activation_double_backward: shapes differ")
    return grad_y.new_empty(grad_y.shape), grad_y.new_empty(grad_y.shape)


@torch.library.register_fake("bpext::dense_forward")
def _(x, weight, bias, activation, params, return_preact):
    _one_device("dense_forward", x, weight, bias)
    torch._check(weight.dim() == 2 and x.shape[-1] == weight.shape[1],
                 lambda: "bpext.dense_forward: weight must be (out_features, in_features of the input)")
    _check_bias("dense_forward", bias, weight.shape[0])
    shape = _rows_like(x, weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if return_preact else (0,))


@torch.library.register_fake("bpext::dense_backward")
def _(grad_y, x, weight, saved, activation, params, output_mask):
    _one_device("dense_backward", grad_y, x, weight, saved)
    out_features = grad_y.shape[-1]
    return (grad_y.new_empty(_rows_like(grad_y, weight.shape[1]) if output_mask[0] else (0,)),
            grad_y.new_empty((out_features, x.shape[-1]) if output_mask[1] else (0,)),
            grad_y.new_empty((out_features,) if output_mask[2] else (0,)))


@torch.library.register_fake("bpext::gated_forward")
def _(x, weight_gate, bias_gate, weight_up, bias_up, activation, params, save):
    _one_device("gated_forward", x, weight_gate, bias_gate, weight_up, bias_up)
    for bias in (bias_gate, bias_up):
        _check_bias("gated_forward", bias, weight_gate.shape[0])
    shape = _rows_like(x, weight_gate.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save else (0,)), x.new_empty(shape if save else (0,))


def _gated_grads_like(gate, x, weight_gate, mask):
    """The gated backward ops' (grad_x, grad_weight_gate, grad_bias_gate, grad_weight_up, grad_bias_up); the
    input features are x's where a weight's gradient reads it, else the weights' (read for grad_x)."""
    hidden = gate.shape[-1]
    in_features = x.shape[-1] if mask[1] or mask[3] else weight_gate.shape[1] if mask[0] else 0
    weight = (hidden, in_features)
    return (gate.new_empty((*gate.shape[:-1], in_features) if mask[0] else (0,)),
            gate.new_empty(weight if mask[1] else (0,)), gate.new_empty((hidden,) if mask[2] else (0,)),
            gate.new_empty(weight if mask[3] else (0,)), gate.new_empty((hidden,) if mask[4] else (0,)))


@torch.library.register_fake("bpext::gated_backward")
def _(grad_y, x, weight_gate, weight_up, gate, up, activation, params, output_mask):
    _one_device("gated_backward", grad_y, x, weight_gate, weight_up, gate, up)
    return _gated_grads_like(gate, x, weight_gate, output_mask)


@torch.library.register_fake("bpext::gated_mlp_forward")
def _(x, weight_gate, bias_gate, weight_up, bias_up, weight_down, bias_down, activation, params, save):
    _one_device("gated_mlp_forward", x, weight_gate, bias_gate, weight_up, bias_up, weight_down, bias_down)
    for bias, features in ((bias_gate, weight_gate.shape[0]), (bias_up, weight_gate.shape[0]),
                           (bias_down, weight_down.shape[0])):
        _check_bias("gated_mlp_forward", bias, features)
    hidden = _rows_like(x, weight_gate.shape[0])
    return (x.new_empty(_rows_like(x, weight_down.shape[0])), x.new_empty(hidden if save else (0,)),
            x.new_empty(hidden if save else (0,)))


@torch.library.register_fake("bpext::gated_mlp_backward")
def _(grad_y, x, weight_gate, weight_up, weight_down, gate, up, activation, params, output_mask):
    _one_device("gated_mlp_backward", grad_y, x, weight_gate, weight_up, weight_down, gate, up)
    out_features = grad_y.shape[-1]
    return (*_gated_grads_like(gate, x, weight_gate, output_mask[:5]),
            gate.new_empty((out_features, gate.shape[-1]) if output_mask[5] else (0,)),
            gate.new_empty((out_features,) if output_mask[6] else (0,)))


def _mlp_keeps_nothing(layer: int, layers: int, activation: str) -> bool:
    """Whether mlp_forward keeps nothing of this layer: the last layer, when its derivative
    reads the output y (which the caller keeps) or nothing. The kernels' mlp_keeps_nothing."""
    return layer == layers - 1 and REGISTRY[activation].saves != "input"


def _check_loss(op, input, weight, bias, target):
    _one_device(op, input, weight, bias, target)
    torch._check(input.dim() == 2 and weight.dim() == 2 and input.shape[1] == weight.shape[1],
                 lambda: f"bpext.{op}: input must be (tokens, hidden) and weight (vocab, hidden)")
    torch._check(target.dim() == 1 and target.shape[0] == input.shape[0] and target.dtype == torch.int64,
                 lambda: f"bpext.{op}: target must be int64 of shape (tokens,)")
    torch._check(bias is None or tuple(bias.shape) == (weight.shape[0],), lambda: f"bpext.{op}: bias must be (vocab,)")


def _loss_grads(input, weight, bias):
    return (input.new_empty(input.shape), input.new_empty(weight.shape),
            input.new_empty((weight.shape[0],) if bias is not None else (0,)))  # (0): no bias


@torch.library.register_fake("bpext::linear_cross_entropy_forward")
def _(input, weight, bias, target, ignore_index, label_smoothing, softcap, z_loss, reduction, divisor, output_mask):
    _check_loss("linear_cross_entropy_forward", input, weight, bias, target)
    loss = input.new_empty((input.shape[0],) if reduction == "none" else (),
                           dtype=torch.float64 if input.dtype == torch.float64 else torch.float32)
    grads = _loss_grads(input, weight, bias)
    return loss, *(g if asked else input.new_empty((0,)) for g, asked in zip(grads, output_mask))


@torch.library.register_fake("bpext::linear_cross_entropy_backward")
def _(grad_loss, input, weight, bias, target, ignore_index, label_smoothing, softcap, z_loss, reduction, divisor):
    _check_loss("linear_cross_entropy_backward", input, weight, bias, target)
    torch._check(tuple(grad_loss.shape) == ((input.shape[0],) if reduction == "none" else ()),
                 lambda: "bpext.linear_cross_entropy_backward: grad_loss must have the loss's shape")
    return _loss_grads(input, weight, bias)


@torch.library.register_fake("bpext::mlp_forward")
def _(x, weights, biases, activation, params, output_activation, output_params, save):
    _one_device("mlp_forward", x, weights, biases)
    layers = len(weights)
    torch._check(len(biases) == layers, lambda: f"bpext.mlp_forward: got {layers} weights but {len(biases)} biases")
    for w, b in zip(weights, biases):  # an empty tensor: no bias
        _check_bias("mlp_forward", None if b.numel() == 0 else b, w.shape[0])
    saved = []
    for layer, w in enumerate(weights):
        act = output_activation if layer == layers - 1 else activation
        keeps_nothing = not save or _mlp_keeps_nothing(layer, layers, act)
        saved.append(x.new_empty((0,) if keeps_nothing else _rows_like(x, w.shape[0])))
    return x.new_empty(_rows_like(x, weights[-1].shape[0])), saved if save else []


@torch.library.register_fake("bpext::mlp_backward")
def _(grad_y, x, y, weights, saved, activation, params, output_activation, output_params, output_mask):
    _one_device("mlp_backward", grad_y, x, y, weights, saved)
    n = len(weights)
    torch._check(len(saved) == n and len(output_mask) == 1 + 2 * n, lambda: "bpext.mlp_backward: saved must "
                 "have one tensor per layer and output_mask 1 + 2 * layers entries")
    # the widths, as the kernel takes them: of x or weights[0], the hidden layers' kept tensors, grad_y
    first = x.shape[-1] if x is not None else weights[0].shape[1] if weights[0].dim() == 2 else 0
    widths = [first, *(s.shape[-1] for s in saved[:-1]), grad_y.shape[-1]]

    def asked(i, shape):
        return grad_y.new_empty(shape if output_mask[i] else (0,))

    return (asked(0, _rows_like(grad_y, widths[0])), [asked(1 + l, (widths[l + 1], widths[l])) for l in range(n)],
            [asked(1 + n + l, (widths[l + 1],)) for l in range(n)])


# ---- vmap rules -------------------------------------------------------------------------------
# Elementwise ops take the batch as more elements; layers whose only batched argument is the
# input take it as more rows (one op call); anything else (batched weights: ensembles;
# batched gradients: per-sample weight gradients) runs once per sample.


def _is_placeholder(t) -> bool:
    return isinstance(t, torch.Tensor) and t.shape == (0,)


def _elementwise_rule(op, n_tensors):
    def rule(info, in_dims, *args):
        tensors = [t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
                   for t, d in zip(args[:n_tensors], in_dims[:n_tensors])]
        out = op(*tensors, *args[n_tensors:])
        return out, pytree.tree_map(lambda _: 0, out)
    return rule


def _select(arg, dim, i):
    if isinstance(arg, (list, tuple)):
        return [_select(a, d, i) for a, d in zip(arg, dim if dim is not None else [None] * len(arg))]
    return arg.select(dim, i) if dim is not None else arg


def _loop(op, info, in_dims, args):
    results = [op(*[_select(a, d, i) for a, d in zip(args, in_dims)]) for i in range(info.batch_size)]
    flat = [pytree.tree_flatten(r) for r in results]
    stacked = [torch.stack(parts) for parts in zip(*(leaves for leaves, _ in flat))]
    out = pytree.tree_unflatten(stacked, flat[0][1])
    return out, pytree.tree_map(lambda _: 0, out)


def _rows_or_loop_rule(op):
    def rule(info, in_dims, *args):
        others = pytree.tree_leaves(list(in_dims[1:]))
        if in_dims[0] is None or any(d is not None for d in others):
            return _loop(op, info, in_dims, args)
        out = op(args[0].movedim(in_dims[0], 0), *args[1:])
        return out, pytree.tree_map(lambda t: None if _is_placeholder(t) else 0, out)
    return rule


def _loop_rule(op):
    return lambda info, in_dims, *args: _loop(op, info, in_dims, args)


for _name, _n in (("activation_forward", 1), ("activation_backward", 2), ("activation_double_backward", 3)):
    torch.library.register_vmap(f"bpext::{_name}", _elementwise_rule(getattr(ops, _name), _n))
for _name in ("dense_forward", "gated_forward", "gated_mlp_forward", "mlp_forward"):
    torch.library.register_vmap(f"bpext::{_name}", _rows_or_loop_rule(getattr(ops, _name)))
for _name in ("dense_backward", "gated_backward", "gated_mlp_backward", "mlp_backward"):
    torch.library.register_vmap(f"bpext::{_name}", _loop_rule(getattr(ops, _name)))

# ---- sharding rules: output placements on DTensors ------------------------------------------------
# Per mesh dimension, each rule lists (output placements, input placements) in schema order:
#
# * all replicated;
# * data parallel: the inputs' leading dim d sharded, weights replicated (weight gradients partial);
# * colwise: weights sharded by output feature (``Shard(0)``), the input replicated, the output
#   sharded on its last dim (``dense``, ``gated``; the gate and up of ``gated_mlp``);
# * rowwise, where the op is linear in its input (``dense`` with identity; the down projection of
#   ``gated_mlp``): the weight sharded by input feature (``Shard(1)``), the input on its last dim,
#   the output (and the bias, scattered as DTensor does natively) partial sums;
# * activations: any placement but partial sums, kept.
#
# Any other placement is redistributed to one of these by DTensor, never computed wrongly.
# The loss op takes its inputs replicated. Registered by bpext/tensor_parallel.py.


def sharding_rules() -> dict:
    """{op name: its sharding rule}, for DTensor's ``register_sharding``."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    R, P = Replicate(), Partial()


    def last(spec) -> int:
        return len(spec.shape) - 1

    def given(spec, placement):
        """The placement of an optional tensor argument: None where it is absent."""
        return None if spec is None else placement

    def of(mask, placements):
        """Output placements, replicated where the output mask leaves a (0) placeholder."""
        return [p if asked else R for p, asked in zip(placements, mask)]

    def activation_forward(x, activation, params):
        return [([R], [R, None, None])] + [([Shard(d)], [Shard(d), None, None]) for d in range(len(x.shape))]

    def activation_backward(grad_y, saved, activation, params):
        return [([R], [R, R, None, None])] + [([Shard(d)], [Shard(d), Shard(d), None, None])
                                              for d in range(len(grad_y.shape))]

    def activation_double_backward(grad_grad_x, grad_y, saved, activation, params):
        return [([R, R], [R, R, R, None, None])] + [([Shard(d)] * 2, [Shard(d)] * 3 + [None, None])
                                                    for d in range(len(grad_y.shape))]

    def dense_forward(x, weight, bias, activation, params, return_preact):
        z = lambda p: p if return_preact else R  # noqa: E731 - preact is (0) unless asked for
        rules = [([R, R], [R, R, given(bias, R), None, None, None])]
        rules += [([Shard(d), z(Shard(d))], [Shard(d), R, given(bias, R), None, None, None]) for d in range(last(x))]
        rules.append(([Shard(last(x)), z(Shard(last(x)))], [R, Shard(0), given(bias, Shard(0)), None, None, None]))
        if activation == "identity":
            rules.append(([P, z(P)], [Shard(last(x)), Shard(1), given(bias, P), None, None, None]))
        return rules

    def dense_backward(grad_y, x, weight, saved, activation, params, output_mask):
        n = last(grad_y)
        s = lambda p: p if len(saved.shape) > 1 or saved.shape[0] > 0 else R  # noqa: E731 - (0): nothing saved
        rules = [(of(output_mask, [R, R, R]), [R, given(x, R), given(weight, R), R, None, None, None])]
        rules += [(of(output_mask, [Shard(d), P, P]), [Shard(d), given(x, Shard(d)), given(weight, R), s(Shard(d)),
                                                       None, None, None]) for d in range(n)]
        rules.append((of(output_mask, [P, Shard(0), Shard(0)]),
                      [Shard(n), given(x, R), given(weight, Shard(0)), s(Shard(n)), None, None, None]))
        if activation == "identity":
            rules.append((of(output_mask, [Shard(n), Shard(1), R]),
                          [R, given(x, Shard(n)), given(weight, Shard(1)), R, None, None, None]))
        return rules

    def gated_forward(x, weight_gate, bias_gate, weight_up, bias_up, activation, params, save):
        kept = lambda p: p if save else R  # noqa: E731 - gate and up are (0) unless saved
        n = last(x)
        rules = [([R, R, R], [R, R, given(bias_gate, R), R, given(bias_up, R), None, None, None])]
        rules += [([Shard(d), kept(Shard(d)), kept(Shard(d))],
                   [Shard(d), R, given(bias_gate, R), R, given(bias_up, R), None, None, None]) for d in range(n)]
        rules.append(([Shard(n), kept(Shard(n)), kept(Shard(n))],
                      [R, Shard(0), given(bias_gate, Shard(0)), Shard(0), given(bias_up, Shard(0)), None, None, None]))
        return rules

    def gated_backward(grad_y, x, weight_gate, weight_up, gate, up, activation, params, output_mask):
        n = last(grad_y)
        rest = [None, None, None]
        rules = [(of(output_mask, [R] * 5), [R, given(x, R), given(weight_gate, R), given(weight_up, R), R, R] + rest)]
        rules += [(of(output_mask, [Shard(d), P, P, P, P]),
                   [Shard(d), given(x, Shard(d)), given(weight_gate, R), given(weight_up, R), Shard(d), Shard(d)] + rest)
                  for d in range(n)]
        rules.append((of(output_mask, [P] + [Shard(0)] * 4),
                      [Shard(n), given(x, R), given(weight_gate, Shard(0)), given(weight_up, Shard(0)), Shard(n),
                       Shard(n)] + rest))
        return rules

    def gated_mlp_forward(x, weight_gate, bias_gate, weight_up, bias_up, weight_down, bias_down, activation, params,
                          save):
        kept = lambda p: p if save else R  # noqa: E731
        n = last(x)
        rest = [None, None, None]
        rules = [([R, R, R], [R, R, given(bias_gate, R), R, given(bias_up, R), R, given(bias_down, R)] + rest)]
        rules += [([Shard(d), kept(Shard(d)), kept(Shard(d))],
                   [Shard(d), R, given(bias_gate, R), R, given(bias_up, R), R, given(bias_down, R)] + rest)
                  for d in range(n)]
        rules.append(([P, kept(Shard(n)), kept(Shard(n))],
                      [R, Shard(0), given(bias_gate, Shard(0)), Shard(0), given(bias_up, Shard(0)), Shard(1),
                       given(bias_down, P)] + rest))
        return rules

    def gated_mlp_backward(grad_y, x, weight_gate, weight_up, weight_down, gate, up, activation, params, output_mask):
        n = last(grad_y)
        rest = [None, None, None]
        weights = lambda g, u, d: [given(weight_gate, g), given(weight_up, u), given(weight_down, d)]  # noqa: E731
        rules = [(of(output_mask, [R] * 7), [R, given(x, R), *weights(R, R, R), R, R] + rest)]
        rules += [(of(output_mask, [Shard(d)] + [P] * 6),
                   [Shard(d), given(x, Shard(d)), *weights(R, R, R), Shard(d), Shard(d)] + rest) for d in range(n)]
        rules.append((of(output_mask, [P] + [Shard(0)] * 4 + [Shard(1), R]),
                      [R, given(x, R), *weights(Shard(0), Shard(0), Shard(1)), Shard(n), Shard(n)] + rest))
        return rules

    def loss_forward(input, weight, bias, target, *options):
        return [([R] * 4, [R, R, given(bias, R), R] + [None] * len(options))]

    def loss_backward(grad_loss, input, weight, bias, target, *options):
        return [([R] * 3, [R, R, R, given(bias, R), R] + [None] * len(options))]

    return {"activation_forward": activation_forward, "activation_backward": activation_backward,
            "activation_double_backward": activation_double_backward, "dense_forward": dense_forward,
            "dense_backward": dense_backward, "gated_forward": gated_forward, "gated_backward": gated_backward,
            "gated_mlp_forward": gated_mlp_forward, "gated_mlp_backward": gated_mlp_backward,
            "linear_cross_entropy_forward": loss_forward, "linear_cross_entropy_backward": loss_backward}


def _tag_compile_caches() -> None:
    """torch.compile's caches key a compiled graph by the graph Dynamo traced, where bpext's ops
    appear by name only; the backward graph that bpext's autograd derives from it is not in the key.
    A cache written with another bpext would call the ops as that one did (seen: a graph calling
    mlp_backward with an older schema's arguments). bpext's op schemas and the source of its
    autograd join the key, so that each bpext compiles its own graphs."""
    import hashlib
    import os

    digest = hashlib.sha256()
    for name in sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("bpext::")):
        digest.update(str(getattr(torch.ops.bpext, name.removeprefix("bpext::")).default._schema).encode())
    here = os.path.dirname(__file__)
    for source in ("_ops.py", "activations.py", "functional.py"):
        with open(os.path.join(here, source), "rb") as f:
            digest.update(f.read())
    tag = f"bpext-{digest.hexdigest()[:16]}"
    current = torch.compiler.config.cache_key_tag
    if tag not in current:
        torch.compiler.config.cache_key_tag = f"{current}+{tag}" if current else tag


_tag_compile_caches()
