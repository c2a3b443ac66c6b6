"""A converted model computes what the model computes now: after hooks, attributes, children,
adapters or dtypes change, and with forwards whose effects a trace cannot record. Every case
against the same model unconverted, through the same change."""

from __future__ import annotations

import copy
import functools
import inspect
import pickle
import threading
import warnings

import pytest
import torch
from torch import nn

import bpext


def _pair(make, seed=0):
    torch.manual_seed(seed)
    native = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = bpext.convert(copy.deepcopy(native))
    return native, ours


def _stack():
    return nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.1), nn.Linear(16, 4))


def _step(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().sum().backward()
    return y.detach(), x.grad, [p.grad for p in model.parameters()]


class WithExtraPath(nn.Linear):
    """A Linear subclass that adds a path: not a Linear."""

    def forward(self, x):
        return super().forward(x) + x.sum(-1, keepdim=True).sin()


CHANGES = {
    "forward hook on a layer": lambda m: m[0].register_forward_hook(lambda mod, i, o: o * 2),
    "pre-hook on the activation": lambda m: m[1].register_forward_pre_hook(lambda mod, i: (i[0] + 1,)),
    "an activation's parameter": lambda m: setattr(m[1], "negative_slope", 0.5),
    "a child replaced": lambda m: m.__setitem__(1, nn.Tanh()),
    "a Linear replaced by a subclass": lambda m: m.__setitem__(0, WithExtraPath(8, 16)),
    "a Linear's class changed in place": lambda m: setattr(m[2], "__class__", WithExtraPath),
    "the weight replaced": lambda m: setattr(m[0], "weight", nn.Parameter(torch.ones(16, 8))),
    "the bias removed": lambda m: setattr(m[2], "bias", None),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_a_change_after_convert_is_what_runs(change):
    native, ours = _pair(_stack)
    assert bpext.fusions(ours) == {"": ["mlp(0, 2, leaky_relu(negative_slope=0.1), identity)"]}
    torch.manual_seed(1)
    change(native)
    torch.manual_seed(1)
    change(ours)
    x = torch.randn(5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(_step(ours, x), _step(native, x))


def test_the_change_is_said_once_and_undoing_it_fuses_again():
    _, ours = _pair(_stack)
    handle = ours[0].register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match=r"Sequential changed after convert \(the hooks or forward of 0\)"):
        ours(torch.randn(2, 8))
    assert bpext.fusions(ours) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(torch.randn(2, 8))  # said once
    handle.remove()
    assert bpext.fusions(ours) == {"": ["mlp(0, 2, leaky_relu(negative_slope=0.1), identity)"]}


def test_convert_again_fuses_the_model_as_it_is_now():
    _, ours = _pair(_stack)
    ours[1] = nn.GELU()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bpext.fusions(ours)
    bpext.convert(ours)
    assert bpext.fusions(ours) == {"": ["mlp(0, 2, gelu, identity)"]}


def test_global_module_hooks_run_for_every_layer():
    native, ours = _pair(_stack)
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours(torch.randn(2, 8))
        native_calls, calls[:] = list(calls), []
        native(torch.randn(2, 8))
    finally:
        handle.remove()
    assert [c.replace("Dense", "Linear") for c in native_calls] == calls
    assert bpext.fusions(ours)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_dtype_change_keeps_fusing(dtype):
    native, ours = _pair(_stack)
    native.to(dtype)
    ours.to(dtype)
    assert bpext.fusions(ours)
    x = torch.randn(5, 8, dtype=dtype)
    torch.testing.assert_close(ours(x), native(x))


@pytest.mark.parametrize("copy_", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_copies_check_their_own_changes(copy_):
    _, ours = _pair(_stack)
    other = copy_(ours)
    assert bpext.fusions(other) == bpext.fusions(ours)
    other[1].negative_slope = 0.5
    x = torch.randn(3, 8)
    expected = other[2](torch.nn.functional.leaky_relu(other[0](x), 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(other(x), expected)
    assert bpext.fusions(ours)


def test_a_model_changed_before_pickling_loads_unfused():
    _, ours = _pair(_stack)
    ours[1].negative_slope = 0.5
    loaded = pickle.loads(pickle.dumps(ours))
    assert bpext.fusions(loaded) == {}
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), loaded[2](torch.nn.functional.leaky_relu(loaded[0](x), 0.5)))


# ---- PEFT after convert ---------------------------------------------------------------------------


def _llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def test_lora_added_after_convert_trains_like_native_lora():
    peft = pytest.importorskip("peft")
    native, ours = _pair(_llama)
    config = dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.0,
                  init_lora_weights=False)
    torch.manual_seed(3)
    native = peft.get_peft_model(native, peft.LoraConfig(**config))
    torch.manual_seed(3)
    ours = peft.get_peft_model(ours, peft.LoraConfig(**config))
    ours.load_state_dict(native.state_dict())
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (native, ours):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(input_ids=ids, labels=ids)
        assert out.loss.requires_grad
        out.loss.backward()
        lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
        assert len(lora) == 2 * 3 * 2 and all(g is not None for g in lora.values())
        results.append((out.loss.detach(), lora))  # (converted, the logits are not computed in training)
    torch.testing.assert_close(results[1], results[0])


class Looping(nn.Module):
    """A forward that iterates a ModuleList and calls a child's children: the trace unrolls the list and
    reaches below the direct children."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 8)])
        self.act = nn.GELU()
        self.block = nn.Module()
        self.block.fc, self.block.drop, self.block.act = nn.Linear(8, 8), nn.Dropout(0.5), nn.Tanh()
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        for layer in self.hidden:
            x = self.act(layer(x))
        return self.out(self.block.act(self.block.drop(self.block.fc(x))))


def _hooked(module):
    module.register_forward_hook(lambda mod, i, o: o * 2)
    return module


F64 = {"dtype": torch.float64}
NESTED_CHANGES = {
    "a ModuleList's item replaced": lambda m: m.hidden.__setitem__(1, nn.Sequential(nn.Linear(8, 8, **F64), nn.Tanh())),
    "a ModuleList's item replaced by a subclass": lambda m: m.hidden.__setitem__(1, WithExtraPath(8, 8, **F64)),
    "a ModuleList's item replaced by a hooked Linear": lambda m: m.hidden.__setitem__(
        1, _hooked(nn.Linear(8, 8, **F64))),
    "a ModuleList grown": lambda m: m.hidden.append(nn.Linear(8, 8, **F64)),
    "a child's fused child replaced": lambda m: setattr(m.block, "act", nn.ReLU()),
    "a child's dropout turned on alone": lambda m: m.block.drop.train(),
    "a child's Linear hooked": lambda m: _hooked(m.block.fc),
}


@pytest.mark.parametrize("change", NESTED_CHANGES.values(), ids=NESTED_CHANGES.keys())
def test_a_change_below_the_children_after_convert_is_what_runs(change):
    native, ours = _pair(lambda: Looping().double().eval())
    assert bpext.fusions(ours) == {"": ["mlp(hidden.0, hidden.1, block.fc, gelu, tanh)"]}  # past the dropout (off)
    torch.manual_seed(1)
    change(native)
    torch.manual_seed(1)
    change(ours)
    x = torch.randn(5, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        torch.manual_seed(2)
        ours_step = _step(ours, x)
    torch.manual_seed(2)
    torch.testing.assert_close(ours_step, _step(native, x))
    assert any("changed after convert" in str(w.message) for w in said)


@pytest.mark.parametrize("change", [c for n, c in NESTED_CHANGES.items() if "dropout" not in n],
                         ids=[n for n in NESTED_CHANGES if "dropout" not in n])
def test_a_change_below_the_children_after_compiling_is_what_runs(change):
    """The same changes made after torch.compile ran the converted model: its next call computes what the
    changed model computes (eager native is the reference: compiled native misses a hook added later)."""
    native, ours = _pair(lambda: Looping().double().eval())
    compiled = torch.compile(ours)
    x = torch.randn(5, 4, dtype=torch.float64)
    compiled(x)
    torch.manual_seed(1)
    change(native)
    torch.manual_seed(1)
    change(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(_step(compiled, x), _step(native, x))


def test_lora_added_after_convert_below_a_module_list_is_what_runs():
    """transformers' SamFeedForward calls the Linears of a ModuleList: LoRA put there after convert runs."""
    peft = pytest.importorskip("peft")
    sam = pytest.importorskip("transformers.models.sam.modeling_sam")
    native, ours = _pair(lambda: sam.SamFeedForward(8, 16, 4, num_layers=4).double())
    assert bpext.fusions(ours)  # the ModuleList's Linears fused with the others
    config = dict(r=2, lora_alpha=4, target_modules=["layers.0", "layers.1"], init_lora_weights=False)
    torch.manual_seed(3)
    native = peft.get_peft_model(native, peft.LoraConfig(**config))
    torch.manual_seed(3)
    ours = peft.get_peft_model(ours, peft.LoraConfig(**config))
    x = torch.randn(3, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(_step(ours, x), _step(native, x))


def test_data_parallel_replicas_compute_with_their_own_parameters(monkeypatch):
    """nn.DataParallel's replicate, with each replica's parameters made different (as copies on other
    devices are): each replica of a fused MLP and of a wired causal LM computes with its own."""
    replicate = __import__("torch.nn.parallel.replicate", fromlist=["replicate"])
    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape", lambda tensors, devices, detach=False: [
        [(t * (1 + 0.5 * j)).detach() if detach else t * (1 + 0.5 * j) for t in tensors] for j in range(len(devices))])
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    for make, call in ((_stack, lambda m: m(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)))),
                       (_llama, lambda m: m(input_ids=ids, labels=ids).loss)):
        native, ours = _pair(make)
        for replica_n, replica_o in zip(replicate.replicate(native, [0, 1]), replicate.replicate(ours, [0, 1])):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.testing.assert_close(call(replica_o), call(replica_n))


