"""torch.func and forward-mode AD on bpext, each against the same code on native layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import bpext
from conftest import DEVICES

B = bpext.functional


def rnd(*shape, device="cpu", seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(device)


# name: (bpext fn, native fn, input shapes); every fn takes (x, *params)
LAYERS = {
    "activation-gelu": (lambda x: B.activation(x, "gelu"), F.gelu, [(4, 3)]),
    "activation-tanh": (lambda x: B.activation(x, "tanh"), torch.tanh, [(4, 3)]),
    "dense-silu": (lambda x, w, b: B.dense(x, w, b, "silu"), lambda x, w, b: F.silu(F.linear(x, w, b)),
                   [(4, 3), (5, 3), (5,)]),
    "dense-relu": (lambda x, w, b: B.dense(x, w, b, "relu"), lambda x, w, b: F.relu(F.linear(x, w, b)),
                   [(4, 3), (5, 3), (5,)]),
    "mlp-tanh": (lambda x, w1, w2, b1: B.mlp(x, [w1, w2], [b1, None], "tanh"),
                 lambda x, w1, w2, b1: F.linear(torch.tanh(F.linear(x, w1, b1)), w2), [(4, 3), (6, 3), (2, 6), (6,)]),
    "mlp-gelu": (lambda x, w1, w2, b1: B.mlp(x, [w1, w2], [b1, None], "gelu", "sigmoid"),
                 lambda x, w1, w2, b1: torch.sigmoid(F.linear(F.gelu(F.linear(x, w1, b1)), w2)),
                 [(4, 3), (6, 3), (2, 6), (6,)]),
    "gated": (lambda x, wg, wu, bg: B.gated(x, wg, wu, bg, None, "silu"),
              lambda x, wg, wu, bg: F.silu(F.linear(x, wg, bg)) * F.linear(x, wu), [(4, 3), (5, 3), (5, 3), (5,)]),
    "gated_mlp": (lambda x, wg, wu, wd: B.gated_mlp(x, wg, wu, wd, activation="gelu"),
                  lambda x, wg, wu, wd: F.linear(F.gelu(F.linear(x, wg)) * F.linear(x, wu), wd),
                  [(4, 3), (5, 3), (5, 3), (2, 5)]),
}


def inputs_of(name, device):
    return [rnd(*shape, device=device, seed=i) for i, shape in enumerate(LAYERS[name][2])]


def both(name, transform, device="cpu"):
    ours, native, _ = LAYERS[name]
    args = inputs_of(name, device)
    return transform(ours, args), transform(native, args)


def assert_same(a, b):
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", LAYERS)
def test_vmap_over_batched_inputs_and_batched_parameters(name, device):
    """Batched inputs (folded into rows); every argument batched too (model ensembling)."""
    assert_same(*both(name, lambda f, a: vmap(f, in_dims=(0,) + (None,) * (len(a) - 1))(a[0].unsqueeze(0).expand(
        3, *a[0].shape).contiguous(), *a[1:]), device))
    assert_same(*both(name, lambda f, a: vmap(f)(*[t.unsqueeze(0).expand(2, *t.shape) * torch.tensor(
        [1.0, -0.5], dtype=t.dtype, device=t.device).view(2, *[1] * t.dim()) for t in a]), device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd", "hessian", "jvp", "per-sample"])
def test_transforms_match_native(name, transform, device):
    all_args = tuple(range(len(LAYERS[name][2])))
    transforms = {
        "grad": lambda f, a: grad(lambda *t: f(*t).square().sum(), argnums=all_args)(*a),
        "jacrev": lambda f, a: jacrev(f, argnums=all_args)(*a),
        "jacfwd": lambda f, a: jacfwd(f, argnums=all_args)(*a),
        "hessian": lambda f, a: hessian(lambda x: f(x, *a[1:]).sum())(a[0]),
        "jvp": lambda f, a: jvp(f, tuple(a), tuple(torch.ones_like(t) for t in a)),
        # per-sample gradients of the parameters, each row of x a sample
        "per-sample": lambda f, a: vmap(grad(lambda p, x: f(x.unsqueeze(0), *p).square().sum()),
                                        in_dims=(None, 0))(tuple(a[1:]), a[0]) if len(a) > 1 else
        vmap(grad(lambda x: f(x).square().sum()))(a[0]),
    }
    assert_same(*both(name, transforms[transform], device))


@pytest.mark.parametrize("name", LAYERS)
def test_forward_mode_ad_and_gradcheck_with_batched_and_forward_grads(name):
    ours, native, _ = LAYERS[name]
    args = [t.requires_grad_(True) for t in inputs_of(name, "cpu")]
    assert torch.autograd.gradcheck(ours, args, check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)
    tangents = [torch.ones_like(t) for t in args]
    results = []
    for f in (ours, native):
        with fwAD.dual_level():
            out = f(*[fwAD.make_dual(t.detach(), u) for t, u in zip(args, tangents)])
            results.append(fwAD.unpack_dual(out).tangent)
    torch.testing.assert_close(results[0], results[1])


def test_per_sample_gradients_of_a_converted_model_equal_native():
    """Differential-privacy style: vmap(grad(functional_call)) over a bpext model and its native twin."""
    torch.manual_seed(0)
    native = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3)).double()
    ours = bpext.convert(copy.deepcopy(native))
    assert bpext.fusions(ours)
    x, target = rnd(8, 6), rnd(8, 3, seed=1)
    results = []
    for model in (ours, native):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xi, ti, model=model):
            return F.mse_loss(functional_call(model, p, (xi.unsqueeze(0),)), ti.unsqueeze(0))

        results.append(vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target))
    for key in results[1]:
        torch.testing.assert_close(results[0][key], results[1][key])


def test_model_ensembling_with_stacked_parameters():
    from torch.func import stack_module_state

    torch.manual_seed(0)
    models = [bpext.nn.MLP(4, [8], 2, activation="silu", dtype=torch.float64) for _ in range(3)]
    params, buffers = stack_module_state(models)
    x = rnd(5, 4)
    base = models[0]
    out = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x))
