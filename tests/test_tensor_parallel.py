"""Tensor parallelism over gloo in child processes: bpext's ops on DTensor shards under torch's plans
(ColwiseParallel, RowwiseParallel, SequenceParallel), against the same plan on the native model:
outputs, gradients, optimizer steps and the collectives each one runs."""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
from gloo import free_port, spawn
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bpext

STEPS = 3


def _ffn():
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))


def _norm_ffn():
    return nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 8))


def _plans():
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    return {"ffn": {"0": ColwiseParallel(), "2": RowwiseParallel()},
            "sequence": {"0": SequenceParallel(), "1": ColwiseParallel(input_layouts=Shard(1)),
                         "3": RowwiseParallel(output_layouts=Shard(1))},
            "llama": {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()},
            "bert": {"intermediate.dense": ColwiseParallel(), "output.dense": RowwiseParallel()}}


def _train(model, x, steps=STEPS):
    """Outputs of each step, then the gradients of the first, as full tensors."""
    from torch.distributed.tensor import DTensor

    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs, grads = [], None
    for step in range(steps):
        y = model(x)
        loss = full(y).square().mean()
        opt.zero_grad()
        loss.backward()
        outputs.append(full(y).detach())
        if step == 0:
            grads = [full(p.grad) for p in model.parameters()]
        opt.step()
    return outputs, grads, [full(p).detach() for p in model.parameters()]


class _Ops(TorchDispatchMode):
    """The collectives run (by name, counted) and the bpext ops (torch's CommDebugMode would add
    global module hooks, under which a converted model runs its own forward)."""

    def __init__(self):
        super().__init__()
        self.collectives, self.bpext = {}, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if func.namespace in ("_c10d_functional", "c10d"):
            self.collectives[name] = self.collectives.get(name, 0) + 1
        elif func.namespace == "bpext":
            self.bpext.add(name)
        return func(*args, **(kwargs or {}))


def _counts(model, x):
    """(the collectives of a training step, the bpext ops it runs)."""
    with _Ops() as ops:
        model(x).sum().backward()
    return ops.collectives, sorted(ops.bpext)


class _LlamaMLP(nn.Module):
    """transformers' LlamaMLP (gate_proj, up_proj, down_proj), small."""

    def __new__(cls):
        import transformers
        from transformers.models.llama.modeling_llama import LlamaMLP

        return LlamaMLP(transformers.LlamaConfig(hidden_size=8, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2))


class _BertFFN(nn.Module):
    """transformers' BERT feed-forward: BertIntermediate (dense, gelu) and BertOutput (dense, dropout, norm)."""

    def __init__(self):
        super().__init__()
        import transformers
        from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

        config = transformers.BertConfig(hidden_size=8, intermediate_size=32, num_attention_heads=2, hidden_dropout_prob=0.0)
        self.intermediate, self.output = BertIntermediate(config), BertOutput(config)

    def forward(self, x):
        return self.output(self.intermediate(x), x)


