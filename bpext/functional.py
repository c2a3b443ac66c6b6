"""Autograd functions and the functional API.

The activations' and the gated layers' Functions: each one's forward is one bpext op, and the same
``setup_context`` and ``backward`` are registered on that op (``torch.library.register_autograd``),
so eager code, torch.func, torch.compile, torch.export and exported programs all differentiate
through one definition. ``backward`` calls the fused backward op; under ``create_graph=True``
(double backward) it composes differentiable pieces instead, so second derivatives are exact, and a
third raises. ``jvp`` (forward-mode AD) takes the derivative from ``activation_backward``, whose
functor is the activation's one definition of act'. vmap batches the ops themselves (_ops.py).

The dense layer's and the MLP's autograd is the C++ Autograd kernel of their forward ops
(kernels/autograd.cpp), on every path; what it needs of Python is defined here: the backward as
differentiable pieces (``bpext::dense_grads``, ``bpext::mlp_grads``) and the tangents
(``bpext::dense_jvp``, ``bpext::mlp_jvp``).

A Function takes its activation as one ``ResolvedActivation`` (a pytree leaf, as torch.func
needs); the ops take it as its name and parameter values.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch.autograd import Function
from torch.utils import _pytree as pytree

from ._ops import ops
from .activations import ResolvedActivation, resolve, resolve_by_values
from .tensor_parallel import is_dtensor

__all__ = [
    "ActivationFunction", "ActivationBackwardFunction", "ActivationSecondFunction",
    "GatedFunction", "GatedMLPFunction", "LinearCrossEntropyFunction", "activation", "dense", "gated",
    "gated_mlp", "linear_cross_entropy", "mlp",
]

THIRD_ORDER = ("bpext computes derivatives up to the second order; a third derivative would need the "
               "activation's third derivative, which bpext does not have. Use the native torch.nn.functional "
               "activation where third derivatives are needed.")

Act = ResolvedActivation


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(*, F) -> (N, F), also for F == 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _saved_of(act: Act, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """The tensor act's derivative is computed from: its input x, its output y, or none."""
    return {"output": y, "input": x, "nothing": None}[act.saves]


def _derivative(grad: torch.Tensor, saved: torch.Tensor | None, act: Act) -> torch.Tensor:
    """grad * act'(.) from the tensor the activation saves; differentiable where a graph is being built."""
    if act.saves == "nothing":
        return grad
    if _needs_graph(grad, saved):
        return _apply(ActivationBackwardFunction, grad, saved, act)
    return _fused(ops.activation_backward, grad, saved, act.name, act.params)


def _needs_graph(*tensors) -> bool:
    """Whether a backward must compose its result of differentiable pieces, for a derivative of it
    to follow: grad mode is on (create_graph=True; always under torch.func) and autograd tracks a
    tensor the result is computed from. Under torch.func, the fused backward op serves a lone
    grad/vjp transform whose inputs no outer autograd tracks; under vmap the pieces batch (the
    backward ops would loop), under nested transforms they are differentiated again."""
    if forward_ad._current_level >= 0:  # forward-mode AD: tangents flow only through differentiable pieces
        return True
    if not torch.is_grad_enabled():
        return False
    tensors = [t for t in tensors if t is not None]
    if not torch._C._are_functorch_transforms_active():
        return any(t.requires_grad for t in tensors)
    stack = torch._C._functorch.get_interpreter_stack()
    if len(stack) != 1 or stack[0].key() != torch._C._functorch.TransformType.Grad:
        return True
    return any(_unwrapped(t).requires_grad for t in tensors)


