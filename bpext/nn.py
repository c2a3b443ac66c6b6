"""Modules: ``Dense``, ``MLP``, ``GatedDense``, ``GatedMLP``, and one activation module per
activation, generated from the registry (named, constructed and parametrised as in torch.nn)."""

from __future__ import annotations

import sys

import torch
from torch import nn

from . import functional as F
from .activations import REGISTRY, ResolvedActivation, resolve

__all__ = ["Dense", "MLP", "GatedDense", "GatedMLP", "LinearCrossEntropy", "Activation", "activation_of",
           "torch_activation"]


class Dense(nn.Linear):
    """A fully connected layer with a fused activation: ``y = act(input @ weight.T + bias)``.

    An ``nn.Linear`` (a subclass: same constructor arguments, parameter names, shapes,
    initialisation and state dict, and ``isinstance(m, nn.Linear)`` holds) whose forward is
    one bpext op each way. ``activation`` is one of ``bpext.ACTIVATIONS`` (default
    ``"identity"``: exactly ``nn.Linear``); its parameters are keyword arguments, e.g.
    ``Dense(64, 64, activation="elu", alpha=0.5)``. Input: (*, in_features); output: (*, out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str | ResolvedActivation = "identity",
        device=None,
        dtype=None,
        **activation_params: float,
    ) -> None:
        if in_features < 0 or out_features < 0:
            raise ValueError(f"Dense: features must be >= 0, got in={in_features}, out={out_features}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation = resolve(activation, **activation_params)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str | ResolvedActivation = "identity",
                    **activation_params: float) -> "Dense":
        """A Dense that shares ``linear``'s parameter objects (optimizers holding them keep working)."""
        dense = cls(linear.in_features, linear.out_features, linear.bias is not None, activation,
                    device="meta", **activation_params)
        dense.weight, dense.bias = linear.weight, linear.bias
        return dense

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return torch.ops.bpext.dense(input, self.weight, self.bias, self._bpext_script_activation,
                                         self._bpext_script_params)
        else:
            return F.dense(input, self.weight, self.bias, self.activation)

    def __prepare_scriptable__(self) -> "Dense":
        """For ``torch.jit.script``: the activation as the name and parameter values that
        ``torch.ops.bpext.dense`` (autograd in C++) takes."""
        _for_script(self, self.activation)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


def _for_script(module: nn.Module, act: ResolvedActivation) -> None:
    """Sets what a scripted forward reads of its activation (as the ops take it), on the module itself:
    torch.jit.script puts what ``__prepare_scriptable__`` returns in the place of the module."""
    module.__dict__.update(_bpext_script_activation=act.name, _bpext_script_params=list(act.params))


# typed for TorchScript, which reads no string annotations
_SCRIPTED = {"_bpext_script_activation": str, "_bpext_script_params": list[float]}
Dense.__annotations__ = dict(_SCRIPTED)


def _linear_stack(widths: list[int], bias: bool, factory: dict) -> nn.ModuleList:
    return nn.ModuleList(Dense(a, b, bias, **factory) for a, b in zip(widths[:-1], widths[1:]))


