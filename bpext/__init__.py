"""bpext: backpropagation by hand for dense and activation layers, as PyTorch ops
with C++ (CPU) and CUDA kernels, checked against autograd."""

from __future__ import annotations

import glob
import os

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

SIMD_LEVELS = ("avx512", "avx2", "default")  # the CPU kernels' builds, fastest first


def _load_cpu_kernels() -> str:
    """Loads the CPU kernels built for the SIMD level torch runs at on this CPU (or below it,
    where a level was not built); BPEXT_CPU_CAPABILITY=AVX512|AVX2|DEFAULT chooses one."""
    wanted = (os.environ.get("BPEXT_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()).lower()
    levels = SIMD_LEVELS[SIMD_LEVELS.index(wanted):] if wanted in SIMD_LEVELS else SIMD_LEVELS[-1:]
    here = os.path.dirname(__file__)
    for level in levels:
        found = sorted(glob.glob(os.path.join(here, f"_cpu_{level}.*so")))
        if found:
            torch.ops.bpext._load_cpu_kernels(found[0])
            return level
    raise ImportError(f"bpext: none of its CPU kernel builds ({', '.join(f'_cpu_{v}' for v in levels)}) is in {here}")


CPU_KERNELS = _load_cpu_kernels()  # the SIMD level of the CPU kernels in use

from . import _ops, functional, nn  # noqa: E402
from ._ops import OPS  # noqa: E402
from .activations import ACTIVATIONS, resolve  # noqa: E402
from .convert import convert, fusions  # noqa: E402

__version__ = "0.2.0"
__all__ = ["ACTIVATIONS", "CPU_KERNELS", "OPS", "convert", "functional", "fusions", "nn", "resolve", "has_cuda_kernels",
           "__version__"]


def has_cuda_kernels() -> bool:
    """True when every bpext op has a CUDA kernel in this build."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"bpext::{op}", "CUDA") for op in OPS)
