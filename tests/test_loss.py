"""The loss step: linear_cross_entropy against F.cross_entropy(F.linear(...)) on every option and
path (eager, gradcheck, opcheck, torch.compile, torch.func, export, autocast), with a weight tied
to another use among the cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bpext
from conftest import DEVICES, assert_close_to_reference

B = bpext.functional


def data(tokens=(3, 5), hidden=6, vocab=11, dtype=torch.float64, device="cpu", seed=0, ignored=2, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, hidden, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / 2).to(device, dtype).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    t = torch.randint(0, vocab, tokens, generator=g)
    t.view(-1)[:ignored] = ignore_index
    return x, w, b, t.to(device)


def native(x, w, t, b=None, *, softcap=None, z_loss=0.0, divisor=None, reduction="mean", **kwargs):
    """F.cross_entropy of F.linear, with Gemma 2's cap and PaLM's z-loss written out."""
    z = F.linear(x, w, b)
    if softcap is None and not z_loss and divisor is None:
        return F.cross_entropy(z.flatten(0, -2), t.flatten(), reduction=reduction, **kwargs).reshape(
            t.shape if reduction == "none" else ())
    z = z.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(z.flatten(0, -2), t.flatten(), reduction="none", **kwargs)
    valid = t.flatten() != kwargs.get("ignore_index", -100)
    rows = rows + z_loss * torch.logsumexp(z.flatten(0, -2), -1) ** 2 * valid
    if reduction == "none":
        return rows.reshape(t.shape).to(x.dtype)
    total = rows.sum()
    return (total / (divisor if divisor is not None else valid.sum() if reduction == "mean" else 1)).to(x.dtype)


OPTIONS = {
    "mean": {}, "sum": {"reduction": "sum"}, "none": {"reduction": "none"},
    "smoothing": {"label_smoothing": 0.1}, "ignore 3": {"ignore_index": 3},
    "softcap": {"softcap": 2.0}, "z_loss": {"z_loss": 1e-2}, "divisor": {"reduction": "sum", "divisor": 7.0},
    "everything": {"label_smoothing": 0.2, "softcap": 3.0, "z_loss": 1e-3, "divisor": 4.0},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_equals_native_loss_and_gradients(options, bias, device):
    x, w, b, t = data(device=device, ignore_index=options.get("ignore_index", -100))
    b = b if bias else None
    ours, ref = B.linear_cross_entropy(x, w, t, b, **options), native(x, w, t, b, **options)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    tensors = [x, w] + ([b] if bias else [])
    g = torch.randn_like(ref)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, tensors, g), torch.autograd.grad(ref, tensors, g))


@pytest.mark.parametrize("ignored", [2, 15], ids=["some ignored", "every target ignored"])
def test_a_divisor_of_zero_is_natives_inf_or_nan(ignored):
    """transformers' num_items_in_batch is 0 when an accumulated batch has no label: the summed loss over
    0 is inf (NaN where every target is ignored, 0/0), as native's; the gradients are non-finite where
    native's are, zeros where native's are (ignored rows)."""
    x, w, b, t = data(ignored=ignored)
    tensors = [x, w, b]
    ours = B.linear_cross_entropy(x, w, t, b, reduction="sum", divisor=0.0)
    ref = F.cross_entropy(F.linear(x, w, b).flatten(0, -2), t.flatten(), reduction="sum") / 0.0  # transformers'
    assert ref.isnan() if ignored == t.numel() else ref.isinf()
    torch.testing.assert_close(ours, ref, equal_nan=True)
    for a, n in zip(torch.autograd.grad(ours, tensors), torch.autograd.grad(ref, tensors)):
        assert torch.equal(a.isfinite(), n.isfinite())
        torch.testing.assert_close(a[a.isfinite()], n[n.isfinite()])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_vocabulary_of_none_equals_native(reduction, label_smoothing):
    """0 classes: every target ignored gives native's zeros (NaN for the mean of none, and for a smoothing
    term's mean over no classes); any other raises."""
    x, w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(0, 4, dtype=torch.float64,
                                                                                  requires_grad=True)
    t = torch.full((3,), -100)
    options = {"reduction": reduction, "label_smoothing": label_smoothing}
    ours, ref = B.linear_cross_entropy(x, w, t, **options), native(x, w, t, **options)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    for a, n in zip(torch.autograd.grad(ours.sum(), [x, w]), torch.autograd.grad(ref.sum(), [x, w])):
        torch.testing.assert_close(a, n)
    with pytest.raises(IndexError, match="outside"):
        B.linear_cross_entropy(x, w, torch.zeros(3, dtype=torch.long), **options)


@pytest.mark.parametrize("options", [OPTIONS["mean"], OPTIONS["none"], OPTIONS["everything"]],
                         ids=["mean", "none", "everything"])