# ---- forwards whose effects a trace does not record -------------------------------------------------


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc2(self.act(self.fc1(x)))


class Stepping(Counting):
    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        self.steps.add_(1)
        return self.fc2(self.act(self.fc1(x)))


class Remembering(Counting):
    def forward(self, x):
        y = self.fc2(self.act(self.fc1(x)))
        self.last = y
        return y


class Frozen(Counting):
    def forward(self, x):
        with torch.no_grad():
            h = self.act(self.fc1(x))
        return self.fc2(h)


@pytest.mark.parametrize("cls", [Counting, Stepping, Remembering, Frozen], ids=lambda c: c.__name__)
def test_side_effects_are_kept(cls):
    native, ours = _pair(cls)
    assert ours.__dict__.get("last") is None and getattr(ours, "calls") == 0
    x = torch.randn(3, 4)
    for _ in range(3):
        torch.testing.assert_close(_step(ours, x), _step(native, x))
    assert ours.calls == native.calls
    assert torch.equal(ours.state_dict().get("steps", torch.zeros(())), native.state_dict().get("steps", torch.zeros(())))
    if cls is Remembering:
        assert type(ours.last) is torch.Tensor
    if cls is Stepping:
        assert int(ours.steps) == 3


def test_a_forward_with_side_effects_is_left_with_a_warning():
    with pytest.warns(UserWarning, match="Counting is not fused: its forward changes the state of Counting"):
        bpext.convert(Counting())
    with pytest.warns(UserWarning, match="Frozen is not fused: its forward changes its grad, autocast or inference mode"):
        bpext.convert(Frozen())


