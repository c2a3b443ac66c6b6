"""Tracing a module's forward for ``convert``: its children as leaves, and which calls the trace
stands for (``Calls``), checked by the rewrite on every call; any other call runs the module's own
forward.

A symbolic trace runs the forward's Python once, on Proxies: each branch it takes is fixed in the
graph. The rewrite is kept only where every branch is the same on every call it serves:

* fx cannot unpack a Proxy as ``*args`` or ``**kwargs`` (every transformers layer passes
  ``**kwargs`` on to its attention): they are traced empty, and the rewrite serves the calls that
  pass nothing to them.
* Each condition the traced Python code tests (``if``, ``while``, ``x if c else y``, ``and``/``or``,
  ``assert``, comprehension filters; the forward and every function it runs on Proxies or as a
  method of the module) may read only constants, the module's own plain attributes (checked on
  each call by convert) and its train flag, and ``argument is None`` / ``is not None`` of the
  forward's own arguments (BART's decoder layer, for its encoder's states): a Proxy is not None,
  so the rewrite serves the calls that pass them. Any other condition (a local, a global, a call:
  ``isinstance``, ``torch.is_grad_enabled()``; a child's attribute), ``try`` and ``match``, or a
  read of the grad or autocast mode anywhere, and the forward is not rewritten.
* A forward wrapped by a decorator is traced through known wrappers only (their code is not
  analysed: what they do is written below), and only the calls they pass through are served.
* A forward that passes ``*args``/``**kwargs`` on, or whose own statements test what a trace cannot
  answer (BART's and Whisper's encoder layers test the dtype of their output), is traced in part
  (``windows``): a run of its top-level statements that reads neither is traced and rewritten, and
  the statements around it run as written, on every call.
"""

from __future__ import annotations

import __future__
import ast
import copy
import functools
import inspect
import linecache
import operator
import os
import sys
import textwrap
import types
from dataclasses import dataclass

import torch
from torch import fx, nn

__all__ = ["MISSING", "PLAIN", "Calls", "ChildrenAsLeaves", "Rest", "has_variadic", "returns_values", "windows"]

_P = inspect.Parameter
_VARIADIC = (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)
MISSING = object()  # a name that is not there
PLAIN = (bool, int, float, complex, str, bytes, type(None))  # values that compare by equality


def _checkpoints(module, args, kwargs) -> bool:
    """transformers' GradientCheckpointingLayer checkpoints the forward when this holds."""
    return bool(getattr(module, "gradient_checkpointing", False)) and module.training and torch.is_grad_enabled()


@dataclass(frozen=True)
class _Passes:
    """Whether a call passes the keyword ``name`` (a predicate that pickles with the rewrite)."""
    name: str

    def __call__(self, module, args, kwargs) -> bool:
        return self.name in kwargs


def _checkpointing(wrapper):
    return _checkpoints


def _deprecated_keyword(wrapper):
    """transformers' deprecate_kwarg renames (warns of, or raises for) its old keyword where a call passes it."""
    return _Passes(_closure(wrapper).get("old_name"))


def _closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


# Wrappers a forward is traced through, by their code (functools.wraps gives a wrapper the wrapped
# function's names): {(file, qualified name): the predicate of a call (module, args, kwargs) where
# it does something of its own, from the wrapper}.
_TRANSPARENT_WRAPPERS = {
    ("transformers/utils/deprecation.py", "deprecate_kwarg.<locals>.wrapper.<locals>.wrapped_func"): _deprecated_keyword,
    ("transformers/modeling_layers.py", "GradientCheckpointingLayer.__init_subclass__.<locals>.forward_with_checkpointing"):
        _checkpointing,
}


def _wrapper_key(fn) -> tuple:
    code = getattr(fn, "__code__", None)
    return _code_key(code) if code is not None else (None, getattr(fn, "__qualname__", repr(fn)))


def _code_key(code) -> tuple:
    path = code.co_filename.replace("\\", "/")
    if "/transformers/" in path:  # the package's own path, wherever it is installed (the last one)
        return "transformers/" + path.rsplit("/transformers/", 1)[1], code.co_qualname
    return "/".join(path.split("/")[-2:]), code.co_qualname


