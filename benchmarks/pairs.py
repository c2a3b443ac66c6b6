"""Timing two variants as the median of interleaved pairs (native, bpext, bpext, native, ...: one
ratio per pair), which holds on a shared machine where an absolute time moves by 30%."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(native: Callable[[], object], bpext: Callable[[], object], pairs: int) -> dict:
    """{"ratio": median native/bpext, "iqr": (q1, q3), "native_s", "bpext_s": median seconds}."""
    steps = {"native": native, "bpext": bpext}
    ratios, times = [], {"native": [], "bpext": []}
    for i in range(pairs):
        pair = {}
        for name in ("native", "bpext") if i % 2 == 0 else ("bpext", "native"):
            start = time.perf_counter()
            steps[name]()
            pair[name] = time.perf_counter() - start
            times[name].append(pair[name])
        ratios.append(pair["native"] / pair["bpext"])
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"ratio": statistics.median(ratios), "iqr": (q[0], q[2]),
            **{f"{name}_s": statistics.median(t) for name, t in times.items()}}
