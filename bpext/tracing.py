"""Tracing a module's forward for ``convert``: its children as leaves, and which calls the trace
stands for (``Calls``), checked by the rewrite on every call.

fx cannot unpack a Proxy as ``*args`` or ``**kwargs`` (every transformers layer passes ``**kwargs``
on to its attention), so they are traced empty, and the rewrite serves the calls that pass nothing
to them; any other call runs the module's own forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import fx, nn

__all__ = ["Calls", "ChildrenAsLeaves"]

_P = inspect.Parameter
_VARIADIC = (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)


@dataclass(frozen=True)
class Calls:
    """The calls a rewrite computes what the forward computes for: those with no more than
    ``positional`` positional arguments (after self) and only the keyword ``names``, for a forward
    with ``*args`` or ``**kwargs`` traced with them empty; every call where these are None."""

    positional: int | None = None
    names: frozenset | None = None

    def serves(self, args: tuple, kwargs: dict) -> bool:
        return self.positional is None or len(args) <= self.positional and self.names.issuperset(kwargs)


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


class ChildrenAsLeaves(fx.Tracer):
    """Traces a module's own forward, calling its children as leaves. ``calls()`` afterwards: what
    the trace assumed of the call."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.root_module = root
        self.signature: list[inspect.Parameter] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self.root_module

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        self.signature = list(inspect.signature(inspect.unwrap(root_fn)).parameters.values())[1:]  # after self
        return super().create_args_for_root(named_only(root_fn), is_module, concrete_args)

    def calls(self) -> Calls:
        named = [p for p in self.signature if p.kind not in _VARIADIC]
        if len(named) == len(self.signature):
            return Calls()
        return Calls(sum(p.kind is not _P.KEYWORD_ONLY for p in named),
                     frozenset(p.name for p in named if p.kind is not _P.POSITIONAL_ONLY))