class MLP(nn.Module):
    """A multi-layer perceptron run as one op each way (``bpext.functional.mlp``).

    Layers ``in_features -> hidden_features[0] -> ... -> out_features``; hidden layers use
    ``activation`` (its parameters as keyword arguments), the last ``output_activation``
    (a name or ``bpext.resolve(...)``). Parameters live in ``self.layers``, a ModuleList
    shaped like a stack of ``nn.Linear``; ``to_sequential()`` and ``from_sequential()``
    convert to and from the native ``nn.Sequential`` (sharing the parameters). Backward
    keeps one tensor per layer.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: list[int],
        out_features: int,
        activation: str | ResolvedActivation = "relu",
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
        self.layers = _linear_stack(widths, bias, {"device": device, "dtype": dtype})

    @property
    def widths(self) -> list[int]:
        return [self.layers[0].in_features] + [layer.out_features for layer in self.layers]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.mlp(input, [layer.weight for layer in self.layers], [layer.bias for layer in self.layers],
                     self.activation, self.output_activation)

    @classmethod
    def from_linears(cls, linears: list[nn.Linear], activation: ResolvedActivation,
                     output_activation: ResolvedActivation) -> "MLP":
        """An MLP over the given layers' parameter objects (optimizers holding them keep working)."""
        widths = [linears[0].in_features] + [lin.out_features for lin in linears]
        mlp = cls(widths[0], widths[1:-1], widths[-1], activation, linears[0].bias is not None, output_activation,
                  device="meta")
        for dense, lin in zip(mlp.layers, linears):
            dense.weight, dense.bias = lin.weight, lin.bias
        return mlp

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> "MLP":
        """From ``nn.Sequential(Linear, act, Linear, act, ..., Linear[, act])`` with one hidden
        activation (none between two Linear layers is identity)."""
        linears, acts = [], []  # acts[i]: the activation after linears[i]
        for module in seq:
            if type(module) is nn.Linear:
                if len(acts) < len(linears):
                    acts.append(resolve("identity"))
                linears.append(module)
            elif linears and len(acts) < len(linears) and activation_of(module) is not None:
                acts.append(activation_of(module))
            else:
                linears = []
                break
        hidden = set(acts[:len(linears) - 1])
        if not linears or len(hidden) > 1:
            raise ValueError("MLP.from_sequential: expected Linear, act, Linear, ..., Linear[, act] with one "
                             "supported hidden activation throughout")
        identity = resolve("identity")
        output = acts[len(linears) - 1] if len(acts) == len(linears) else identity
        return cls.from_linears(linears, hidden.pop() if hidden else identity, output)

    def to_sequential(self) -> nn.Sequential:
        """The native equivalent, sharing this MLP's parameters."""
        modules: list[nn.Module] = []
        for i, dense in enumerate(self.layers):
            lin = nn.Linear(dense.in_features, dense.out_features, dense.bias is not None, device="meta")
            lin.weight, lin.bias = dense.weight, dense.bias
            modules.append(lin)
            act = self.output_activation if i == len(self.layers) - 1 else self.activation
            if act.name != "identity":
                modules.append(torch_activation(act))
        return nn.Sequential(*modules)

    def extra_repr(self) -> str:
        return f"widths={self.widths}, activation={self.activation}, output_activation={self.output_activation}"


