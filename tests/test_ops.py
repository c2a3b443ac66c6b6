"""The registered ops: opcheck on every op, CUDA kernels present in CUDA builds, torch.compile."""

from __future__ import annotations

import os

import pytest
import torch

import bpext
from bpext import _ops
from conftest import DEVICES

OPS = torch.ops.bpext


def op_samples(device):
    """(op, args) covering every op, with and without bias, 2-D and 3-D, saves-y and saves-z activations."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    x2, x3, w, b = rnd(6, 5), rnd(2, 3, 5), rnd(4, 5), rnd(4)
    samples = []
    for act, p0, p1 in (("relu", 0.0, 0.0), ("gelu", 0.0, 0.0), ("softplus", 2.0, 5.0), ("identity", 0.0, 0.0)):
        z = rnd(3, 7)
        samples.append((OPS.activation_forward.default, (z, act, p0, p1)))
        samples.append((OPS.activation_backward.default, (rnd(3, 7), z, act, p0, p1)))
        samples.append((OPS.activation_double_backward.default, (rnd(3, 7), rnd(3, 7), z, act, p0, p1)))
        for x in (x2, x3):
            saves_y = bpext.activations.REGISTRY[act].saves_output
            for bias in (b, None):
                samples.append((OPS.dense_forward.default, (x, w, bias, act, p0, p1, not saves_y)))
            gy = rnd(*x.shape[:-1], 4)
            saved = rnd(*x.shape[:-1], 4) if act != "identity" else rnd(0)
            for mask in ([True, True, True], [False, True, False], [True, False, False]):
                samples.append((OPS.dense_backward.default, (gy, x, w, saved, act, p0, p1, mask)))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    samples = op_samples(device)
    assert {op._name for op, _ in samples} == {f"bpext::{name}" for name in bpext.OPS}
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_cuda_kernels_built_with_cuda_torch():
    """A CUDA torch with nvcc must produce CUDA kernels for every op (CI builds them)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        pytest.skip("CPU-only torch or no CUDA toolkit: CUDA kernels are not expected")
    if os.environ.get("BPEXT_FORCE_CPU") == "1":
        pytest.skip("BPEXT_FORCE_CPU=1: built with the CPU kernels only, on purpose")
    missing = [op for op in bpext.OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"bpext::{op}", "CUDA")]
    assert not missing, f"bpext._C lacks CUDA kernels for {missing}; was it built with BPEXT_FORCE_CPU=1?"
    assert bpext.has_cuda_kernels()


def test_cpu_kernels_registered():
    for op in bpext.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bpext::{op}", "CPU"), op


class SmallNet(torch.nn.Module):
    def __init__(self, device):
        super().__init__()
        self.l1 = bpext.nn.Dense(12, 16, activation="gelu", device=device)
        self.act = bpext.nn.Tanh()
        self.l2 = bpext.nn.Dense(16, 3, bias=False, device=device)

    def forward(self, x):
        return self.l2(self.act(self.l1(x)))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    torch.manual_seed(0)
    model = SmallNet(device)
    x = torch.randn(2, 5, 12, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y_eager = model(x)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), list(model.parameters()))
    y_comp = compiled(x)
    grads_comp = torch.autograd.grad(y_comp.square().sum(), list(model.parameters()))
    torch.testing.assert_close(y_comp, y_eager)
    for a, b in zip(grads_comp, grads_eager):
        torch.testing.assert_close(a, b)


def test_cublaslt_epilogue_switch_round_trips():
    previous = _ops.set_cublaslt_epilogue(False)
    try:
        assert _ops.set_cublaslt_epilogue(True) is False
    finally:
        _ops.set_cublaslt_epilogue(previous)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["identity", "relu", "gelu"])
def test_both_forward_paths_agree(device, name):
    """The cuBLASLt-epilogue path and bpext's own epilogue compute the same layer."""
    x = torch.randn(33, 64, device=device)
    w = torch.randn(48, 64, device=device)
    b = torch.randn(48, device=device)
    outs = []
    for enabled in (True, False):
        previous = _ops.set_cublaslt_epilogue(enabled)
        try:
            outs.append(bpext.functional.dense(x, w, b, activation=name))
        finally:
            _ops.set_cublaslt_epilogue(previous)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
