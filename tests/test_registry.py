"""One list per activation: the kernels' list (activations.h) and the Python table agree, and
everything else (modules, convert's mappings, rules) is generated from them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bpext
from bpext.activations import REGISTRY, TORCH


def test_python_table_matches_the_kernels_list():
    """Names, order, save policy and parameters come from the extension; the Python table has a line for each."""
    table = torch.ops.bpext._activation_table().splitlines()
    assert [line.split()[0] for line in table] == list(bpext.ACTIVATIONS) == list(TORCH)
    for line in table:
        name, saves, *params = line.split()
        spec = REGISTRY[name]
        assert spec.saves == saves in ("output", "input", "nothing")
        assert [f"{p.name}={p.default:g}:{p.rule}" for p in spec.params] == params


@pytest.mark.parametrize("name", bpext.ACTIVATIONS)
def test_parameters_are_the_torch_functional_keywords(name):
    """Each parameter is a keyword of the torch reference, with its default."""
    spec = REGISTRY[name]
    x = torch.linspace(-5, 5, 41, dtype=torch.float64)
    defaults = {p.name: p.default for p in spec.params}
    torch.testing.assert_close(spec.torch.reference(x, **defaults), spec.torch.reference(x))


@pytest.mark.parametrize("name", [n for n in bpext.ACTIVATIONS if REGISTRY[n].torch.module not in (None, nn.Identity)])
def test_bpext_modules_are_torch_nn_twins(name):
    """bpext.nn.<Name> subclasses torch.nn.<Name>: same arguments, attributes, repr; bpext's kernels."""
    spec = REGISTRY[name]
    twin = getattr(bpext.nn, spec.torch.module.__name__)
    assert issubclass(twin, spec.torch.module) and twin.__module__ == "bpext.nn"
    kwargs = {**spec.torch.fixed, **{p.name: p.default * 0.5 + 0.25 for p in spec.params}}
    ours, native = twin(**kwargs), spec.torch.module(**kwargs)
    assert repr(ours) == repr(native)
    assert bpext.nn.activation_of(ours) == bpext.nn.activation_of(native) == bpext.resolve(
        name, **{p.name: kwargs[p.name] for p in spec.params})
    x = torch.randn(7, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), native(x))


def test_activation_without_a_torch_module_gets_its_own():
    x = torch.randn(10, dtype=torch.float64)
    torch.testing.assert_close(bpext.nn.QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    assert isinstance(bpext.nn.torch_activation(bpext.resolve("quick_gelu")), bpext.nn.QuickGELU)


def test_rules_live_in_the_kernels():
    """Parameter rules are checked by the kernels' list, for modules at construction too."""
    with pytest.raises(ValueError, match="softplus beta must be finite and nonzero"):
        bpext.resolve("softplus", beta=0.0)
    with pytest.raises(ValueError, match="leaky_relu negative_slope must be finite"):
        bpext.nn.LeakyReLU(float("nan"))
    with pytest.raises(ValueError, match="softplus threshold must not be NaN"):
        bpext.nn.Dense(2, 2, activation="softplus", threshold=float("nan"))
    assert bpext.resolve("elu", alpha=-0.5).params == (-0.5,)  # negative alpha: as native allows
    assert bpext.resolve("softplus", threshold=float("inf")).params == (1.0, float("inf"))
