"""Per-call overhead, the case issue 21 must not slow down: one 128->128 ReLU layer at batch 32,
forward+backward, native against a converted nn.Sequential, the op called directly and the
functional layer; then the demo's model (bpext/demo.py) in an AdamW training step at batch 128.
Each a median of interleaved pairs (native, bpext, bpext, native, ...), native/bpext: above 1,
bpext is faster.

    python benchmarks/call_overhead.py [--pairs 301]
"""
import argparse
import copy

import torch
from torch import nn

import bpext
from bpext.bench import interleaved
from bpext.demo import make_mlp


def repeated(step, n):
    def run():
        for _ in range(n):
            step()
    return run


def report(name, result, pairs):
    q1, q3 = result["iqr"]
    print(f"{name:34s} native/bpext {result['ratio']:.3f} (IQR {q1:.3f}-{q3:.3f}, {pairs} pairs)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=301)
    pairs = parser.parse_args().pairs
    torch.manual_seed(0)
    native = nn.Sequential(nn.Linear(128, 128), nn.ReLU())
    converted = bpext.convert(copy.deepcopy(native))
    linear = converted[0]
    x = torch.randn(32, 128)
    training = lambda layer: repeated(lambda: layer(x).sum().backward(), 50)  # noqa: E731
    for name, layer in (
            ("converted Sequential(Linear, ReLU)", converted),
            ("torch.ops.bpext.dense", lambda x: torch.ops.bpext.dense(x, linear.weight, linear.bias, "relu", [])),
            ("bpext.functional.dense", lambda x: bpext.functional.dense(x, linear.weight, linear.bias, "relu"))):
        report(name, interleaved(training(native), training(layer), pairs), pairs)

    model = make_mlp("cpu")
    models = (model, bpext.convert(copy.deepcopy(model)))
    optimizers = {m: torch.optim.AdamW(m.parameters()) for m in models}
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))

    def step(m):
        optimizers[m].zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        optimizers[m].step()

    steps = max(pairs // 3, 11)
    report("demo model, AdamW step, batch 128", interleaved(*(repeated(lambda m=m: step(m), 20) for m in models), steps),
           steps)


if __name__ == "__main__":
    main()
