"""Data-parallel training of bpext models over gloo in 2 processes equals one process on the full batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from gloo import free_port, spawn

import bpext

WORLD = 2
STEPS = 3


def make_model():
    return torch.nn.Sequential(bpext.nn.MLP(8, [16], 8, activation="gelu"), bpext.nn.Dense(8, 4, activation="tanh"))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 8, generator=g), torch.randn(64, 4, generator=g)


def train(model, x, t, steps=STEPS):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _train_and_save(rank, port, wrap, init_state, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = make_model()
        model.load_state_dict(init_state)
        x, t = data()
        shard = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
        if wrap == "ddp":
            trained = train(torch.nn.parallel.DistributedDataParallel(model), x[shard], t[shard])
            state = trained.module.state_dict()
        else:
            from torch.distributed.fsdp import fully_shard

            fully_shard(model)
            train(model, x[shard], t[shard])
            state = {k: v.full_tensor() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_data_parallel_matches_single_process(wrap, tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if wrap == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    torch.manual_seed(0)
    model = make_model()
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "rank0.pt"
    spawn(_train_and_save, WORLD, free_port(), wrap, init_state, str(out))
    reference = train(model, *data()).state_dict()
    trained = torch.load(out)
    assert trained.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(trained[key], reference[key], rtol=1e-5, atol=1e-6)
