"""Every CUDA kernel of bpext once, on small tensors, for compute-sanitizer (memcheck, racecheck).

Covers each activation forward, backward and double backward (packed and unaligned/tail
paths) and dense
forward and backward in every dtype (packed and unpacked widths, both epilogue paths)."""

import torch

import bpext
from bpext import _ops

assert torch.cuda.is_available(), "needs a CUDA device"
torch.manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for name in bpext.ACTIVATIONS:
        for n in (4099, 64):
            x = torch.randn(n + 1, device="cuda", dtype=dtype)[1:].requires_grad_(True)  # unaligned
            bpext.functional.activation(x, name).sum().backward()
            x = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
            (g,) = torch.autograd.grad(bpext.functional.activation(x, name).sum(), x, create_graph=True)
            g.sum().backward()  # activation_double_backward
        for fout in (64, 37):
            for lt in (True, False):
                previous = _ops.set_gemm_epilogue(lt)
                x = torch.randn(129, 48, device="cuda", dtype=dtype, requires_grad=True)
                layer = bpext.nn.Dense(48, fout, activation=name, device="cuda", dtype=dtype)
                layer(x).sum().backward()
                _ops.set_gemm_epilogue(previous)
torch.cuda.synchronize()
print("cuda smoke: all kernels ran")
