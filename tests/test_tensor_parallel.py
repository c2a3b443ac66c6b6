"""Tensor parallelism over gloo in child processes: bpext's ops on DTensor shards under torch's plans
(ColwiseParallel, RowwiseParallel, SequenceParallel), against the same plan on the native model:
outputs, gradients, optimizer steps and the collectives each one runs."""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bpext

STEPS = 3


def _ffn():
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))


def _norm_ffn():
    return nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 8))


def _plans():
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    ffn = {"0": ColwiseParallel(), "2": RowwiseParallel()}
    sequence = {"0": SequenceParallel(), "1": ColwiseParallel(input_layouts=Shard(1)),
                "3": RowwiseParallel(output_layouts=Shard(1))}
    return ffn, sequence


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


def _counts(model, x):
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        model(x).sum().backward()
    return {str(k): v for k, v in comm.get_comm_counts().items()}


def _case(name, mesh):
    """(native results, bpext results) of one case, each its model under the same plan."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module

    ffn_plan, sequence_plan = _plans()
    torch.manual_seed(0)
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
            from torch.distributed.tensor.debug import CommDebugMode

            with CommDebugMode() as comm:
                y = fn(xd, *ws, *bs)
                y.full_tensor().square().sum().backward()
            results.append(([y.full_tensor().detach()], [t.grad.full_tensor() for t in ws + bs], [],
                            {str(k): v for k, v in comm.get_comm_counts().items()}))
        return results
    make, plan, x = {"ffn": (_ffn, ffn_plan, torch.randn(4, 5, 8)),
                     "ffn converted before the plan": (_ffn, ffn_plan, torch.randn(4, 5, 8)),
                     "sequence parallel": (_norm_ffn, sequence_plan, torch.randn(2, 6, 8))}[name]
    native = make()
    ours = copy.deepcopy(native)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fused block whose layers the plan hooks runs its own forward
        if name == "ffn converted before the plan":
            bpext.convert(ours)
        parallelize_module(native, mesh, plan)
        parallelize_module(ours, mesh, plan)
        if name != "ffn converted before the plan":
            bpext.convert(ours)
        if name == "sequence parallel":  # each rank holds its part of the sequence
            x = x.chunk(mesh.size(), dim=1)[mesh.get_local_rank()]
        results = []
        for model in (native, ours):
            results.append((*_train(model, x), _counts(model, x)))
    assert any(isinstance(m, bpext.nn.Dense) for m in ours.modules())
    return results


def _native_gated_mlp(x, wg, wu, wd, bg, bu, bd):
    return nn.functional.linear(nn.functional.silu(nn.functional.linear(x, wg, bg)) * nn.functional.linear(x, wu, bu),
                                wd, bd)


CASES = ["ffn", "ffn converted before the plan", "sequence parallel", "gated_mlp op"]


def _run(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (world,))
        report = {}
        for name in CASES:
            try:
                (n_out, n_grads, n_params, n_comm), (b_out, b_grads, b_params, b_comm) = _case(name, mesh)
                diff = max(((a - b).abs().max() / a.abs().max().clamp_min(1)).item()  # relative to the largest
                           for a, b in zip(n_out + n_grads + n_params, b_out + b_grads + b_params))
                report[name] = {"diff": diff, "native_comm": n_comm, "bpext_comm": b_comm}
            except Exception:
                report[name] = {"error": traceback.format_exc()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _worker(rank, world, port, out_dir):
    # Leaves with os._exit once the report is written: gloo's threads can outlive the process
    # group and abort the interpreter's teardown (see tests/test_distributed.py).
    code = 1
    try:
        _run(rank, world, port, out_dir)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("tp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", CASES)
def test_a_plan_gives_natives_results_and_communication(reports, case):
    for rank, report in enumerate(reports):
        result = report[case]
        assert "error" not in result, f"rank {rank}:\n{result.get('error')}"
        assert result["diff"] < 1e-5, (rank, result["diff"])
        # no more collectives than native's layers run (the same ones)
        assert result["bpext_comm"] == result["native_comm"], (rank, result)


def test_the_rules_wait_for_dtensor_to_be_imported():
    """bpext does not import torch.distributed.tensor (a second of import time); its rules are
    registered when something does."""
    import subprocess

    code = ("import sys, bpext; assert 'torch.distributed.tensor' not in sys.modules; "
            "import torch.distributed.tensor; from bpext import tensor_parallel; assert tensor_parallel._registered")
    subprocess.run([sys.executable, "-c", code], check=True)
