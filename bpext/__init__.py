"""bpext: backpropagation by hand for dense and activation layers, as PyTorch ops
with C++ (CPU) and CUDA kernels, checked against autograd."""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.bpext.*)
except ImportError as e:
    if "another copy" in str(e):
        raise
    raise ImportError(
        "bpext's compiled kernels (bpext._C) are missing or do not match this torch; "
        "build them with `pip install --no-build-isolation -e .` (or `make install`)"
    ) from e

from . import _ops, functional, nn  # noqa: E402
from ._ops import OPS  # noqa: E402
from .activations import ACTIVATIONS, resolve  # noqa: E402
from .convert import convert, fusions  # noqa: E402

__version__ = "0.2.0"
__all__ = ["ACTIVATIONS", "OPS", "convert", "functional", "fusions", "nn", "resolve", "has_cuda_kernels",
           "__version__"]


def has_cuda_kernels() -> bool:
    """True when every bpext op has a CUDA kernel in this build."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"bpext::{op}", "CUDA") for op in OPS)
