"""Every autograd path gives native's answer: a weight or bias used twice, non-reentrant and
reentrant checkpointing, torch.func running the fused backward ops, inference mode, zero-width
layers and non-finite inputs. Each case against the same computation done natively through the
same path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad
from torch.profiler import ProfilerActivity, profile

import bpext

B = bpext.functional


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def _shared():
    """A weight and a bias used by two layers (float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, generator=g)
    w = torch.randn(4, 4, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_()
    return x, w, b


def _native_twice(x, w, b):
    return F.linear(torch.tanh(F.linear(x, w, b)), w, b)


# ---- a tensor passed in several places ------------------------------------------------------

SHARED_CALLS = {
    "mlp_forward op": lambda x, w, b: torch.ops.bpext.mlp_forward(x, [w, w], [b, b], "tanh", [], "identity", [], True)[0],
    "functional.mlp": lambda x, w, b: B.mlp(x, [w, w], [b, b], "tanh"),
    "dense twice": lambda x, w, b: B.dense(B.dense(x, w, b, "tanh"), w, b),
}


@pytest.mark.parametrize("call", SHARED_CALLS.values(), ids=SHARED_CALLS.keys())
def test_a_weight_and_bias_used_twice_in_eager(call):
    x, w, b = _shared()
    for ours, ref in zip(_grads(call(x, w, b).sum(), [w, b]), _grads(_native_twice(x, w, b).sum(), [w, b])):
        torch.testing.assert_close(ours, ref)


def _shared_model():
    lin = nn.Linear(4, 4, dtype=torch.float64)
    return nn.Sequential(lin, nn.Tanh(), lin)


@pytest.mark.parametrize("path", ["eager", "compile", "export", "torch.func"])
def test_a_linear_used_twice_in_a_converted_model(path):
    """nn.Sequential(lin, Tanh, lin) with one Linear in both places, fused into one mlp op."""
    torch.manual_seed(0)
    native = _shared_model()
    ours = bpext.convert(copy.deepcopy(native))
    assert bpext.fusions(ours)  # the shared pair is fused: the case under test
    x = torch.randn(6, 4, dtype=torch.float64)

    def run(model):
        if path == "torch.func":
            params = dict(model.named_parameters())
            return grad(lambda p: functional_call(model, p, (x,)).square().sum())(params)
        if path == "compile":
            torch._dynamo.reset()
            model = torch.compile(model, backend="aot_eager", fullgraph=True)
        elif path == "export":  # below a plain root module
            model = torch.export.export(nn.Sequential(model), (x,)).module()
        names, params = zip(*model.named_parameters())
        return dict(zip(names, _grads(model(x).square().sum(), params)))

    ours_grads, native_grads = run(ours), run(native)
    assert ours_grads.keys() == native_grads.keys()
    for name in native_grads:
        torch.testing.assert_close(ours_grads[name], native_grads[name])


def test_gate_and_up_weights_that_are_one_tensor():
    x, w, b = _shared()
    for fn, ref in ((lambda: B.gated(x, w, w, b, b, "silu"), lambda: F.silu(F.linear(x, w, b)) * F.linear(x, w, b)),
                    (lambda: B.gated_mlp(x, w, w, w, b, b, b, "gelu"),
                     lambda: F.linear(F.gelu(F.linear(x, w, b)) * F.linear(x, w, b), w, b))):
        for ours, native in zip(_grads(fn().sum(), [w, b]), _grads(ref().sum(), [w, b])):
            torch.testing.assert_close(ours, native)


# ---- activation checkpointing -----------------------------------------------------------------


class GatedBlock(nn.Module):
    """LLaMA's MLP as transformers writes it."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class GatedOnly(GatedBlock):
    def forward(self, x):
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)


CHECKPOINTED = {
    "activation": lambda: nn.Sequential(nn.LayerNorm(8), nn.SiLU()),
    "dense": lambda: nn.Sequential(nn.Linear(8, 8), nn.GELU()),
    "mlp": lambda: nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)),
    "gated": GatedOnly,
    "gated_mlp": GatedBlock,
    "shared weight": lambda: (lambda lin: nn.Sequential(nn.LayerNorm(8), lin, nn.Tanh(), lin))(nn.Linear(8, 8)),
}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("make", CHECKPOINTED.values(), ids=CHECKPOINTED.keys())
def test_activation_checkpointing_equals_native(make, reentrant):
    torch.manual_seed(0)
    native = make()
    ours = bpext.convert(copy.deepcopy(native))
    x = torch.randn(3, 5, 8)
    results = []
    for model in (native, ours):
        xi = x.clone().requires_grad_()
        y = torch.utils.checkpoint.checkpoint(model, xi, use_reentrant=reentrant)
        y.square().sum().backward()  # the reentrant form takes no torch.autograd.grad
        results.append((y, xi.grad, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0])


def test_transformers_gradient_checkpointing_of_a_converted_llama():
    """gradient_checkpointing_enable() (non-reentrant, transformers' default) on a converted LLaMA."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    native = transformers.LlamaForCausalLM(config)
    ours = bpext.convert(copy.deepcopy(native))
    assert any("gated_mlp" in f for fs in bpext.fusions(ours).values() for f in fs)
    ids = torch.randint(0, 64, (2, 10))
    losses = []
    for model in (native, ours):
        model.train()
        model.gradient_checkpointing_enable()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)


# ---- torch.func runs the fused backward ops -------------------------------------------------------

FUSED = {
    "activation_backward": (lambda x, w: B.activation(x @ w, "gelu"), 2),
    "dense_backward": (lambda x, w: B.dense(x, w, None, "gelu"), 2),
    "mlp_backward": (lambda x, w: B.mlp(x, [w, w], None, "gelu"), 2),
    "gated_backward": (lambda x, w: B.gated(x, w, w, activation="silu"), 2),
    "gated_mlp_backward": (lambda x, w: B.gated_mlp(x, w, w, w, activation="silu"), 2),
}


@pytest.mark.parametrize("op", FUSED, ids=FUSED.keys())
def test_torch_func_grad_runs_the_fused_backward_op(op):
    fn, _ = FUSED[op]
    x, w = torch.randn(6, 4), torch.randn(4, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours = grad(lambda w: fn(x, w).square().sum())(w)
    assert f"bpext::{op}" in {e.name for e in prof.events()}
    wn = w.clone().requires_grad_()
    expected = torch.autograd.grad(fn(x, wn).square().sum(), wn)[0]
    torch.testing.assert_close(ours, expected)


def test_nested_transforms_still_compose_differentiable_pieces():
    """grad of grad and vmap of grad need the differentiable form; they equal native."""
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    ours = lambda w: B.dense(x, w, None, "gelu").sum()  # noqa: E731
    native = lambda w: F.gelu(F.linear(x, w)).sum()  # noqa: E731
    torch.testing.assert_close(grad(lambda v: grad(ours)(v).sum())(w), grad(lambda v: grad(native)(v).sum())(w))
    ws = torch.randn(2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(grad(ours))(ws), torch.func.vmap(grad(native))(ws))


# ---- what backward keeps -----------------------------------------------------------------------
# The gated layers keep gate and up, x only where a weight needs a gradient and the weights only
# where x does, as native's products; double backward reaches x and the weights through gate and up.

GATED = {
    "gated": (lambda x, wg, wu, wd, b: B.gated(x, wg, wu, b, b, "silu"),
              lambda x, wg, wu, wd, b: F.silu(F.linear(x, wg, b)) * F.linear(x, wu, b)),
    "gated_mlp": (lambda x, wg, wu, wd, b: B.gated_mlp(x, wg, wu, wd, b, b, None, "gelu"),
                  lambda x, wg, wu, wd, b: F.linear(F.gelu(F.linear(x, wg, b)) * F.linear(x, wu, b), wd)),
}


def _gated_inputs(kind: str, needs: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=g)
    wg, wu, wd = (torch.randn(*shape, dtype=torch.float64, generator=g) for shape in ((6, 4), (6, 4), (3, 6)))
    b = torch.randn(6, dtype=torch.float64, generator=g)
    inputs = [x, wg, wu, wd, b]
    wanted = {"x": [0], "weights": [1, 2, 3, 4], "both": [0, 1, 2, 3, 4]}[needs]
    wanted = [i for i in wanted if kind == "gated_mlp" or i != 3]  # the gated layer has no down projection
    for i in wanted:
        inputs[i].requires_grad_()
    return inputs, [inputs[i] for i in wanted]


@pytest.mark.parametrize("needs", ["x", "weights"])
@pytest.mark.parametrize("kind", GATED)
def test_gated_layers_keep_only_what_their_gradients_read(kind, needs):
    """Neither x nor the weights are kept where no gradient reads them, so an in-place edit after
    forward that native tolerates (x edited when only x needs a gradient) gives native's gradients."""
    edit = [0] if needs == "x" else [1, 2]  # what no gradient reads
    inputs, _ = _gated_inputs(kind, needs)
    copies = [t * 1 for t in inputs]  # the tensors forward sees
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.data_ptr()) or t, lambda t: t):
        GATED[kind][0](*copies)
    assert not {copies[i].data_ptr() for i in edit} & set(kept)
    results = []
    for fn in GATED[kind]:
        inputs, wanted = _gated_inputs(kind, needs)
        copies = [t * 1 for t in inputs]  # the tensors forward sees, edited after it
        y = fn(*copies)
        with torch.no_grad():
            for i in edit:
                copies[i].add_(1.0)
        results.append(_grads(y.square().sum(), wanted))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("needs", ["x", "weights", "both"])
