"""Per-call cost of convert's check: a converted 2-layer MLP at batch 32, forward+backward, with the
check as it is against the check skipped; median of interleaved pairs."""
import statistics, time, torch, bpext
from torch import nn
from bpext.convert import _Assumed, _fused_forward
torch.manual_seed(0)
m = bpext.convert(nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128)))
x = torch.randn(32, 128, requires_grad=True)
real = _Assumed.holds
def step():
    m(x).sum().backward()
def timed(n=200):
    t = time.perf_counter()
    for _ in range(n): step()
    return (time.perf_counter() - t) / n * 1e6
for _ in range(50): step()
diffs, ratios = [], []
for i in range(31):
    order = (True, False) if i % 2 == 0 else (False, True)
    r = {}
    for checked in order:
        _Assumed.holds = real if checked else (lambda self, module: True)
        r[checked] = timed()
    diffs.append(r[True] - r[False]); ratios.append(r[True] / r[False])
_Assumed.holds = real
t = time.perf_counter()
a = _fused_forward(m).rewrites[(True,)].assumed
for _ in range(20000): a.holds(m)
per = (time.perf_counter() - t) / 20000 * 1e6
q = statistics.quantiles(diffs, n=4)
print(f"check alone: {per:.2f} us; step with check - without: median {statistics.median(diffs):.2f} us (IQR {q[0]:.2f}..{q[2]:.2f}); ratio {statistics.median(ratios):.3f}; step {r[False]:.1f} us")
