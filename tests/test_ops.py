"""The registered ops: opcheck on every op (samples with and without requires_grad), CUDA kernels
present in CUDA builds, torch.compile."""

from __future__ import annotations

import os

import pytest
import torch

import bpext
from bpext import _ops
from conftest import DEVICES

OPS = torch.ops.bpext
ACTS = [("relu", []), ("gelu", []), ("softplus", [2.0, 5.0]), ("identity", []), ("tanh", [])]


def op_samples(device, requires_grad):
    """(op, args) covering every op: with and without bias, 2-D and 3-D, each save policy."""
    g = torch.Generator().manual_seed(0)

    def rnd(*s, grad=requires_grad):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_(grad)

    samples = []
    for act, params in ACTS:
        saves = bpext.activations.REGISTRY[act].saves
        # activation_double_backward's derivative in `saved` is a third derivative, which raises by design.
        samples += [(OPS.activation_forward.default, (rnd(3, 7), act, params)),
                    (OPS.activation_backward.default, (rnd(3, 7), rnd(3, 7), act, params)),
                    (OPS.activation_double_backward.default, (rnd(3, 7), rnd(3, 7), rnd(3, 7, grad=False), act,
                                                              params))]
        for shape in ((6, 5), (2, 3, 5)):
            x, w, b, gy = rnd(*shape), rnd(4, 5), rnd(4), rnd(*shape[:-1], 4)
            saved = rnd(*shape[:-1], 4) if saves != "nothing" else rnd(0, grad=False)
            for bias in (b, None):
                samples.append((OPS.dense_forward.default, (x, w, bias, act, params, saves == "input")))
            for mask in ([True, True, True], [False, True, False], [True, False, False]):
                samples.append((OPS.dense_backward.default, (gy, x, w, saved, act, params, mask)))
            wg, wu, wd, bg, bd = rnd(3, 5), rnd(3, 5), rnd(4, 3), rnd(3), rnd(4)
            gate, up, gh = rnd(*shape[:-1], 3), rnd(*shape[:-1], 3), rnd(*shape[:-1], 3)
            samples += [
                (OPS.gated_forward.default, (x, wg, bg, wu, None, act, params, True)),
                (OPS.gated_backward.default, (gh, x, wg, wu, gate, up, act, params, [True, True, True, True, False])),
                # what no asked-for gradient reads may be left out: x, or the weights
                (OPS.gated_backward.default, (gh, None, wg, wu, gate, up, act, params, [True, False, True, False, True])),
                (OPS.gated_backward.default, (gh, x, None, None, gate, up, act, params, [False, True, True, True, False])),
                (OPS.gated_mlp_forward.default, (x, wg, None, wu, bg, wd, bd, act, params, True)),
                (OPS.gated_mlp_backward.default, (gy, x, wg, wu, wd, gate, up, act, params, [True] * 7)),
                (OPS.gated_mlp_backward.default, (gy, None, wg, wu, wd, gate, up, act, params,
                                                  [True, False, True, False, True, True, True])),
                (OPS.gated_mlp_backward.default, (gy, x, None, None, wd, gate, up, act, params,
                                                  [False, True, False, True, False, True, False])),
                (OPS.gated_mlp_backward.default, (gy, None, None, None, None, gate, up, act, params,
                                                  [False] * 5 + [True, True])),
            ]
        x, ws, bs = rnd(3, 4), [rnd(5, 4), rnd(2, 5)], [rnd(5), rnd(0, grad=False)]
        for save in (True, False) if not requires_grad else (True,):  # save=False: forward only, by contract
            samples.append((OPS.mlp_forward.default, (x, ws, bs, act, params, "sigmoid", [], save)))
        with torch.no_grad():
            y, saved = OPS.mlp_forward(x, ws, bs, act, params, "sigmoid", [], True)
        gy, none = rnd(3, 2), rnd(0, grad=False)
        for inputs, mask in (((x, ws), [True, True, True, True, False]),  # the second layer has no bias
                             ((None, [none, ws[1]]), [False, False, True, True, False]),  # nothing of layer 0 but its bias
                             ((None, [none, none]), [False, False, True, False, False])):  # only the last weight
            samples.append((OPS.mlp_backward.default, (gy, inputs[0], y, inputs[1], saved, act, params, "sigmoid", [],
                                                       mask)))
    x, w, b, t = rnd(6, 5), rnd(7, 5), rnd(7), torch.tensor([0, 6, -100, 2, 3, 3], device=device)
    for reduction, bias in (("mean", b), ("sum", None), ("none", b)):
        options = (-100, 0.1, 2.0, 1e-3, reduction, 3.0 if reduction == "sum" else None)
        mask = [requires_grad and reduction != "none", requires_grad and reduction == "mean", bias is not None]
        samples.append((OPS.linear_cross_entropy_forward.default,
                        (x, w, bias, t, *options, mask if reduction != "none" else [False] * 3)))
        # linear_cross_entropy_backward's derivative is the loss's second one, which raises by design
        no_grad = [v.detach() if v is not None else None for v in (x, w, bias)]
        samples.append((OPS.linear_cross_entropy_backward.default,
                        (rnd(6, grad=False) if reduction == "none" else rnd(1, grad=False).reshape(()), *no_grad, t,
                         *options)))
    return samples


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "requires-grad"])
def test_opcheck_every_op(device, requires_grad):
    samples = op_samples(device, requires_grad)
    assert {op._name for op, _ in samples} == {f"bpext::{name}" for name in bpext.OPS}
    for op, args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "requires-grad"])