# ---- recognition by certainty -----------------------------------------------------------------------


class SquareLinear(nn.Module):
    """Not a Linear of any library: x @ W + b with W square, symmetric when it is made."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(6))
        self.bias = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_layers_are_recognised_by_class_not_by_sample_values():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = SquareLinear(), nn.GELU(), nn.Linear(6, 6)
            self.c, self.clip, self.d = nn.Linear(6, 6), nn.Hardtanh(0, 40), nn.Linear(6, 6)

        def forward(self, x):
            return self.d(self.clip(self.c(self.b(self.act(self.a(x))))))

    native, ours = _pair(Net)
    assert bpext.fusions(ours) == {}
    with torch.no_grad():
        for m in (native, ours):
            m.a.weight.copy_(torch.arange(36.0).reshape(6, 6) / 10)
    x = torch.randn(4, 6) * 100
    torch.testing.assert_close(ours(x), native(x))


def test_other_libraries_activations_are_recognised_by_class():
    transformers = pytest.importorskip("transformers")
    timm = pytest.importorskip("timm")
    for act in (transformers.activations.GELUActivation(), transformers.activations.NewGELUActivation(),
                transformers.activations.QuickGELUActivation(), timm.layers.activations.GELUTanh()):
        native, ours = _pair(lambda: nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 4)))
        assert len(bpext.fusions(ours)[""]) == 1
        x = torch.randn(3, 4)
        torch.testing.assert_close(ours(x), native(x), rtol=1e-5, atol=1e-6)


# ---- in-place activations, dtype casts -----------------------------------------------------------------


@pytest.mark.parametrize("fuse", [False, True])
def test_in_place_activations_keep_writing_their_input(fuse):
    model = nn.Sequential(nn.ReLU(inplace=True))
    bpext.convert(model, fuse=fuse)
    x = torch.randn(10)
    y = model(x)
    assert y.data_ptr() == x.data_ptr() and (x >= 0).all()


def test_t5_in_float16_with_wo_in_float32_runs_as_native():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   dropout_rate=0.0, feed_forward_proj="relu", decoder_start_token_id=0)

    def make():
        model = transformers.T5EncoderModel(config).half()
        for block in model.encoder.block:
            block.layer[-1].DenseReluDense.wo.float()  # what from_pretrained(dtype=float16) keeps in float32
        return model.eval()

    native, ours = _pair(make)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(input_ids=ids).last_hidden_state, native(input_ids=ids).last_hidden_state)


# ---- threads, export, signature --------------------------------------------------------------------


def test_first_calls_from_several_threads_after_loading():
    _, ours = _pair(lambda: nn.Sequential(_stack(), nn.Tanh(), nn.Linear(4, 4)))
    ours.eval()
    x = torch.randn(16, 8)
    expected = ours(x)
    for _ in range(30):
        loaded = pickle.loads(pickle.dumps(ours))
        results, errors = [None] * 4, []

        def run(i, model=loaded):
            try:
                results[i] = model(x)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and not loaded.training
        for r in results:
            torch.testing.assert_close(r, expected)
        assert bpext.fusions(loaded) == bpext.fusions(ours)


class WithSignature(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 4)

    def forward(self, x, scale: float = 1.0):
        return self.fc2(self.act(self.fc1(x))) * scale


def test_the_converted_root_keeps_its_signature_and_exports():
    native, ours = _pair(WithSignature)
    assert bpext.fusions(ours)
    assert inspect.signature(ours.forward) == inspect.signature(native.forward)
    x = torch.randn(5, 4)
    batch = torch.export.Dim("batch")
    for model in (native, ours):
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
        torch.testing.assert_close(program.module()(torch.randn(7, 4) * 0 + 1), native(torch.ones(7, 4)))


# ---- what a fresh pair of eyes found -------------------------------------------------------------------


def test_a_copy_changed_before_its_first_call_runs_as_changed():
    for copy_ in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        native, ours = _pair(_stack)
        other, native_other = copy_(ours), copy.deepcopy(native)
        other[1].negative_slope = native_other[1].negative_slope = 0.5
        x = torch.randn(3, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(other(x), native_other(x))


class Configured(nn.Module):
    """Reads a private attribute and a dict's item as constants."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)
        self.cfg, self._k = {"scale": 2.0}, 3.0

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) * self.cfg["scale"] * self._k


