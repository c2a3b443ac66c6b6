"""``bpext.convert``: bpext's layers in a model the user already has, found by data flow.

For each submodule, its forward is traced with ``torch.fx`` (its children as leaves) and
the layer patterns it computes are rewritten into fused bpext calls:

* ``down(act(gate(x)) * up(x))``   -> one ``gated_mlp`` op  (LLaMA, Mistral, Qwen, timm SwiGLU)
* ``act(gate(x)) * up(x)``         -> one ``gated`` op
* ``L1 -> act -> L2 [-> ...]``     -> one ``mlp`` op        (transformer and timm MLPs)
* ``L -> act``                     -> one ``dense`` op      (BERT/ViT intermediate layers)

where a Linear is an ``nn.Linear`` or any module that computes one (GPT-2's ``Conv1D``:
its stored-transposed weight is passed as a view, never copied), an activation is anything
computing one of bpext's (torch.nn and torch.nn.functional activations, and modules from
other libraries, recognised by evaluating them), and dropout that is off (eval mode or
p = 0) and ``nn.Identity`` may sit between them. The submodule keeps its class, its
children, its parameters and so its state-dict keys and hooks: only its forward is
replaced, per train/eval state (dropout that is active in training stays, and breaks the
chain there). A module with hooks is not fused away (its hooks keep running).

Then every remaining ``nn.Linear`` becomes a ``bpext.nn.Dense`` and every torch.nn
activation module its bpext twin, in place (same object: parameters, hooks and optimizers
are unaffected).
"""

from __future__ import annotations

import copy
import inspect
import operator
import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn

from . import functional as F
from .activations import REGISTRY, ResolvedActivation, resolve, resolve_by_values
from .nn import TWINS, Dense, activation_of

__all__ = ["convert", "fusions"]


def convert(model: nn.Module, fuse: bool = True) -> nn.Module:
    """Puts bpext's kernels into ``model`` in place and returns it (see the module docstring).

    ``fuse=False`` only swaps modules (Linear -> Dense, activations -> bpext's) without
    rewriting any forward. Outputs, gradients, state dicts (strictly, both ways), parameter
    objects, hooks and train/eval behaviour are those of the original model.
    """
    if fuse:
        for name, module in list(model.named_modules()):
            _fuse_module(module, name)
    for module in list(model.modules()):
        _swap_in_place(module)
    return model


def fusions(model: nn.Module) -> dict[str, list[str]]:
    """What ``convert`` fused, per module path: e.g. ``{"layers.0.mlp": ["gated_mlp(gate_proj, up_proj, silu, down_proj)"]}``
    (the patterns of the module's current train/eval state)."""
    out = {}
    for name, module in model.named_modules():
        fused = module.__dict__.get("forward")
        if isinstance(fused, FusedForward):
            found = fused.descriptions()
            if found:
                out[name] = found
    return out


# ---- swapping modules in place -------------------------------------------------------------------


def _swap_in_place(module: nn.Module) -> None:
    if type(module) is nn.Linear:
        module.__class__ = Dense
        module.activation = resolve("identity")
    elif type(module) in TWINS and activation_of(module) is not None:
        module.__class__ = TWINS[type(module)]


# ---- recognising layers ------------------------------------------------------------------------

# Values an activation is evaluated at to recognise it: both signs, the kinks, the tails.
_PROBE = torch.cat([torch.linspace(-12, 12, 97, dtype=torch.float64),
                    torch.tensor([-30.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 30.0], dtype=torch.float64)]).reshape(8, 13)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _matches(out, expected) -> bool:
    return (isinstance(out, torch.Tensor) and out.shape == expected.shape and out.dtype == expected.dtype
            and torch.allclose(out, expected, rtol=1e-10, atol=1e-12, equal_nan=True))


