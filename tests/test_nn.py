"""Modules and convert(): nn.Linear compatibility, state dicts, fused conversion of real models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bpext
from conftest import DEVICES


def test_dense_initialises_like_linear():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5)
    torch.manual_seed(0)
    dense = bpext.nn.Dense(7, 5)
    torch.testing.assert_close(dense.weight, lin.weight, rtol=0, atol=0)
    torch.testing.assert_close(dense.bias, lin.bias, rtol=0, atol=0)


def test_dense_state_dict_both_ways():
    lin = nn.Linear(6, 4)
    dense = bpext.nn.Dense(6, 4, activation="relu")
    dense.load_state_dict(lin.state_dict())
    x = torch.randn(3, 6)
    torch.testing.assert_close(dense(x), torch.relu(lin(x)))
    lin2 = nn.Linear(6, 4)
    lin2.load_state_dict(dense.state_dict())
    torch.testing.assert_close(lin2(x), lin(x))
    no_bias = bpext.nn.Dense(6, 4, bias=False)
    assert set(no_bias.state_dict()) == {"weight"} and no_bias.bias is None


@pytest.mark.parametrize("device", DEVICES)
def test_dense_device_dtype_kwargs(device):
    layer = bpext.nn.Dense(3, 2, device=device, dtype=torch.float64)
    assert layer.weight.device.type == device and layer.weight.dtype == torch.float64
    assert layer(torch.randn(4, 3, device=device, dtype=torch.float64)).dtype == torch.float64


def test_repr_names_activation_and_params():
    assert "activation=elu(alpha=0.5)" in repr(bpext.nn.Dense(2, 3, activation="elu", alpha=0.5))
    assert repr(bpext.nn.Softplus(beta=2.0)) == "Softplus(beta=2.0, threshold=20.0)"
    assert repr(bpext.nn.Activation("softplus", beta=2.0)) == "Activation(softplus(beta=2.0, threshold=20.0))"


MODULE_PAIRS = [
    (bpext.nn.ReLU(), nn.ReLU()),
    (bpext.nn.LeakyReLU(0.2), nn.LeakyReLU(0.2)),
    (bpext.nn.ELU(0.7), nn.ELU(0.7)),
    (bpext.nn.GELU(), nn.GELU()),
    (bpext.nn.GELU("tanh"), nn.GELU("tanh")),
    (bpext.nn.SiLU(), nn.SiLU()),
    (bpext.nn.Mish(), nn.Mish()),
    (bpext.nn.Sigmoid(), nn.Sigmoid()),
    (bpext.nn.Tanh(), nn.Tanh()),
    (bpext.nn.Softplus(2.0, 3.0), nn.Softplus(2.0, 3.0)),
    (bpext.nn.Hardswish(), nn.Hardswish()),
    (bpext.nn.LeakyReLU(-0.3), nn.LeakyReLU(-0.3)),
]


@pytest.mark.parametrize("ours,native", MODULE_PAIRS, ids=lambda m: repr(m))
def test_activation_modules_match_torch_nn(ours, native):
    x = torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(ours(x), native(x))


def mlp():
    return nn.Sequential(
        nn.Linear(10, 32), nn.GELU(),
        nn.Linear(32, 32), nn.ReLU(inplace=True),
        nn.Linear(32, 16), nn.Softplus(beta=2.0),
        nn.Linear(16, 8), nn.Tanh(),
        nn.Linear(8, 4),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_convert_sequential_mlp(device):
    torch.manual_seed(0)
    native = mlp().to(device)
    model = bpext.convert(copy.deepcopy(native), fuse=False)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Dense", "GELU", "Dense", "ReLU", "Dense", "Softplus", "Dense", "Tanh", "Dense"]
    # ReLU(inplace=True) stays torch's: code may rely on its write into the input
    assert [type(m).__module__ == "bpext.nn" for m in model] == [True, True, True, False, True, True, True, True, True]
    assert model.state_dict().keys() == native.state_dict().keys()
    x = torch.randn(64, 10, device=device)
    y, y_ref = model(x), native(x)
    torch.testing.assert_close(y, y_ref)
    y.square().mean().backward()
    y_ref.square().mean().backward()
    for p, p_ref in zip(model.parameters(), native.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad)


def test_convert_nested_and_standalone():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.act = nn.SiLU()
            self.attn = nn.MultiheadAttention(4, 1)

        def forward(self, x):
            return self.act(self.proj(x))

    model = nn.Sequential(Block(), nn.Mish())
    bpext.convert(model)
    assert bpext.fusions(model) == {"0": ["dense(proj, silu)"]}
    assert isinstance(model[0].proj, bpext.nn.Dense) and isinstance(model[0].act, bpext.nn.SiLU)
    assert type(model[0].attn.out_proj) is not bpext.nn.Dense  # attention reads its weight directly
    assert isinstance(model[1], bpext.nn.Mish)
    assert isinstance(bpext.convert(nn.ReLU()), bpext.nn.ReLU)


def test_convert_swaps_in_place_keeping_hooks():
    lin = nn.Linear(3, 3)
    calls = []
    lin.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    model = nn.Sequential(lin)
    bpext.convert(model)
    assert model[0] is lin and type(lin) is bpext.nn.Dense
    model(torch.randn(2, 3))
    assert calls == ["Dense"]


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "layers"])
def test_activation_checkpointing_gives_native_gradients(use_reentrant, fuse):
    """torch.utils.checkpoint (what gradient_checkpointing_enable() uses): forward recomputed in
    backward, through the C++ autograd of the dense layers and of the fused MLP."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    native = mlp().double()
    model = bpext.convert(copy.deepcopy(native), fuse=fuse)
    grads = []
    for m in (model, native):
        x = torch.randn(16, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        checkpoint(m, x, use_reentrant=use_reentrant).square().sum().backward()  # reentrant: no .grad()
        grads.append([x.grad, *(p.grad for p in m.parameters())])
    torch.testing.assert_close(grads[0], grads[1])