class FullPrecision(Configured):
    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            return self.fc2(self.act(self.fc1(x.float())))


class MCDropout(nn.Dropout):
    def forward(self, x):
        return torch.nn.functional.dropout(x, self.p, training=True)


def test_private_attributes_and_container_items_are_checked():
    native, ours = _pair(Configured)
    assert bpext.fusions(ours)
    for m in (native, ours):
        m.cfg["scale"], m._k = 5.0, -1.0
    x = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours(x), native(x))


def test_autocast_inside_a_forward_is_kept():
    native = FullPrecision()
    with pytest.warns(UserWarning, match="autocast"):
        ours = bpext.convert(copy.deepcopy(native))
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(ours(x), native(x))
        assert ours(x).dtype == torch.float32


def test_a_dropout_subclass_is_not_taken_for_a_pass_through():
    native, ours = _pair(lambda: nn.Sequential(nn.Linear(4, 8), nn.GELU(), MCDropout(0.5), nn.Linear(8, 4)).eval())
    assert bpext.fusions(ours) == {"": ["dense(0, gelu)"]}
    torch.manual_seed(0)
    a = ours(torch.ones(64, 4))
    torch.manual_seed(0)
    torch.testing.assert_close(a, native(torch.ones(64, 4)))


def test_a_layer_whose_forward_was_replaced_on_the_instance_runs_it():
    native, ours = _pair(_stack)
    for m in (native, ours):
        m[0].forward = (lambda lin: lambda x: torch.nn.functional.linear(x, lin.weight, lin.bias) * 3)(m[0])
    x = torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours(x), native(x))