def test_several_blocks_equal_native(options):
    """A vocabulary of 33000 words makes blocks of 256 rows (kernels/ops.cpp, loss_block_rows): 520 tokens
    take three, the last of 8 rows, with ignored targets in each."""
    x, w, b, t = data(tokens=(520,), hidden=3, vocab=33000, ignored=0)
    t[::97] = -100
    ours, ref = B.linear_cross_entropy(x, w, t, b, **options), native(x, w, t, b, **options)
    g = torch.randn_like(ref)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, [x, w, b], g), torch.autograd.grad(ref, [x, w, b], g))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_reduced_precision_is_never_farther_from_float64_than_native(dtype, device):
    x64, w64, b64, t = data(tokens=(64,), hidden=32, vocab=300, device=device)
    x, w, b = (v.detach().to(dtype).requires_grad_() for v in (x64, w64, b64))
    exact = native(x64, w64, t, b64)
    exact_grads = torch.autograd.grad(exact, [x64, w64, b64])
    ours, ref = B.linear_cross_entropy(x, w, t, b), native(x, w, t, b)
    assert ours.dtype == dtype
    assert_close_to_reference(ours, exact, dtype, ref)
    for a, n, e in zip(torch.autograd.grad(ours, [x, w, b]), torch.autograd.grad(ref, [x, w, b]), exact_grads):
        assert a.dtype == dtype
        assert_close_to_reference(a, e, dtype, n)


def test_gradcheck_and_no_double_backward():
    x, w, b, t = data()
    for options in ({"label_smoothing": 0.2, "softcap": 3.0, "z_loss": 1e-2}, {"reduction": "none", "softcap": 2.0},
                    {"reduction": "sum", "divisor": 3.0}):
        assert torch.autograd.gradcheck(lambda x, w, b: B.linear_cross_entropy(x, w, t, b, **options), (x, w, b))
    (gw,) = torch.autograd.grad(B.linear_cross_entropy(x, w, t, b), [w], create_graph=False)
    with pytest.raises(NotImplementedError, match="no double backward"):
        torch.autograd.grad(B.linear_cross_entropy(x, w, t, b), [w], create_graph=True)


def test_every_ignored_target_gives_natives_answer():
    x, w, b, t = data(ignored=15)
    for reduction in ("mean", "sum", "none"):
        ours, ref = B.linear_cross_entropy(x, w, t, b, reduction=reduction), native(x, w, t, b, reduction=reduction)
        torch.testing.assert_close(ours, ref, equal_nan=True)  # mean: NaN (0/0), as native
        for a, n in zip(torch.autograd.grad(ours.sum(), [x, w, b]), torch.autograd.grad(ref.sum(), [x, w, b])):
            torch.testing.assert_close(a, n)
            assert not a.isnan().any()