@dataclass(frozen=True)
class Calls:
    """The calls a rewrite computes what the forward computes for: those with no more than
    ``positional`` positional arguments (after self) and only the keyword ``names`` (a forward with
    ``*args`` or ``**kwargs`` traced with them empty; None: any), passing each argument of
    ``given`` ((name, position, default)) not None, for which no wrapper of the forward does
    something of its own (``unless``: predicates of (module, args, kwargs)), with the globals and
    class attributes the traced code read as they were (``constants``)."""

    positional: int | None = None
    names: frozenset | None = None
    given: tuple = ()
    unless: tuple = ()
    constants: tuple = ()  # (module name or class, name, value): globals and class attributes the trace read

    def serves(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        if self.positional is not None and (len(args) > self.positional or not self.names.issuperset(kwargs)):
            return False
        for holder, name, value in self.constants:
            now = (getattr(sys.modules.get(holder), name, MISSING) if isinstance(holder, str)
                   else getattr(holder, name, MISSING))
            if type(now) is not type(value) or now != value:
                return False
        for name, position, default in self.given:
            value = kwargs.get(name, MISSING)
            if value is MISSING:
                value = args[position] if position is not None and position < len(args) else default
            if value is None:
                return False
        for wrapper_acts in self.unless:
            if wrapper_acts(module, args, kwargs):
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
        if key in _TRANSPARENT_WRAPPERS:
            unless.append(_TRANSPARENT_WRAPPERS[key](fn))
        else:
            unknown.append(f"{key[0]}:{key[1]}")
        fn = fn.__wrapped__
    return fn, tuple(unless), unknown


class ChildrenAsLeaves(fx.Tracer):
    """Traces a module's own forward (through its wrappers), calling its children as leaves.
    Afterwards ``calls()``: the calls the trace stands for; ``refusal``: why it stands for none."""

    def __init__(self, root: nn.Module, window=None):
        super().__init__()
        self.root_module = root
        self.window = window  # a run of the forward's statements to trace in its place (``windows``)
        self._calls = Calls()
        self.refusal: str | None = None  # why a rewrite of this forward would not compute it

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self.root_module

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        fn, unless, unknown = _unwrapped(root_fn)
        if unknown:
            self.refusal = f"its forward is wrapped by {', '.join(unknown)}, whose code a rewrite would skip"
        fn = self.window or fn
        signature = list(inspect.signature(fn).parameters.values())[1:]  # after self
        self._forward, self._unless = fn, unless
        self._named = [p for p in signature if p.kind not in _VARIADIC]
        self._variadic = len(self._named) < len(signature)
        return super().create_args_for_root(named_only(fn), is_module, concrete_args)

    def trace(self, root, concrete_args=None):
        executed = _Executed(root)
        previous = sys.getprofile()
        sys.setprofile(executed)
        try:
            graph = super().trace(root, concrete_args)
        finally:
            sys.setprofile(previous)
        arguments = {p.name for p in self._named} if self.window is None else set()  # a window takes locals
        tested, constants, why = _conditions(executed.codes, root, self._forward.__code__, arguments)
        self.refusal = self.refusal or why
        named = self._named
        positions = {p.name: i for i, p in enumerate(named) if p.kind is not _P.KEYWORD_ONLY}
        given = tuple((p.name, positions.get(p.name), None if p.default is _P.empty else p.default)
                      for p in named if p.name in tested)
        self._calls = Calls(len(positions) if self._variadic else None,
                            frozenset(p.name for p in named if p.kind is not _P.POSITIONAL_ONLY) if self._variadic
                            else None, given, self._unless, tuple(constants))
        return graph

    def calls(self) -> Calls:
        return self._calls


# ---- the conditions the traced code tested ------------------------------------------------------

_NOT_ANALYSED = (os.path.dirname(torch.__file__), os.path.dirname(__file__))  # torch's and bpext's own code
_WINDOW_FILE = "<bpext traced part of "  # the file name of a run of a forward's statements (``windows``): analysed
_MODE_READS = frozenset({"is_grad_enabled", "is_inference_mode_enabled", "is_autocast_enabled", "get_autocast_dtype",
                         "is_autocast_cpu_enabled", "get_autocast_cpu_dtype", "get_autocast_gpu_dtype",
                         "is_scripting", "is_tracing", "is_compiling", "is_torchdynamo_compiling"})


class _Executed:
    """A profiler recording the Python functions a trace runs whose branches could depend on the call:
    the module's methods, and any function given a Proxy. {code: (whether self is the module, the name
    of the Python module whose globals it reads)}."""

    def __init__(self, root: nn.Module):
        self.root, self.codes = root, {}

    def __call__(self, frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        generated = code.co_filename.startswith("<") and not code.co_filename.startswith(_WINDOW_FILE)
        if code in self.codes or code.co_filename.startswith(_NOT_ANALYSED) or generated:
            return
        if _code_key(code) in _TRANSPARENT_WRAPPERS:
            return
        local = frame.f_locals
        is_method = local.get("self") is self.root
        if is_method or any(isinstance(v, fx.Proxy) for v in local.values()):
            self.codes[code] = (is_method, frame.f_globals.get("__name__"))


def _conditions(codes: dict, root: nn.Module, forward, arguments: set) -> tuple[set, list, str | None]:
    """(the forward's arguments its conditions test against None, the plain globals and class attributes
    the code read (the trace took them as constants), why a condition is not certain)."""
    tested: set = set()
    constants: list = []
    for code, (is_method, module_name) in codes.items():
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(code)))
        except (OSError, TypeError, SyntaxError, IndentationError):
            return tested, constants, f"the source of {code.co_qualname}, which it runs, is not readable"
        function = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                     ast.Lambda))), None)
        if function is None:
            return tested, constants, f"the source of {code.co_qualname} is not a function"
        constants += _constants_read(function, module_name, root if is_method else None)
        is_forward = (code.co_filename, code.co_firstlineno) == (forward.co_filename, forward.co_firstlineno)
        own = arguments if is_forward else set()  # arguments tested against None: only the forward's
        checker = _Certain(root if is_method else None, own - _assigned(function))
        why = _uncertain(function, checker, code.co_qualname) or _outside_effects(function, module_name, code.co_qualname)
        if why:
            return tested, constants, why
        tested |= checker.tested
    return tested, constants, None