def test_forward_mode_derivative_of_a_gradient():
    import torch.autograd.forward_ad as fwAD

    x, w, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    results = []
    for fn in (lambda w: bpext.functional.dense(x, w, None, "tanh"), lambda w: torch.tanh(torch.nn.functional.linear(x, w))):
        with fwAD.dual_level():
            wd = fwAD.make_dual(w.clone().requires_grad_(), t)
            (g,) = torch.autograd.grad(fn(wd).sum(), wd)
            results.append(fwAD.unpack_dual(g).tangent)
    assert results[0] is not None
    torch.testing.assert_close(results[0], results[1])


class _Residual(nn.Module):
    """A block TorchScript compiles: an MLP fused by convert, a residual and a norm."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.norm = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


SCRIPTABLE = {
    "sequential": lambda: nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 8), nn.Tanh()),
    "a block of its own": _Residual,
    "in a container": lambda: nn.ModuleList([_Residual()]).append(nn.Linear(8, 8)),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("make", SCRIPTABLE.values(), ids=SCRIPTABLE.keys())
def test_jit_script_compiles_the_models_own_forward(make, fuse):
    """torch.jit.script of a converted model scripts the class's forward (TorchScript compiles source,
    not the rewrite), with bpext::dense under each Linear, sharing the converted model's parameters."""
    native, ours = _pair(make)
    if not fuse:
        ours = bpext.convert(copy.deepcopy(native), fuse=False)
    if isinstance(native, nn.ModuleList):  # scripted from inside: its container is left as it is too
        container, native, ours = ours, native[0], ours[0]
    else:
        container = ours
    modules, fused = list(container.modules()), bpext.fusions(container)
    scripted, reference = torch.jit.script(ours), torch.jit.script(native)
    assert all(a is b for a, b in zip(container.modules(), modules)) and bpext.fusions(container) == fused
    x = torch.randn(3, 8)
    y, grad_x, grads = _step(scripted, x)
    ref_y, ref_grad_x, ref_grads = _step(reference, x)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(grad_x, ref_grad_x)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref)
    assert "bpext::dense" in str(scripted.graph) or "bpext.dense" in "".join(m.code for m in scripted.modules())
    assert [p.data_ptr() for p in scripted.parameters()] == [p.data_ptr() for p in ours.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bpext::dense has autocast kernels, as linear
        low, ref_low = scripted(x), reference(x)
    assert low.dtype == ref_low.dtype
    torch.testing.assert_close(low, ref_low)
    # the converted model itself is untouched: still fused, as it was
    torch.testing.assert_close(ours(x), ref_y)
    if fuse and bpext.fusions(ours):
        assert "forward" in ours.__dict__


def _ulps(y: torch.Tensor, exact: torch.Tensor) -> float:
    """The largest error of float32 values y, in float32 ulps of the exact values (where those are normal)."""
    normal = exact.abs() >= torch.finfo(torch.float32).tiny
    ulp = 2.0 ** (torch.floor(torch.log2(exact[normal].abs())) - 23)
    return ((y.double()[normal] - exact[normal]).abs() / ulp).max().item()


ROUNDED = {"bloom": ("transformers.models.bloom.modeling_bloom", "BloomGelu"),
           "fast_gelu": ("transformers.activations", "FastGELUActivation")}


@pytest.mark.parametrize("where", ROUNDED.values(), ids=ROUNDED.keys())
def test_activations_with_truncated_constants_fuse_where_they_are_bpexts_within_rounding(where):
    """BLOOM's GELU (sqrt(2/pi) to 8 digits) and FastGELU (to 10) are tanh-GELU within float32's rounding,
    not float64's: fused in float32, bpext's values and gradients no farther from the float64 truth than the
    module's own; left as they are in float64, also when the model becomes float64 after convert."""
    module = pytest.importorskip(where[0])
    act = getattr(module, where[1])()
    native, ours = _pair(lambda: nn.Sequential(nn.Linear(4, 64), act, nn.Linear(64, 4)))
    assert bpext.fusions(ours) == {"": ["mlp(0, 2, gelu_tanh, identity)"]}
    x = torch.linspace(-12, 12, 20001).double().requires_grad_()  # float32 values, exactly
    exact = torch.nn.functional.gelu(x, approximate="tanh")
    (exact_grad,) = torch.autograd.grad(exact.sum(), x)
    theirs, ours_ = x.detach().float().requires_grad_(), x.detach().float().requires_grad_()
    y_theirs, y_ours = act.train()(theirs), bpext.functional.activation(ours_, "gelu_tanh")
    (y_theirs.sum() + y_ours.sum()).backward()
    assert _ulps(y_ours, exact) <= _ulps(y_theirs, exact)
    assert _ulps(ours_.grad, exact_grad) <= _ulps(theirs.grad, exact_grad)
    torch.testing.assert_close(ours(x.detach().float()[:, None].expand(-1, 4)[:50]),
                               native(x.detach().float()[:, None].expand(-1, 4)[:50]))
    assert bpext.fusions(bpext.convert(copy.deepcopy(native).double())) == {}
    ours.double()
    with pytest.warns(UserWarning, match="the dtypes of the layers it fuses"):
        torch.testing.assert_close(ours(x.detach()[:, None].expand(-1, 4)[:50]),
                                   native.double()(x.detach()[:, None].expand(-1, 4)[:50]))


# ---- forwards a trace stands for only in part ---------------------------------------------------------


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)


