"""Tracing a module's forward for ``convert``: its children as leaves, and which calls the trace
stands for (``Calls``), checked by the rewrite on every call; any other call runs the module's own
forward.

* fx cannot unpack a Proxy as ``*args`` or ``**kwargs`` (every transformers layer passes
  ``**kwargs`` on to its attention): they are traced empty, and the rewrite serves the calls that
  pass nothing to them.
* An argument is a Proxy in the trace, and a Proxy ``is not None``: where the forward tests an
  argument with ``is None`` or ``is not None`` (BART's decoder layer, for its encoder's states), the
  rewrite serves the calls that pass it, not None. A forward that asks ``isinstance`` of an argument
  is not traced (a Proxy is no tensor).
* A forward wrapped by a decorator runs the decorator's code at each call, which a rewrite would
  skip: only wrappers known to pass a call through are traced through (their function, unwrapped),
  and only the calls they pass through are served.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass

import torch
from torch import fx, nn

__all__ = ["Calls", "ChildrenAsLeaves"]

_P = inspect.Parameter
_VARIADIC = (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)
_MISSING = object()


def _checkpointing(module: nn.Module) -> bool:
    """transformers' GradientCheckpointingLayer: its wrapper checkpoints the forward when this holds."""
    return bool(getattr(module, "gradient_checkpointing", False)) and module.training and torch.is_grad_enabled()


# Wrappers a forward is traced through, by their code (functools.wraps gives a wrapper the wrapped
# function's names): {(file, qualified name): when it does not pass a call through as it is (None:
# never; the renaming of a deprecated keyword is a call the rewrite does not serve, as the keyword
# is not the forward's)}.
_TRANSPARENT_WRAPPERS = {
    ("transformers/utils/deprecation.py", "deprecate_kwarg.<locals>.wrapper.<locals>.wrapped_func"): None,
    ("transformers/modeling_layers.py", "GradientCheckpointingLayer.__init_subclass__.<locals>.forward_with_checkpointing"):
        _checkpointing,
}


def _wrapper_key(fn) -> tuple:
    code = getattr(fn, "__code__", None)
    if code is None:
        return (None, getattr(fn, "__qualname__", repr(fn)))
    return ("/".join(code.co_filename.replace("\\", "/").split("/")[-2:]) if "transformers/" not in code.co_filename
            else "transformers/" + code.co_filename.replace("\\", "/").split("transformers/", 1)[1], code.co_qualname)


@dataclass(frozen=True)
class Calls:
    """The calls a rewrite computes what the forward computes for: those with no more than
    ``positional`` positional arguments (after self) and only the keyword ``names`` (a forward with
    ``*args`` or ``**kwargs`` traced with them empty; None: any), passing each argument of
    ``given`` ((name, position, default)) not None, for which no wrapper of the forward does
    something of its own (``unless``: predicates of the module)."""

    positional: int | None = None
    names: frozenset | None = None
    given: tuple = ()
    unless: tuple = ()

    def serves(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        if self.positional is not None and (len(args) > self.positional or not self.names.issuperset(kwargs)):
            return False
        for name, position, default in self.given:
            value = kwargs.get(name, _MISSING)
            if value is _MISSING:
                value = args[position] if position is not None and position < len(args) else default
            if value is None:
                return False
        for wrapper_acts in self.unless:
            if wrapper_acts(module):
                return False
        return True


def named_only(fn):
    """``fn`` taking only its named parameters, its ``*args`` and ``**kwargs`` left empty (``fn``
    itself where it has neither): what a forward that passes ``**kwargs`` on computes for a call
    without them, which is what fx can trace."""
    parameters = inspect.signature(inspect.unwrap(fn)).parameters.values()
    if not any(p.kind in _VARIADIC for p in parameters):
        return fn
    named = [p for p in parameters if p.kind not in _VARIADIC]
    positional = [p.name for p in named if p.kind is not _P.KEYWORD_ONLY]
    keyword = [p.name for p in named if p.kind is _P.KEYWORD_ONLY]
    header = ", ".join(positional + (["*", *keyword] if keyword else []))
    call = ", ".join(positional + [f"{k}={k}" for k in keyword])
    namespace = {"_bpext_forward": fn}
    exec(f"def forward({header}):\n    return _bpext_forward({call})", namespace)  # noqa: S102 - names of a signature
    wrapper = namespace["forward"]
    wrapper.__defaults__ = tuple(p.default for p in named if p.kind is not _P.KEYWORD_ONLY
                                 and p.default is not _P.empty) or None
    wrapper.__kwdefaults__ = {p.name: p.default for p in named if p.kind is _P.KEYWORD_ONLY
                              and p.default is not _P.empty} or None
    return wrapper


def _unwrapped(fn) -> tuple:
    """(the function a forward wraps, the predicates of when its known wrappers act, the unknown ones)."""
    unless, unknown = [], []
    while hasattr(fn, "__wrapped__"):
        key = _wrapper_key(fn)
        if key not in _TRANSPARENT_WRAPPERS:
            unknown.append(f"{key[0]}:{key[1]}")
        elif _TRANSPARENT_WRAPPERS[key] is not None:
            unless.append(_TRANSPARENT_WRAPPERS[key])
        fn = fn.__wrapped__
    return fn, tuple(unless), unknown


def _tested_arguments(fn, names: set) -> tuple[set, set]:
    """(the arguments fn tests with ``is``/``is not``, those it asks ``isinstance`` of), from its source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return set(), set()
    identity, types = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            identity |= {n.id for n in (node.left, *node.comparators) if isinstance(n, ast.Name) and n.id in names}
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
              and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in names):
            types.add(node.args[0].id)
    return identity, types


class ChildrenAsLeaves(fx.Tracer):
    """Traces a module's own forward (through its wrappers), calling its children as leaves.
    Afterwards ``calls()``: the calls the trace stands for; ``refusal``: why it stands for none."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.root_module = root
        self._calls = Calls()
        self.refusal: str | None = None  # why a rewrite of this forward would not compute it

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self.root_module

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        fn, unless, unknown = _unwrapped(root_fn)
        if unknown:
            self.refusal = f"its forward is wrapped by {', '.join(unknown)}, whose code a rewrite would skip"
        signature = list(inspect.signature(fn).parameters.values())[1:]  # after self
        named = [p for p in signature if p.kind not in _VARIADIC]
        identity, types = _tested_arguments(fn, {p.name for p in named})
        if types:
            self.refusal = f"its forward asks isinstance of {', '.join(sorted(types))}, which a trace cannot answer"
        positions = {p.name: i for i, p in enumerate(named) if p.kind is not _P.KEYWORD_ONLY}
        given = tuple((p.name, positions.get(p.name), None if p.default is _P.empty else p.default)
                      for p in named if p.name in identity)
        variadic = len(named) < len(signature)
        self._calls = Calls(sum(p.kind is not _P.KEYWORD_ONLY for p in named) if variadic else None,
                            frozenset(p.name for p in named if p.kind is not _P.POSITIONAL_ONLY) if variadic else None,
                            given, unless)
        return super().create_args_for_root(named_only(fn), is_module, concrete_args)

    def calls(self) -> Calls:
        return self._calls