_MUTATORS = frozenset({"append", "extend", "insert", "update", "add", "setdefault", "pop", "popitem", "remove", "clear",
                       "discard", "write", "writelines", "put"})


def _outside_effects(function: ast.AST, module_name: str | None, qualname: str) -> str | None:
    """Why the code changes something outside the module (a global's contents, the output), which its
    trace did once, not on each call; None where it does not."""
    local = {a.arg for a in ast.walk(function) if isinstance(a, ast.arg)} | _assigned(function)
    namespace = vars(sys.modules[module_name]) if module_name in sys.modules else {}

    def global_base(e) -> str | None:
        while isinstance(e, (ast.Attribute, ast.Subscript)):
            e = e.value
        return e.id if isinstance(e, ast.Name) and e.id not in local else None

    for node in ast.walk(function):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            return f"{qualname} prints, which its trace did once"
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATORS
                and (name := global_base(node.func.value)) is not None
                and not isinstance(namespace.get(name), types.ModuleType)):
            return f"{qualname} changes {name}, a global, which its trace did once"
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if isinstance(target, (ast.Attribute, ast.Subscript)) and (name := global_base(target)) is not None:
                return f"{qualname} changes {name}, a global, which its trace did once"
    return None


# Calls whose value a trace fixes from the Proxy it was given (its type, identity, text), wherever
# they stand: a condition on them, or their value kept, would be the trace's on every call.
_INTROSPECTION = frozenset({"isinstance", "issubclass", "type", "hasattr", "callable", "id", "str", "repr", "format"})
# What reads or changes the frame's names behind the compiler's back.
_FRAME_ACCESS = frozenset({"locals", "vars", "eval", "exec", "_getframe", "currentframe"})
# Calls that only report (their text may hold a Proxy's: harmless).
_REPORTS = frozenset({"warn", "warning", "warning_once", "info", "debug", "error"})


def _name_of(call: ast.Call) -> str | None:
    return getattr(call.func, "attr", getattr(call.func, "id", None))