@pytest.mark.parametrize("kind", GATED)
def test_gated_double_backward_through_the_kept_pre_activations(kind, needs):
    fn, native = GATED[kind]
    inputs, wanted = _gated_inputs(kind, needs)
    positions = [i for i, t in enumerate(inputs) if t.requires_grad]

    def of(f):
        return lambda *ts: f(*[ts[positions.index(i)] if i in positions else t for i, t in enumerate(inputs)])
    assert torch.autograd.gradgradcheck(of(fn), wanted)
    first = [torch.autograd.grad(f(*inputs).square().sum(), wanted, create_graph=True) for f in (fn, native)]
    second = [torch.autograd.grad(sum(g.sum() for g in grads), wanted, allow_unused=True) for grads in first]
    for ours, ref in zip(*second):
        torch.testing.assert_close(ours, ref)
    x = inputs[0].detach()
    hessians = [torch.func.hessian(lambda x: f(x, *[t.detach() for t in inputs[1:]]).square().sum())(x)
                for f in (fn, native)]
    torch.testing.assert_close(*hessians)


# The MLP keeps one tensor per layer, x only where the first weight needs a gradient and a weight
# only where something below its layer does; double backward reaches the layers through the kept tensors.

MLP_ACTS = {"gelu keeps z": ("gelu", "gelu"), "relu keeps y": ("relu", "sigmoid"),
            "tanh, linear out": ("tanh", "identity")}