def _scale_default_2(forward):
    @functools.wraps(forward)
    def wrapper(self, x, scale=2.0, **kwargs):
        return forward(self, x, scale, **kwargs)
    return wrapper


def _accepts_more(forward):
    @functools.wraps(forward)
    def wrapper(self, x, **kwargs):
        return forward(self, x) * (2 if kwargs.get("double") else 1)
    return wrapper


class WrappedDefault(_TwoLayers):
    @_scale_default_2
    def forward(self, x, scale=1.0, **kwargs):
        return self.fc2(torch.relu(self.fc1(x))) * scale


class WrappedKwargs(_TwoLayers):
    @_accepts_more
    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class KeywordAfterDefault(_TwoLayers):
    def forward(self, x, scale=1.0, *, k, **kwargs):
        return self.fc2(torch.relu(self.fc1(x))) * scale * k


class TestsNone(_TwoLayers):
    def forward(self, x, pool_dim=None, extra=None, **kwargs):
        h = self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        if pool_dim is not None:
            h = h.mean(pool_dim)
        return h if extra is None else h + extra


class AsksIsinstance(_TwoLayers):
    def forward(self, x, y=None):
        h = self.fc2(torch.relu(self.fc1(x)))
        return h + y if isinstance(y, torch.Tensor) else h


class ReadsAChildsFlag(_TwoLayers):
    def forward(self, x):
        return self.fc2(torch.nn.functional.dropout(torch.relu(self.fc1(x)), 0.9, self.fc1.training))


