"""convert's wiring of a causal language model's head and loss to ``linear_cross_entropy``.

In training, called with ``labels``, a converted transformers causal LM runs its own forward with two
things changed for the duration of the call (a context variable: other calls and threads are not
affected): its ``lm_head`` returns no logits (an empty ``(batch, tokens, 0)`` tensor, which is what
the output's ``logits`` is then) and keeps its input, and its ``loss_function`` computes the loss
from that input with ``linear_cross_entropy``, as transformers' ``ForCausalLMLoss`` does from the
logits (labels shifted by one, ``ignore_index``, ``num_items_in_batch``, Gemma 2's final soft-cap).
Everywhere else (eval mode, no labels, no gradient, ``generate()``) the model's forward runs as it is.

Only the models in CAUSAL_LMS are wired: their forward computes ``logits = self.lm_head(hidden)``,
[the final soft-cap], then ``self.loss_function(logits, labels, ...)`` and nothing else of the logits
(tests/test_causal_lm.py checks each one's source). Each call checks that the head and the loss
function are still the ones convert installed, with no hooks.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .functional import linear_cross_entropy
from .nn import Dense

__all__ = ["CAUSAL_LMS", "wire"]

# {class path: whether its forward soft-caps the logits with config.final_logit_softcapping}
CAUSAL_LMS = {
    f"transformers.models.{path}": softcap for path, softcap in (
        ("llama.modeling_llama.LlamaForCausalLM", False), ("mistral.modeling_mistral.MistralForCausalLM", False),
        ("qwen2.modeling_qwen2.Qwen2ForCausalLM", False), ("qwen3.modeling_qwen3.Qwen3ForCausalLM", False),
        ("gemma.modeling_gemma.GemmaForCausalLM", False), ("gemma2.modeling_gemma2.Gemma2ForCausalLM", True),
        ("phi3.modeling_phi3.Phi3ForCausalLM", False), ("gpt2.modeling_gpt2.GPT2LMHeadModel", False))
}

_CALL = contextvars.ContextVar("bpext_causal_lm_call", default=None)


class _Call:
    """One training call of a wired model: the hidden states its head was given."""

    def __init__(self, model: nn.Module):
        self.model, self.hidden = model, None
        self.forward = inspect.unwrap(type(model).forward).__code__  # (transformers decorates it)


_MODULE_CALL = inspect.getsourcefile(nn.Module)  # nn.Module.__call__ and its helpers


def _module_caller():
    """The code that called the module whose forward calls this, past nn.Module's own call machinery."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == _MODULE_CALL:
        frame = frame.f_back
    return None if frame is None else frame.f_code


class HeadForward:
    """The wired ``lm_head.forward``: within a wired call, called by the model's own forward, keeps its
    input and returns no logits (a call from elsewhere, a hook's logit lens, gets its logits). Under
    torch.compile, whose frames are not the model's, the first call within the wired call."""

    def __init__(self, head: nn.Module):
        self.head = head

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        call = _CALL.get()
        if (call is not None and call.model.lm_head is self.head and call.hidden is None
                and (torch.compiler.is_compiling() or _module_caller() is call.forward)):
            call.hidden = input
            return input.new_empty((*input.shape[:-1], 0))
        return type(self.head).forward(self.head, input)


class LossFunction:
    """The wired ``loss_function``: within a wired call, ForCausalLMLoss from the kept hidden states."""

    def __init__(self, model: nn.Module, original):
        self.model, self.original = model, original

    def __call__(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index: int = -100,
                 shift_labels=None, **kwargs):
        call = _CALL.get()
        if call is None or call.model is not self.model or call.hidden is None:
            return self.original(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                 ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        hidden, call.hidden = call.hidden, None
        if shift_labels is None:  # tokens < n predict n
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        head, cls = self.model.lm_head, type(self.model)
        divisor = None if num_items_in_batch is None else float(num_items_in_batch)
        softcap = self.model.config.final_logit_softcapping if CAUSAL_LMS[f"{cls.__module__}.{cls.__qualname__}"] else None
        return linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device), head.bias,
                                    ignore_index=ignore_index, reduction="mean" if divisor is None else "sum",
                                    softcap=softcap, divisor=divisor, dtype=torch.float32)


class CausalLMForward(functools.partial):
    """The wired model's ``forward``, with its class's signature."""

    @property
    def __signature__(self):
        model = self.args[0]
        return inspect.signature(functools.partial(type(model).forward, model))


FORWARDS = (CausalLMForward, HeadForward)  # what wire installs as a module's forward


def _wired_call(model: nn.Module, *args, **kwargs):
    forward = type(model).forward
    head = model._modules.get("lm_head")
    wired = (model.training and torch.is_grad_enabled() and _labels(forward, model, args, kwargs) is not None
             and type(head) in (nn.Linear, Dense) and not _hooked(head)
             and isinstance(head.__dict__.get("forward"), HeadForward) and head.forward.head is head
             and isinstance(model.__dict__.get("_loss_function"), LossFunction))
    if not wired:
        return forward(model, *args, **kwargs)
    token = _CALL.set(_Call(model))
    try:
        return forward(model, *args, **kwargs)
    finally:
        _CALL.reset(token)


def _labels(forward, model, args, kwargs):
    if "labels" in kwargs:
        return kwargs["labels"]
    try:
        return inspect.signature(forward).bind(model, *args, **kwargs).arguments.get("labels")
    except TypeError:
        return None


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def wire(model: nn.Module) -> bool:
    """Wires a causal LM of CAUSAL_LMS (in place); False for any other module, or one wired already."""
    cls = type(model)
    if f"{cls.__module__}.{cls.__qualname__}" not in CAUSAL_LMS or "forward" in model.__dict__:
        return False
    head = model._modules.get("lm_head")
    if type(head) not in (nn.Linear, Dense) or "forward" in head.__dict__:
        return False
    # transformers' own ForCausalLMLoss only: a loss_function set on the model computes something else
    if "_loss_function" in model.__dict__ or getattr(model.loss_function, "__name__", None) != "ForCausalLMLoss":
        return False
    head.__dict__["forward"] = HeadForward(head)
    model.loss_function = LossFunction(model, model.loss_function)
    model.__dict__["forward"] = CausalLMForward(_wired_call, model)
    return True