_NATIVE_ACTS = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda t: t}


def _mlp_fns(acts):
    hidden, output = acts

    def ours(x, w0, b0, w1, b1, w2, b2):
        return B.mlp(x, [w0, w1, w2], [b0, b1, b2], hidden, output)

    def op(x, w0, b0, w1, b1, w2, b2):  # the op's registered autograd (torch.compile's and export's path)
        return torch.ops.bpext.mlp_forward(x, [w0, w1, w2], [b0, b1, b2], hidden, [], output, [], True)[0]

    def native(x, w0, b0, w1, b1, w2, b2):
        act, out = _NATIVE_ACTS[hidden], _NATIVE_ACTS[output]
        return out(F.linear(act(F.linear(act(F.linear(x, w0, b0)), w1, b1)), w2, b2))
    return {"bpext.mlp": ours, "mlp_forward op": op, "native": native}


# what needs a gradient -> what no gradient reads (native tolerates editing it in place after forward)
MLP_NEEDS = {"x": ([0], [0]), "weights": ([1, 2, 3, 4, 5, 6], [1]), "last layer": ([5, 6], [0, 1, 3]),
             "middle bias": ([4], [0, 1, 3]), "all": ([0, 1, 2, 3, 4, 5, 6], [])}


def _mlp_inputs(needs):
    g = torch.Generator().manual_seed(0)
    shapes = ((2, 3, 4), (6, 4), (6,), (5, 6), (5,), (3, 5), (3,))
    inputs = [torch.randn(*shape, dtype=torch.float64, generator=g) for shape in shapes]
    wanted = MLP_NEEDS[needs][0]
    for i in wanted:
        inputs[i].requires_grad_()
    return inputs, [inputs[i] for i in wanted]