def test_opcheck_the_eager_ops(device, requires_grad):
    """bpext::dense and bpext::mlp: the forward and backward ops tied by a C++ autograd Function
    (kernels/autograd.cpp), on the samples of dense_forward and mlp_forward."""
    for op, args in op_samples(device, requires_grad):
        if op is OPS.dense_forward.default:
            torch.library.opcheck(OPS.dense.default, args[:-1])
        if op is OPS.mlp_forward.default:
            torch.library.opcheck(OPS.mlp.default, args[:-1])


@pytest.mark.parametrize("op", [op for op in bpext.OPS if not op.endswith("backward")])
def test_every_forward_op_has_autograd(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bpext::{op}", "Autograd")


def test_cuda_kernels_built_with_cuda_torch():
    """A CUDA torch with nvcc must produce CUDA kernels for every op (CI builds them)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        pytest.skip("CPU-only torch or no CUDA toolkit: CUDA kernels are not expected")
    if os.environ.get("BPEXT_FORCE_CPU") == "1":
        pytest.skip("BPEXT_FORCE_CPU=1: built with the CPU kernels only, on purpose")
    missing = [op for op in bpext.OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"bpext::{op}", "CUDA")]
    assert not missing, f"bpext._C lacks CUDA kernels for {missing}; was it built with BPEXT_FORCE_CPU=1?"
    assert bpext.has_cuda_kernels()


def test_cpu_kernels_registered():
    for op in bpext.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bpext::{op}", "CPU"), op


class SmallNet(torch.nn.Module):
    def __init__(self, device):
        super().__init__()
        self.l1 = bpext.nn.Dense(12, 16, activation="gelu", device=device)
        self.act = bpext.nn.Tanh()
        self.mlp = bpext.nn.MLP(16, [8], 8, activation="silu", device=device)
        self.gated = bpext.nn.GatedMLP(8, 12, 3, bias=False, device=device)

    def forward(self, x):
        return self.gated(self.mlp(self.act(self.l1(x))))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(device, backend):
    torch.manual_seed(0)
    model = SmallNet(device)
    x = torch.randn(2, 5, 12, device=device)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    y_eager = model(x)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), list(model.parameters()))
    y_comp = compiled(x)
    grads_comp = torch.autograd.grad(y_comp.square().sum(), list(model.parameters()))
    torch.testing.assert_close(y_comp, y_eager)
    for a, b in zip(grads_comp, grads_eager):
        torch.testing.assert_close(a, b)


def test_gemm_epilogue_switch_round_trips():
    previous = _ops.set_gemm_epilogue(False)
    try:
        assert _ops.set_gemm_epilogue(True) is False
    finally:
        _ops.set_gemm_epilogue(previous)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["identity", "relu", "gelu"])
def test_both_forward_paths_agree(device, name):
    """The GEMM-epilogue path (cuBLASLt on CUDA) and bpext's own activation pass compute the same
    layer, and a ReLU layer with a bias does take the epilogue when it is enabled."""
    x = torch.randn(33, 64, device=device)
    w = torch.randn(48, 64, device=device)
    b = torch.randn(48, device=device)
    outs = []
    for enabled in (True, False):
        previous = _ops.set_gemm_epilogue(enabled)
        try:
            with torch.profiler.profile() as profile:
                outs.append(bpext.functional.dense(x, w, b, activation=name))
        finally:
            _ops.set_gemm_epilogue(previous)
        epilogue = any(e.name == "aten::_addmm_activation" for e in profile.events())
        assert epilogue == (enabled and name == "relu")
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
