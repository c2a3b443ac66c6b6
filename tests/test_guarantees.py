"""Determinism, thread safety and mixed precision on the CPU."""

from __future__ import annotations

import threading

import pytest
import torch

import bpext


def step(model, x):
    y = model(x)
    return y.detach(), torch.autograd.grad(y.square().sum(), list(model.parameters()))


@pytest.mark.parametrize("kind", ["dense", "mlp", "activation"])
def test_bitwise_identical_across_runs_and_thread_counts(kind):
    torch.manual_seed(0)
    model = {
        "dense": lambda: bpext.nn.Dense(48, 40, activation="gelu"),
        "mlp": lambda: bpext.nn.MLP(48, [40, 40], 8, activation="silu"),
        "activation": lambda: torch.nn.Sequential(torch.nn.Linear(48, 48), bpext.nn.Mish()),
    }[kind]()
    x = torch.randn(3000, 48)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            results.append(step(model, x))
    finally:
        torch.set_num_threads(threads)
    for y, grads in results[1:]:
        assert torch.equal(y, results[0][0])
        for a, b in zip(grads, results[0][1]):
            assert torch.equal(a, b)


def test_ops_from_several_python_threads():
    torch.manual_seed(0)
    model = bpext.nn.MLP(16, [32], 4, activation="gelu")
    dense = bpext.nn.Dense(16, 8, activation="tanh")
    inputs = [torch.randn(257, 16) for _ in range(8)]
    expected = [(step(model, x), step(dense, x)) for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        for _ in range(5):
            results[i] = (step(model, inputs[i]), step(dense, inputs[i]))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for got, want in zip(results, expected):
        for (y, grads), (y_ref, grads_ref) in zip(got, want):
            assert torch.equal(y, y_ref)
            assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))


def test_cpu_autocast_bfloat16_like_linear():
    torch.manual_seed(0)
    mlp = bpext.nn.MLP(16, [32], 8, activation="relu")
    native = mlp.to_sequential()
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = mlp(x), native(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in mlp.parameters())
