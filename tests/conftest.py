"""Shared parametrization: devices, dtypes per device, and per-dtype tolerances."""

from __future__ import annotations

import pytest
import torch

import bpext
from bpext import check

HAS_CUDA = torch.cuda.is_available() and bpext.has_cuda_kernels()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (or bpext built without CUDA kernels)")

DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]

# bfloat16 and float16 are computed in float32 and rounded once, as native does.
DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}

# (rtol, atol) for bpext against torch.nn.functional at the same dtype: the table
# `python -m bpext check` uses too.
TOLERANCES = check.TOLERANCES

# (rtol, atol as a fraction of the largest |reference|) for layers, against a float64
# reference computed from the same (rounded) inputs: GEMM sums round differently than
# native's in low precision, so both are held to the exact answer instead.
DENSE_TOLERANCES = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 2e-5),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (3e-3, 2e-3),
}


def device_dtype_params():
    """(device, dtype) pairs with readable ids; CUDA pairs skip without a GPU."""
    out = []
    for device in ("cpu", "cuda"):
        marks = [requires_cuda, pytest.mark.cuda] if device == "cuda" else []
        for dtype in DTYPES[device]:
            out.append(pytest.param(device, dtype, marks=marks, id=f"{device}-{str(dtype).removeprefix('torch.')}"))
    return out


def assert_close(actual, expected, dtype, table=TOLERANCES):
    rtol, atol = table[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


def assert_close_to_reference(actual, reference, dtype):
    """actual (any dtype) against a float64 reference, with DENSE_TOLERANCES."""
    rtol, atol = DENSE_TOLERANCES[dtype]
    reference = reference.double()
    scale = reference.abs().max().item() if reference.numel() else 1.0
    torch.testing.assert_close(actual.double(), reference, rtol=rtol, atol=atol * max(scale, 1e-30))


# Non-default parameters per activation, to test that they reach the kernels.
NON_DEFAULT_PARAMS = check.CHECK_PARAMS