class GatedDense(nn.Module):
    """A gated linear unit: ``act(gate_proj(input)) * up_proj(input)``, one op each way.

    SwiGLU with ``activation="silu"`` (the default), GeGLU with ``"gelu"``, ReGLU with
    ``"relu"``. ``gate_proj`` and ``up_proj`` are ``Dense`` (nn.Linear) layers named as in
    LLaMA. Backward keeps the two pre-activations (native keeps four tensors).
    """

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True,
                 activation: str | ResolvedActivation = "silu", device=None, dtype=None, **activation_params: float):
        super().__init__()
        self.activation = resolve(activation, **activation_params)
        self.gate_proj = Dense(in_features, hidden_features, bias, device=device, dtype=dtype)
        self.up_proj = Dense(in_features, hidden_features, bias, device=device, dtype=dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.gated(input, self.gate_proj.weight, self.up_proj.weight, self.gate_proj.bias, self.up_proj.bias,
                       self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class GatedMLP(GatedDense):
    """A gated MLP block, ``down_proj(act(gate_proj(input)) * up_proj(input))``, one op each way:
    the MLP of LLaMA, Mistral, Qwen and Gemma, with their parameter names (its state dict loads
    from theirs). Backward keeps the two pre-activations only, half of what native keeps."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = True,
                 activation: str | ResolvedActivation = "silu", device=None, dtype=None, **activation_params: float):
        super().__init__(in_features, hidden_features, bias, activation, device, dtype, **activation_params)
        out_features = in_features if out_features is None else out_features
        self.down_proj = Dense(hidden_features, out_features, bias, device=device, dtype=dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.gated_mlp(input, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                           self.gate_proj.bias, self.up_proj.bias, self.down_proj.bias, self.activation)


class LinearCrossEntropy(nn.Module):
    """The last dense layer with its loss: ``forward(input, target)`` is
    ``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` in one op, the (tokens, classes)
    logits never whole (``bpext.functional.linear_cross_entropy``). ``weight`` (num_classes,
    in_features) and ``bias`` are an ``nn.Linear(in_features, num_classes)``'s, initialised alike;
    the loss's options are fixed at construction, as in ``nn.CrossEntropyLoss``."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = False, *, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, softcap: float | None = None,
                 z_loss: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_classes, device=device, dtype=dtype)) if bias else None
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.softcap, self.z_loss = softcap, z_loss
        nn.Linear.reset_parameters(self)

    def forward(self, input: torch.Tensor, target: torch.Tensor, divisor: float | None = None) -> torch.Tensor:
        return F.linear_cross_entropy(input, self.weight, target, self.bias, ignore_index=self.ignore_index,
                                      reduction=self.reduction, label_smoothing=self.label_smoothing,
                                      softcap=self.softcap, z_loss=self.z_loss, divisor=divisor)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.out_features}, bias={self.bias is not None}, "
                f"reduction={self.reduction!r}")


class Activation(nn.Module):
    """An activation by name: ``Activation("softplus", beta=2.0)``."""

    def __init__(self, activation: str | ResolvedActivation, **params: float) -> None:
        super().__init__()
        self.activation = resolve(activation, **params)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.activation(input, self.activation)

    def extra_repr(self) -> str:
        return repr(self.activation)


# ---- activation modules generated from the registry ------------------------------------------


def activation_of(module: nn.Module, strict: bool = False) -> ResolvedActivation | None:
    """The bpext activation that a torch.nn (or bpext) activation module computes, read from its
    attributes; None for any other module or a setting bpext does not support (``strict``: raise
    ValueError saying why)."""
    if isinstance(module, Activation):
        return module.activation
    specs = _SPECS_BY_MODULE.get(_TORCH_BASE.get(type(module)), ())
    for spec in specs:
        if all(getattr(module, k, None) == v for k, v in spec.torch.fixed.items()):
            try:
                return resolve(spec.name, **{p.name: getattr(module, p.name) for p in spec.params})
            except ValueError:
                if strict:
                    raise
                return None
    if strict:
        settings = " or ".join(", ".join(f"{k}={v!r}" for k, v in s.torch.fixed.items()) for s in specs)
        raise ValueError(f"{type(module).__name__}({module.extra_repr()}): bpext computes it with {settings}")
    return None


def torch_activation(act: ResolvedActivation) -> nn.Module:
    """The torch.nn module computing ``act`` (bpext's own where torch.nn has none)."""
    t = act.spec.torch
    return t.module(**t.fixed, **act.kwargs) if t.module is not None else globals()[t.module_name]()


def _make_torch_twin(torch_class: type[nn.Module]) -> type[nn.Module]:
    """A subclass of a torch.nn activation class whose forward is bpext's: same constructor,
    attributes and repr, so a module can also become one in place (convert keeps its hooks)."""

    def __init__(self, *args, **kwargs):
        torch_class.__init__(self, *args, **kwargs)
        activation_of(self, strict=True)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return torch.ops.bpext.activation_forward(input, self._bpext_script_activation, self._bpext_script_params)
        else:
            return F.activation(input, self._bpext_resolved())

    def _bpext_resolved(self) -> ResolvedActivation:
        key = tuple(getattr(self, name) for name in self._bpext_attributes)
        if self.__dict__.get("_bpext_key") != key:
            self.__dict__["_bpext_activation"], self.__dict__["_bpext_key"] = activation_of(self), key
        return self._bpext_activation

    def __prepare_scriptable__(self):
        """For ``torch.jit.script``: the activation as ``torch.ops.bpext.activation_forward`` takes it."""
        _for_script(self, self._bpext_resolved())
        return self

    names = sorted({p.name for s in _SPECS_BY_MODULE[torch_class] for p in s.params}
                   | {k for s in _SPECS_BY_MODULE[torch_class] for k in s.torch.fixed})
    doc = f"``torch.nn.{torch_class.__name__}`` computed by bpext's kernels (same arguments)."
    return type(torch_class.__name__, (torch_class,), {
        "__init__": __init__, "forward": forward, "_bpext_resolved": _bpext_resolved,
        "__prepare_scriptable__": __prepare_scriptable__, "__annotations__": dict(_SCRIPTED), "__doc__": doc,
        "__module__": __name__, "_bpext_attributes": tuple(names)})


def _make_named(spec) -> type[nn.Module]:
    """A module for an activation that torch.nn does not have (e.g. QuickGELU)."""
    def __init__(self, **params: float) -> None:
        Activation.__init__(self, spec.name, **params)

    return type(spec.torch.module_name, (Activation,), {
        "__init__": __init__, "__doc__": f"The {spec.name} activation computed by bpext.", "__module__": __name__})


_SPECS_BY_MODULE: dict[type, list] = {}
for _spec in REGISTRY.values():
    if _spec.torch.module is not None and _spec.torch.module is not nn.Identity:
        _SPECS_BY_MODULE.setdefault(_spec.torch.module, []).append(_spec)
_TORCH_BASE: dict[type, type] = {cls: cls for cls in _SPECS_BY_MODULE}  # and each bpext twin -> its torch class
TWINS: dict[type, type] = {}  # torch.nn class -> its bpext twin
for _cls in _SPECS_BY_MODULE:
    TWINS[_cls] = _make_torch_twin(_cls)
    _TORCH_BASE[TWINS[_cls]] = _cls
    setattr(sys.modules[__name__], _cls.__name__, TWINS[_cls])
for _spec in REGISTRY.values():
    if _spec.torch.module_name is not None:
        setattr(sys.modules[__name__], _spec.torch.module_name, _make_named(_spec))
__all__ += [cls.__name__ for cls in TWINS] + [s.torch.module_name for s in REGISTRY.values() if s.torch.module_name]
