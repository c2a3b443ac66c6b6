"""Calls every bpext op (bpext.OPS, and ``dense`` and ``mlp`` with their C++ autograd) with
random, mostly wrong, arguments: ranks 0-3, sizes 0-4, dtypes, meta tensors mixed in, None where
a tensor is optional, lists too short or too long, inputs that need a gradient. Each call must return or
raise a Python exception, and backward of what returned must run; a crash kills this process
(run it in a subprocess: tests/test_robustness.py). Where a forward op returns, its outputs have
the shapes its fake implementation predicts and its values are those of native PyTorch.

    python tests/fuzz_ops.py SEED CALLS
"""

from __future__ import annotations

import random
import sys

import torch
import torch.nn.functional as F

import bpext

ops = torch.ops.bpext
EAGER_OPS = ("dense", "mlp")  # the ops with their autograd in C++ (kernels/autograd.cpp)


def tensor(rng: random.Random, shape=None, dtype=None):
    if shape is None:
        shape = [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]
    dtype = dtype or rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.int64])
    device = "meta" if rng.random() < 0.08 else "cpu"
    t = torch.randn(shape, generator=torch.Generator().manual_seed(rng.randint(0, 2**31))) * 3
    return t.to(dtype=dtype, device=device)


def activation(rng):
    name = rng.choice(bpext.ACTIVATIONS + ("nope",))
    spec = bpext.activations.REGISTRY.get(name)
    n = len(spec.params) if spec else 0
    n = n if rng.random() < 0.9 else rng.randint(0, 3)
    return name, [rng.choice([0.5, 2.0, -1.0, 0.0, 1e300, float("nan"), float("inf")]) for _ in range(n)]


def related(rng, rows, features, dtype):
    """A tensor that usually fits (rows..., features), sometimes not."""
    if rng.random() < 0.75:
        return tensor(rng, [*rows, features], dtype)
    return tensor(rng)


def sample(rng, op: str):
    dtype = rng.choice([torch.float32, torch.float64, torch.bfloat16])
    rows = [rng.randint(0, 4) for _ in range(rng.randint(0, 2))]
    fin, hidden, fout = rng.randint(0, 4), rng.randint(0, 5), rng.randint(0, 4)
    act, params = activation(rng)
    x = related(rng, rows, fin, dtype)
    maybe = lambda t: t if rng.random() < 0.8 else None  # noqa: E731
    w, b = related(rng, [fout], fin, dtype), maybe(related(rng, [], fout, dtype))
    wg, wu, wd = related(rng, [hidden], fin, dtype), related(rng, [hidden], fin, dtype), related(rng, [fout], hidden, dtype)
    bg, bu, bd = maybe(related(rng, [], hidden, dtype)), maybe(related(rng, [], hidden, dtype)), maybe(related(rng, [], fout, dtype))
    gy, gh = related(rng, rows, fout, dtype), related(rng, rows, hidden, dtype)
    mask = lambda n: [rng.random() < 0.7 for _ in range(n)]  # noqa: E731
    if op == "activation_forward":
        return (x, act, params)
    if op == "activation_backward":
        return (x, related(rng, rows, fin, dtype), act, params)
    if op == "activation_double_backward":
        return (x, related(rng, rows, fin, dtype), related(rng, rows, fin, dtype), act, params)
    if op == "dense_forward":
        return (x, w, b, act, params, rng.random() < 0.5)
    if op == "dense":  # with its C++ autograd: inputs that need a gradient, sometimes
        for t in (x, w, b):
            if t is not None and t.is_floating_point() and rng.random() < 0.5:
                t.requires_grad_(True)
        return (x, w, b, act, params)
    if op == "dense_backward":
        return (gy, maybe(x), w, related(rng, rows, fout, dtype), act, params, mask(3))
    if op == "gated_forward":
        return (x, wg, bg, wu, bu, act, params, rng.random() < 0.5)
    if op == "gated_backward":
        return (gh, maybe(x), maybe(wg), maybe(wu), related(rng, rows, hidden, dtype), related(rng, rows, hidden, dtype),
                act, params, mask(5))
    if op == "gated_mlp_forward":
        return (x, wg, bg, wu, bu, wd, bd, act, params, rng.random() < 0.5)
    if op == "gated_mlp_backward":
        return (gy, maybe(x), maybe(wg), maybe(wu), maybe(wd), related(rng, rows, hidden, dtype),
                related(rng, rows, hidden, dtype), act, params, mask(7))
    if op.startswith("linear_cross_entropy"):
        tokens = rng.randint(0, 4)
        target = (torch.tensor([rng.choice([-100, -1, 0, 1, 2, 3, 7]) for _ in range(tokens)], dtype=torch.int64)
                  if rng.random() < 0.9 else tensor(rng))
        reduction = rng.choice(["mean", "sum", "none", "avg"])
        options = (rng.choice([-100, 0]), rng.choice([0.0, 0.1, 1.5]), rng.choice([0.0, 30.0, -1.0]),
                   rng.choice([0.0, 1e-4, float("nan")]), reduction, rng.choice([None, 4.0, 0.0]))
        xl = related(rng, [tokens], fin, dtype)
        if op == "linear_cross_entropy_forward":
            return (xl, w, b, target, *options, mask(3))
        grad_loss = tensor(rng, [tokens] if reduction == "none" else [], dtype) if rng.random() < 0.9 else tensor(rng)
        return (grad_loss, xl, w, b, target, *options)
    layers = rng.randint(0, 3)
    widths = [fin] + [rng.randint(0, 4) for _ in range(layers)]
    ws = [related(rng, [b_], a, dtype) for a, b_ in zip(widths[:-1], widths[1:])]
    bs = [related(rng, [], b_, dtype) if rng.random() < 0.8 else torch.empty(0, dtype=dtype) for b_ in widths[1:]]
    if rng.random() < 0.1:
        bs = bs[:-1] + [None, None]  # not a list of tensors
    out_act, out_params = activation(rng)
    if op == "mlp_forward":
        return (x, ws, bs, act, params, out_act, out_params, rng.random() < 0.5)
    if op == "mlp":  # with its C++ autograd: inputs that need a gradient, sometimes
        for t in (x, *ws, *bs):
            if t is not None and t.is_floating_point() and rng.random() < 0.5:
                t.requires_grad_(True)
        return (x, ws, bs, act, params, out_act, out_params)
    saved = [related(rng, rows, b_, dtype) for b_ in widths[1:]]
    return (related(rng, rows, widths[-1], dtype), x, related(rng, rows, widths[-1], dtype), ws, bs, saved, act, params,
            out_act, out_params, rng.random() < 0.5)