def _case(name, mesh):
    """(native results, bpext results) of one case, each its model under the same plan."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module

    plans = _plans()
    torch.manual_seed(0)
    if name in ("activation op", "loss op"):
        return _op_case(name, mesh)
    if name == "gated_mlp op":  # colwise gate and up, rowwise down: one gated_mlp on the shards, one all-reduce
        x = torch.randn(4, 5, 8)
        weights = [torch.randn(32, 8) * 0.3, torch.randn(32, 8) * 0.3, torch.randn(8, 32) * 0.3]
        biases = [torch.randn(32), torch.randn(32), torch.randn(8)]
        placements = [Shard(0), Shard(0), Shard(1)], [Shard(0), Shard(0), Replicate()]
        results = []
        for fn in (_native_gated_mlp, bpext.functional.gated_mlp):
            ws = [distribute_tensor(w.clone(), mesh, [p]).requires_grad_() for w, p in zip(weights, placements[0])]
            bs = [distribute_tensor(b.clone(), mesh, [p]).requires_grad_() for b, p in zip(biases, placements[1])]
            xd = DTensor.from_local(x, mesh, [Replicate()])
            with _Ops() as ops:
                y = fn(xd, *ws, *bs)
                y.full_tensor().square().sum().backward()
            results.append(([y.full_tensor().detach()], [t.grad.full_tensor() for t in ws + bs], [],
                            (ops.collectives, sorted(ops.bpext))))
        return results
    make, plan, x = {"ffn": (_ffn, "ffn", torch.randn(4, 5, 8)),
                     "sequence parallel": (_norm_ffn, "sequence", torch.randn(2, 6, 8)),
                     "llama mlp": (_LlamaMLP, "llama", torch.randn(2, 5, 8)),
                     "bert ffn": (_BertFFN, "bert", torch.randn(2, 5, 8))}[name.removesuffix(" converted first")]
    native = make()
    ours = copy.deepcopy(native)
    first = name.endswith("converted first")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused patterns run under the plan: nothing to warn of
        if first:
            bpext.convert(ours)
        parallelize_module(native, mesh, plans[plan])
        parallelize_module(ours, mesh, plans[plan])
        if not first:
            bpext.convert(ours)
        if plan == "sequence":  # each rank holds its part of the sequence
            x = x.chunk(mesh.size(), dim=1)[mesh.get_local_rank()]
        results = []
        for model in (native, ours):
            results.append((*_train(model, x), _counts(model, x)))
    return results


def _op_case(name, mesh):
    """An activation on a tensor sharded on its middle dim stays sharded there (no collective); the loss
    on a vocabulary-sharded weight, which its rule takes replicated, is redistributed (all-gathered)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    if name == "activation op":
        full = torch.randn(4, 6, 8)
        fns = (torch.nn.functional.gelu, lambda t: bpext.functional.activation(t, "gelu"))
        placements = [Shard(1)]
    else:
        full, target = torch.randn(32, 8) * 0.3, torch.randint(0, 32, (6,))
        h = torch.randn(6, 8)
        fns = (lambda w: torch.nn.functional.cross_entropy(h @ w.full_tensor().t(), target),
               lambda w: bpext.functional.linear_cross_entropy(_replicated(h, mesh), w, _replicated(
                   target, mesh)).full_tensor())
        placements = [Shard(0)]
    results = []
    for fn in fns:
        t = distribute_tensor(full.clone(), mesh, placements).requires_grad_()
        with _Ops() as ops:
            y = fn(t)
            (y.full_tensor() if hasattr(y, "full_tensor") else y).square().sum().backward()
        if name == "activation op":
            assert y.placements == tuple(placements), y.placements
        out = y.full_tensor() if hasattr(y, "full_tensor") else y
        results.append(([out.detach()], [t.grad.full_tensor()], [], (ops.collectives, sorted(ops.bpext))))
    return results


def _replicated(t, mesh):
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(t, mesh, [Replicate()])


def _native_gated_mlp(x, wg, wu, wd, bg, bu, bd):
    return nn.functional.linear(nn.functional.silu(nn.functional.linear(x, wg, bg)) * nn.functional.linear(x, wu, bu),
                                wd, bd)


# case: the bpext ops its training step runs (each on the ranks' shards)
CASES = {"ffn": ["dense_backward", "dense_forward"],
         "ffn converted first": ["dense_backward", "dense_forward"],
         "sequence parallel": ["dense_backward", "dense_forward"],
         "llama mlp": ["gated_mlp_backward", "gated_mlp_forward"],
         "llama mlp converted first": ["gated_mlp_backward", "gated_mlp_forward"],
         "bert ffn": ["dense_backward", "dense_forward"],
         "gated_mlp op": ["gated_mlp_backward", "gated_mlp_forward"],
         "activation op": ["activation_backward", "activation_forward"],
         "loss op": ["linear_cross_entropy_forward"]}


def _run(rank, world, port, out_dir, cases):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (world,))
        report = {}
        for name in cases:
            try:
                (n_out, n_grads, n_params, n_comm), (b_out, b_grads, b_params, b_comm) = _case(name, mesh)
                diff = max(((a - b).abs().max() / a.abs().max().clamp_min(1)).item()  # relative to the largest
                           for a, b in zip(n_out + n_grads + n_params, b_out + b_grads + b_params))
                report[name] = {"diff": diff, "native_comm": n_comm[0], "bpext_comm": b_comm[0], "ops": b_comm[1]}
            except Exception:
                report[name] = {"error": traceback.format_exc()}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    report["torn down"] = not dist.is_initialized()  # the process group is gone before the process exits
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