class OddHalves(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up = nn.Linear(4, 3)  # chunk(2): widths 2 and 1, which the product broadcasts

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up


CALLS = {  # model: the calls to compare, as (args, kwargs)
    "a wrapper's own default": (WrappedDefault, [((), {}), ((), {"scale": 3.0})]),
    "a wrapper that takes more": (WrappedKwargs, [((), {}), ((), {"double": True})]),
    "a required keyword after a default": (KeywordAfterDefault, [((), {"k": 2.0}), ((0.5,), {"k": 3.0})]),
    "arguments tested against None": (TestsNone, [((), {}), ((0,), {}), ((), {"extra": torch.ones(4)}),
                                                  ((None,), {"extra": None})]),
    "isinstance of an argument": (AsksIsinstance, [((), {}), ((torch.ones(4),), {})]),
    "one Linear's unequal halves": (OddHalves, [((), {})]),
}


@pytest.mark.parametrize("make,calls", CALLS.values(), ids=CALLS.keys())
def test_a_rewrite_serves_only_the_calls_its_trace_stands_for(make, calls):
    native, ours = _pair(make)
    x = torch.randn(3, 4)
    for args, kwargs in calls:
        xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_native, y_ours = native(xs[0], *args, **kwargs), ours(xs[1], *args, **kwargs)
        torch.testing.assert_close(y_ours, y_native)
        y_native.square().sum().backward()
        y_ours.square().sum().backward()
        torch.testing.assert_close(xs[1].grad, xs[0].grad)


class AsksIsinstanceInside(_TwoLayers):
    def forward(self, x, y=None):
        return self.fc2(torch.relu(self.fc1(x))) * (2 if isinstance(y, torch.Tensor) else 1)


def test_a_forward_under_an_unknown_wrapper_is_left_with_a_warning():
    with pytest.warns(UserWarning, match="wrapped by .*whose code a rewrite would skip"):
        bpext.convert(WrappedDefault())
    with pytest.warns(UserWarning, match=r"branches on isinstance\(y, torch.Tensor\)"):
        bpext.convert(AsksIsinstanceInside())


def test_a_test_after_the_mlp_leaves_the_mlp_fused():
    """AsksIsinstance tests its argument after its MLP: the MLP's statement is rewritten, the test runs as
    written (test_a_rewrite_serves_only_the_calls_its_trace_stands_for compares both branches)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bpext.fusions(bpext.convert(AsksIsinstance())) == {"": ["mlp(fc1, fc2, relu, identity)"]}


def test_a_train_flag_read_from_a_child_is_part_of_the_state():
    native, ours = _pair(ReadsAChildsFlag)
    for model in (native, ours):
        model.eval()
        model.fc1.train()
    x = torch.randn(50, 4)
    torch.manual_seed(0)
    expected = native(x)
    torch.manual_seed(0)
    torch.testing.assert_close(ours(x), expected)


@pytest.mark.parametrize("call", ["p above 1", "dropout1d of a 4-D input"])
def test_functional_dropout_that_raises_natively_is_not_passed_through(call):
    class Bad(_TwoLayers):
        def forward(self, x):
            h = torch.relu(self.fc1(x))
            h = (torch.nn.functional.dropout(h, 1.5, self.training) if call == "p above 1"
                 else torch.nn.functional.dropout1d(h, 0.5, self.training))
            return self.fc2(h)

    native, ours = _pair(Bad)
    x = torch.randn(2, 3, 5, 4)
    with pytest.raises((ValueError, RuntimeError)) as expected:
        native.eval()(x)
    with pytest.raises(type(expected.value)):
        ours.eval()(x)


def test_gradient_checkpointing_of_a_transformers_layer_runs_the_layers_wrapper():
    """transformers' GradientCheckpointingLayer wraps forward to checkpoint it: with checkpointing on
    (training, grad enabled) the converted layer runs that wrapper (its own forward), else its rewrite."""
    transformers = pytest.importorskip("transformers")
    config = transformers.OPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                                    vocab_size=50, max_position_embeddings=16, word_embed_proj_dim=16, dropout=0.0,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    native = transformers.OPTModel(config)
    native.gradient_checkpointing_enable()
    ours = bpext.convert(copy.deepcopy(native))
    layer = ours.decoder.layers[0]
    ids = torch.randint(0, 50, (2, 5))
    for model in (native, ours):
        model.train()
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        names: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as seen:
        out, ref = ours(input_ids=ids).last_hidden_state, native(input_ids=ids).last_hidden_state
        torch.testing.assert_close(out, ref)
        out.sum().backward()
        ref.sum().backward()
    assert not any("mlp_forward" in n for n in seen.names)  # the layer's own forward, checkpointed
    for p, q in zip(native.parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad)
    with Ops() as seen:
        ours.eval()(input_ids=ids)
    assert any("mlp_forward" in n for n in seen.names)  # no checkpointing: the rewrite


SCALE = 1.0  # a module global a forward reads


class _Branching(_TwoLayers):
    """fc2(gelu(fc1(x))), then a branch or a constant that a trace cannot take as fixed."""

    scale = 1.0  # a class attribute

    def mlp(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class IsTrue(_Branching):
    def forward(self, x, double=False):
        h = self.mlp(x)
        return h * 2 if double is True else h


class AliasIsNone(_Branching):
    def forward(self, x, scale=None):
        s = scale
        return self.mlp(x) * 2 if s is None else self.mlp(x)


class IsTensor(_Branching):
    def forward(self, x, mask=None):
        h = self.mlp(x)
        return h + mask if torch.is_tensor(mask) else h


class HasAttr(_Branching):
    def forward(self, x, scale=2.0):
        h = self.mlp(x)
        return h if hasattr(scale, "shape") else h * scale


class GradMode(_Branching):
    def forward(self, x):
        h = self.mlp(x)
        return h * 2 if torch.is_grad_enabled() else h


class ChildFlag(_Branching):
    def __init__(self):
        super().__init__()
        self.post = nn.Identity()
        self.post.enabled = True

    def forward(self, x):
        h = self.mlp(x)
        return h * 3 if self.post.enabled else h


class ReadsAGlobal(_Branching):
    def forward(self, x):
        return self.mlp(x) * SCALE


class ReadsAClassAttribute(_Branching):
    def forward(self, x):
        return self.mlp(x) * self.scale


def _set_global(value):
    global SCALE
    SCALE = value


BRANCHES = {  # model, calls ((args, kwargs)), a change after convert
    "is True": (IsTrue, [((), {}), ((), {"double": True})], None),
    "an alias tested against None": (AliasIsNone, [((), {}), ((3.0,), {})], None),
    "torch.is_tensor": (IsTensor, [((), {}), ((torch.ones(4),), {})], None),
    "hasattr": (HasAttr, [((), {})], None),
    "the grad mode": (GradMode, [((), {})], None),
    "a child's attribute": (ChildFlag, [((), {})], lambda m: setattr(m.post, "enabled", False)),
    "a module global": (ReadsAGlobal, [((), {})], lambda m: _set_global(2.0)),
    "a class attribute": (ReadsAClassAttribute, [((), {})], lambda m: setattr(type(m), "scale", 2.0)),
}


@pytest.mark.parametrize("make,calls,change", BRANCHES.values(), ids=BRANCHES.keys())
def test_a_branch_or_constant_a_trace_cannot_fix_runs_as_native(make, calls, change):
    native, ours = _pair(make)
    x = torch.randn(3, 4)
    try:
        if change is not None:
            change(native)
            change(ours)
        for args, kwargs in calls:
            for grad in (True, False):
                with torch.set_grad_enabled(grad):
                    torch.testing.assert_close(ours(x, *args, **kwargs), native(x, *args, **kwargs))
    finally:  # as they were, for the other tests
        _set_global(1.0)
        if "scale" in vars(ReadsAClassAttribute):
            del ReadsAClassAttribute.scale


def test_a_deprecated_keyword_runs_the_wrapper():
    """transformers' deprecate_kwarg renames the old keyword (and raises where so asked): calls that pass
    it run the wrapped forward, those that do not the rewrite."""
    deprecation = pytest.importorskip("transformers.utils.deprecation")

    class Renamed(_TwoLayers):
        @deprecation.deprecate_kwarg("factor", version="99.0", new_name="scale")
        def forward(self, x, scale=1.0):
            return self.fc2(torch.relu(self.fc1(x))) * scale

    native, ours = _pair(Renamed)
    assert bpext.fusions(ours) == {"": ["mlp(fc1, fc2, relu, identity)"]}
    x = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for kwargs in ({}, {"scale": 2.0}, {"factor": 3.0}):
            torch.testing.assert_close(ours(x, **kwargs), native(x, **kwargs))