def native(op: str, args):
    """What native PyTorch computes for a forward op's first output (or raises)."""
    if op == "activation_forward":
        x, name, params = args
        return bpext.activations.resolve_by_values(name, tuple(params)).reference(x)
    if op in ("dense_forward", "dense"):
        x, w, b, name, params, *_ = args
        return bpext.activations.resolve_by_values(name, tuple(params)).reference(F.linear(x, w, b))
    if op == "gated_forward":
        x, wg, bg, wu, bu, name, params, _ = args
        act = bpext.activations.resolve_by_values(name, tuple(params))
        return act.reference(F.linear(x, wg, bg)) * F.linear(x, wu, bu)
    if op == "linear_cross_entropy_forward":
        x, w, b, target, ignore_index, smoothing, softcap, z_loss, reduction, divisor, _ = args
        if softcap or z_loss or divisor is not None:
            return None
        return F.cross_entropy(F.linear(x, w, b), target, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=smoothing)
    return None


def check_call(op: str, args) -> str:
    try:
        out = getattr(ops, op)(*args)
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError):
        return "raised"
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    meta_args = torch.utils._pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, args)
    expected = getattr(ops, op)(*meta_args)
    shapes = [t.shape for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    assert [t.shape for t in leaves] == shapes, (op, [t.shape for t in leaves], shapes)
    if leaves[0].requires_grad:  # backward of what forward accepted never fails
        leaves[0].sum().backward()
    if any(t.device.type == "meta" for t in leaves):
        return "returned"
    try:
        reference = native(op, args)
    except Exception:  # native refuses inputs that bpext computes (e.g. a parameter bpext allows): no reference
        reference = None
    if reference is not None:
        dtype = leaves[0].dtype
        tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
        torch.testing.assert_close(leaves[0], reference.to(dtype), rtol=tol, atol=tol, equal_nan=True,
                                   msg=lambda m: f"{op}: {m}")
    return "returned"


def main(seed: int, calls: int) -> None:
    rng = random.Random(seed)
    counts = {"raised": 0, "returned": 0}
    for i in range(calls):
        op = rng.choice(bpext.OPS + EAGER_OPS)
        args = sample(rng, op)
        print(f"{i} {op}", file=sys.stderr, flush=True)  # the last line names the call that crashed
        counts[check_call(op, args)] += 1
    print(f"fuzz: {calls} calls, {counts['raised']} raised a Python exception, {counts['returned']} returned "
          f"the right answer")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
