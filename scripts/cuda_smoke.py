"""Every CUDA kernel of bpext once, on small tensors, for compute-sanitizer (memcheck, racecheck).

Covers each activation's forward, backward and double backward (packed and unaligned/tail
paths), dense forward and backward in every dtype (packed and unpacked widths, both
epilogue paths, with and without bias), the gated layers (with bias sums), the MLP and the loss."""

import torch

import bpext
from bpext import _ops

assert torch.cuda.is_available(), "needs a CUDA device"
torch.manual_seed(0)
cuda = {"device": "cuda"}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    kw = {**cuda, "dtype": dtype}
    for name in bpext.ACTIVATIONS:
        for n in (4099, 64):
            x = torch.randn(n + 1, **kw)[1:].requires_grad_(True)  # unaligned
            bpext.functional.activation(x, name).sum().backward()
            x = torch.randn(n, **kw, requires_grad=True)
            (g,) = torch.autograd.grad(bpext.functional.activation(x, name).sum(), x, create_graph=True)
            g.sum().backward()  # activation_double_backward
        for fout in (64, 37):
            for epilogue in (True, False):
                previous = _ops.set_gemm_epilogue(epilogue)
                x = torch.randn(129, 48, **kw, requires_grad=True)
                layer = bpext.nn.Dense(48, fout, bias=fout == 64, activation=name, **kw)
                layer(x).sum().backward()
                _ops.set_gemm_epilogue(previous)
            x = torch.randn(33, 48, **kw, requires_grad=True)
            bpext.nn.GatedDense(48, fout, activation=name, **kw)(x).sum().backward()
            bpext.nn.GatedMLP(48, fout, 16, bias=fout == 37, activation=name, **kw)(x).sum().backward()
    x = torch.randn(70, 24, **kw, requires_grad=True)
    bpext.nn.MLP(24, [32, 32], 8, activation="gelu", output_activation="tanh", **kw)(x).sum().backward()
    # the loss: gradients in forward (mean), recomputed in backward (none), every option
    head = bpext.nn.LinearCrossEntropy(24, 1000, bias=True, label_smoothing=0.1, softcap=30.0, z_loss=1e-4, **kw)
    target = torch.randint(0, 1000, (70,), device="cuda")
    target[:5] = -100
    head(x, target).backward()
    bpext.functional.linear_cross_entropy(x, head.weight, target, reduction="none").sum().backward()
torch.cuda.synchronize()
print("cuda smoke: all kernels ran")