def test_a_tied_weight_gets_both_gradients():
    """The LM head tied to the embedding: the embedding's lookup and the loss both use the weight."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (4, 5), generator=g)
    results = []
    for loss in (B.linear_cross_entropy, native):
        h = torch.tanh(F.embedding(ids[:, :-1], emb))
        results.append(torch.autograd.grad(loss(h, emb, ids[:, 1:]), emb)[0])
    torch.testing.assert_close(results[0], results[1])


def test_keeps_only_the_gradients_when_training():
    """Forward computed the gradients: nothing else is kept, so the weight may change in place before backward."""
    x, w, b, t = data()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v.shape) or v, lambda v: v):
        loss = B.linear_cross_entropy(x, w, t, b)
    assert sorted(saved) == sorted([x.reshape(-1, 6).shape, w.shape, b.shape])
    with torch.no_grad():
        w.mul_(2)
    loss.backward()


def test_opcheck():
    x, w, b, t = data()
    rows, tokens = x.reshape(-1, 6), t.reshape(-1)
    for mask, reduction in (([True] * 3, "mean"), ([False] * 3, "none"), ([False, True, False], "sum")):
        torch.library.opcheck(torch.ops.bpext.linear_cross_entropy_forward.default,
                              (rows, w, b, tokens, -100, 0.1, 2.0, 1e-3, reduction, None, mask))
    torch.library.opcheck(torch.ops.bpext.linear_cross_entropy_backward.default,
                          (torch.randn(15, dtype=torch.float64), rows.detach(), w.detach(), None, tokens, -100, 0.0,
                           0.0, 0.0, "none", None))


@pytest.mark.parametrize("path", ["compile", "torch.func", "export"])
def test_paths_equal_eager_native(path):
    x, w, b, t = data()

    def loss_of(fn):
        return lambda x, w, b: fn(x, w, t, b, label_smoothing=0.1)

    if path == "torch.func":
        for ours, ref in zip(torch.func.grad(loss_of(B.linear_cross_entropy), argnums=(0, 1, 2))(x, w, b),
                             torch.func.grad(loss_of(native), argnums=(0, 1, 2))(x, w, b)):
            torch.testing.assert_close(ours, ref)
        return

    class Head(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x, w, b):
            return self.fn(x, w, b)

    model = Head(loss_of(B.linear_cross_entropy))
    if path == "compile":
        torch._dynamo.reset()
        model = torch.compile(model, backend="aot_eager", fullgraph=True)
    else:
        model = torch.export.export(model, (x, w, b)).module()
    ours, ref = model(x, w, b), native(x, w, t, b, label_smoothing=0.1)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, [x, w, b]), torch.autograd.grad(ref, [x, w, b]))


def test_autocast_like_native():
    x, w, b, t = data(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = B.linear_cross_entropy(x, w, t, b), F.cross_entropy(F.linear(x, w, b).flatten(0, 1), t.flatten())
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=1e-2)
    for a, n in zip(torch.autograd.grad(ours, [x, w, b]), torch.autograd.grad(ref, [x, w, b])):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, n, rtol=2e-2, atol=2e-2)


def test_module_like_a_linear_and_cross_entropy():
    torch.manual_seed(0)
    head = bpext.nn.LinearCrossEntropy(6, 11, bias=True, label_smoothing=0.1)
    torch.manual_seed(0)
    linear = nn.Linear(6, 11)
    assert torch.equal(head.weight, linear.weight) and torch.equal(head.bias, linear.bias)
    assert head.state_dict().keys() == linear.state_dict().keys()
    x, _, _, t = data(dtype=torch.float32)
    torch.testing.assert_close(head(x, t), nn.CrossEntropyLoss(label_smoothing=0.1)(linear(x).flatten(0, 1),
                                                                                     t.flatten()))


BAD = {
    "target dtype": (lambda x, w, t: (x, w, t.float()), TypeError, "target must be int64"),
    "target shape": (lambda x, w, t: (x, w, t[:, :2]), ValueError, "target must have input's leading shape"),
    "class out of range": (lambda x, w, t: (x, w, t.clamp(min=0) + 20), IndexError, "outside \\[0, 11\\)"),
    "weight width": (lambda x, w, t: (x, w[:, :3], t), RuntimeError, "weight must be 2-D"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_input_raises_clearly(case):
    make, error, message = case
    x, w, _, t = data()
    with pytest.raises(error, match=message):
        B.linear_cross_entropy(*make(x, w, t))
    with pytest.raises(ValueError, match="reduction must be"):
        B.linear_cross_entropy(x, w, t, reduction="avg")


def test_float16_under_a_loss_scale_like_gradscaler():
    """Gradients made at scale 1 and scaled after would overflow (65536 x) or underflow: float16
    recomputes them in backward with the scaled loss gradient."""
    x64, w64, b64, t = data(tokens=(256,), hidden=16, vocab=64)
    x, w = (v.detach().half().requires_grad_() for v in (x64, w64))
    ours = torch.autograd.grad(B.linear_cross_entropy(x, w, t, dtype=torch.float32) * 65536, [x, w])
    ref = torch.autograd.grad(F.cross_entropy(F.linear(x, w).float(), t) * 65536, [x, w])  # as autocast has it
    for a, n in zip(ours, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float() / 65536, n.float() / 65536, rtol=2e-2, atol=1e-5)


def test_bfloat16_scaled_loss_scales_the_gradient_as_natively():
    """The loss divided by 3 (gradient accumulation): the gradient scales as native's does (the
    scale is applied in float32 to gradients made in forward, not rounded to bfloat16 first)."""
    x64, w64, _, t = data(tokens=(256,), hidden=16, vocab=64)
    x, w = (v.detach().bfloat16().requires_grad_() for v in (x64, w64))
    ratios = []
    for fn in (B.linear_cross_entropy, native):
        for scale in (1.0, 1 / 3):
            loss = fn(x, w, t, dtype=torch.float32) if fn is B.linear_cross_entropy else F.cross_entropy(
                F.linear(x, w).float(), t)
            ratios.append(torch.autograd.grad(loss * scale, [w])[0].double().abs().sum())
    ours, theirs = ratios[1] / ratios[0], ratios[3] / ratios[2]
    assert abs(ours.item() * 3 - 1) < 1e-3 and abs(ours.item() / theirs.item() - 1) < 2e-3


def test_only_what_requires_a_gradient_is_computed_and_kept():
    """A frozen head (LoRA): no (vocab, hidden) weight gradient is made or kept."""
    x, w, b, t = data()
    w, b = w.detach(), b.detach()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(tuple(v.shape)) or v, lambda v: v):
        loss = B.linear_cross_entropy(x, w, t, b)
    assert saved == [(15, 6)]
    (gx,) = torch.autograd.grad(loss, [x])
    torch.testing.assert_close(gx, torch.autograd.grad(native(x, w, t, b), [x])[0])