def _uncertain(tree: ast.AST, checker: "_Certain", qualname: str) -> str | None:
    """Why the code in ``tree`` may take another branch, or compute another value, on another call
    than its trace did; None where it cannot."""
    reported = {id(n) for r in ast.walk(tree) if isinstance(r, ast.Raise) or isinstance(r, ast.Call) and
                _name_of(r) in _REPORTS for n in ast.walk(r)}  # raised or reported: text only
    for node in ast.walk(tree):
        if isinstance(node, (ast.Try, ast.Match, getattr(ast, "TryStar", ast.Try))):
            return f"{qualname} has a try or match statement"
        if isinstance(node, (ast.With, ast.AsyncWith)):
            return f"{qualname} has a with statement, whose context a trace enters once"
        if isinstance(node, ast.Call) and _name_of(node) in _MODE_READS:
            return f"{qualname} reads the grad, autocast or tracing mode ({ast.unparse(node)})"
        if isinstance(node, (ast.Name, ast.Attribute)) and getattr(node, "id", getattr(node, "attr", None)) in _FRAME_ACCESS:
            return f"{qualname} reads its frame ({ast.unparse(node)})"
        tests, values = [], []
        if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
            tests.append(node.test)
        elif isinstance(node, ast.BoolOp):
            tests.extend(node.values)
        elif isinstance(node, ast.comprehension):
            tests.extend(node.ifs)
        elif id(node) in reported:
            pass
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            values.append(node)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _INTROSPECTION:
            values.append(node)
        elif isinstance(node, ast.JoinedStr) and any(isinstance(v, ast.FormattedValue) for v in node.values):
            values.append(node)
        for expr, what in [(t, "branches on") for t in tests] + [(v, "computes") for v in values]:
            if not checker.certain(expr):
                return f"{qualname} {what} {ast.unparse(expr)}, which a trace cannot answer"
    return None