FOUR_RANKS = ["llama mlp", "bert ffn"]


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def reports(request, tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    world = request.param
    out = tmp_path_factory.mktemp("tp")
    spawn(_run, world, world, free_port(), str(out), list(CASES) if world == 2 else FOUR_RANKS)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("case", CASES)
def test_a_plan_gives_natives_results_and_communication(reports, case):
    if case not in reports[0]:
        pytest.skip("run on 2 ranks only")
    for rank, report in enumerate(reports):
        assert report["torn down"], rank
        result = report[case]
        assert "error" not in result, f"rank {rank}:\n{result.get('error')}"
        assert result["diff"] < 1e-5, (rank, result["diff"])
        # no more collectives than native's layers run, bpext's fused ops on the shards
        native_comm, bpext_comm = result["native_comm"], result["bpext_comm"]
        assert all(bpext_comm[k] <= native_comm.get(k, 0) for k in bpext_comm), (rank, result)
        assert result["ops"] == CASES[case], (rank, result["ops"])


def test_the_rules_wait_for_dtensor_to_be_imported():
    """bpext does not import torch.distributed.tensor (a second of import time); its rules are
    registered when something does."""
    import subprocess

    code = ("import sys, bpext; assert 'torch.distributed.tensor' not in sys.modules; "
            "import torch.distributed.tensor; from bpext import tensor_parallel; assert tensor_parallel._registered")
    subprocess.run([sys.executable, "-c", code], check=True)


def _hf_train(rank, port, path, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    import transformers

    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.x: tp_plan is to move into DistributedConfig
        native, ours = (transformers.LlamaForCausalLM.from_pretrained(path, tp_plan="auto") for _ in range(2))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="bpext")  # every MLP fuses under the plan
        bpext.convert(ours)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    losses, collectives, ops = [], [], []
    for model in (native, ours):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(STEPS):
            with _Ops() as seen:
                loss = model(input_ids=ids, labels=ids).loss
                opt.zero_grad()
                loss.backward()
            opt.step()
            losses.append(loss.item())
            if step == 0:
                collectives.append(seen.collectives)
                ops.append(sorted(seen.bpext))
        with torch.no_grad():  # transformers' layers run on local tensors: the layers' own forwards
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    with open(os.path.join(out_dir, f"hf{rank}.json"), "w") as f:
        json.dump({"native": losses[:STEPS + 1], "bpext": losses[STEPS + 1:], "fusions": bpext.fusions(ours),
                   "collectives": collectives, "ops": ops[1]}, f)
    dist.barrier()
    dist.destroy_process_group()


def test_a_transformers_llama_loaded_with_tp_plan_auto_trains_as_native(tmp_path):
    """from_pretrained(tp_plan="auto") then convert: the MLPs fuse under transformers' plan (its layers'
    own forwards), with the same losses step by step and the same collectives; without grad,
    transformers' layers run on local tensors, and so do the converted ones (their own forwards)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                                      max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    spawn(_hf_train, 2, free_port(), str(tmp_path / "llama"), str(tmp_path))
    for rank in range(2):
        result = json.loads((tmp_path / f"hf{rank}.json").read_text())
        assert result["bpext"] == pytest.approx(result["native"], rel=1e-5)
        assert result["fusions"] == {f"model.layers.{i}.mlp": ["gated_mlp(gate_proj, up_proj, silu, down_proj)"]
                                     for i in range(2)}
        assert "gated_mlp_forward" in result["ops"] and "gated_mlp_backward" in result["ops"]
        # fewer collectives: one all-reduce of the input's gradient for gate and up together, not one each
        native_comm, bpext_comm = result["collectives"]
        assert set(bpext_comm) <= set(native_comm) and all(bpext_comm[k] <= native_comm[k] for k in bpext_comm)
        assert bpext_comm["all_reduce"] == native_comm["all_reduce"] - 2
