"""bpext's ops on DTensors: each op's sharding rule (bpext/_ops.py, ``sharding_rules``) is registered
with DTensor when ``torch.distributed.tensor`` is first imported (a second's import that bpext
itself does not need), so that under tensor-parallel plans (``ColwiseParallel``, ``RowwiseParallel``,
``SequenceParallel``) each op runs on the rank's local shards, with the communication native layers
have (rowwise: one all-reduce of the partial output). ``bpext.functional.mlp`` runs DTensors layer
by layer (its op's lists of tensors have no rule).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

import torch

__all__ = ["register"]

_registered = False


def register() -> None:
    """Registers every rule with DTensor (once)."""
    global _registered
    if _registered:
        return
    _registered = True
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
    from torch.distributed.tensor.experimental import register_sharding

    from ._ops import sharding_rules

    ops = torch.ops.bpext
    propagator = DTensor._op_dispatcher.sharding_propagator
    for name, rule in sharding_rules().items():
        op = getattr(ops, name).default
        register_sharding(op)(rule)
        # Every argument that is not a tensor (the activation, its parameters, masks, flags) selects the
        # placements: all of them key DTensor's cache of sharding decisions, not only integers.
        static = next(i for i, a in enumerate(op._schema.arguments) if not _is_tensor(a.type))
        propagator.op_to_schema_info[op] = RuntimeSchemaInfo(static_argnum=static, needs_pytree=True)


def _is_tensor(t) -> bool:
    return isinstance(t, torch.TensorType) or isinstance(t, torch.OptionalType) and _is_tensor(t.getElementType())


def is_dtensor(t) -> bool:
    """Whether t is a DTensor (without importing DTensor where nothing has)."""
    return "torch.distributed.tensor" in sys.modules and isinstance(t, sys.modules["torch.distributed.tensor"].DTensor)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Registers the rules once ``torch.distributed.tensor`` has been imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "torch.distributed.tensor":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


if "torch.distributed.tensor" in sys.modules:
    register()
elif torch.distributed.is_available():
    sys.meta_path.insert(0, _AfterImport())