@pytest.mark.parametrize("needs", [n for n in MLP_NEEDS if MLP_NEEDS[n][1]])
@pytest.mark.parametrize("acts", MLP_ACTS.values(), ids=MLP_ACTS.keys())
def test_mlp_keeps_only_what_its_gradients_read(acts, needs):
    """x and the weights are not kept where no gradient reads them, so an in-place edit after
    forward that native tolerates gives native's gradients (it raised before, on both paths)."""
    edit = MLP_NEEDS[needs][1]
    fns = _mlp_fns(acts)
    for name in ("bpext.mlp", "mlp_forward op"):
        inputs, _ = _mlp_inputs(needs)
        copies = [t * 1 for t in inputs]
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.data_ptr()) or t, lambda t: t):
            fns[name](*copies)
        assert not {copies[i].data_ptr() for i in edit} & set(kept), name
    results = {}
    for name, fn in fns.items():
        inputs, wanted = _mlp_inputs(needs)
        copies = [t * 1 for t in inputs]  # the tensors forward sees, edited after it
        y = fn(*copies)
        with torch.no_grad():
            for i in edit:
                copies[i].add_(1.0)
        results[name] = _grads(y.square().sum(), wanted)
    for name in ("bpext.mlp", "mlp_forward op"):
        for ours, ref in zip(results[name], results["native"]):
            torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("loss", ["sum", "square"])  # sum: the first gradients do not depend on y
@pytest.mark.parametrize("needs", MLP_NEEDS)
@pytest.mark.parametrize("acts", MLP_ACTS.values(), ids=MLP_ACTS.keys())
def test_mlp_double_backward_through_the_kept_tensors(acts, needs, loss):
    fns = _mlp_fns(acts)
    inputs, wanted = _mlp_inputs(needs)
    positions = [i for i, t in enumerate(inputs) if t.requires_grad]
    reduce = (lambda y: y.sum()) if loss == "sum" else (lambda y: y.square().sum())

    def first(fn):
        grads = torch.autograd.grad(reduce(fn(*inputs)), wanted, create_graph=True)
        total = sum((g * g).sum() for g in grads)
        if not total.requires_grad:  # the first gradients are constants (the last layer's, of a linear loss)
            return [torch.zeros_like(t) for t in wanted]
        return [g if g is not None else torch.zeros_like(t)
                for g, t in zip(torch.autograd.grad(total, wanted, allow_unused=True), wanted)]
    expected = first(fns["native"])
    for name in ("bpext.mlp", "mlp_forward op"):
        for ours, ref in zip(first(fns[name]), expected):
            torch.testing.assert_close(ours, ref, msg=name)
    if loss == "square":
        def of(f):
            return lambda *ts: f(*[ts[positions.index(i)] if i in positions else t for i, t in enumerate(inputs)])
        assert torch.autograd.gradgradcheck(of(fns["bpext.mlp"]), wanted)


@pytest.mark.parametrize("acts", MLP_ACTS.values(), ids=MLP_ACTS.keys())
def test_mlp_second_derivatives_under_torch_func_equal_native(acts):
    """hessian (reverse over reverse) and jvp of grad (forward over reverse: the kept tensors' tangents)."""
    fns = _mlp_fns(acts)
    inputs, _ = _mlp_inputs("all")
    inputs = [t.detach() for t in inputs]

    def loss(fn):
        return lambda x, w1: fn(x, inputs[1], inputs[2], w1, *inputs[4:]).square().sum()
    args, tangents = (inputs[0], inputs[3]), (torch.ones_like(inputs[0]), torch.ones_like(inputs[3]))
    for name in ("bpext.mlp",):
        for transform in (lambda f: torch.func.hessian(f, argnums=(0, 1))(*args),
                          lambda f: torch.func.jvp(grad(f, argnums=(0, 1)), args, tangents)[1]):
            torch.testing.assert_close(transform(loss(fns[name])), transform(loss(fns["native"])))


# Per-sample gradients differentiated again: vmap(grad(f)) where an autograd outside the transforms
# tracks the weights (the layers compose native ops there; their Functions gave wrong numbers or raised).