def _probe(fn, bound: dict | None = None) -> ResolvedActivation | None:
    """The activation fn computes (checked on _PROBE), or None. ``bound``: the call's arguments
    by name, where parameters of a parametrised activation can be read."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(_PROBE.clone())
    except Exception:  # anything that is not an activation of one tensor
        return None
    for spec in REGISTRY.values():
        if spec.name == "identity":
            continue
        try:
            act = resolve(spec.name, **{p.name: bound[p.name] for p in spec.params}) if spec.params else resolve(spec.name)
        except (KeyError, TypeError, ValueError):
            continue
        if _matches(out, act.reference(_PROBE)):
            return act
    return None


@dataclass(frozen=True)
class _Linear:
    target: str        # the submodule's path
    transposed: bool   # weight stored (in, out), as GPT-2's Conv1D does


def _linear_of(root: nn.Module, node: fx.Node) -> _Linear | None:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    module = root.get_submodule(node.target)
    if type(module) is nn.Linear or (type(module) is Dense and module.activation.name == "identity"):
        return _Linear(node.target, False)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if (isinstance(weight, torch.Tensor) and weight.dim() == 2 and not list(module.children())
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.shape == weight.shape[1:]))):
        probe = torch.randn(3, weight.shape[0], dtype=weight.dtype, device=weight.device,
                            generator=torch.Generator(weight.device).manual_seed(0))
        with torch.no_grad():
            try:
                out = module(probe)
            except Exception:
                return None
            if _matches(out, torch.nn.functional.linear(probe, weight.t(), bias)):
                return _Linear(node.target, True)
    return None


def _activation_of_node(root: nn.Module, node: fx.Node) -> ResolvedActivation | None:
    """The activation a node applies to its first argument (all other arguments constant)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if any(isinstance(a, fx.Node) for a in _leaves((node.args[1:], node.kwargs))):
        return None
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        if len(node.args) != 1 or node.kwargs:
            return None
        known = activation_of(module)
        if known is not None:
            return known
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            return None
        return _probe(module)
    args, kwargs = node.args[1:], dict(node.kwargs)
    if node.op == "call_method":
        return _probe(lambda t: getattr(t, node.target)(*args, **kwargs))
    if node.op == "call_function" and getattr(node.target, "__module__", "").startswith("torch"):
        try:
            bound = inspect.signature(node.target).bind(_PROBE, *args, **kwargs)
            bound.apply_defaults()
            bound = dict(bound.arguments)
        except (TypeError, ValueError):
            bound = None
        return _probe(lambda t: node.target(t, *args, **kwargs), bound)
    return None


