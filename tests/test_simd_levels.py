"""One build runs on any x86-64 CPU: the CPU kernels are built per SIMD level and bpext loads the
one torch runs at; every level computes the same functions."""

from __future__ import annotations

import os

import pytest
import torch

import bpext
from conftest import run_python

BUILT = [level for level in bpext.SIMD_LEVELS
         if any(f.startswith(f"_cpu_{level}.") for f in os.listdir(os.path.dirname(bpext.__file__)))]


def test_loads_the_level_torch_runs_at():
    wanted = (os.environ.get("BPEXT_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()).lower()
    expected = next((level for level in bpext.SIMD_LEVELS[bpext.SIMD_LEVELS.index(wanted):] if level in BUILT)
                    if wanted in bpext.SIMD_LEVELS else BUILT[-1])
    assert bpext.CPU_KERNELS == expected
    assert os.path.basename(torch.ops.bpext._cpu_kernels()).startswith(f"_cpu_{expected}.")


@pytest.mark.parametrize("level", BUILT)
def test_every_level_computes_the_same_functions(level):
    """In a child process that loads that level: every activation, a dense layer and a fused MLP
    against native, forward and backward."""
    result = run_python(f"""
        import torch, bpext
        assert bpext.CPU_KERNELS == {level!r}, bpext.CPU_KERNELS
        torch.manual_seed(0)
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
            x = (torch.randn(257, 48, dtype=torch.float64) * 3).to(dtype)
            w = (torch.randn(40, 48, dtype=torch.float64) / 7).to(dtype)
            for name in bpext.ACTIVATIONS:
                act = bpext.resolve(name)
                for ours_fn, native_fn in ((lambda t: bpext.functional.activation(t, act), act.reference),
                                           (lambda t: bpext.functional.dense(t, w, None, act),
                                            lambda t: act.reference(torch.nn.functional.linear(t, w)))):
                    results = []
                    for fn in (ours_fn, native_fn):
                        xi = x.clone().requires_grad_(True)
                        y = fn(xi)
                        results.append((y, torch.autograd.grad(y.sum(), xi)[0]))
                    torch.testing.assert_close(results[0], results[1], **tol)
            mlp = bpext.nn.MLP(48, [32, 32], 8, activation="gelu", dtype=dtype)
            torch.testing.assert_close(mlp(x), mlp.to_sequential()(x), **tol)
        print("ok")
    """, env={**os.environ, "BPEXT_CPU_CAPABILITY": level.upper()})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