_PER_SAMPLE = {
    "activation": (lambda x, w0, w1: B.activation(F.linear(x, w0), "gelu"), lambda x, w0, w1: F.gelu(F.linear(x, w0))),
    "dense": (lambda x, w0, w1: B.dense(B.dense(x, w0, None, "gelu"), w1, None, "tanh"),
              lambda x, w0, w1: torch.tanh(F.linear(F.gelu(F.linear(x, w0)), w1))),
    "mlp identity": (lambda x, w0, w1: B.mlp(x, [w0, w1], None, "identity", "tanh"),
                     lambda x, w0, w1: torch.tanh(F.linear(F.linear(x, w0), w1))),
    "mlp gelu": (lambda x, w0, w1: B.mlp(x, [w0, w1], None, "gelu", "tanh"),
                 lambda x, w0, w1: torch.tanh(F.linear(F.gelu(F.linear(x, w0)), w1))),
    "gated": (lambda x, w0, w1: B.gated(x, w0, w0, None, None, "silu"),
              lambda x, w0, w1: F.silu(F.linear(x, w0)) * F.linear(x, w0)),
    "gated_mlp": (lambda x, w0, w1: B.gated_mlp(x, w0, w0, w1, activation="silu"),
                  lambda x, w0, w1: F.linear(F.silu(F.linear(x, w0)) * F.linear(x, w0), w1)),
}


@pytest.mark.parametrize("kind", _PER_SAMPLE)
def test_backward_through_per_sample_gradients_equals_native(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, generator=g)
    results = []
    for fn in _PER_SAMPLE[kind]:
        w0, w1 = (torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i)).requires_grad_()
                  for i, shape in enumerate(((4, 3), (2, 4))))
        per_sample = torch.func.vmap(torch.func.grad(lambda xi: fn(xi, w0, w1).square().sum()))(x)
        results.append((per_sample, *_grads(per_sample.sin().sum(), [w0, w1])))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref)


def test_backward_through_per_sample_gradients_of_a_converted_model():
    torch.manual_seed(0)
    native = nn.Sequential(nn.Linear(3, 6), nn.GELU(), nn.Linear(6, 2)).double()
    ours = bpext.convert(copy.deepcopy(native))
    assert bpext.fusions(ours)
    x = torch.randn(5, 3, dtype=torch.float64)
    results = []
    for model in (native, ours):
        params = dict(model.named_parameters())  # tracked by autograd outside the transforms
        per_sample = torch.func.vmap(torch.func.grad(
            lambda p, xi: functional_call(model, p, (xi[None],)).square().sum()), in_dims=(None, 0))(params, x)
        results.append(_grads(sum(g.sin().sum() for g in per_sample.values()), list(params.values())))
    for ours_, ref in zip(*results):
        torch.testing.assert_close(ours_, ref)


# ---- inference mode ---------------------------------------------------------------------------


INFERENCE = {
    "mlp without bias": lambda: bpext.nn.MLP(4, [6], 3, bias=False),
    "mlp": lambda: bpext.nn.MLP(4, [6], 3),
    "dense": lambda: bpext.nn.Dense(4, 3, activation="gelu"),
    "gated_mlp without bias": lambda: bpext.nn.GatedMLP(4, 6, bias=False),
    "converted stack without bias": lambda: bpext.convert(
        nn.Sequential(nn.Linear(4, 6, bias=False), nn.GELU(), nn.Linear(6, 3, bias=False))),
}


@pytest.mark.parametrize("make", INFERENCE.values(), ids=INFERENCE.keys())
def test_inference_mode_equals_no_grad(make):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        got = model(x)
    assert got.is_inference()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_inference_tensor_bias_in_a_training_forward():
    """A bias made in inference mode (no version counter) in a forward that records a graph."""
    with torch.inference_mode():
        b = torch.randn(6)
    x, w1, w2 = torch.randn(3, 4, requires_grad=True), torch.randn(6, 4), torch.randn(2, 6)
    y = B.mlp(x, [w1, w2], [b, None], "gelu")
    (gx,) = _grads(y.sum(), [x])
    xn = x.detach().requires_grad_()
    torch.testing.assert_close(gx, _grads(F.linear(F.gelu(F.linear(xn, w1, b)), w2).sum(), [xn])[0])


# ---- zero-width layers, non-finite inputs --------------------------------------------------------


