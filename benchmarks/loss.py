"""The loss step: LM head + cross-entropy, forward and backward, bpext.functional.linear_cross_entropy
against F.cross_entropy(F.linear(...)). Peak memory growth of one step, each in a fresh process
(ru_maxrss), and time as the median of interleaved pairs (native, bpext, bpext, native, ...).

    python benchmarks/loss.py [--tokens 4096] [--vocab 32000] [--hidden 256] [--pairs 7]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch
import torch.nn.functional as F

import bpext
from pairs import interleaved


def step(variant: str, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> None:
    if variant == "native":
        loss = F.cross_entropy(F.linear(h, w), t)
    else:
        loss = bpext.functional.linear_cross_entropy(h, w, t)
    loss.backward()


def inputs(tokens: int, vocab: int, hidden: int):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_()
    return h, w, torch.randint(0, vocab, (tokens,), generator=g)


def peak_growth_mb(variant: str, args) -> float:
    """ru_maxrss growth of one step in a fresh process, in MB."""
    code = f"""
import resource, sys
sys.path.insert(0, {sys.path[0]!r})
from loss import inputs, step
h, w, t = inputs({args.tokens}, {args.vocab}, {args.hidden})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step({variant!r}, h, w, t)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=7)
    args = parser.parse_args()
    memory = {v: peak_growth_mb(v, args) for v in ("native", "bpext")}
    h, w, t = inputs(args.tokens, args.vocab, args.hidden)
    step("native", h, w, t), step("bpext", h, w, t)  # warm up
    r = interleaved(lambda: step("native", h, w, t), lambda: step("bpext", h, w, t), args.pairs)
    print(f"LM head + cross-entropy, {args.tokens} tokens x vocab {args.vocab}, hidden {args.hidden}, float32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, bpext {bpext.__version__} ({bpext.CPU_KERNELS})")
    print(f"peak memory growth: native {memory['native']:.0f} MB, bpext {memory['bpext']:.0f} MB "
          f"({memory['bpext'] / memory['native']:.3f}x)")
    print(f"time fwd+bwd: native {r['native_s'] * 1e3:.0f} ms, bpext {r['bpext_s'] * 1e3:.0f} ms; native/bpext median "
          f"{r['ratio']:.2f} (IQR {r['iqr'][0]:.2f}-{r['iqr'][1]:.2f}, {args.pairs} interleaved pairs)")


if __name__ == "__main__":
    main()