def _leaves(args):
    out = []
    fx.node.map_aggregate(args, out.append)
    return out


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _passthrough(root: nn.Module, node: fx.Node) -> bool:
    """Dropout that is off (eval mode or p = 0) or nn.Identity: y = x."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    module = root.get_submodule(node.target)
    if type(module) is nn.Identity:
        return True
    return isinstance(module, nn.modules.dropout._DropoutNd) and (not module.training or module.p == 0)


# ---- rewriting a traced forward ----------------------------------------------------------------


# What the rewritten forwards call. The graph holds each activation as (name, parameter values).
_act = resolve_by_values


def _weight(linear: nn.Module, transposed: bool) -> torch.Tensor:
    return linear.weight.t() if transposed else linear.weight


def _fused_dense(x, linear, transposed, activation, params):
    return F.dense(x, _weight(linear, transposed), linear.bias, _act(activation, params))


def _fused_mlp(x, linears, transposed, activation, params, output_activation, output_params):
    return F.mlp(x, [_weight(lin, t) for lin, t in zip(linears, transposed)], [lin.bias for lin in linears],
                 _act(activation, params), _act(output_activation, output_params))


def _fused_gated(x, gate, up, activation, params):
    return F.gated(x, gate.weight, up.weight, gate.bias, up.bias, _act(activation, params))


def _fused_gated_mlp(x, gate, up, down, down_transposed, activation, params):
    return F.gated_mlp(x, gate.weight, up.weight, _weight(down, down_transposed), gate.bias, up.bias, down.bias,
                       _act(activation, params))


class _Rewriter:
    """Finds and rewrites the layer patterns of one traced graph."""

    def __init__(self, root: nn.Module, graph: fx.Graph):
        self.root, self.graph = root, graph
        self.found: list[str] = []
        self.hooked: set[str] = set()  # children a pattern would have fused, but whose hooks must run

    def run(self) -> list[str]:
        for match in (self._gated, self._chain):  # gated first: its gate is also the start of a chain
            erased: set[fx.Node] = set()
            for node in list(self.graph.nodes):
                if node not in erased:
                    erased |= match(node) or set()
        self.graph.lint()
        return self.found

    def _replace(self, last: fx.Node, dead: list[fx.Node], fn, args: tuple, description: str) -> set[fx.Node]:
        with self.graph.inserting_before(last):
            new = self.graph.call_function(fn, args)
        last.replace_all_uses_with(new)
        dead = set(dead)
        for node in reversed(list(self.graph.nodes)):  # users before what they use
            if node in dead:
                self.graph.erase_node(node)
        self.found.append(description)
        return dead

    def _unhooked(self, node: fx.Node | None) -> bool:
        """False for a child with hooks: fused away, its hooks would not run (it is recorded, for a warning)."""
        if node is None or node.op != "call_module":
            return node is not None
        module = self.root.get_submodule(node.target)
        if _has_hooks(module):
            if _fusable_child(module):
                self.hooked.add(node.target)
            return False
        return True

    def _linear(self, node: fx.Node | None) -> _Linear | None:
        return _linear_of(self.root, node) if self._unhooked(node) else None

    def _activation(self, node: fx.Node | None) -> ResolvedActivation | None:
        return _activation_of_node(self.root, node) if self._unhooked(node) else None

    def _next_after(self, node: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
        """The single user of node after pass-through modules (dropout that is off, nn.Identity), and those."""
        skipped = []
        while (nxt := _single_user(node)) is not None and self._unhooked(nxt) and _passthrough(self.root, nxt):
            skipped.append(nxt)
            node = nxt
        return _single_user(node), skipped

    def _module(self, target: str) -> fx.Node:
        return self.graph.get_attr(target)

    def _gated(self, mul: fx.Node) -> set[fx.Node] | None:
        """mul(act(gate(x)), up(x)) [-> pass-through -> down]."""
        if not (mul.op == "call_function" and mul.target in (operator.mul, torch.mul)
                or mul.op == "call_method" and mul.target == "mul") or len(mul.args) != 2 or mul.kwargs:
            return None
        for a, b in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                return None
            act = self._activation(a)
            if act is None or not isinstance(a.args[0], fx.Node) or len(a.users) != 1:
                continue
            gate_node, up_node = a.args[0], b
            gate, up = self._linear(gate_node), self._linear(up_node)
            if (gate is None or up is None or gate.transposed or up.transposed or gate_node.args[0] is not up_node.args[0]
                    or len(gate_node.users) != 1 or len(up_node.users) != 1):
                continue
            g_mod, u_mod = self.root.get_submodule(gate.target), self.root.get_submodule(up.target)
            if g_mod.weight.shape != u_mod.weight.shape:
                continue
            x = gate_node.args[0]
            down_node, skipped = self._next_after(mul)
            down = self._linear(down_node)
            dead = [gate_node, up_node, a, mul]
            with self.graph.inserting_before(mul):
                g_ref, u_ref = self._module(gate.target), self._module(up.target)
            if down is not None:
                with self.graph.inserting_before(mul):
                    d_ref = self._module(down.target)
                return self._replace(down_node, dead + skipped + [down_node], _fused_gated_mlp,
                              (x, g_ref, u_ref, d_ref, down.transposed, act.name, act.params),
                              f"gated_mlp({gate.target}, {up.target}, {act}, {down.target})")
            return self._replace(mul, dead, _fused_gated, (x, g_ref, u_ref, act.name, act.params),
                                 f"gated({gate.target}, {up.target}, {act})")
        return None

    def _chain(self, start: fx.Node) -> set[fx.Node] | None:
        """L (act L)* [act], one hidden activation: an MLP, or a Dense for L act."""
        first = self._linear(start)
        if first is None:
            return None
        linears, nodes, hidden, output, last = [first], [start], None, None, start
        while True:
            act_node, skipped = self._next_after(last)
            act = self._activation(act_node)
            if act is None:
                break
            nxt, skipped2 = self._next_after(act_node)
            lin = self._linear(nxt)
            if lin is None or (hidden is not None and act != hidden):
                output, last = act, act_node
                nodes += skipped + [act_node]
                break
            hidden = act
            linears.append(lin)
            nodes += skipped + [act_node] + skipped2 + [nxt]
            last = nxt
        if len(linears) == 1 and output is None:
            return None
        x = start.args[0]
        identity = resolve("identity")
        output = output or identity
        with self.graph.inserting_before(start):
            refs = tuple(self._module(lin.target) for lin in linears)
        if len(linears) == 1:
            return self._replace(last, nodes, _fused_dense, (x, refs[0], first.transposed, output.name, output.params),
                          f"dense({first.target}, {output})")
        hidden = hidden or identity
        return self._replace(last, nodes, _fused_mlp,
                             (x, refs, tuple(lin.transposed for lin in linears), hidden.name, hidden.params,
                              output.name, output.params),
                             f"mlp({', '.join(lin.target for lin in linears)}, {hidden}, {output})")


class _ChildrenAsLeaves(fx.Tracer):
    def __init__(self, root: nn.Module):
        super().__init__()
        self.root_module = root

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self.root_module


def _compile_graph(graph: fx.Graph):
    """The Python function of a graph, taking the module as ``self``."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, "<bpext fused forward>", "exec"), namespace)  # noqa: S102 - code generated by torch.fx
    return namespace["forward"]