@pytest.fixture
def deterministic():
    """torch.empty fills new memory with NaN."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("widths", [(3, 5, 0), (3, 0, 4), (0, 5, 2)], ids=str)
def test_zero_width_layers_give_zero_gradients(widths, deterministic):
    """Uninitialized memory is NaN here (deterministic mode): a gradient not written shows."""
    w_in, w_hid, w_out = widths
    x = torch.randn(2, w_in, requires_grad=True)
    ws = [torch.randn(w_hid, w_in, requires_grad=True), torch.randn(w_out, w_hid, requires_grad=True)]
    bs = [torch.randn(w_hid, requires_grad=True), torch.randn(w_out, requires_grad=True)]
    ours = _grads(B.mlp(x, ws, bs, "gelu").sum(), [x, *ws, *bs])
    native = _grads(F.linear(F.gelu(F.linear(x, ws[0], bs[0])), ws[1], bs[1]).sum(), [x, *ws, *bs])
    for a, b, t in zip(ours, native, [x, *ws, *bs]):
        if a is None:  # a bias of width 0 is the mlp ops' "no bias": no gradient, where native's is empty
            assert t.numel() == 0 and b.numel() == 0
            continue
        torch.testing.assert_close(a, b)


def test_double_backward_of_an_mlp_on_a_vector_of_zero_features():
    """Its input gradient is (0), as the composite backward's "no gradient" placeholder: kept, as native's."""
    x = torch.randn(0, dtype=torch.float64, requires_grad=True)
    w0, w1 = torch.randn(1, 0, dtype=torch.float64, requires_grad=True), torch.randn(2, 1, dtype=torch.float64)
    (gx,) = torch.autograd.grad(B.mlp(x, [w0, w1], None, "gelu", "gelu").sum(), x, create_graph=True)
    (gn,) = torch.autograd.grad(F.gelu(F.linear(F.gelu(F.linear(x, w0)), w1)).sum(), x, create_graph=True)
    assert gx.shape == gn.shape == (0,)


@pytest.mark.parametrize("widths", [(3, 5, 0), (3, 0, 4)], ids=str)
def test_mlp_backward_op_writes_every_gradient_past_a_zero_width_layer(widths, deterministic):
    w_in, w_hid, w_out = widths
    x = torch.randn(4, w_in, dtype=torch.float64)
    ws = [torch.randn(w_hid, w_in, dtype=torch.float64), torch.randn(w_out, w_hid, dtype=torch.float64)]
    bs = [torch.empty(0, dtype=torch.float64)] * 2
    y, saved = torch.ops.bpext.mlp_forward(x, ws, bs, "gelu", [], "identity", [], True)
    grad_y = torch.randn_like(y)
    grad_x, grad_w, _ = torch.ops.bpext.mlp_backward(grad_y, x, y, ws, saved, "gelu", [], "identity", [],
                                                     [True] * 3 + [False] * 2)
    xn, wn = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws]
    expected = torch.autograd.grad(F.linear(F.gelu(F.linear(xn, wn[0])), wn[1]), [xn, *wn], grad_y)
    torch.testing.assert_close([grad_x, *grad_w], list(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["silu", "quick_gelu"])
def test_swish_derivatives_at_the_ends_of_the_range_are_their_limits(name, dtype):
    """z * sigmoid(k z) at +-max (k z overflows): derivative 1 and 0, second derivative 0, not NaN."""
    big = torch.finfo(dtype).max
    x = torch.tensor([big, -big, float("inf"), -float("inf")], dtype=dtype, requires_grad=True)
    (g,) = torch.autograd.grad(B.activation(x, name).sum(), x, create_graph=True)
    assert g.tolist() == [1.0, 0.0, 1.0, 0.0]
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert gg.tolist() == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("name,params", [("elu", {"alpha": 0.5}), ("elu", {}), ("hardswish", {})])
def test_gradient_at_nan_is_nan_whatever_the_length(name, params):
    """Native's ELU and hardswish derivatives at NaN are 1 for a tensor of a few elements (its scalar
    loop) and NaN for a longer one (its vectorized loop). bpext's is NaN at every length and position;
    at +-inf and +-max it equals native's."""
    big = torch.finfo(torch.float32).max
    act = bpext.resolve(name, **params)
    for n in (5, 64, 67):
        x = torch.tensor([-float("inf"), float("inf"), float("nan"), -big, big]).repeat(14)[:n].requires_grad_()
        (ours,) = torch.autograd.grad(B.activation(x, act).sum(), x)
        xn = x.detach().requires_grad_()
        (native,) = torch.autograd.grad(act.reference(xn).sum(), xn)
        nan = x.detach().isnan()
        assert ours[nan].isnan().all()
        torch.testing.assert_close(ours[~nan], native[~nan])


