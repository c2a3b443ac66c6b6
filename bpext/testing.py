"""What "equal to native" and "as accurate as native" mean, for the tests and ``python -m bpext check``.

Two yardsticks:

* ``ELEMENTWISE`` / ``LAYER``: (rtol, atol) against native PyTorch at the same dtype. Layers'
  GEMMs may sum in another order than native's, so they get the looser table.
* ``accuracy_excess``: PyTorch's own rule for reduced precision. bpext's result may differ
  from native's, but it must never be farther from the exact answer than native is, beyond the
  noise of rounding: NOISE_ULPS units in the last place of the dtype, and the rounding a result
  inherits from its inputs (``scale``).
"""

from __future__ import annotations

import torch

ELEMENTWISE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
LAYER = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (3e-3, 3e-3),
}
# Two layers round the hidden activation once more: an ulp of it, summed over a batch with
# cancellation, moves a float16 weight gradient past the layer tolerance.
STACK = {**LAYER, torch.float16: (1e-2, 1e-2)}

# Non-default parameters, so that checks see them reach the kernels.
CHECK_PARAMS = {"leaky_relu": {"negative_slope": 0.2}, "elu": {"alpha": 0.5},
                "softplus": {"beta": 2.0, "threshold": 5.0}}


# The noise allowed beyond native's error, in units in the last place of the dtype: a result may
# land on either side of a rounding boundary, and round again on the way.
NOISE_ULPS = 2.0


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at |values| (float64), with its subnormal floor."""
    info = torch.finfo(dtype)
    return torch.maximum(values.abs() * info.eps, torch.tensor(info.smallest_normal * info.eps, dtype=torch.float64))


def _error(values: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return torch.where(values == exact, 0, (values - exact).abs())  # equal infinities: no error


def accuracy_excess(ours: torch.Tensor, native: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
                    scale: torch.Tensor | None = None) -> float:
    """How far bpext's result is beyond native's error against ``exact``, in units of the allowed
    noise: NOISE_ULPS ulps of the dtype at the exact value, plus as many epsilons of ``scale``,
    the magnitude each result inherits rounding from: for a GEMM the magnitudes it sums; for an
    activation the problem's condition, |x f'(x)| (what one rounding of the input x moves the
    exact result by). Above 1 means bpext is less accurate than native somewhere; NaN where
    native has a number counts as infinitely worse."""
    ours, native, exact = ours.double(), native.double(), exact.double()
    if (ours.isnan() & ~native.isnan() & ~exact.isnan()).any():
        return float("inf")
    err, native_err = _error(ours, exact).nan_to_num(nan=0.0), _error(native, exact).nan_to_num(nan=float("inf"))
    noise = NOISE_ULPS * ulp(exact, dtype)
    if scale is not None:
        noise = noise + NOISE_ULPS * torch.finfo(dtype).eps * scale.double()
    excess = torch.where(err <= native_err, 0, (err - native_err) / noise)
    excess = torch.where(exact.isnan(), 0, excess)
    return float(excess.max()) if excess.numel() else 0.0
