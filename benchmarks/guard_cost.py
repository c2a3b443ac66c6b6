"""Per-call cost of convert's checks (what the rewrite assumed of the module, which calls it serves):
a converted 2-layer MLP at batch 32, forward+backward, through its installed forward against its
rewrite called directly; median of interleaved pairs."""
import functools
import statistics
import time

import torch
from torch import nn

import bpext
from bpext.convert import _fused_forward

torch.manual_seed(0)
m = bpext.convert(nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128)))
x = torch.randn(32, 128, requires_grad=True)
installed = m.__dict__["forward"]
fused = _fused_forward(m)
rewrite = fused.rewrites[next(iter(fused.rewrites))]
direct = functools.partial(rewrite.fn, m)


def timed(forward, n=200):
    m.__dict__["forward"] = forward
    t = time.perf_counter()
    for _ in range(n):
        m(x).sum().backward()
    return (time.perf_counter() - t) / n * 1e6


for _ in range(50):
    m(x).sum().backward()
diffs, ratios = [], []
for i in range(31):
    r = {}
    for checked in ((True, False) if i % 2 == 0 else (False, True)):
        r[checked] = timed(installed if checked else direct)
    diffs.append(r[True] - r[False])
    ratios.append(r[True] / r[False])
m.__dict__["forward"] = installed
t = time.perf_counter()
for _ in range(20000):
    fused.current() is not None and rewrite.calls.serves(m, (x,), {})
per = (time.perf_counter() - t) / 20000 * 1e6
q = statistics.quantiles(diffs, n=4)
print(f"checks alone: {per:.2f} us; step with checks - without: median {statistics.median(diffs):.2f} us "
      f"(IQR {q[0]:.2f}..{q[2]:.2f}); ratio {statistics.median(ratios):.3f}; step {r[False]:.1f} us")