# ---- the ops with their autograd in C++ under forward-mode AD -----------------------------------


def test_the_ops_carry_tangents():
    """bpext::dense's and bpext::mlp's autograd (kernels/autograd.cpp) carries forward-mode tangents, of
    the inputs and of the weights, as the functional layers do."""
    import torch.autograd.forward_ad as fwAD
    x, w, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    t, w_t = torch.randn_like(x), torch.randn_like(w)
    _, expected = torch.func.jvp(lambda x, w: torch.tanh(F.linear(x, w, b)), (x, w), (t, w_t))
    with fwAD.dual_level():
        dual, dual_w = fwAD.make_dual(x, t), fwAD.make_dual(w, w_t)
        for y in (torch.ops.bpext.dense(dual, dual_w, b, "tanh", []),
                  torch.ops.bpext.mlp(dual, [dual_w], [b], "tanh", [], "tanh", []),
                  B.dense(dual, dual_w, b, "tanh"), B.mlp(dual, [dual_w], [b], "identity", "tanh")):
            torch.testing.assert_close(fwAD.unpack_dual(y).tangent, expected)


# ---- forward mode inside another derivative ------------------------------------------------------

NESTED = {
    "activation": (lambda x, w, wu, wd, b: B.activation(x, "tanh"), lambda x, w, wu, wd, b: torch.tanh(x)),
    "dense": (lambda x, w, wu, wd, b: B.dense(x, w, b, "silu"), lambda x, w, wu, wd, b: F.silu(F.linear(x, w, b))),
    "mlp": (lambda x, w, wu, wd, b: B.mlp(x, [w, wd], [b, None], "gelu"),
            lambda x, w, wu, wd, b: F.linear(F.gelu(F.linear(x, w, b)), wd)),
    "gated": (lambda x, w, wu, wd, b: B.gated(x, w, wu, b, None, "tanh"),
              lambda x, w, wu, wd, b: torch.tanh(F.linear(x, w, b)) * F.linear(x, wu)),
    "gated_mlp": (lambda x, w, wu, wd, b: B.gated_mlp(x, w, wu, wd, b, None, None, "gelu"),
                  lambda x, w, wu, wd, b: F.linear(F.gelu(F.linear(x, w, b)) * F.linear(x, wu), wd)),
}
TRANSFORMS = {
    "jacfwd(jacfwd)": lambda f: torch.func.jacfwd(torch.func.jacfwd(f)),
    "jacrev(jacfwd)": lambda f: torch.func.jacrev(torch.func.jacfwd(f)),
    "jacfwd(hessian)": lambda f: torch.func.jacfwd(torch.func.hessian(f)),
    "hessian": torch.func.hessian,
}