def _fused(op, *args):
    """A fused backward op, where no graph is built (_needs_graph is false): below autograd, and
    under torch.func on the plain tensors below its wrappers (its result is a constant to the
    transform, as nothing differentiates it further)."""
    if torch._C._are_functorch_transforms_active():
        args = pytree.tree_map_only(torch.Tensor, _unwrapped, args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor below torch.func's wrappers."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _save(ctx, for_backward: tuple, everything: tuple) -> None:
    """Saves what backward reads, in plain eager mode. Under torch.func or forward-mode AD it
    saves ``everything`` (the same positions, plus what jvp reads) for backward and jvp alike:
    functorch batches a single saved set."""
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        ctx.save_for_backward(*everything)
        ctx.save_for_forward(*everything)
    else:
        ctx.save_for_backward(*for_backward)


def _eager_twin(function: type[Function]) -> type[Function]:
    """Gives ``function`` an old-style twin (``forward(ctx, ...)``), which plain eager mode applies:
    torch.func needs the setup_context form, whose apply costs some 17 us more per call. Both run
    the same forward, setup_context, backward and jvp; the twin calls its forward op below autograd
    (its own autograd is the Function's), sparing the op its registered autograd kernel. Backward
    is the Function's own: it unpacks what was saved with autograd on (a non-reentrant checkpoint
    recomputes the forward then, and must record what it saves), then calls its ops below autograd."""

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = function.forward(*args)
        function.setup_context(ctx, args, output)
        return output

    function.eager = type(function.__name__, (Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(function.backward),
        "jvp": staticmethod(function.jvp), "__module__": function.__module__, "__doc__": function.__doc__})
    return function


def _apply(function: type[Function], *args):
    """function.apply: its old-style twin in plain eager mode (see _eager_twin)."""
    if torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return function.eager.apply(*args)


def _sum(terms):
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


# ---- activations ----------------------------------------------------------------------------


@_eager_twin
class ActivationFunction(Function):
    """y = act(x); saves y, x or nothing, as the activation's policy says."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, act: Act):
        return ops.activation_forward(x, act.name, act.params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, act = inputs
        ctx.act = act
        saved = _saved_of(act, x, output)
        _save(ctx, (saved if ctx.needs_input_grad[0] else None,), (saved,))

    @staticmethod
    def backward(ctx, grad_y):
        (saved,) = ctx.saved_tensors
        return _derivative(grad_y, saved, ctx.act), None

    @staticmethod
    def jvp(ctx, x_t, _):
        (saved,) = ctx.saved_tensors
        return _derivative(x_t, saved, ctx.act)


@_eager_twin
class ActivationBackwardFunction(Function):
    """grad_x = grad_y * act'(s), differentiable in grad_y and in the saved s (y or z).
    When s is the output y, autograd carries its gradient on through y's own graph."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_y, saved, act: Act):
        return ops.activation_backward(grad_y, saved, act.name, act.params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_y, saved, act = inputs
        ctx.act = act
        _save(ctx, (grad_y if ctx.needs_input_grad[1] else None, saved), (grad_y, saved))

    @staticmethod
    def backward(ctx, grad_grad_x):
        grad_y, saved = ctx.saved_tensors
        act, needs = ctx.act, ctx.needs_input_grad
        grad_grad_y = _derivative(grad_grad_x, saved, act) if needs[0] else None
        grad_saved = None
        if needs[1]:
            if _needs_graph(grad_grad_x, grad_y, saved):
                grad_saved = _apply(ActivationSecondFunction, grad_grad_x, grad_y, saved, act)[1]
            else:
                grad_saved = _fused(ops.activation_double_backward, grad_grad_x, grad_y, saved, act.name, act.params)[1]
        return grad_grad_y, grad_saved, None

    @staticmethod
    def jvp(ctx, grad_y_t, saved_t, _):
        grad_y, saved = ctx.saved_tensors
        act = ctx.act
        return _sum([None if grad_y_t is None else ops.activation_backward(grad_y_t, saved, act.name, act.params),
                     None if saved_t is None else
                     ops.activation_double_backward(saved_t, grad_y, saved, act.name, act.params)[1]])


@_eager_twin
class ActivationSecondFunction(Function):
    """The second-derivative pass: (grad_grad_x * act'(s), grad_grad_x * grad_y * act''(s)),
    differentiable in grad_grad_x and grad_y. Its derivative in s would need the activation's third
    derivative: there it raises instead of returning a wrong number."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_grad_x, grad_y, saved, act: Act):
        return ops.activation_double_backward(grad_grad_x, grad_y, saved, act.name, act.params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_grad_x, grad_y, saved, act = inputs
        ctx.act = act
        _save(ctx, (grad_grad_x, grad_y, saved), (grad_grad_x, grad_y, saved))

    @staticmethod
    def backward(ctx, grad_first, grad_second):
        grad_grad_x, grad_y, saved = ctx.saved_tensors
        act, needs = ctx.act, ctx.needs_input_grad
        if needs[2]:
            raise NotImplementedError(THIRD_ORDER)
        second = lambda a, b: ops.activation_double_backward(a, b, saved, act.name, act.params)[1]  # noqa: E731
        grads = [None, None]
        if needs[0]:  # d/d grad_grad_x: act'(s), and grad_y act''(s)
            grads[0] = _sum([None if grad_first is None else _derivative(grad_first, saved, act),
                             None if grad_second is None else second(grad_second, grad_y)])
        if needs[1] and grad_second is not None:  # d/d grad_y: grad_grad_x act''(s)
            grads[1] = second(grad_second, grad_grad_x)
        return grads[0], grads[1], None, None

    @staticmethod
    def jvp(ctx, grad_grad_x_t, grad_y_t, saved_t, _):
        if saved_t is not None:
            raise NotImplementedError(THIRD_ORDER)
        grad_grad_x, grad_y, saved = ctx.saved_tensors
        act = ctx.act
        first_t = None if grad_grad_x_t is None else _derivative(grad_grad_x_t, saved, act)
        second_t = _sum([None if t is None else ops.activation_double_backward(t, other, saved, act.name,
                                                                               act.params)[1]
                         for t, other in ((grad_grad_x_t, grad_y), (grad_y_t, grad_grad_x))])
        return first_t, second_t


# ---- dense layers ---------------------------------------------------------------------------


def _linear_grads(dz, x, weight, needs):
    """(grad_x, grad_weight, grad_bias) of x @ weight.T + bias from dz = the gradient of its output,
    as differentiable matrix products (double backward); None where ``needs`` says no or dz is None.
    x is read for grad_weight only, weight for grad_x only."""
    if dz is None:
        return None, None, None
    dz2 = _rows(dz)
    return ((dz2 @ weight).reshape(*dz.shape[:-1], weight.shape[1]) if needs[0] else None,
            dz2.t() @ _rows(x) if needs[1] else None,
            dz2.sum(0) if needs[2] else None)


def _linear_tangent(x, weight, x_t, weight_t, bias_t):
    """The tangent of x @ weight.T + bias (broadcast to the output's shape); None when no input has one."""
    products = _sum([None if x_t is None else F.linear(x_t, weight), None if weight_t is None else F.linear(x, weight_t)])
    if bias_t is None:
        return products
    return bias_t.expand(*x.shape[:-1], weight.shape[0]) if products is None else products + bias_t


def _keep_differentiable(ctx, *kept) -> bool:
    """Makes a layer's kept pre-activations differentiable outputs where they were kept, so that
    double backward reaches the layer's inputs through them (backward then reads only what its
    first-order gradients need, as native's products). Not under torch.compile, whose graphs
    would send them zeros on every step (it has no double backward)."""
    ctx.kept_differentiable = all(t.numel() > 0 for t in kept) and not torch.compiler.is_compiling()
    if not ctx.kept_differentiable:
        ctx.mark_non_differentiable(*kept)
    ctx.set_materialize_grads(False)
    return ctx.kept_differentiable


def _dense_grads(grad_y, x, weight, saved, act: Act, mask, grad_preact=None):
    """The dense layer's backward as differentiable pieces (dense_backward computes the same in one
    op): from grad_y (or None) and a gradient sent into the pre-activation z itself (double backward)
    -> (grad_x, grad_weight, grad_bias), None where mask says no. ``saved``: y, z or None, as act saves."""
    dz = _sum([None if grad_y is None else _derivative(grad_y, saved, act), grad_preact])
    return _linear_grads(dz, x, weight, mask)


# ---- layer stacks: MLP, gated layers --------------------------------------------------------------
# Their backward ops recompute what they did not keep; jvp pushes tangents through the layers rebuilt
# from F.linear and ActivationFunction. Double backward differentiates the gated layers' backward
# through their kept pre-activations, and the MLP's layers rebuilt.


def _activation_tangent(z, z_t, act: Act):
    """act(z) and its tangent."""
    y = ops.activation_forward(z, act.name, act.params)
    return y, None if z_t is None else _derivative(z_t, _saved_of(act, z, y), act)


def _layer_input(kept, act: Act):
    """A hidden layer's output from what it kept: its y, or act(z)."""
    return _apply(ActivationFunction, kept, act) if act.saves == "input" else kept


def _mlp_grads(grad_y, grad_kept, x, y, weights, kept, acts, mask):
    """The MLP's backward as differentiable pieces, from what mlp_forward kept (mlp_backward computes
    the same in one op): from grad_y and the gradients sent into the kept tensors (double backward),
    each None where none -> [grad_x, *grad_weights, *grad_biases], None where ``mask`` (x, the
    weights, the biases) says no or no gradient reaches. kept[l] is layer l's z where its
    activation's derivative reads z, else its y; the last layer keeps nothing else (its derivative
    reads the output y, or nothing)."""
    n = len(weights)
    reads = [w.dim() == 2 for w in weights]  # (0) where not read: the kernels' MLPGrads says where
    grads = [None] * (1 + 2 * n)
    g = grad_y
    for layer in reversed(range(n)):
        w_asked, b_asked = mask[1 + layer], mask[1 + n + layer]
        if not (reads[layer] or w_asked or b_asked):
            break  # nothing is asked of this layer or below it
        act, into_kept = acts[layer], grad_kept[layer]
        keeps_z = act.saves == "input"
        g = _sum([g, None if keeps_z else into_kept])  # a kept y: a gradient of the layer's output
        saved = None if act.saves == "nothing" else kept[layer] if keeps_z or layer < n - 1 else y
        dz = _sum([None if g is None else _derivative(g, saved, act), into_kept if keeps_z else None])
        h = None if not w_asked else x if layer == 0 else _layer_input(kept[layer - 1], acts[layer - 1])
        g, grads[1 + layer], grads[1 + n + layer] = _linear_grads(dz, h, weights[layer],
                                                                  (reads[layer], w_asked, b_asked))
    grads[0] = g if mask[0] else None
    return grads


def _op_biases(biases, like) -> list[torch.Tensor]:
    """The mlp ops take a list of tensors: (0) stands for a layer without bias."""
    return [b if b is not None else like.new_empty(0) for b in biases]


def _layer_biases(biases) -> list[torch.Tensor | None]:
    return [b if b.numel() > 0 else None for b in biases]


def _gated_grads(grad_h, x, weight_gate, weight_up, gate, up, act: Act, mask, grad_gate=None, grad_up=None):
    """The gated layer's backward as differentiable pieces (gated_backward computes the same in one
    op): from the gradient of act(gate) * up (grad_h, or None) and gradients sent into gate and up
    themselves (double backward) -> (grad_x, grad_weight_gate, grad_bias_gate, grad_weight_up,
    grad_bias_up), None where mask says no. x is read for the weights' gradients only, the weights
    for grad_x only."""
    if grad_h is not None:
        y = _apply(ActivationFunction, gate, act)
        grad_gate = _sum([_derivative(grad_h * up, _saved_of(act, gate, y), act), grad_gate])
        grad_up = _sum([grad_h * y, grad_up])
    gx_gate, gw_gate, gb_gate = _linear_grads(grad_gate, x, weight_gate, (mask[0], mask[1], mask[2]))
    gx_up, gw_up, gb_up = _linear_grads(grad_up, x, weight_up, (mask[0], mask[3], mask[4]))
    return _sum([gx_gate, gx_up]), gw_gate, gb_gate, gw_up, gb_up


def _gated_mlp_grads(grad_y, x, weight_gate, weight_up, weight_down, gate, up, act: Act, mask, grad_gate=None,
                     grad_up=None):
    """The gated MLP's backward as differentiable pieces (gated_mlp_backward in one op): the down
    projection's gradients from act(gate) * up, recomputed, then the gated layer's; weight_down is
    read only where the gated layer's gradients are asked for."""
    grad_h = grad_wd = grad_bd = None
    if grad_y is not None:
        h = _apply(ActivationFunction, gate, act) * up if mask[5] else None
        grad_h, grad_wd, grad_bd = _linear_grads(grad_y, h, weight_down, (any(mask[:5]), mask[5], mask[6]))
    return (*_gated_grads(grad_h, x, weight_gate, weight_up, gate, up, act, mask[:5], grad_gate, grad_up),
            grad_wd, grad_bd)


def _gated_tangent(x, x_t, weight_gate, bias_gate, weight_up, bias_up, tangents, act: Act):
    """act(gate) * up and the tangents of it, of gate and of up; tangents of (weight_gate, bias_gate, weight_up,
    bias_up)."""
    wg_t, bg_t, wu_t, bu_t = tangents
    gate, up = F.linear(x, weight_gate, bias_gate), F.linear(x, weight_up, bias_up)
    gate_t = _linear_tangent(x, weight_gate, x_t, wg_t, bg_t)
    a, a_t = _activation_tangent(gate, gate_t, act)
    up_t = _linear_tangent(x, weight_up, x_t, wu_t, bu_t)
    return a * up, _sum([None if a_t is None else a_t * up, None if up_t is None else a * up_t]), gate_t, up_t


@_eager_twin
class GatedFunction(Function):
    """(y, gate, up) = (act(gate) * up, x Wg^T + bg, x Wu^T + bu) in one op; gate and up are (0)
    unless ``save``. Saves gate and up, x only where a weight needs a gradient, the weights only
    where x does; never the biases (native keeps four tensors)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight_gate, bias_gate, weight_up, bias_up, act: Act, save: bool):
        return ops.gated_forward(x, weight_gate, bias_gate, weight_up, bias_up, act.name, act.params, save)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight_gate, bias_gate, weight_up, bias_up, act, _ = inputs
        _, gate, up = output
        _keep_differentiable(ctx, gate, up)
        ctx.act = act
        needs = ctx.needs_input_grad
        _save(ctx, (x if needs[1] or needs[3] else None, weight_gate if needs[0] else None, None,
                    weight_up if needs[0] else None, None, gate, up),
              (x, weight_gate, bias_gate, weight_up, bias_up, gate, up))

    @staticmethod
    def backward(ctx, grad_y, grad_gate, grad_up):
        x, weight_gate, _, weight_up, _, gate, up = ctx.saved_tensors
        act, mask = ctx.act, ctx.needs_input_grad[:5]
        if not ctx.kept_differentiable:
            grad_gate = grad_up = None
        if grad_y is None and grad_gate is None and grad_up is None:
            return (None,) * 7
        if grad_gate is not None or grad_up is not None or _needs_graph(grad_y, x, weight_gate, weight_up, gate, up):
            grads = _gated_grads(grad_y, x, weight_gate, weight_up, gate, up, act, mask, grad_gate, grad_up)
        else:
            grads = _fused(ops.gated_backward, grad_y, x, weight_gate, weight_up, gate, up, act.name, act.params,
                           list(mask))
        return (*(g if m else None for g, m in zip(grads, mask)), None, None)

    @staticmethod
    def jvp(ctx, x_t, weight_gate_t, bias_gate_t, weight_up_t, bias_up_t, *_):
        x, weight_gate, bias_gate, weight_up, bias_up, _, _ = ctx.saved_tensors
        _, y_t, gate_t, up_t = _gated_tangent(x, x_t, weight_gate, bias_gate, weight_up, bias_up,
                                              (weight_gate_t, bias_gate_t, weight_up_t, bias_up_t), ctx.act)
        return (y_t, *((gate_t, up_t) if ctx.kept_differentiable else (None, None)))


@_eager_twin
class GatedMLPFunction(Function):
    """(y, gate, up) = (down(act(gate) * up), x Wg^T + bg, x Wu^T + bu) in one op each way; gate and
    up are (0) unless ``save``. Saves gate and up (backward recomputes act(gate) * up), x only where
    the gate's or up's weight needs a gradient, their weights only where x does, the down weight
    only where anything before it does; never the biases."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight_gate, bias_gate, weight_up, bias_up, weight_down, bias_down, act: Act, save: bool):
        return ops.gated_mlp_forward(x, weight_gate, bias_gate, weight_up, bias_up, weight_down, bias_down,
                                     act.name, act.params, save)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight_gate, bias_gate, weight_up, bias_up, weight_down, bias_down, act, _ = inputs
        _, gate, up = output
        _keep_differentiable(ctx, gate, up)
        ctx.act = act
        needs = ctx.needs_input_grad
        _save(ctx, (x if needs[1] or needs[3] else None, weight_gate if needs[0] else None, None,
                    weight_up if needs[0] else None, None, weight_down if any(needs[:5]) else None, None, gate, up),
              (x, weight_gate, bias_gate, weight_up, bias_up, weight_down, bias_down, gate, up))

    @staticmethod
    def backward(ctx, grad_y, grad_gate, grad_up):
        x, weight_gate, _, weight_up, _, weight_down, _, gate, up = ctx.saved_tensors
        act, mask = ctx.act, ctx.needs_input_grad[:7]
        if not ctx.kept_differentiable:
            grad_gate = grad_up = None
        if grad_y is None and grad_gate is None and grad_up is None:
            return (None,) * 9
        if grad_gate is not None or grad_up is not None or _needs_graph(grad_y, x, weight_gate, weight_up,
                                                                          weight_down, gate, up):
            grads = _gated_mlp_grads(grad_y, x, weight_gate, weight_up, weight_down, gate, up, act, mask, grad_gate,
                                     grad_up)
        else:
            grads = _fused(ops.gated_mlp_backward, grad_y, x, weight_gate, weight_up, weight_down, gate, up, act.name,
                           act.params, list(mask))
        return (*(g if m else None for g, m in zip(grads, mask)), None, None)

    @staticmethod
    def jvp(ctx, x_t, *tangents):
        x, weight_gate, bias_gate, weight_up, bias_up, weight_down, bias_down, _, _ = ctx.saved_tensors
        weight_gate_t, bias_gate_t, weight_up_t, bias_up_t, weight_down_t, bias_down_t, *_ = tangents
        h, h_t, gate_t, up_t = _gated_tangent(x, x_t, weight_gate, bias_gate, weight_up, bias_up,
                                              (weight_gate_t, bias_gate_t, weight_up_t, bias_up_t), ctx.act)
        y_t = _linear_tangent(h, weight_down, h_t, weight_down_t, bias_down_t)
        return (y_t, *((gate_t, up_t) if ctx.kept_differentiable else (None, None)))


# ---- the last dense layer with its loss ------------------------------------------------------------

DOUBLE_BACKWARD_OF_LOSS = ("bpext.linear_cross_entropy has no double backward: its gradients are computed block "
                           "by block from logits that are never kept. Use F.cross_entropy(F.linear(...)) where a "
                           "second derivative of the loss is needed.")


class LinearCrossEntropyFunction(Function):
    """loss = cross_entropy(input @ weight.T + bias, target) in one op, the (tokens, vocab) logits
    never whole. With a scalar reduction, the op computes the gradients ``mask`` asks for (those of
    the inputs that require one) in the same blocks (three matrix products, as native's forward and
    backward) and keeps only them; backward scales them by the loss's gradient, in float32. With
    reduction="none", or float16 inputs (a GradScaler's scale would overflow gradients made at scale
    1), backward recomputes the logits block by block with the loss's gradient."""

    @staticmethod
    def forward(input, weight, bias, target, options: tuple, mask: tuple):
        return ops.linear_cross_entropy_forward(input, weight, bias, target, *options, list(mask))

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, target, options, mask = inputs
        _, *grads = output
        ctx.mark_non_differentiable(*grads)
        ctx.set_materialize_grads(False)
        # the gradients made in forward serve where they are every one backward needs
        covered = any(mask) and all(m or not need for m, need in zip(mask, ctx.needs_input_grad[:3]))
        ctx.options, ctx.with_grad, ctx.has_bias = options, covered, bias is not None
        if covered:
            ctx.save_for_backward(*(g if m else None for g, m in zip(grads, mask)))
        else:
            ctx.save_for_backward(input, weight, bias, target)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return (None,) * 6
        if torch.is_grad_enabled() and (not torch._C._are_functorch_transforms_active()
                                        or _needs_graph(grad_loss, *ctx.saved_tensors)):  # create_graph=True
            raise NotImplementedError(DOUBLE_BACKWARD_OF_LOSS)
        needs = ctx.needs_input_grad
        if ctx.with_grad:
            grads = [None if g is None else g * grad_loss if g.dtype == torch.float64 else
                     (g.float() * grad_loss.float()).to(g.dtype) for g in ctx.saved_tensors]
        else:
            input, weight, bias, target = ctx.saved_tensors
            grads = _fused(ops.linear_cross_entropy_backward, grad_loss, input, weight, bias, target, *ctx.options)
        grad_input, grad_weight, grad_bias = grads
        return (grad_input if needs[0] else None, grad_weight if needs[1] else None,
                grad_bias if needs[2] and ctx.has_bias else None, None, None, None)


# ---- the same autograd on the ops themselves ------------------------------------------------------
# An op takes the activation as (name, params) where its Function takes one ResolvedActivation.


def _register(op_name: str, function: type[Function], at: int) -> None:
    def setup_context(ctx, inputs, output):
        act = resolve_by_values(inputs[at], tuple(inputs[at + 1]))
        function.setup_context(ctx, (*inputs[:at], act, *inputs[at + 2:]), output)

    def backward(ctx, *grads):
        out = function.backward(ctx, *grads)
        return (*out[:at], None, *out[at:])

    torch.library.register_autograd(f"bpext::{op_name}", backward, setup_context=setup_context)


def _per_argument(inputs: tuple, grad_of) -> tuple:
    """A backward's result in the structure torch.library expects of an op with lists of tensors: a
    list of gradients for a list of tensors (an empty list included), None for anything else."""
    tensor_lists = any(isinstance(a, list) and a and all(isinstance(t, torch.Tensor) for t in a) for a in inputs)
    return tuple([grad_of(t) for t in a] if tensor_lists and isinstance(a, list) and all(
        isinstance(t, torch.Tensor) for t in a) else grad_of(a) if isinstance(a, torch.Tensor) else None
        for a in inputs)


# The backward ops are reached by autograd only when differentiated directly (opcheck; the backward
# graph of an exported program differentiated again): the vjp of each one's definition, written
# in the differentiable pieces above and recomputed.


def _dense_backward_definition(grad_y, x, weight, saved, activation, params, mask):
    return _dense_grads_op(grad_y, None, x, weight, saved, activation, params, mask)


def _gated_backward_definition(grad_y, x, weight_gate, weight_up, gate, up, activation, params, mask):
    act = resolve_by_values(activation, tuple(params))
    return _placeholders(_gated_grads(grad_y, x, weight_gate, weight_up, gate, up, act, mask), grad_y)


def _gated_mlp_backward_definition(grad_y, x, weight_gate, weight_up, weight_down, gate, up, activation, params,
                                   mask):
    act = resolve_by_values(activation, tuple(params))
    return _placeholders(_gated_mlp_grads(grad_y, x, weight_gate, weight_up, weight_down, gate, up, act, mask), grad_y)


def _mlp_backward_definition(grad_y, x, y, weights, saved, activation, params, output_activation, output_params,
                             mask):
    grads = _mlp_grads_op(grad_y, [], x, y, weights, saved, activation, params, output_activation, output_params, mask)
    n = len(weights)
    return grads[0], grads[1:1 + n], grads[1 + n:]


def _placeholders(grads, like):
    """The (0) tensors a backward op returns for what it was not asked to compute."""
    return tuple(like.new_empty(0) if g is None else g for g in grads)


def _register_backward_op(op_name: str, definition) -> None:
    def setup_context(ctx, inputs, output):
        flat, ctx.spec = pytree.tree_flatten(inputs)
        ctx.is_tensor = [isinstance(t, torch.Tensor) for t in flat]
        ctx.constants = [None if is_tensor else t for t, is_tensor in zip(flat, ctx.is_tensor)]
        ctx.save_for_backward(*[t for t in flat if isinstance(t, torch.Tensor)])

    def backward(ctx, *grads):
        tensors = iter(ctx.saved_tensors)
        flat = [next(tensors) if is_tensor else c for c, is_tensor in zip(ctx.constants, ctx.is_tensor)]
        create_graph = torch.is_grad_enabled()  # a derivative of this one follows: keep the inputs' graphs
        with torch.enable_grad():
            # one tensor per position (a tensor passed twice gets each place's gradient)
            leaves = [t if not isinstance(t, torch.Tensor) else t.view_as(t) if create_graph else
                      t.detach().requires_grad_(t.is_floating_point()) for t in flat]
            inputs = pytree.tree_unflatten(leaves, ctx.spec)
            outputs = pytree.tree_leaves(definition(*inputs))
            pairs = [(o, g) for o, g in zip(outputs, pytree.tree_leaves(grads)) if g is not None and o.requires_grad]
            wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
            found = dict(zip(map(id, wanted), torch.autograd.grad(
                [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True,
                create_graph=create_graph) if pairs else []))
        return _per_argument(inputs, lambda t: found.get(id(t)))

    torch.library.register_autograd(f"bpext::{op_name}", backward, setup_context=setup_context)


for _op, _definition in (("dense_backward", _dense_backward_definition),
                         ("gated_backward", _gated_backward_definition),
                         ("gated_mlp_backward", _gated_mlp_backward_definition),
                         ("mlp_backward", _mlp_backward_definition)):
    _register_backward_op(_op, _definition)

def _loss_op_setup_context(ctx, inputs, output):
    input, weight, bias, target, *options, mask = inputs
    LinearCrossEntropyFunction.setup_context(ctx, (input, weight, bias, target, tuple(options), tuple(mask)), output)


def _loss_op_backward(ctx, *grads):
    return (*LinearCrossEntropyFunction.backward(ctx, *grads)[:4], *[None] * 7)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(DOUBLE_BACKWARD_OF_LOSS)


torch.library.register_autograd("bpext::linear_cross_entropy_forward", _loss_op_backward,
                                setup_context=_loss_op_setup_context)
torch.library.register_autograd("bpext::linear_cross_entropy_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)

for _op, _function, _at in (("activation_forward", ActivationFunction, 1),
                            ("activation_backward", ActivationBackwardFunction, 2),
                            ("activation_double_backward", ActivationSecondFunction, 3),
                            ("gated_forward", GatedFunction, 5),
                            ("gated_mlp_forward", GatedMLPFunction, 7)):
    _register(_op, _function, _at)


# ---- what the dense layer's and the MLP's C++ autograd needs of Python -------------------------------
# kernels/autograd.cpp's Nodes call these where a derivative of the backward may follow (grad mode on,
# torch.func, tangents) and for forward-mode tangents: each layer's backward as pieces and its jvp,
# defined once, here.

_library = torch.library.Library("bpext", "FRAGMENT")
_library.define("dense_grads(Tensor? grad_y, Tensor? grad_preact, Tensor? x, Tensor? weight, Tensor? saved, "
                "str activation, float[] params, bool[3] mask) -> (Tensor, Tensor, Tensor)")
_library.define("dense_jvp(Tensor x, Tensor weight, Tensor? bias, Tensor? x_t, Tensor? weight_t, Tensor? bias_t, "
                "Tensor y, Tensor preact, str activation, float[] params) -> (Tensor, Tensor)")
_library.define("mlp_jvp(Tensor x, Tensor[] weights, Tensor[] biases, Tensor? x_t, Tensor?[] weights_t, "
                "Tensor?[] biases_t, str activation, float[] params, str output_activation, float[] output_params) "
                "-> (Tensor, Tensor[])")
_library.define("mlp_grads(Tensor? grad_y, Tensor[] grad_kept, Tensor? x, Tensor y, Tensor[] weights, Tensor[] saved, "
                "str activation, float[] params, str output_activation, float[] output_params, bool[] mask) -> Tensor[]")


def _dense_grads_op(grad_y, grad_preact, x, weight, saved, activation, params, mask):
    """The dense layer's backward where kernels/autograd.cpp's node runs with grad mode on or tangents
    (create_graph=True, torch.func, forward over reverse) or gets a gradient sent into z: _dense_grads,
    or the fused dense_backward where no derivative of it follows (_needs_graph). (0) where mask says
    no. ``saved`` is unread (or none) where act saves nothing."""
    act = resolve_by_values(activation, tuple(params))
    saved = saved if act.saves != "nothing" else None
    if grad_preact is None and not _needs_graph(grad_y, x, weight, saved):
        return _fused(ops.dense_backward, grad_y, x, weight, grad_y.new_empty(0) if saved is None else saved,
                      activation, params, mask)
    return _placeholders(_dense_grads(grad_y, x, weight, saved, act, mask, grad_preact),
                         grad_y if grad_y is not None else grad_preact)


def _dense_jvp_op(x, weight, bias, x_t, weight_t, bias_t, y, preact, activation, params):
    """The tangents of dense_forward's (y, preact) from the primals and the inputs' tangents (some
    defined): the tangent of z, and act'(z) times it. z is recomputed where it was not kept."""
    act = resolve_by_values(activation, tuple(params))
    preact_t = _linear_tangent(x, weight, x_t, weight_t, bias_t)
    if act.saves == "input" and preact.shape != preact_t.shape:  # (0): z was not kept
        preact = F.linear(x, weight, bias)
    return _tangent_derivative(preact_t, _saved_of(act, preact, y), act), preact_t


def _mlp_jvp_op(x, weights, biases, x_t, weights_t, biases_t, activation, params, output_activation, output_params):
    """The tangents of mlp_forward's y and kept tensors (z or y per layer, as kept; (0) for a last layer
    keeping nothing), from the primals and the inputs' tangents (some defined), through the layers rebuilt."""
    hidden, output = (resolve_by_values(activation, tuple(params)),
                      resolve_by_values(output_activation, tuple(output_params)))
    n = len(weights)
    h, h_t, kept_t = x, x_t, []
    for i, (weight, bias) in enumerate(zip(weights, _layer_biases(biases))):
        act = output if i == n - 1 else hidden
        z = F.linear(h, weight, bias)
        z_t = _linear_tangent(h, weight, h_t, weights_t[i], biases_t[i] if bias is not None else None)
        h = _activation_forward(z, act)
        h_t = None if z_t is None else _tangent_derivative(z_t, _saved_of(act, z, h), act)
        kept_t.append(z_t if act.saves == "input" else h_t if i < n - 1 else None)
    return (h_t if h_t is not None else torch.zeros_like(h)), [x.new_empty(0) if t is None else t for t in kept_t]


def _under_transforms() -> bool:
    """Under torch.func, where a tangent op runs below the transforms' front: its pieces are the
    ops themselves, called below autograd (torch.func takes Functions only at its front). Nothing
    differentiates such a tangent further (_composes_native routes the cases that would to native ops)."""
    return torch._C._are_functorch_transforms_active()


def _activation_forward(z, act: Act):
    if _under_transforms():
        with torch._C._AutoDispatchBelowAutograd():
            return ops.activation_forward(z, act.name, act.params)
    return ops.activation_forward(z, act.name, act.params)


def _tangent_derivative(z_t, saved, act: Act):
    """z_t * act'(.), for a tangent (_under_transforms)."""
    if saved is None or not _under_transforms():
        return _derivative(z_t, saved, act)
    with torch._C._AutoDispatchBelowAutograd():
        return ops.activation_backward(z_t, saved, act.name, act.params)


def _mlp_grads_op(grad_y, grad_kept, x, y, weights, saved, activation, params, output_activation, output_params,
                  mask):
    """_mlp_grads: [grad_x, *grad_weights, *grad_biases], (0) where mask (x, the weights, the biases) says no or
    no gradient reaches.
    The op's lists hold (0) for what is not there: grad_kept may be empty or (0) where a kept tensor
    gets no gradient, weights (0) where unread, y (0) where the last derivative does not read it."""
    n = len(weights)
    acts = [resolve_by_values(activation, tuple(params))] * (n - 1) + [
        resolve_by_values(output_activation, tuple(output_params))]
    grad_kept = [None if g.shape == (0,) else g for g in grad_kept] or [None] * n
    if (all(g is None for g in grad_kept) and not torch._C._functorch.is_legacy_batchedtensor(grad_y)
            and not _needs_graph(grad_y, x, y, *weights, *saved)):
        grad_x, grad_w, grad_b = _fused(ops.mlp_backward, grad_y, x, y, weights, saved, activation, params,
                                        output_activation, output_params, mask)
        return [grad_x, *grad_w, *grad_b]
    like = next(g for g in (grad_y, *grad_kept) if g is not None)
    return list(_placeholders(_mlp_grads(grad_y, grad_kept, x, y, list(weights), list(saved), acts, list(mask)), like))


# Also at torch.func's front (the first key its transforms dispatch), where kernels/autograd.cpp's
# node calls it from the engine: there it runs as code the user calls, and its pieces are Functions,
# which torch.func takes only there (a composite op's kernel runs below the front).
for _name, _fn in (("dense_grads", _dense_grads_op), ("mlp_grads", _mlp_grads_op)):
    _library.impl(_name, _fn, "FuncTorchDynamicLayerFrontMode")
for _name, _fn in (("dense_jvp", _dense_jvp_op), ("mlp_jvp", _mlp_jvp_op)):
    for _key in ("CompositeImplicitAutograd", "Batched"):  # Batched: gradcheck's legacy vmap
        _library.impl(_name, _fn, _key)
for _name, _fn in (("dense_grads", _dense_grads_op), ("mlp_grads", _mlp_grads_op)):
    # Batched too: gradcheck's legacy vmap has no fallback for an op that returns a list
    for _key in ("CompositeImplicitAutograd", "Batched"):
        _library.impl(_name, _fn, _key)


# ---- the functional API -------------------------------------------------------------------------


def _builds_graph(*tensors) -> bool:
    """Whether autograd will record this call: only then do the layers keep anything for backward.
    (Always under torch.jit.trace, whose program must not depend on it.)"""
    return torch.jit.is_tracing() or torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


def _through_ops() -> bool:
    """Under torch.compile (which cannot trace a Function with a jvp) and torch.jit.trace (which
    cannot save a Python Function), call the ops, differentiable through their registered autograd."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _composes_native(*tensors) -> bool:
    """Where a Function's derivative would be lost, or the kernels cannot take the input, the layers
    compose native ops, whose derivatives of every order are native's:

    * a forward-mode derivative inside another (``jacfwd(jacfwd(f))``, ``jacrev(jacfwd(f))``): a
      Function's jvp runs below the outer transform's level, which sees none of its work (so the
      outer derivative of the tangent would be lost). Forward over reverse, ``hessian``, is exact.
    * under vmap, an input that an autograd outside the transforms tracks (``vmap(grad(f))``'s
      per-sample gradients, then ``backward`` through them): the Function's batched backward gave
      that autograd wrong numbers or raised, for every layer.
    * a sparse input (x first): the kernels take strided tensors, native's F.linear sparse COO too."""
    if tensors[0] is not None and tensors[0].layout is not torch.strided:
        return True
    if not torch._C._are_functorch_transforms_active():
        return False
    transform = torch._C._functorch.TransformType
    stack = torch._C._functorch.get_interpreter_stack()
    outer = forward_ad._current_level >= 0  # a derivative is taken outside the first level
    for interpreter in stack:  # outermost first
        key = interpreter.key()
        if key == transform.Jvp and outer:
            return True
        outer = outer or key in (transform.Grad, transform.Jvp)
    return any(i.key() == transform.Vmap for i in stack) and any(
        t is not None and _unwrapped(t).requires_grad for t in tensors)


def _native_gated(x, weight_gate, bias_gate, weight_up, bias_up, act: Act) -> torch.Tensor:
    """act(gate) * up in native ops (where _composes_native holds)."""
    return act.reference(F.linear(x, weight_gate, bias_gate)) * F.linear(x, weight_up, bias_up)


def _autocast(*tensors):
    """Under torch.autocast, casts the inputs to the autocast dtype as nn.Linear does (gradients
    flow back through the casts): the floating tensors of autocast's device but float64 ones;
    otherwise returns them unchanged."""
    if not torch._C._is_any_autocast_enabled():  # the common case, checked in 0.1 us
        return tensors
    device_type = tensors[0].device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64
                 and t.device.type == device_type else t for t in tensors)


def activation(x: torch.Tensor, activation: str | Act = "relu", **params: float) -> torch.Tensor:
    """Applies an activation by name, e.g. ``activation(x, "leaky_relu", negative_slope=0.1)``.

    Parameters take ``torch.nn.functional``'s names and defaults. The output has x's
    shape and dtype (autocast leaves activations in their input dtype).
    """
    act = resolve(activation, **params)
    if _through_ops():
        return ops.activation_forward(x, act.name, act.params)
    if _composes_native(x):
        return act.reference(x)
    return _apply(ActivationFunction, x, act)


def dense(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | Act = "identity",
    **params: float,
) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))`` in one fused op. x: (*, in), weight: (out, in), bias: (out).

    Under ``torch.autocast`` the inputs are cast to the autocast dtype first, as
    ``nn.Linear``'s are, and gradients flow back through the casts.
    """
    act = resolve(activation, **params)
    x, weight, bias = _autocast(x, weight, bias)
    if _composes_native(x, weight, bias):
        return act.reference(F.linear(x, weight, bias))
    return ops.dense(x, weight, bias, act.name, act.params)


def mlp(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None] | None = None,
    activation: str | Act = "relu",
    output_activation: str | Act = "identity",
    **params: float,
) -> torch.Tensor:
    """A stack of dense layers in one op: ``weights[l]``: (W[l+1], W[l]), ``biases[l]``: (W[l+1]) or None.

    Hidden layers apply ``activation`` (with ``params``), the last ``output_activation``
    (a name, or ``bpext.resolve(name, **its_params)``). Equal to the same stack of
    ``F.linear`` + activations, but keeps one tensor per layer for backward.
    """
    hidden = resolve(activation, **params)
    output = resolve(output_activation)
    biases = list(biases) if biases is not None else [None] * len(weights)
    if len(biases) != len(weights):
        raise ValueError(f"mlp: got {len(weights)} weights but {len(biases)} biases")
    for i, (w, b) in enumerate(zip(weights, biases)):  # an empty tensor stands for "no bias" in the op
        if b is not None and b.numel() == 0 and w.dim() == 2 and w.shape[0] > 0:
            raise ValueError(f"mlp: biases[{i}] must be 1-D of size out_features ({w.shape[0]}) or None, "
                             f"got shape {list(b.shape)}")
    x, *tensors = _autocast(x, *weights, *biases)
    n = len(weights)
    # Layer by layer: DTensors (the mlp ops' lists have no sharding rule), where native ops compose
    if any(is_dtensor(t) for t in (x, *tensors)) or _composes_native(x, *tensors):
        for i, (weight, bias) in enumerate(zip(tensors[:n], tensors[n:])):
            x = dense(x, weight, bias, output if i == n - 1 else hidden)
        return x
    return ops.mlp(x, tensors[:n], _op_biases(tensors[n:], x), hidden.name, hidden.params, output.name, output.params)


def gated(
    x: torch.Tensor,
    weight_gate: torch.Tensor,
    weight_up: torch.Tensor,
    bias_gate: torch.Tensor | None = None,
    bias_up: torch.Tensor | None = None,
    activation: str | Act = "silu",
    **params: float,
) -> torch.Tensor:
    """A gated linear unit in one fused op: ``act(x @ weight_gate.T + bias_gate) * (x @ weight_up.T + bias_up)``.

    SwiGLU with ``activation="silu"`` (the default), GeGLU with ``"gelu"``, ReGLU with ``"relu"``.
    x: (*, in), weight_gate and weight_up: (hidden, in) -> (*, hidden). Keeps the two
    pre-activations for backward (native keeps four tensors).
    """
    act = resolve(activation, **params)
    tensors = _autocast(x, weight_gate, bias_gate, weight_up, bias_up)
    if _composes_native(*tensors):
        return _native_gated(*tensors, act)
    save = _builds_graph(*tensors)
    if _through_ops():
        return ops.gated_forward(*tensors, act.name, act.params, save)[0]
    return _apply(GatedFunction, *tensors, act, save)[0]


def gated_mlp(
    x: torch.Tensor,
    weight_gate: torch.Tensor,
    weight_up: torch.Tensor,
    weight_down: torch.Tensor,
    bias_gate: torch.Tensor | None = None,
    bias_up: torch.Tensor | None = None,
    bias_down: torch.Tensor | None = None,
    activation: str | Act = "silu",
    **params: float,
) -> torch.Tensor:
    """A gated MLP block (LLaMA, Mistral, Qwen, Gemma, T5 v1.1): ``down(act(gate(x)) * up(x))``
    in one op each way. weight_down: (out, hidden). Keeps the two pre-activations only, half of
    what the same block keeps natively; backward recomputes ``act(gate) * up``."""
    act = resolve(activation, **params)
    tensors = _autocast(x, weight_gate, bias_gate, weight_up, bias_up, weight_down, bias_down)
    if _composes_native(*tensors):
        return F.linear(_native_gated(*tensors[:5], act), *tensors[5:])
    save = _builds_graph(*tensors)
    if _through_ops():
        return ops.gated_mlp_forward(*tensors, act.name, act.params, save)[0]
    return _apply(GatedMLPFunction, *tensors, act, save)[0]


def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    divisor: float | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` in one op, the (tokens, vocab)
    logits never whole: input (*, hidden), weight (vocab, hidden), target (*) int64.

    ``ignore_index``, ``reduction`` ("mean", "sum", "none") and ``label_smoothing`` as in
    F.cross_entropy (a mean over only ignored targets is NaN, as natively); ``softcap`` caps the
    logits at ``softcap * tanh(logits / softcap)`` (Gemma 2); ``z_loss`` adds ``z_loss * lse^2``
    per token (PaLM); ``divisor`` divides the summed loss instead of the count of tokens
    (transformers' ``num_items_in_batch`` under gradient accumulation). Computed in float32 for
    16-bit inputs and returned in ``dtype`` (default: input's, as F.cross_entropy; float32 under
    ``torch.autocast``, which casts the inputs first, as ``nn.Linear``'s are).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be > 0 or None, got {softcap}")
    if target.shape != input.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: target must have input's leading shape {tuple(input.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    input, weight, bias = _autocast(input, weight, bias)
    rows, tokens = _rows(input), target.reshape(-1)
    options = (int(ignore_index), float(label_smoothing), float(softcap or 0.0), float(z_loss), reduction,
               None if divisor is None else float(divisor))
    in_forward = reduction != "none" and input.dtype != torch.float16 and _builds_graph(input, weight, bias)
    mask = tuple(in_forward and t is not None and t.requires_grad for t in (input, weight, bias))
    if _through_ops():
        loss = ops.linear_cross_entropy_forward(rows, weight, bias, tokens, *options, list(mask))[0]
    else:
        loss = LinearCrossEntropyFunction.apply(rows, weight, bias, tokens, options, mask)[0]
    if dtype is None:  # autocast computes cross-entropy in float32 (float64 in float64)
        autocast = torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(input.device.type)
        dtype = torch.float32 if autocast and input.dtype != torch.float64 else input.dtype
    loss = loss.to(dtype)
    return loss.reshape(target.shape) if reduction == "none" else loss
