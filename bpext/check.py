"""`python -m bpext check`: gradient checks of every op, activation, dtype and device.

float64 runs torch.autograd.gradcheck and gradgradcheck on the real kernels and compares
with native autograd; the other dtypes compare forward and backward with native at that dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

from . import functional
from .activations import ACTIVATIONS, resolve
from .testing import CHECK_PARAMS, ELEMENTWISE, LAYER, STACK

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass
class CheckResult:
    device: str
    op: str
    activation: str
    dtype: torch.dtype
    check: str  # "gradcheck", "gradgrad" or "vs native"
    max_error: float  # largest |bpext - native| over outputs and gradients
    passed: bool


def _compare(fn, ref, inputs, grad_out, tol) -> tuple[float, bool]:
    """Max abs error and pass/fail (|a - b| <= atol + rtol*|b| everywhere) of outputs and gradients."""
    rtol, atol = tol
    results = []
    for f in (fn, ref):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        y = f(*leaves)
        y.backward(grad_out)
        results.append([y.detach()] + [t.grad for t in leaves])
    max_err, ok = 0.0, True
    for a, b in zip(*results):
        a, b = a.double(), b.double()
        diff = (a - b).abs()
        both_nan = a.isnan() & b.isnan()
        bad = ~both_nan & ~(diff <= atol + rtol * b.abs())
        max_err = max(max_err, float(diff[~both_nan].max()) if diff.numel() else 0.0)
        ok = ok and not bool(bad.any())
    return max_err, ok


def _cases(device: str, name: str, dtype: torch.dtype):
    """(op, bpext fn, native fn, inputs, grad_out, tolerances) for one activation and dtype:
    the activation, a dense layer, a two-layer MLP with it as hidden activation, and a gated
    MLP block with it as gate activation."""
    params = CHECK_PARAMS.get(name, {})
    ref_act = resolve(name, **params).reference
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    x = rnd(4, 3, 8)
    x = torch.where(x.abs() < 0.05, x + 0.1, x)  # away from kinks, for finite differences
    w, b = rnd(6, 8) / 8**0.5, rnd(6)
    yield ("activation", lambda t: functional.activation(t, name, **params), ref_act, (x,), rnd(4, 3, 8), ELEMENTWISE)
    yield ("dense", lambda *t: functional.dense(*t, activation=name, **params),
           lambda xx, ww, bb: ref_act(nnf.linear(xx, ww, bb)), (x, w, b), rnd(4, 3, 6), LAYER)
    w2, b2 = rnd(5, 6) / 6**0.5, rnd(5)
    yield ("mlp", lambda xx, *p: functional.mlp(xx, p[:2], p[2:], name, **params),
           lambda xx, ww, ww2, bb, bb2: nnf.linear(ref_act(nnf.linear(xx, ww, bb)), ww2, bb2),
           (x, w, w2, b, b2), rnd(4, 3, 5), STACK)
    wu = rnd(6, 8) / 8**0.5
    yield ("gated_mlp", lambda xx, wg, wu_, wd, bg: functional.gated_mlp(xx, wg, wu_, wd, bg, activation=name, **params),
           lambda xx, wg, wu_, wd, bg: nnf.linear(ref_act(nnf.linear(xx, wg, bg)) * nnf.linear(xx, wu_), wd),
           (x, w, wu, w2, b), rnd(4, 3, 5), STACK)


def run_checks(devices: list[str]) -> list[CheckResult]:
    results = []
    for device in devices:
        for name in ACTIVATIONS:
            for dtype in DTYPES:
                for op, fn, ref, inputs, grad_out, table in _cases(device, name, dtype):
                    err, ok = _compare(fn, ref, inputs, grad_out, table[dtype])
                    results.append(CheckResult(device, op, name, dtype, "vs native", err, ok))
                    if dtype == torch.float64:
                        leaves = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
                        for check, run in (("gradcheck", torch.autograd.gradcheck),
                                           ("gradgrad", torch.autograd.gradgradcheck)):
                            passed = run(fn, leaves, raise_exception=False)
                            results.append(CheckResult(device, op, name, dtype, check, err, passed))
    return results


def format_table(results: list[CheckResult]) -> str:
    header = f"{'device':<6} {'op':<10} {'activation':<10} {'dtype':<8} {'check':<9} {'max err':>9}  result"
    lines = [header, "-" * len(header)]
    for r in results:
        dtype = str(r.dtype).removeprefix("torch.")
        lines.append(f"{r.device:<6} {r.op:<10} {r.activation:<10} {dtype:<8} {r.check:<9} "
                     f"{r.max_error:>9.2e}  {'pass' if r.passed else 'FAIL'}")
    failed = sum(not r.passed for r in results)
    lines.append(f"{len(results) - failed} passed, {failed} failed")
    return "\n".join(lines)


def available_devices() -> list[str]:
    from . import has_cuda_kernels

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() and has_cuda_kernels() else [])


def main(devices: list[str] | None = None) -> int:
    results = run_checks(devices or available_devices())
    print(format_table(results))
    return 0 if all(r.passed for r in results) else 1
