"""Modules: ``Dense``, one module per activation (named as in ``torch.nn``), and ``convert``."""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from .activations import ResolvedActivation, resolve

__all__ = [
    "Dense", "MLP", "Activation", "ReLU", "LeakyReLU", "ELU", "GELU", "SiLU", "Mish", "Sigmoid", "Tanh", "Softplus",
    "convert",
]


def _describe(act: ResolvedActivation) -> str:
    params = ", ".join(f"{k}={v}" for k, v in act.kwargs.items())
    return f"{act.name}({params})" if params else act.name


class Dense(nn.Module):
    """A fully connected layer with a fused activation: ``y = act(x @ weight.T + bias)``.

    ``weight`` (out_features, in_features) and ``bias`` (out_features) are named, shaped
    and initialised as in ``nn.Linear``, so state dicts load both ways. ``activation`` is
    one of ``bpext.ACTIVATIONS`` (default ``"identity"``: exactly ``nn.Linear``); its
    parameters are keyword arguments, e.g. ``Dense(64, 64, activation="elu", alpha=0.5)``.
    Input: (*, in_features); output: (*, out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "identity",
        device=None,
        dtype=None,
        **activation_params: float,
    ) -> None:
        super().__init__()
        if in_features < 0 or out_features < 0:
            raise ValueError(f"Dense: features must be >= 0, got in={in_features}, out={out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.activation = resolve(activation, **activation_params)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation (the same random draws for the same seed)."""
        nn.Linear.reset_parameters(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str = "identity", **activation_params: float) -> "Dense":
        """A Dense that shares ``linear``'s parameter objects (optimizers holding them keep working)."""
        dense = cls(linear.in_features, linear.out_features, linear.bias is not None, activation,
                    device="meta", **activation_params)
        dense.weight = linear.weight
        dense.bias = linear.bias
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dense(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={_describe(self.activation)}")


class MLP(nn.Module):
    """A multi-layer perceptron run as one op each way (``bpext.functional.mlp``).

    Layers ``in_features -> hidden_features[0] -> ... -> out_features``; hidden layers use
    ``activation`` (its parameters as keyword arguments), the last ``output_activation``
    (a name or ``bpext.resolve(...)``). Parameters live in ``self.layers``, a ModuleList
    of ``Dense`` shaped like a stack of ``nn.Linear``; ``to_sequential()`` and
    ``from_sequential()`` convert to and from the native ``nn.Sequential`` (sharing the
    parameters), so state dicts convert both ways. Backward keeps one tensor per layer.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: list[int],
        out_features: int,
        activation: str = "relu",
        bias: bool = True,
        output_activation: str | ResolvedActivation = "identity",
        device=None,
        dtype=None,
        **activation_params: float,
    ) -> None:
        super().__init__()
        self.activation = resolve(activation, **activation_params)
        self.output_activation = resolve(output_activation)
        widths = [in_features, *hidden_features, out_features]
        acts = [self.activation] * len(hidden_features) + [self.output_activation]
        self.layers = nn.ModuleList(
            Dense(a, b, bias, act.name, device=device, dtype=dtype, **act.kwargs)
            for a, b, act in zip(widths[:-1], widths[1:], acts)
        )

    @property
    def widths(self) -> list[int]:
        return [self.layers[0].in_features] + [layer.out_features for layer in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.mlp(x, [layer.weight for layer in self.layers], [layer.bias for layer in self.layers],
                     self.activation, self.output_activation)

    @classmethod
    def from_linears(cls, linears: list[nn.Linear], activation: ResolvedActivation,
                     output_activation: ResolvedActivation) -> "MLP":
        """An MLP over the given layers' parameter objects (optimizers holding them keep working)."""
        widths = [linears[0].in_features] + [lin.out_features for lin in linears]
        mlp = cls(widths[0], widths[1:-1], widths[-1], activation.name, linears[0].bias is not None,
                  output_activation, device="meta", **activation.kwargs)
        for dense, lin in zip(mlp.layers, linears):
            dense.weight, dense.bias = lin.weight, lin.bias
        return mlp

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> "MLP":
        """From ``nn.Sequential(Linear, act, Linear, act, ..., Linear[, act])`` with one hidden activation."""
        chain = _mlp_chain(list(seq), 0, min_layers=1)
        if chain is None or chain[0] != len(seq):
            raise ValueError("MLP.from_sequential: expected Linear, act, Linear, ..., Linear[, act] with one "
                             "supported hidden activation throughout")
        _, linears, hidden, output = chain
        return cls.from_linears(linears, hidden, output)

    def to_sequential(self) -> nn.Sequential:
        """The native equivalent, sharing this MLP's parameters."""
        modules: list[nn.Module] = []
        for i, dense in enumerate(self.layers):
            lin = nn.Linear(dense.in_features, dense.out_features, dense.bias is not None, device="meta")
            lin.weight, lin.bias = dense.weight, dense.bias
            modules.append(lin)
            act = self.output_activation if i == len(self.layers) - 1 else self.activation
            if act.name != "identity":
                modules.append(_torch_activation(act))
        return nn.Sequential(*modules)

    def extra_repr(self) -> str:
        return (f"widths={self.widths}, activation={_describe(self.activation)}, "
                f"output_activation={_describe(self.output_activation)}")


class Activation(nn.Module):
    """An activation by name: ``Activation("softplus", beta=2.0)``."""

    def __init__(self, activation: str, **params: float) -> None:
        super().__init__()
        self.activation = resolve(activation, **params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.activation(x, self.activation)

    def extra_repr(self) -> str:
        return _describe(self.activation)


# Modules mirroring torch.nn's names and arguments. ``inplace`` is accepted so that code
# written for torch.nn runs unchanged; bpext never overwrites its input.


class ReLU(Activation):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__("relu")


class LeakyReLU(Activation):
    def __init__(self, negative_slope: float = 0.01, inplace: bool = False) -> None:
        super().__init__("leaky_relu", negative_slope=negative_slope)


class ELU(Activation):
    def __init__(self, alpha: float = 1.0, inplace: bool = False) -> None:
        super().__init__("elu", alpha=alpha)


class GELU(Activation):
    def __init__(self, approximate: str = "none") -> None:
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got '{approximate}'")
        super().__init__("gelu" if approximate == "none" else "gelu_tanh")


class SiLU(Activation):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__("silu")


class Mish(Activation):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__("mish")


class Sigmoid(Activation):
    def __init__(self) -> None:
        super().__init__("sigmoid")


class Tanh(Activation):
    def __init__(self) -> None:
        super().__init__("tanh")


class Softplus(Activation):
    def __init__(self, beta: float = 1.0, threshold: float = 20.0) -> None:
        super().__init__("softplus", beta=beta, threshold=threshold)


def _native_activation(module: nn.Module) -> ResolvedActivation | None:
    """The bpext activation equal to a torch.nn activation module, or None."""
    kind = type(module)
    if kind is nn.ReLU:
        return resolve("relu")
    if kind is nn.LeakyReLU:
        return resolve("leaky_relu", negative_slope=module.negative_slope) if module.negative_slope >= 0 else None
    if kind is nn.ELU:
        return resolve("elu", alpha=module.alpha) if module.alpha >= 0 else None
    if kind is nn.GELU:
        return resolve("gelu" if module.approximate == "none" else "gelu_tanh")
    if kind is nn.Softplus:
        return resolve("softplus", beta=module.beta, threshold=module.threshold) if module.beta > 0 else None
    simple = {nn.SiLU: "silu", nn.Mish: "mish", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
    return resolve(simple[kind]) if kind in simple else None


def _torch_activation(act: ResolvedActivation) -> nn.Module:
    """The torch.nn module computing ``act``."""
    kw = act.kwargs
    return {
        "relu": lambda: nn.ReLU(), "leaky_relu": lambda: nn.LeakyReLU(**kw), "elu": lambda: nn.ELU(**kw),
        "gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": lambda: nn.SiLU(),
        "mish": lambda: nn.Mish(), "sigmoid": lambda: nn.Sigmoid(), "tanh": lambda: nn.Tanh(),
        "softplus": lambda: nn.Softplus(**kw),
    }[act.name]()


def _mlp_chain(mods: list[nn.Module], start: int, min_layers: int = 2):
    """The MLP starting at mods[start]: (end index, linears, hidden act, output act), or None.

    It is ``Linear (act Linear)* [act]``: at least ``min_layers`` Linear layers, every hidden
    activation the same (none at all between the layers means identity), and an
    optional final activation (identity without one).
    """
    if start >= len(mods) or type(mods[start]) is not nn.Linear:
        return None
    linears, hidden, i = [mods[start]], None, start + 1
    while i < len(mods):
        if type(mods[i]) is nn.Linear:  # Linear directly after Linear: identity between them
            act, step = resolve("identity"), 1
        elif i + 1 < len(mods) and type(mods[i + 1]) is nn.Linear:
            act, step = _native_activation(mods[i]), 2
        else:
            break
        if act is None or (hidden is not None and act != hidden):
            break
        hidden = act
        linears.append(mods[i + step - 1])
        i += step
    if len(linears) < min_layers:
        return None
    output = _native_activation(mods[i]) if i < len(mods) else None
    if output is not None:
        i += 1
    identity = resolve("identity")
    return i, linears, hidden or identity, output or identity


def convert(model: nn.Module, fuse_mlp: bool = True) -> nn.Module:
    """Swaps torch.nn layers for bpext ones, in place, and returns the model.

    Inside an ``nn.Sequential``, a chain ``Linear, act, Linear, ..., Linear[, act]`` with
    one hidden activation becomes one ``MLP`` at the chain's first slot (the other slots
    become ``nn.Identity``; state-dict keys change to the MLP's). With ``fuse_mlp=False``,
    or for a single ``nn.Linear`` followed by a supported activation, each pair becomes
    one fused ``Dense`` (the activation's slot becomes ``nn.Identity``, so state-dict
    keys are unchanged). Any other ``nn.Linear`` becomes ``Dense`` and any
    supported activation module its bpext twin. The parameter objects are kept, so
    outputs, gradients and existing optimizers are unaffected. Subclasses of
    ``nn.Linear`` (such as attention's out_proj, whose weight is read directly) and
    unsupported settings (a negative leaky_relu slope) are left alone.
    """
    replacement = _convert_module(model)
    if replacement is not None:
        return replacement
    if isinstance(model, nn.Sequential):
        if fuse_mlp:
            _fuse_mlp_chains(model)
        _fuse_linear_activation(model)
    for name, child in model.named_children():
        new = convert(child, fuse_mlp)
        if new is not child:
            setattr(model, name, new)
    return model


def _convert_module(module: nn.Module) -> nn.Module | None:
    if type(module) is nn.Linear:
        return Dense.from_linear(module)
    act = _native_activation(module)
    return Activation(act.name, **act.kwargs) if act is not None else None


def _fuse_linear_activation(seq: nn.Sequential) -> None:
    for i in range(len(seq) - 1):
        act = _native_activation(seq[i + 1])
        if type(seq[i]) is nn.Linear and act is not None:
            seq[i] = Dense.from_linear(seq[i], act.name, **act.kwargs)
            seq[i + 1] = nn.Identity()


def _fuse_mlp_chains(seq: nn.Sequential) -> None:
    mods, i = list(seq), 0
    while i < len(mods):
        chain = _mlp_chain(mods, i)
        if chain is None:
            i += 1
            continue
        end, linears, hidden, output = chain
        seq[i] = MLP.from_linears(linears, hidden, output)
        for j in range(i + 1, end):
            seq[j] = nn.Identity()
        i = end
