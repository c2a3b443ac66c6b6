"""Second derivatives: gradgradcheck on the real kernels, and gradient-penalty training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bpext
from bpext.check import CHECK_PARAMS
from conftest import DEVICES


def away_from_kinks(*shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = torch.where(x.abs() < 0.1, x + 0.3, x)
    return x.to(device).requires_grad_(True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", bpext.ACTIVATIONS)
def test_activation_gradgradcheck(device, name):
    params = CHECK_PARAMS.get(name, {})
    x = away_from_kinks(4, 5, device=device)
    fn = lambda t: bpext.functional.activation(t, name, **params)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", bpext.ACTIVATIONS)
@pytest.mark.parametrize("shape,bias", [((5, 4), True), ((2, 3, 4), False)], ids=["2d-bias", "3d-nobias"])
def test_dense_gradgradcheck(device, name, shape, bias):
    params = CHECK_PARAMS.get(name, {})
    x = away_from_kinks(*shape, device=device, seed=1)
    w = away_from_kinks(3, 4, device=device, seed=2)
    inputs = (x, w, away_from_kinks(3, device=device, seed=3)) if bias else (x, w)
    fn = lambda *t: bpext.functional.dense(*t, activation=name, **params)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("fuse_mlp", [False, True], ids=["dense", "mlp"])
def test_gradient_penalty_training_matches_native(fuse_mlp):
    """Fit f(x) = sin(3x) and f'(x) = 3 cos(3x) (a physics-style loss on the input gradient)."""
    torch.manual_seed(0)
    second = nn.Tanh() if fuse_mlp else nn.GELU()  # an MLP has one hidden activation
    native = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), second, nn.Linear(32, 1)).double()
    ours = bpext.convert(copy.deepcopy(native), fuse_mlp=fuse_mlp)
    assert isinstance(ours[0], bpext.nn.MLP if fuse_mlp else bpext.nn.Dense)
    x = torch.linspace(-1, 1, 64, dtype=torch.float64).unsqueeze(1)
    losses = {}
    for key, model in (("native", native), ("bpext", ours)):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        history = []
        for _ in range(30):
            xi = x.clone().requires_grad_(True)
            y = model(xi)
            (dy,) = torch.autograd.grad(y.sum(), xi, create_graph=True)
            loss = (y - torch.sin(3 * xi)).pow(2).mean() + (dy - 3 * torch.cos(3 * xi)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(loss.item())
        losses[key] = history
    torch.testing.assert_close(torch.tensor(losses["bpext"]), torch.tensor(losses["native"]), rtol=1e-6, atol=1e-9)
    assert losses["bpext"][-1] < 0.5 * losses["bpext"][0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hidden,output", [("tanh", "identity"), ("gelu", "sigmoid"), ("silu", "softplus"),
                                           ("elu", "tanh")])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_mlp_gradgradcheck(device, hidden, output, bias):
    x = away_from_kinks(5, 3, device=device)
    ws = [away_from_kinks(4, 3, device=device, seed=1), away_from_kinks(2, 4, device=device, seed=2)]
    bs = [away_from_kinks(4, device=device, seed=3), away_from_kinks(2, device=device, seed=4)] if bias else []

    def fn(x, *params):
        return bpext.functional.mlp(x, list(params[:2]), list(params[2:]) or None, hidden, output)

    assert torch.autograd.gradgradcheck(fn, (x, *ws, *bs))


def test_mlp_double_backward_only_where_asked():
    """A gradient penalty on the input gradient reaches exactly the tensors that require grad."""
    torch.manual_seed(0)
    ours = bpext.nn.MLP(3, [4, 4], 2, activation="gelu", dtype=torch.float64)
    ours.layers[1].bias.requires_grad_(False)
    native = copy.deepcopy(ours.to_sequential())
    results = []
    for model in (ours, native):
        x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        (dx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        dx.pow(2).sum().backward()
        results.append([x.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    assert ours.layers[1].bias.grad is None