def _train_state(module: nn.Module) -> tuple:
    """The state a rewrite depends on: the module's train flag and which of its dropouts are active."""
    dropouts = [m for m in module.children() if isinstance(m, nn.modules.dropout._DropoutNd)]
    return (module.training, *(d.training and d.p > 0 for d in dropouts))


def _rewrite(module: nn.Module, training: bool):
    """(state, function, descriptions, hooked children) of module's forward rewritten in train or
    eval mode; None where fx cannot trace it."""
    flags = {m: m.training for m in module.modules()}
    try:
        module.train(training)
        state = _train_state(module)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _ChildrenAsLeaves(module).trace(module)
        rewriter = _Rewriter(module, graph)
        found = rewriter.run()
        return state, _compile_graph(graph) if found else None, found, rewriter.hooked
    except Exception:  # a forward fx cannot trace (data-dependent control flow, ...): left as it is
        return None
    finally:
        for m, flag in flags.items():
            m.training = flag


class FusedForward:
    """A module's forward replaced by bpext's rewrite of it, one per train/eval state; the
    class's forward runs in any other state. Installed as the module's instance attribute
    ``forward``, so the module keeps its class, children, state dict and hooks. Pickles as a
    marker and is rewritten again on first use after loading."""

    def __init__(self, module: nn.Module, rewrites: dict | None = None):
        self.module = module
        self.rewrites = rewrites  # {state: (function, descriptions)}; None until (re)built

    @staticmethod
    def build(module: nn.Module) -> tuple[dict, set[str]]:
        """The rewrites that fuse something, per state, and the hooked children that stopped a fusion."""
        found = [r for r in (_rewrite(module, mode) for mode in (True, False)) if r is not None]
        rewrites = {state: (fn, descriptions) for state, fn, descriptions, _ in found if descriptions}
        return rewrites, set().union(*(hooked for *_, hooked in found))

    def _current(self):
        if self.rewrites is None:
            if torch.compiler.is_compiling():  # cannot trace inside a compiled region: run unfused
                return None
            self.rewrites = self.build(self.module)[0]
        return self.rewrites.get(_train_state(self.module))

    def descriptions(self) -> list[str]:
        current = self._current()
        return current[1] if current else []

    def __call__(self, *args, **kwargs):
        current = self._current()
        if current is None:
            return type(self.module).forward(self.module, *args, **kwargs)
        return current[0](self.module, *args, **kwargs)

    def __reduce__(self):
        return (FusedForward, (self.module,))

    def __deepcopy__(self, memo):
        return FusedForward(copy.deepcopy(self.module, memo), self.rewrites)


def _fusable_child(module: nn.Module) -> bool:
    return (isinstance(module, (nn.Linear, nn.Identity, nn.modules.dropout._DropoutNd))
            or activation_of(module) is not None)


def _fuse_module(module: nn.Module, name: str) -> None:
    if (isinstance(module, (nn.Linear, torch.jit.ScriptModule, fx.GraphModule)) or not list(module.children())
            or "forward" in module.__dict__):  # converted already, or a forward replaced by someone else
        return
    rewrites, hooked = FusedForward.build(module)
    if hooked:
        warnings.warn(f"bpext.convert: in {name or type(module).__name__}, {', '.join(sorted(hooked))} "
                      f"have hooks, so they were not fused (their hooks keep running)", stacklevel=3)
    if rewrites:
        module.__dict__["forward"] = FusedForward(module, rewrites)