@pytest.mark.parametrize("transform", TRANSFORMS, ids=TRANSFORMS.keys())
@pytest.mark.parametrize("layer", NESTED, ids=NESTED.keys())
def test_forward_mode_inside_another_derivative_equals_native(layer, transform):
    """Once 0 or a crash: a Function's jvp runs below an outer transform, which sees none of its work;
    there the layers compose native ops (third derivatives included)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, dtype=torch.float64, generator=g)
    w, wu = torch.randn(4, 3, dtype=torch.float64, generator=g), torch.randn(4, 3, dtype=torch.float64, generator=g)
    wd, b = torch.randn(3, 4, dtype=torch.float64, generator=g), torch.randn(4, dtype=torch.float64, generator=g)
    ours, native = (lambda x, f=f: f(x, w, wu, wd, b).square().sum() for f in NESTED[layer])
    torch.testing.assert_close(TRANSFORMS[transform](ours)(x), TRANSFORMS[transform](native)(x))


def test_a_backward_op_differentiated_twice_raises_for_a_third_derivative():
    """Once a silent wrong number: the backward op's vjp cut its inputs' graphs, so a derivative of it
    lost their dependence; now it keeps them, and what would need a third derivative raises."""
    g = torch.Generator().manual_seed(0)
    gy, x, w = (torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_() for shape in ((3, 4), (3, 5),
                                                                                                  (4, 5)))
    def ours():
        s = torch.tanh(F.linear(x, w))
        return torch.ops.bpext.dense_backward(gy, x, w, s, "tanh", [], [True, True, False])[0]

    def native():
        s = torch.tanh(F.linear(x, w))
        return (gy * (1 - s ** 2)) @ w

    (gw,) = torch.autograd.grad(ours().square().sum(), [w], create_graph=True)
    with pytest.raises(NotImplementedError, match="third derivative"):
        torch.autograd.grad(gw.sum(), [x])
    # a derivative of its derivative in gy (no third derivative of tanh) equals native's
    second = [torch.autograd.grad(torch.autograd.grad(f().square().sum(), [gy], create_graph=True)[0].sum(), [w])
              for f in (ours, native)]
    torch.testing.assert_close(*second)


# ---- found by a review of the one autograd (kernels/autograd.cpp) ----------------------------------


@pytest.mark.parametrize("act", ["tanh", "gelu", "relu"])
@pytest.mark.parametrize("layer", ["dense", "mlp"])
@pytest.mark.parametrize("dual", ["x", "bias"])
def test_reverse_over_forward_equals_native(act, layer, dual):
    """The gradient of a tangent: its dependence on the primals through act' reaches them (it was lost
    while the tangent was computed before the node's history was set)."""
    import torch.autograd.forward_ad as fwAD
    g = torch.Generator().manual_seed(0)
    x0, w0, b0 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((4, 3), (3, 3), (3,)))
    ref = bpext.activations.resolve(act).reference
    layers = {"dense": (lambda x, w, b: B.dense(x, w, b, act), lambda x, w, b: ref(F.linear(x, w, b))),
              "mlp": (lambda x, w, b: B.mlp(x, [w, w], [b, b], act, act),
                      lambda x, w, b: ref(F.linear(ref(F.linear(x, w, b)), w, b)))}
    results = []
    for f in layers[layer]:
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        with fwAD.dual_level():
            args = [fwAD.make_dual(x, torch.ones_like(x)) if dual == "x" else x, w,
                    fwAD.make_dual(b, torch.ones_like(b)) if dual == "bias" else b]
            tangent = fwAD.unpack_dual(f(*args)).tangent
        results.append(torch.autograd.grad(tangent.square().sum(), (x, w, b), allow_unused=True,
                                           materialize_grads=True))
    for ours, native in zip(*results):
        torch.testing.assert_close(ours, native)


@pytest.mark.parametrize("x_shape,w_shape", [((0, 3), (3, 3)), ((4, 3), (0, 3)), ((2, 0, 3), (3, 3))])
def test_forward_ad_of_an_empty_output(x_shape, w_shape):
    """A dense layer whose derivative reads z, with no output elements: an empty tangent of native's shape."""
    import torch.autograd.forward_ad as fwAD
    x, w = torch.randn(*x_shape, dtype=torch.float64), torch.randn(*w_shape, dtype=torch.float64)
    b = torch.randn(w_shape[0], dtype=torch.float64)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        tangents = [fwAD.unpack_dual(f(dual)).tangent for f in (lambda t: B.dense(t, w, b, "gelu"),
                                                               lambda t: F.gelu(F.linear(t, w, b)))]
    assert tangents[0].shape == tangents[1].shape


def test_double_backward_of_an_mlp_with_a_layer_of_no_width():
    """A hidden layer of width 0 keeps nothing differentiable: the gradients double backward sends into
    the later layers' kept tensors reach them (they landed one place off: a shape error or 4.5 off)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    tensors = [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((0, 3), (2, 0), (2,), (2, 2), (2,))]

    def native(x, weights, biases):
        for w, b in zip(weights, biases):
            x = torch.tanh(F.linear(x, w, b))
        return x

    for wanted in ((True,) * 5, (False, False, True, True, False)):
        results = []
        for f in (lambda x, ws, bs: B.mlp(x, ws, bs, "tanh", "tanh"), native):
            w0, w1, b1, w2, b2 = ts = [t.clone().requires_grad_(m) for t, m in zip(tensors, wanted)]
            tracked = [t for t in ts if t.requires_grad]
            first = torch.autograd.grad(f(x, [w0, w1, w2], [None, b1, b2]).square().sum(), tracked, create_graph=True)
            results.append(torch.autograd.grad(sum(q.square().sum() for q in first), tracked, allow_unused=True,
                                               materialize_grads=True))
        for ours, native_ in zip(*results):
            torch.testing.assert_close(ours, native_)
