"""The activation registry. Each activation's name, parameters (names, defaults, rules) and
what its backward saves come from the kernels' own list (kernels/include/bpext/activations.h),
read through the extension; the table below adds, in one line per activation, how PyTorch
computes it: the functional reference and the torch.nn module class, if there is one.
bpext.nn's activation modules and convert's mappings are generated from this registry."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


@dataclass(frozen=True)
class Torch:
    """How PyTorch computes an activation: ``reference(x, **params)``, and the torch.nn
    class whose attributes named like the parameters (plus ``fixed``) select it. ``module_name``
    names bpext's module class where torch.nn has none."""

    reference: Callable[..., torch.Tensor]
    module: type[nn.Module] | None = None
    fixed: dict = field(default_factory=dict)
    module_name: str | None = None


# One line per activation in kernels/include/bpext/activations.h (a test checks that they agree).
TORCH = {
    "identity": Torch(_identity, nn.Identity),
    "relu": Torch(F.relu, nn.ReLU),
    "leaky_relu": Torch(F.leaky_relu, nn.LeakyReLU),
    "elu": Torch(F.elu, nn.ELU),
    "gelu": Torch(F.gelu, nn.GELU, {"approximate": "none"}),
    "gelu_tanh": Torch(functools.partial(F.gelu, approximate="tanh"), nn.GELU, {"approximate": "tanh"}),
    "silu": Torch(F.silu, nn.SiLU),
    "mish": Torch(F.mish, nn.Mish),
    "sigmoid": Torch(torch.sigmoid, nn.Sigmoid),
    "tanh": Torch(torch.tanh, nn.Tanh),
    "softplus": Torch(F.softplus, nn.Softplus),
    "quick_gelu": Torch(_quick_gelu, module_name="QuickGELU"),
    "hardswish": Torch(F.hardswish, nn.Hardswish),
}


@dataclass(frozen=True)
class Param:
    name: str
    default: float
    rule: str  # "finite", "nonzero" or "not_nan"


@dataclass(frozen=True, eq=False)  # one instance per activation: compared and hashed by identity
class ActivationSpec:
    """What bpext knows about one activation: its kernels' name, parameters, which tensor its
    backward reads (``saves``: "output", "input" or "nothing") and how PyTorch computes it."""

    name: str
    saves: str
    params: tuple[Param, ...]
    torch: Torch


def _read_kernel_list() -> dict[str, ActivationSpec]:
    specs = {}
    for line in torch.ops.bpext._activation_table().splitlines():
        name, saves, *params = line.split()
        parsed = []
        for p in params:
            pname, rest = p.split("=")
            default, rule = rest.split(":")
            parsed.append(Param(pname, float(default), rule))
        if name not in TORCH:
            raise ImportError(f"bpext: activation '{name}' of the kernels has no line in bpext.activations.TORCH")
        specs[name] = ActivationSpec(name, saves, tuple(parsed), TORCH[name])
    return specs


REGISTRY: dict[str, ActivationSpec] = _read_kernel_list()
ACTIVATIONS: tuple[str, ...] = tuple(REGISTRY)


@dataclass(frozen=True)
class ResolvedActivation:
    """An activation with its parameters bound: what the ops and autograd functions take."""

    spec: ActivationSpec
    params: tuple[float, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def saves(self) -> str:
        return self.spec.saves

    @property
    def kwargs(self) -> dict[str, float]:
        return {p.name: v for p, v in zip(self.spec.params, self.params)}

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same function computed by PyTorch (for tests and benchmarks)."""
        return self.spec.torch.reference(x, **self.kwargs)

    def __repr__(self) -> str:
        kwargs = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.name}({kwargs})" if kwargs else self.name

    def __reduce__(self):  # pickles as the call that makes it
        return (resolve_by_values, (self.name, self.params))


_RESOLVED: dict[tuple[str, tuple[float, ...]], ResolvedActivation] = {}


def resolve_by_values(name: str, params: tuple[float, ...]) -> ResolvedActivation:
    """``resolve`` with the parameter values in the activation's order. Remembered (a model calls
    its layers with the same few activations again and again); the kernels check the values,
    here once and again in every op (a plain dict, which torch.compile traces through)."""
    key = (name, tuple(params))
    found = _RESOLVED.get(key)
    if found is not None:
        return found
    spec = REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"unknown activation '{name}'; expected one of: {', '.join(ACTIVATIONS)}")
    if torch.compiler.is_compiling():  # the op checks them when it runs
        return ResolvedActivation(spec, key[1])
    torch.ops.bpext._check_activation(name, list(key[1]))
    _RESOLVED[key] = ResolvedActivation(spec, key[1])
    return _RESOLVED[key]


def resolve(activation: str | ResolvedActivation, **params: float) -> ResolvedActivation:
    """Looks up ``activation`` and binds its parameters (defaults for those not given).

    Raises ValueError for an unknown name or a value the kernels refuse (they hold the
    rules), TypeError for a parameter the activation does not take.
    """
    if isinstance(activation, ResolvedActivation):
        if params:
            raise TypeError("resolve: parameters cannot be given with an already resolved activation")
        return activation
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str, got {type(activation).__name__}")
    spec = REGISTRY.get(activation)
    if spec is None:
        raise ValueError(f"unknown activation '{activation}'; expected one of: {', '.join(ACTIVATIONS)}")
    names = [p.name for p in spec.params]
    unknown = sorted(set(params) - set(names))
    if unknown:
        takes = f"takes {', '.join(names)}" if names else "takes no parameters"
        raise TypeError(f"activation '{activation}' {takes}; got unexpected {', '.join(unknown)}")
    return resolve_by_values(activation, tuple(float(params.get(p.name, p.default)) for p in spec.params))
