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


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_double_backward(device):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    for act, p0, p1 in (("gelu", 0.0, 0.0), ("tanh", 0.0, 0.0), ("softplus", 2.0, 5.0)):
        torch.library.opcheck(torch.ops.bpext.activation_double_backward.default,
                              (rnd(3, 4), rnd(3, 4), rnd(3, 4), act, p0, p1))


def test_gradient_penalty_training_matches_native():
    """Fit f(x) = sin(3x) and f'(x) = 3 cos(3x) (a physics-style loss on the input gradient)."""
    torch.manual_seed(0)
    native = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 1)).double()
    ours = bpext.convert(copy.deepcopy(native), fuse_mlp=False)
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


def test_mlp_double_backward_is_refused_clearly():
    mlp = bpext.nn.MLP(3, [4], 2, activation="tanh")
    x = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="MLP does not support double backward yet"):
        torch.autograd.grad(mlp(x).sum(), x, create_graph=True)
