"""The activation registry: each activation's name, parameters, saved-tensor policy
and PyTorch reference. The math itself lives once, in kernels/include/bpext/activations.h."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ActivationSpec:
    """What bpext knows about one activation.

    ``params`` are the keyword arguments (``torch.nn.functional`` names and defaults)
    that travel to the kernels as ``p0`` and ``p1``, in order. ``saves_output`` says
    which tensor backward needs: the output ``y`` (True) or the pre-activation ``z``.
    ``reference`` computes the same function with ``torch.nn.functional``.
    """

    name: str
    saves_output: bool
    reference: Callable[..., torch.Tensor]
    params: tuple[tuple[str, float], ...] = ()


_SPECS = (
    ActivationSpec("identity", True, lambda x: x),
    ActivationSpec("relu", True, F.relu),
    ActivationSpec("leaky_relu", True, F.leaky_relu, (("negative_slope", 0.01),)),
    ActivationSpec("elu", True, F.elu, (("alpha", 1.0),)),
    ActivationSpec("gelu", False, F.gelu),
    ActivationSpec("gelu_tanh", False, lambda x: F.gelu(x, approximate="tanh")),
    ActivationSpec("silu", False, F.silu),
    ActivationSpec("mish", False, F.mish),
    ActivationSpec("sigmoid", True, torch.sigmoid),
    ActivationSpec("tanh", True, torch.tanh),
    ActivationSpec("softplus", False, F.softplus, (("beta", 1.0), ("threshold", 20.0))),
)

REGISTRY: dict[str, ActivationSpec] = {s.name: s for s in _SPECS}
ACTIVATIONS: tuple[str, ...] = tuple(REGISTRY)


@dataclass(frozen=True)
class ResolvedActivation:
    """An activation with its parameters bound: what the ops and autograd functions take."""

    spec: ActivationSpec
    p0: float = 0.0
    p1: float = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kwargs(self) -> dict[str, float]:
        return {k: v for (k, _), v in zip(self.spec.params, (self.p0, self.p1))}

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same function computed by torch.nn.functional (for tests and benchmarks)."""
        return self.spec.reference(x, **self.kwargs)


def resolve(activation: str | ResolvedActivation, **params: float) -> ResolvedActivation:
    """Looks up ``activation`` and binds its parameters (defaults for those not given).

    Raises ValueError for an unknown name or an invalid value, TypeError for a
    parameter the activation does not take.
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
    names = [k for k, _ in spec.params]
    unknown = sorted(set(params) - set(names))
    if unknown:
        takes = f"takes {', '.join(names)}" if names else "takes no parameters"
        raise TypeError(f"activation '{activation}' {takes}; got unexpected {', '.join(unknown)}")
    values = [float(params.get(k, default)) for k, default in spec.params]
    for k, v in zip(names, values):
        if math.isnan(v) or (k != "threshold" and math.isinf(v)):
            raise ValueError(f"activation '{activation}': {k} must be finite, got {v}")
    values += [0.0] * (2 - len(values))
    return ResolvedActivation(spec, values[0], values[1])
