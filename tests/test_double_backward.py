"""Second derivatives: gradgradcheck on the real kernels, and gradient-penalty training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bpext
from conftest import DEVICES
from conftest import NON_DEFAULT_PARAMS as CHECK_PARAMS


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


@pytest.mark.parametrize("fuse", [False, True], ids=["dense", "mlp"])
def test_gradient_penalty_training_matches_native(fuse):
    """Fit f(x) = sin(3x) and f'(x) = 3 cos(3x) (a physics-style loss on the input gradient)."""
    torch.manual_seed(0)
    second = nn.Tanh() if fuse else nn.GELU()  # an MLP has one hidden activation
    native = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), second, nn.Linear(32, 1)).double()
    ours = bpext.convert(copy.deepcopy(native), fuse=fuse)
    assert bpext.fusions(ours) == ({"": ["mlp(0, 2, 4, tanh, identity)"]} if fuse else {})
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gated", "gated_mlp"])
@pytest.mark.parametrize("name", ["silu", "gelu", "tanh"])
def test_gated_gradgradcheck(device, kind, name):
    x = away_from_kinks(3, 4, device=device)
    wg, wu = away_from_kinks(5, 4, device=device, seed=1), away_from_kinks(5, 4, device=device, seed=2)
    bg, bu = away_from_kinks(5, device=device, seed=3), away_from_kinks(5, device=device, seed=4)
    if kind == "gated":
        fn = lambda x, wg, wu, bg, bu: bpext.functional.gated(x, wg, wu, bg, bu, name)  # noqa: E731
        inputs = (x, wg, wu, bg, bu)
    else:
        wd, bd = away_from_kinks(2, 5, device=device, seed=5), away_from_kinks(2, device=device, seed=6)
        fn = lambda x, wg, wu, wd, bg, bu, bd: bpext.functional.gated_mlp(x, wg, wu, wd, bg, bu, bd, name)  # noqa
        inputs = (x, wg, wu, wd, bg, bu, bd)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("layer", ["activation", "dense", "mlp", "gated_mlp"])
@pytest.mark.parametrize("name", ["tanh", "gelu", "relu"])
def test_third_derivative_raises_instead_of_a_wrong_number(layer, name):
    """A third derivative would need the activation's third derivative: a clear error, never a wrong number."""
    x = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.7], [-0.4]], dtype=torch.float64)
    fn = {
        "activation": lambda t: bpext.functional.activation(t, name),
        "dense": lambda t: bpext.functional.dense(t.unsqueeze(-1), w[:1], activation=name).squeeze(-1),
        "mlp": lambda t: bpext.functional.mlp(t.unsqueeze(-1), [w[:1], w[:1]], activation=name).squeeze(-1),
        "gated_mlp": lambda t: bpext.functional.gated_mlp(t.unsqueeze(-1), w[:1], w[1:], w[:1], activation=name
                                                          ).squeeze(-1),
    }[layer]
    (d1,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="up to the second order"):
        torch.autograd.grad(d2.sum(), x)


def test_second_derivative_of_tanh_equals_native():
    """The case that was silently wrong at third order: first and second orders stay exact."""
    x = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (lambda t: bpext.functional.activation(t, "tanh"), torch.tanh):
        (d1,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), x)
        results.append((d1.detach(), d2))
    torch.testing.assert_close(results[0], results[1])
