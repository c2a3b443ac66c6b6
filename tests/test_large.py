"""Tensors past 2^31 elements (int64 indexing). Marked slow: run with `make test-slow`."""

from __future__ import annotations

import pytest
import torch

import bpext

PERIOD = 997  # a prime period: an index off by a multiple of 2^31 lands on a different value


@pytest.mark.slow
@pytest.mark.parametrize("name", ["relu", "gelu"])
def test_activation_over_2_pow_31_elements_cpu(name):
    n = 2**31 + 1000
    pattern = torch.linspace(-4, 4, PERIOD, dtype=torch.bfloat16)
    x = torch.empty(n, dtype=torch.bfloat16)
    full = n // PERIOD * PERIOD
    x[:full].view(-1, PERIOD).copy_(pattern)
    x[full:] = pattern[: n - full]
    y = bpext.functional.activation(x, name)
    ref = bpext.resolve(name).reference
    for part in (slice(0, 5000), slice(2**31 - 2500, 2**31 + 2500), slice(n - 5000, n)):
        torch.testing.assert_close(y[part], ref(x[part]), rtol=2e-2, atol=2e-2)
    g = bpext._ops.ops.activation_backward(y, y if name == "relu" else x, name, [])
    assert g.shape == x.shape
    torch.testing.assert_close(g[-3000:], bpext._ops.ops.activation_backward(
        y[-3000:], (y if name == "relu" else x)[-3000:], name, []))
