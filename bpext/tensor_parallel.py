"""bpext's ops on DTensors: a sharding rule for each op, so that under tensor-parallel plans
(``ColwiseParallel``, ``RowwiseParallel``, ``SequenceParallel``) each op runs on the rank's local
shards, with the communication native layers have (rowwise: one all-reduce of the partial output).

Per mesh dimension, each rule lists (output placements, input placements) in schema order:

* all replicated;
* data parallel: the inputs' leading dim d sharded, weights replicated (weight gradients partial);
* colwise: weights sharded by output feature (``Shard(0)``), the input replicated, the output
  sharded on its last dim (``dense``, ``gated``; the gate and up of ``gated_mlp``);
* rowwise, where the op is linear in its input (``dense`` with identity; the down projection of
  ``gated_mlp``): the weight sharded by input feature (``Shard(1)``), the input on its last dim,
  the output (and the bias, scattered as DTensor does natively) partial sums;
* activations: any placement but partial sums, kept.

Any other placement is redistributed to one of these by DTensor, never computed wrongly. The loss
op takes its inputs replicated. ``bpext.functional.mlp`` runs DTensors layer by layer (its op's
lists of tensors have no rule). The rules are registered when ``torch.distributed.tensor`` is
first imported (a second's import that bpext itself does not need).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

import torch

__all__ = ["register"]

_registered = False


def register() -> None:
    """Registers every rule with DTensor (once)."""
    global _registered
    if _registered:
        return
    _registered = True
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
    from torch.distributed.tensor.experimental import register_sharding

    R, P = Replicate(), Partial()
    ops = torch.ops.bpext

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

    rules = {"activation_forward": activation_forward, "activation_backward": activation_backward,
             "activation_double_backward": activation_double_backward, "dense_forward": dense_forward,
             "dense_backward": dense_backward, "gated_forward": gated_forward, "gated_backward": gated_backward,
             "gated_mlp_forward": gated_mlp_forward, "gated_mlp_backward": gated_mlp_backward,
             "linear_cross_entropy_forward": loss_forward, "linear_cross_entropy_backward": loss_backward}
    propagator = DTensor._op_dispatcher.sharding_propagator
    for name, rule in rules.items():
        op = getattr(ops, name).default
        register_sharding(op)(rule)
        # Every argument that is not a tensor (the activation, its parameters, masks, flags) selects the
        # placements: all of them key DTensor's cache of sharding decisions, not only integers.
        static = next(i for i, a in enumerate(op._schema.arguments) if not _is_tensor(a.type))
        propagator.op_to_schema_info[op] = RuntimeSchemaInfo(static_argnum=static, needs_pytree=True)


def _is_tensor(t) -> bool:
    return isinstance(t, torch.TensorType) or isinstance(t, torch.OptionalType) and _is_tensor(t.getElementType())


def is_dtensor(t) -> bool:
    """Whether t is a DTensor (without importing DTensor where nothing has)."""
    return "torch.distributed.tensor" in sys.modules and isinstance(t, sys.modules["torch.distributed.tensor"].DTensor)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Registers the rules once ``torch.distributed.tensor`` has been imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "torch.distributed.tensor":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


if "torch.distributed.tensor" in sys.modules:
    register()
elif torch.distributed.is_available():
    sys.meta_path.insert(0, _AfterImport())
