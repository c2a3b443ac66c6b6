"""Shared parametrization: devices, dtypes, and comparisons against native and against float64."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import bpext
from bpext.testing import CHECK_PARAMS, ELEMENTWISE, LAYER

HAS_CUDA = torch.cuda.is_available() and bpext.has_cuda_kernels()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (or bpext built without CUDA kernels)")

DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Non-default parameters per activation, to test that they reach the kernels.
NON_DEFAULT_PARAMS = CHECK_PARAMS


def device_dtype_params():
    """(device, dtype) pairs with readable ids; CUDA pairs skip without a GPU."""
    out = []
    for device in ("cpu", "cuda"):
        marks = [requires_cuda, pytest.mark.cuda] if device == "cuda" else []
        for dtype in DTYPES:
            out.append(pytest.param(device, dtype, marks=marks, id=f"{device}-{str(dtype).removeprefix('torch.')}"))
    return out


def assert_close(actual, expected, dtype, table=ELEMENTWISE):
    rtol, atol = table[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


def assert_close_to_reference(actual, reference, dtype, native=None):
    """actual (any dtype) against a float64 reference, with LAYER tolerances (atol as a fraction
    of the largest |reference|). Given native's result at the same dtype, an element as far off
    as native's passes too: a rounded pre-activation may land on the other side of a kink (relu's
    0, hardswish's +-3) for both."""
    rtol, atol = LAYER[dtype]
    reference = reference.double()
    scale = reference.abs().max().item() if reference.numel() else 1.0
    if native is None:
        torch.testing.assert_close(actual.double(), reference, rtol=rtol, atol=atol * max(scale, 1e-30))
        return
    bound = atol * max(scale, 1e-30) + rtol * reference.abs()
    err, native_err = (actual.double() - reference).abs(), (native.double() - reference).abs()
    bad = (err > bound) & (err > native_err + bound)
    assert not bad.any(), f"{int(bad.sum())} elements farther from the reference than native and the tolerance"


def record_step(forward, inputs: tuple, grad: torch.Tensor) -> tuple:
    """One step of forward(*inputs): (its grad_fn's name, the output, the gradients of the inputs
    that require grad, the shapes of the tensors autograd saved)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = forward(*inputs)
    leaves = [t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    return y.grad_fn.name(), y.detach(), torch.autograd.grad(y, leaves, grad), sorted(tuple(t.shape) for t in saved)


def assert_same_step(cpp: tuple, python: tuple, cpp_node: str, python_node: str) -> None:
    """record_step of a C++ autograd path and of the Python Function it mirrors: bitwise the same
    output and gradients, and the same tensors kept for backward."""
    assert cpp_node in cpp[0] and python_node in python[0]
    assert cpp[3] == python[3]
    for a, b in zip(cpp[1:3], python[1:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def run_python(code: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter (for what could crash or abort the process)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)
