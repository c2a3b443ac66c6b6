"""bpext: backpropagation by hand for dense and activation layers, as PyTorch ops
with C++ (CPU) and CUDA kernels, checked against autograd."""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.bpext.*)
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "bpext's compiled kernels (bpext._C) are missing or do not match this torch; "
        "build them with `pip install --no-build-isolation -e .` (or `make install`)"
    ) from e

from . import _ops, functional, nn  # noqa: E402
from .activations import ACTIVATIONS, resolve  # noqa: E402
from .nn import convert  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ACTIVATIONS", "convert", "functional", "nn", "resolve", "has_cuda_kernels", "__version__"]

# The ops with a kernel per device (the MLP ops fall back to these where a device has no own kernel).
OPS = ("activation_forward", "activation_backward", "activation_double_backward", "dense_forward", "dense_backward")


def has_cuda_kernels() -> bool:
    """True when every bpext op has a CUDA kernel in this build."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"bpext::{op}", "CUDA") for op in OPS)
