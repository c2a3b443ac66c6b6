"""convert wires a transformers causal LM's head and loss to linear_cross_entropy: in training with
labels its loss is transformers' own (label shift, -100, num_items_in_batch, Gemma 2's soft-cap),
with the same gradients (a tied embedding's included) and optimizer steps; everywhere else the
model runs as it is."""

from __future__ import annotations

import copy
import importlib
import inspect
import warnings

import pytest
import torch

import bpext
from bpext.causal_lm import CAUSAL_LMS

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=32)
MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL)),
    "gemma2 (soft-cap)": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **SMALL, head_dim=8, final_logit_softcapping=5.0)),
    "gpt2 (tied)": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=97, n_embd=16, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)),
}


def _pair(make):
    torch.manual_seed(0)
    native = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = bpext.convert(copy.deepcopy(native))
    return native.train(), ours.train()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_training_loss_gradients_and_steps_equal_native(make):
    native, ours = _pair(make)
    assert bpext.fusions(ours)[""] == ["linear_cross_entropy(lm_head)"]
    ids, labels = _batch()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (native, ours)]
    for _ in range(3):
        results = []
        for model, opt in zip((native, ours), opts):
            opt.zero_grad()
            out = model(input_ids=ids, labels=labels)
            out.loss.backward()
            results.append((out.loss.detach(), [p.grad for p in model.parameters()]))
            opt.step()
        (loss_n, grads_n), (loss_o, grads_o) = results
        assert loss_o.dtype == loss_n.dtype
        torch.testing.assert_close(loss_o, loss_n, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads_o, grads_n):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert out.logits.shape == (2, 9, 0)  # no logits in training with labels


def test_num_items_in_batch_divides_the_summed_loss():
    native, ours = _pair(MODELS["llama"])
    ids, labels = _batch()
    losses = [m(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(11)).loss for m in (native, ours)]
    torch.testing.assert_close(losses[1], losses[0])


@pytest.mark.parametrize("mode", ["eval", "no labels", "no grad"])
def test_elsewhere_the_model_runs_as_it_is(mode):
    native, ours = _pair(MODELS["llama"])
    ids, labels = _batch()
    kwargs = {"input_ids": ids} if mode == "no labels" else {"input_ids": ids, "labels": labels}
    if mode == "eval":
        native.eval(), ours.eval()
    with torch.set_grad_enabled(mode != "no grad"):
        out_n, out_o = native(**kwargs), ours(**kwargs)
    torch.testing.assert_close(out_o.logits, out_n.logits, rtol=1e-5, atol=1e-5)
    if out_n.loss is not None:
        torch.testing.assert_close(out_o.loss, out_n.loss)


def test_generate_is_natives():
    native, ours = _pair(MODELS["llama"])
    ids, _ = _batch()
    native.eval(), ours.eval()
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), native.generate(ids, **kwargs))


def test_a_hook_on_the_head_or_a_new_loss_function_runs_natively():
    native, ours = _pair(MODELS["llama"])
    ids, labels = _batch()
    for m in (native, ours):
        m.lm_head.register_forward_hook(lambda mod, i, o: o * 0.5)
    torch.testing.assert_close(ours(input_ids=ids, labels=labels).loss, native(input_ids=ids, labels=labels).loss)
    native, ours = _pair(MODELS["llama"])
    for m in (native, ours):
        m.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().square().mean()
    torch.testing.assert_close(ours(input_ids=ids, labels=labels).loss, native(input_ids=ids, labels=labels).loss)


@pytest.mark.parametrize("name", ["llama", "gpt2 (tied)"])
def test_the_head_called_from_a_layers_hook_gives_its_logits(name):
    """A logit lens: a hook inside the model calls lm_head during the wired call. It gets its logits, and
    the loss is still the model's (from the head's call in the model's own forward)."""
    native, ours = _pair(MODELS[name])
    ids, labels = _batch()
    results = []
    for model in (native, ours):
        lens = []
        base = model.base_model
        layers = base.layers if hasattr(base, "layers") else base.h
        norm = base.norm if hasattr(base, "norm") else base.ln_f
        layers[0].register_forward_hook(
            lambda mod, i, o, m=model, n=norm, lens=lens: lens.append(m.lm_head(n(o[0] if isinstance(o, tuple) else o))))
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        results.append((out.loss.detach(), lens[0].detach(), [p.grad for p in model.parameters()]))
    assert results[1][1].shape == (2, 9, 97)
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-6)


def test_pickles_and_copies_wired():
    import pickle

    _, ours = _pair(MODELS["gpt2 (tied)"])
    ids, labels = _batch()
    expected = ours(input_ids=ids, labels=labels).loss
    for other in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert bpext.fusions(other)[""] == ["linear_cross_entropy(lm_head)"]
        torch.testing.assert_close(other(input_ids=ids, labels=labels).loss, expected)
        assert inspect.signature(other.forward) == inspect.signature(ours.forward)


@pytest.mark.parametrize("path", sorted(CAUSAL_LMS))
def test_each_wired_forward_uses_the_logits_only_for_the_loss(path):
    """What the wiring relies on, read from the installed transformers' source: the logits are the
    head's output of the hidden states, soft-capped at most, then given to loss_function."""
    module, name = path.rsplit(".", 1)
    source = inspect.getsource(getattr(importlib.import_module(module), name).forward)
    body = source[source.index("logits = self.lm_head("):]
    lines = [line.strip() for line in body.splitlines() if "logits" in line]
    assert lines[0].startswith("logits = self.lm_head(hidden_states")
    allowed = ("if self.config.final_logit_softcapping", "logits = logits / self.config.final_logit_softcapping",
               "logits = torch.tanh(logits)", "logits = logits * self.config.final_logit_softcapping",
               "loss = self.loss_function(", "logits=logits", "logits,", "return ")
    assert all(line.startswith(allowed) for line in lines[1:]), lines
    assert "self.loss_function(" in body


def test_a_custom_loss_function_set_before_convert_is_kept():
    torch.manual_seed(0)
    native = MODELS["llama"]().train()
    native.loss_function = lambda logits, labels, vocab_size, **kw: torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), label_smoothing=0.1)
    ours = bpext.convert(copy.deepcopy(native))
    assert "" not in bpext.fusions(ours)
    ids, labels = _batch()
    torch.testing.assert_close(ours(input_ids=ids, labels=labels).loss, native(input_ids=ids, labels=labels).loss)


def test_a_softcap_in_a_config_whose_forward_has_none_is_not_applied():
    config = transformers.LlamaConfig(**SMALL)
    config.final_logit_softcapping = 0.5  # LLaMA's forward ignores it
    native, ours = _pair(lambda: transformers.LlamaForCausalLM(config))
    ids, labels = _batch()
    torch.testing.assert_close(ours(input_ids=ids, labels=labels).loss, native(input_ids=ids, labels=labels).loss)