def _assigned(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _bound_locally(statements) -> set[str]:
    """The names ``statements`` bind in the function's own scope (a comprehension's targets are its own)."""
    out = set()

    def visit(node):
        if isinstance(node, _COMPREHENSIONS):
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
            return  # its body is a scope of its own
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            out.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            out.add(node.rest)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for s in statements:
        visit(s)
    return out


def _constants_read(function: ast.AST, module_name: str | None, module: nn.Module | None) -> list:
    """(module name or class, name, value) for each plain value a function reads from its module's
    globals, or (a method of ``module``) from the module's class, which a trace bakes into the graph."""
    local = {a.arg for a in ast.walk(function) if isinstance(a, ast.arg)}
    local |= {n.id for n in ast.walk(function) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    namespace = vars(sys.modules[module_name]) if module_name in sys.modules else {}
    out = []
    for n in ast.walk(function):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in local:
            value = namespace.get(n.id, MISSING)
            if type(value) in PLAIN:
                out.append((module_name, n.id, value))
        elif (module is not None and isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
              and n.value.id == "self" and n.attr not in module.__dict__):
            value = getattr(type(module), n.attr, MISSING)
            if type(value) in PLAIN:
                out.append((type(module), n.attr, value))
    return out


class _Certain:
    """Whether a condition has the same value on every call the rewrite serves: constants, the
    module's own plain attributes and train flag (``self.x``, where self is the module), and
    ``argument is None`` / ``is not None`` of ``arguments`` (recorded in ``tested``)."""

    def __init__(self, module: nn.Module | None, arguments: set):
        self.module, self.arguments, self.tested = module, arguments, set()

    def certain(self, e: ast.expr) -> bool:
        if isinstance(e, ast.Constant):
            return True
        if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
            if self.module is None:
                return False
            return e.attr == "training" or type(self.module.__dict__.get(e.attr, MISSING)) in PLAIN
        if isinstance(e, ast.Compare):
            if (len(e.ops) == 1 and isinstance(e.ops[0], (ast.Is, ast.IsNot)) and isinstance(e.left, ast.Name)
                    and e.left.id in self.arguments and isinstance(e.comparators[0], ast.Constant)
                    and e.comparators[0].value is None):
                self.tested.add(e.left.id)
                return True
            return all(self.certain(x) for x in (e.left, *e.comparators))
        if isinstance(e, ast.BoolOp):
            return all(self.certain(x) for x in e.values)
        if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.Not):
            return self.certain(e.operand)
        return False


# ---- a forward traced in part ----------------------------------------------------------------

# What the traced statements may not hold: they run as a function of their own (taking the locals they
# read, returning those the rest reads), so nothing that leaves it, binds names elsewhere or closes over
# its names.
_NOT_IN_WINDOW = (ast.Return, ast.Yield, ast.YieldFrom, ast.Await, ast.Global, ast.Nonlocal, ast.Delete,
                  ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.Import, ast.ImportFrom)


@dataclass(frozen=True)
class Rest:
    """A forward with one run of its top-level statements rewritten, as ``source``:
    ``_bpext_outer(window)`` returns the forward (its signature, without annotations), which runs the
    statements before the run as written, calls ``window`` (the rewrite of the run) with the locals
    the run reads, takes the ones it returns and runs the statements after it as written, in the
    globals of the forward's module (read on each call)."""

    source: str
    module: str
    defaults: tuple | None
    kwdefaults: dict | None
    flags: int  # the forward's __future__ flags
    name: str
    qualname: str

    def around(self, window):
        outer = _function_code(self.source, f"<bpext forward of {self.module}.{self.qualname}>", self.flags)
        forward = types.FunctionType(outer, vars(sys.modules[self.module]))(window)
        forward.__defaults__, forward.__kwdefaults__ = self.defaults, self.kwdefaults
        forward.__name__, forward.__qualname__ = self.name, self.qualname
        return forward


def windows(module: nn.Module, wanted) -> list[tuple[object, Rest]]:
    """The runs of top-level statements of module's forward that a trace can stand for on every call,
    each as (a function of the locals it reads, returning the ones read after it; the rest of the
    forward), in order; those that mention a child for which ``wanted(child)`` holds only. A statement
    is in no run where it tests what a trace cannot answer, reads ``*args``/``**kwargs`` (which the
    rest passes on as the call gave them: every transformers layer passes ``**kwargs`` to its
    attention) or leaves or binds outside the run (return, del, a def, a lambda, an import)."""
    fn, _, _ = _unwrapped(type(module).forward)
    code = getattr(fn, "__code__", None)
    name = getattr(fn, "__globals__", {}).get("__name__")
    if (code is None or code.co_freevars or code.co_cellvars or sys.modules.get(name) is None
            or vars(sys.modules[name]) is not fn.__globals__):
        return []  # a closure, or one made in it (its cells), or globals that are not a module's
    function = _function_tree(fn)
    if function is None or any(_private(n) or getattr(n, "id", getattr(n, "attr", None)) in _FRAME_ACCESS
                               for n in ast.walk(function)):
        return []  # private names (compiled outside the class, they would not be mangled), the frame read
    parameters = list(inspect.signature(fn).parameters.values())
    variadic = {p.name for p in parameters if p.kind in _VARIADIC}
    checker = _Certain(module, set())
    body = function.body

    def traceable(statement) -> bool:
        return not (any(isinstance(n, _NOT_IN_WINDOW) or isinstance(n, ast.Name) and n.id in variadic
                        for n in ast.walk(statement)) or _uncertain(statement, checker, code.co_qualname))

    children = {n for n, child in module.named_children() if wanted(child)}
    out, start = [], None
    for i, statement in enumerate([*body, None]):
        if statement is not None and traceable(statement):
            start = i if start is None else start
            continue
        if start is not None and any(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                                     and n.value.id == parameters[0].name and n.attr in children
                                     for s in body[start:i] for n in ast.walk(s)):
            window = _window(fn, function, parameters, start, i)
            if window is not None:
                out.append(window)
        start = None
    return out


def _function_tree(fn) -> ast.FunctionDef | None:
    """fn's source as a tree; parsed as the body of a block, so that string constants keep the
    indentation of their lines (dedenting the source would change them)."""
    try:
        source = inspect.getsource(fn)
        indented = source[:1].isspace()
        tree = ast.parse("if True:\n" + source if indented else source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    function = (tree.body[0].body if indented else tree.body)[0]
    return function if isinstance(function, ast.FunctionDef) else None


def _private(node: ast.AST) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return name.startswith("__") and not name.endswith("__")


def has_variadic(module: nn.Module) -> bool:
    """Whether module's forward takes ``*args`` or ``**kwargs``."""
    fn, _, _ = _unwrapped(type(module).forward)
    return any(p.kind in _VARIADIC for p in inspect.signature(fn).parameters.values())


def returns_values(graph: fx.Graph) -> bool:
    """Whether a traced run returns only traced values and plain constants: fx rebuilds any other
    object it returns (a list, a dict, an attribute's object) on each call, a copy the statements
    after the run would change instead of the object."""
    def value(a) -> bool:
        return isinstance(a, fx.Node) or type(a) in PLAIN or type(a) is tuple and all(map(value, a))
    return all(value(a) for n in graph.nodes if n.op == "output" for a in n.args[0])


def _names(statements) -> set[str]:
    return {n.id for s in statements for n in ast.walk(s) if isinstance(n, ast.Name)}


def _bound(statements) -> set[str]:
    """The names the top-level assignments among ``statements`` bind, whatever branch the others take."""
    out = set()
    for s in statements:
        targets = s.targets if isinstance(s, ast.Assign) else [s.target] if isinstance(s, ast.AnnAssign) and s.value else []
        out |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return out


def _window(fn, function: ast.FunctionDef, parameters, start: int, stop: int) -> tuple[object, Rest] | None:
    before, run, after = function.body[:start], function.body[start:stop], function.body[stop:]
    if any(isinstance(n, (ast.Delete, ast.Global, ast.Nonlocal)) for s in before for n in ast.walk(s)):
        return None
    if any(isinstance(n, ast.NamedExpr) for s in run for n in ast.walk(s)):
        return None  # a walrus binds in the forward's scope from inside a comprehension
    own = parameters[0].name
    named = {p.name for p in parameters}
    reads = {n.id for s in run for n in ast.walk(s) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    bound_before, bound_run = _bound_locally(before), _bound_locally(run)
    taken = sorted(reads & (named | bound_before | _bound_locally(after)) - {own})  # the locals it reads from outside
    if not set(taken) <= named | _bound(before):  # each bound when the run starts, whatever happened before
        return None
    if bound_run & _names(before) - named - bound_before:
        return None  # natively a local the statements before read unbound; a global in the forward rewritten
    given = sorted(bound_run & _names(after))
    arguments = copy.deepcopy(function.args)  # the signature without annotations; defaults set afterwards
    for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg, arguments.kwarg):
        if a is not None:
            a.annotation = None
    arguments.defaults, arguments.kw_defaults = [], [None] * len(arguments.kwonlyargs)
    names = ", ".join(given) + ("," if given else "")
    source = (f"def forward({', '.join([own, *taken])}):\n{_block(run, 1)}\n    return ({names})\n")
    filename = f"{_WINDOW_FILE}{fn.__module__}.{fn.__code__.co_qualname}, statements {start}-{stop - 1}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # for _conditions
    flags = fn.__code__.co_flags & _FUTURE_FLAGS  # the forward's module's __future__ imports, not bpext's
    window = types.FunctionType(_function_code(source, filename, flags), fn.__globals__)
    call = f"{f'({names}) = ' if given else ''}_bpext_window({', '.join([own, *taken])})"
    outer = (f"def _bpext_outer(_bpext_window):\n    def _bpext_forward({ast.unparse(arguments)}):\n"
             f"{_block(before, 2)}\n        {call}\n{_block(after, 2)}\n    return _bpext_forward\n")
    return window, Rest(outer, fn.__globals__["__name__"], fn.__defaults__, fn.__kwdefaults__, flags,
                        fn.__name__, fn.__qualname__)


_FUTURE_FLAGS = functools.reduce(operator.or_, (getattr(__future__, f).compiler_flag for f in __future__.all_feature_names))


def _function_code(source: str, filename: str, flags: int) -> types.CodeType:
    """The code of the one function ``source`` defines, compiled with the given __future__ flags only."""
    module = compile(source, filename, "exec", flags=flags, dont_inherit=True)
    return next(c for c in module.co_consts if isinstance(c, types.CodeType))


def _block(statements, depth: int) -> str:
    return textwrap.indent("\n".join(ast.unparse(s) for s in statements) or "pass", "    " * depth)
