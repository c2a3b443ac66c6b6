"""What ``convert`` takes for a Linear or an activation: only what is certain for every input.

A module is recognised by its exact class (a subclass may compute anything), read from its
attributes, never by evaluating it on sample values: torch.nn's classes and bpext's through
the activation registry, other libraries' classes through the tables below, named by their
import path so that those libraries are never imported. A function or tensor method is
recognised by identity through the registry's torch references. Each table entry computes
the same function as bpext's activation up to the rounding of its own formula; bpext's result
is never farther from the exact one (its formulas are the accurate ones, tests/test_accuracy.py).
"""

from __future__ import annotations

import functools
import operator

import torch
from torch import fx, nn

from .activations import REGISTRY, ResolvedActivation, resolve
from .nn import Dense, activation_of

__all__ = ["DROPOUTS", "activation_of_module", "activation_of_node", "linear_of_module", "widest_dtype"]

# torch's dropouts, exactly: a subclass may drop in eval mode too (MC dropout)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# Modules of other libraries that compute x @ W^T + b: {class path: whether W is stored (in, out)}.
FOREIGN_LINEARS = {
    "transformers.pytorch_utils.Conv1D": True,  # GPT-2: addmm(b, x, W) with W (in, out)
    "transformers.models.falcon.modeling_falcon.FalconLinear": False,  # x @ W.T + b
}


# Other libraries' activation modules (none has parameters): {class path: the bpext activation}.
# transformers' GELUActivation and GELUTanh apply torch's function, or the same formula in Python
# (use_gelu_python): equal up to rounding either way.
FOREIGN_ACTIVATIONS = {
    "transformers.activations.GELUActivation": "gelu",
    "transformers.activations.GELUTanh": "gelu_tanh",
    "transformers.activations.PytorchGELUTanh": "gelu_tanh",
    "transformers.activations.NewGELUActivation": "gelu_tanh",
    "transformers.activations.FastGELUActivation": "gelu_tanh",
    "transformers.activations.QuickGELUActivation": "quick_gelu",
    "transformers.activations.SiLUActivation": "silu",
    "transformers.activations.MishActivation": "mish",
    "transformers.models.bloom.modeling_bloom.BloomGelu": "gelu_tanh",
    "timm.layers.activations.GELU": "gelu",
    "timm.layers.activations.GELUTanh": "gelu_tanh",
    "timm.layers.activations.QuickGELU": "quick_gelu",
    "timm.layers.activations.Swish": "silu",
    "timm.layers.activations.Mish": "mish",
    "timm.layers.activations.Sigmoid": "sigmoid",
    "timm.layers.activations.Tanh": "tanh",
    "timm.layers.activations.HardSwish": "hardswish",
}


# Of those, the ones whose constants are truncated (BLOOM's sqrt(2/pi) to 8 digits, FastGELU's to 10): the
# same function as bpext's within the rounding of float32, not of float64. {class path: the widest dtype}
ROUNDED_ACTIVATIONS = {
    "transformers.models.bloom.modeling_bloom.BloomGelu": torch.float32,
    "transformers.activations.FastGELUActivation": torch.float32,
}


def widest_dtype(module: nn.Module) -> torch.dtype | None:
    """The widest dtype in which a recognised activation module computes bpext's activation within
    rounding (None: every dtype)."""
    return ROUNDED_ACTIVATIONS.get(_qualname(type(module)))


def linear_of_module(module: nn.Module) -> bool | None:
    """Whether ``module`` stores its weight transposed ((in, out)), if it is a Linear; None otherwise."""
    if type(module) is nn.Linear or (type(module) is Dense and module.activation.name == "identity"):
        return False
    return FOREIGN_LINEARS.get(_qualname(type(module)))


def activation_of_module(module: nn.Module) -> ResolvedActivation | None:
    known = activation_of(module)
    if known is not None:
        return known
    name = FOREIGN_ACTIVATIONS.get(_qualname(type(module)))
    return resolve(name) if name is not None else None


def _partial_parts(fn):
    """(function, keyword arguments fixed by a functools.partial)."""
    return (fn.func, dict(fn.keywords)) if isinstance(fn, functools.partial) else (fn, {})


# Functions that are each other's aliases; in-place variants, on an intermediate with a single user
# (the only ones a pattern takes), are the same function.
_ALIASES = {torch.relu: torch.nn.functional.relu, torch.relu_: torch.nn.functional.relu,
            torch.nn.functional.relu_: torch.nn.functional.relu, torch.nn.functional.sigmoid: torch.sigmoid,
            torch.sigmoid_: torch.sigmoid, torch.nn.functional.tanh: torch.tanh, torch.tanh_: torch.tanh}


def _by_function() -> dict:
    """{torch function: [(its activation's spec, the keyword arguments that must select it, those that
    may)]}: gelu_tanh is F.gelu with approximate="tanh" given; gelu is F.gelu with approximate="none"
    or nothing."""
    out = {}
    for spec in REGISTRY.values():
        if spec.name == "identity":
            continue
        fn, required = _partial_parts(spec.torch.reference)
        optional = {k: v for k, v in spec.torch.fixed.items() if k not in required}
        out.setdefault(fn, []).append((spec, required, optional))
    return out


_FUNCTIONS = _by_function()


def _activation_of_call(fn, args: tuple, kwargs: dict) -> ResolvedActivation | None:
    """The activation ``fn(x, *args, **kwargs)`` computes, where fn is a registered torch function:
    positional arguments after x are the activation's parameters in torch.nn.functional's order,
    then what selects it (gelu's approximate); a trailing ``inplace`` flag changes nothing here."""
    for spec, required, optional in _FUNCTIONS.get(_ALIASES.get(fn, fn), ()):
        names = [p.name for p in spec.params] + [*required, *optional]
        given = dict(zip(names, args))
        extra = args[len(names):]
        if len(extra) > 1 or (extra and not isinstance(extra[0], bool)):
            continue
        given.update({k: v for k, v in kwargs.items() if k != "inplace"})
        if (set(given) - set(names) or any(given.get(k) != v for k, v in required.items())
                or any(given.get(k, v) != v for k, v in optional.items())):
            continue
        try:
            return resolve(spec.name, **{p.name: given[p.name] for p in spec.params if p.name in given})
        except (TypeError, ValueError):
            return None
    return None


def _leaves(args) -> list:
    out = []
    fx.node.map_aggregate(args, out.append)
    return out


def activation_of_node(root: nn.Module, node: fx.Node) -> ResolvedActivation | None:
    """The activation a node applies to its first argument (every other argument a constant)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    args, kwargs = tuple(node.args[1:]), dict(node.kwargs)
    if any(isinstance(a, fx.Node) for a in _leaves((args, kwargs))):
        return None
    if node.op == "call_module":
        return activation_of_module(root.get_submodule(node.target)) if not args and not kwargs else None
    if node.op == "call_method":
        fn = getattr(torch, node.target, None)
        return _activation_of_call(fn, args, kwargs) if callable(fn) else None
    if node.op == "call_function" and node.target is not operator.getitem:
        return _activation_of_call(node.target, args, kwargs)
    return None
