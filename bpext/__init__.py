"""bpext: backpropagation by hand for dense and activation layers, as PyTorch ops
with C++ (CPU) and CUDA kernels, checked against autograd."""

from __future__ import annotations

import glob
import os
import warnings

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

SIMD_LEVELS = tuple(torch.ops.bpext._cpu_levels())  # the CPU kernels' levels, fastest first
RUNNABLE_SIMD_LEVELS = tuple(level for level in SIMD_LEVELS if not torch.ops.bpext._cpu_missing_features(level))


def _wanted_cpu_level() -> str:
    """The level asked for: BPEXT_CPU_CAPABILITY (any case, spaces ignored; unknown values raise),
    else the level torch runs at (or the default for a CPU bpext has no level for). A level this
    CPU lacks is clamped to the best it has, with a warning."""
    requested = os.environ.get("BPEXT_CPU_CAPABILITY", "").strip()
    if not requested:
        capability = torch.backends.cpu.get_cpu_capability().lower()
        return capability if capability in SIMD_LEVELS else "default"
    wanted = requested.lower()
    if wanted not in SIMD_LEVELS:
        raise ValueError(f"BPEXT_CPU_CAPABILITY={requested!r}: expected one of "
                         f"{', '.join(level.upper() for level in SIMD_LEVELS)} (any case)")
    if wanted not in RUNNABLE_SIMD_LEVELS:
        lacks = ", ".join(torch.ops.bpext._cpu_missing_features(wanted))
        warnings.warn(f"BPEXT_CPU_CAPABILITY={requested!r}: this CPU lacks {lacks}, which the {wanted} kernels "
                      f"need; using the best level it runs ({RUNNABLE_SIMD_LEVELS[0]})", RuntimeWarning, stacklevel=3)
        return RUNNABLE_SIMD_LEVELS[0]
    return wanted


def _load_cpu_kernels() -> str:
    """Loads the CPU kernels built for the wanted SIMD level, or the best level below it that
    was built and that this CPU runs; returns that level."""
    wanted = _wanted_cpu_level()
    here = os.path.dirname(__file__)
    levels = [level for level in SIMD_LEVELS[SIMD_LEVELS.index(wanted):] if level in RUNNABLE_SIMD_LEVELS]
    for level in levels:
        found = sorted(glob.glob(os.path.join(here, f"_cpu_{level}.*so")))
        if found:
            torch.ops.bpext._load_cpu_kernels(found[0])
            return level
    raise ImportError(f"bpext: none of its CPU kernel builds ({', '.join(f'_cpu_{v}' for v in levels)}) is in {here}")


CPU_KERNELS = _load_cpu_kernels()  # the SIMD level of the CPU kernels in use

from . import _ops, functional, nn, tensor_parallel  # noqa: E402
from ._ops import OPS  # noqa: E402
from .activations import ACTIVATIONS, resolve  # noqa: E402
from .convert import convert, fusions  # noqa: E402

__version__ = "0.2.0"
__all__ = ["ACTIVATIONS", "CPU_KERNELS", "OPS", "RUNNABLE_SIMD_LEVELS", "SIMD_LEVELS", "convert", "functional", "fusions", "nn", "resolve", "has_cuda_kernels",
           "__version__"]


def has_cuda_kernels() -> bool:
    """True when every bpext op has a CUDA kernel in this build."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"bpext::{op}", "CUDA") for op in OPS)
