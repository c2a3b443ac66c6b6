"""Bad or extreme input gets a clear Python error or the right answer: never a crash, never
uninitialised memory, never a result that depends on the thread count."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import bpext
from conftest import run_python

HERE = os.path.dirname(__file__)


@pytest.mark.parametrize("seed", range(8))
def test_fuzz_every_op_returns_the_right_answer_or_raises(seed):
    """Random ranks, sizes, dtypes, meta tensors and parameters through every op, in a child process."""
    result = run_python(f"import sys; sys.path.insert(0, {HERE!r}); import fuzz_ops; fuzz_ops.main({seed}, 1500)")
    last_call = result.stderr.strip().splitlines()[-3:] if result.stderr else []
    assert result.returncode == 0, f"crashed or failed (rc {result.returncode}) at {last_call}:\n{result.stderr[-3000:]}"
    assert "fuzz: 1500 calls" in result.stdout


def test_mlp_backward_checks_ranks_in_a_child_process():
    """Once a segfault: a 0-D grad_y into the fused CPU mlp_backward."""
    result = run_python("""
        import torch, bpext
        x, w = torch.randn(2, 3), torch.randn(4, 3)
        none = torch.empty(0)
        y, s = torch.ops.bpext.mlp_forward(x, [w], [none], "relu", [], "relu", [], True)
        try:
            torch.ops.bpext.mlp_backward(torch.tensor(1.), x, y, [w], s, "relu", [], "relu", [], [True] * 3)
        except RuntimeError as e:
            print("raised:", e)
    """)
    assert result.returncode == 0 and "raised: bpext.mlp_backward: grad_y must have at least 1 dimension" in result.stdout


@pytest.mark.parametrize("bias_shape", [(2,), (100,), (1, 64), (0,)])
def test_mlp_checks_bias_shapes(bias_shape):
    with pytest.raises((RuntimeError, ValueError), match=r"biases\[0\] must be 1-D of size out_features \(64\)"):
        bpext.functional.mlp(torch.randn(4, 3), [torch.randn(64, 3)], [torch.randn(bias_shape)], "relu")


def test_meta_tensors_mixed_with_cpu_raise():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="expected all tensors on one device"):
        bpext.functional.dense(x, w, torch.randn(4, device="meta"))
    with pytest.raises(RuntimeError, match="expected all tensors on one device"):
        bpext.nn.MLP(3, [5], 2, device="meta")(x)
    with pytest.raises(RuntimeError, match="expected all tensors on one device"):
        bpext.nn.GatedMLP(3, 5, device="meta")(x)


def test_meta_modules_work_like_torch_nn():
    for layer in (bpext.nn.Dense(3, 4, device="meta"), bpext.nn.MLP(3, [5], 4, device="meta"),
                  bpext.nn.GatedMLP(3, 5, 4, device="meta")):
        y = layer(torch.randn(2, 3, device="meta"))
        assert y.device.type == "meta" and y.shape == (2, 4)


def test_parameters_beyond_the_compute_type_raise():
    with pytest.raises(ValueError, match="does not fit in the compute type"):
        bpext.functional.activation(torch.randn(3), "leaky_relu", negative_slope=1e300)
    x = torch.randn(3, dtype=torch.float64)  # float64 computes with it, as native does
    torch.testing.assert_close(bpext.functional.activation(x, "leaky_relu", negative_slope=1e300),
                               torch.nn.functional.leaky_relu(x, 1e300))


def test_zero_width_inputs():
    x = torch.randn(2**20, 0)
    layer = bpext.nn.Dense(0, 3)
    torch.testing.assert_close(layer(x), layer.bias.expand(2**20, 3))
    assert bpext.functional.mlp(x, [torch.randn(0, 0)], activation="gelu").shape == (2**20, 0)
    assert bpext.functional.activation(torch.randn(2**20, 0), "gelu").shape == (2**20, 0)


def test_mlp_bias_changed_in_place_before_backward():
    """The bias is not saved (backward does not read it), so editing it in place is fine, as natively."""
    results = []
    for make in (lambda m: m, lambda m: m.to_sequential()):
        torch.manual_seed(0)
        mlp = bpext.nn.MLP(3, [4], 2, activation="tanh")
        model = make(mlp)
        y = model(torch.randn(5, 3))
        with torch.no_grad():
            mlp.layers[0].bias.add_(1.0)
        y.sum().backward()
        results.append([p.grad for p in mlp.parameters()])
    torch.testing.assert_close(results[0], results[1])


OPS_FOR_THREADS = {
    "activation_forward": lambda x, g, name: bpext._ops.ops.activation_forward(x, name, _params(name)),
    "activation_backward": lambda x, g, name: bpext._ops.ops.activation_backward(g, x, name, _params(name)),
    "activation_double_backward": lambda x, g, name: bpext._ops.ops.activation_double_backward(g, g, x, name,
                                                                                            _params(name)),
}


def _params(name):
    return [p.default for p in bpext.activations.REGISTRY[name].params]


@pytest.mark.parametrize("op", OPS_FOR_THREADS)
@pytest.mark.parametrize("name", bpext.ACTIVATIONS)
def test_bitwise_equal_for_any_thread_count(op, name):
    """300,000 values (the issue's case: GELU backward once differed between 1 and 2 threads)."""
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(300_000, generator=g) * 4, torch.randn(300_000, generator=g)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outputs.append(OPS_FOR_THREADS[op](x, grad, name))
    finally:
        torch.set_num_threads(threads)
    for out in outputs[1:]:
        for a, b in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(outputs[0])):
            assert torch.equal(a, b)


def test_a_second_copy_of_the_extension_is_an_import_error(tmp_path):
    """A vendored copy of bpext._C: a clear ImportError (it used to abort the process)."""
    package = tmp_path / "vendored"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(bpext._C.__file__, package / os.path.basename(bpext._C.__file__))
    result = run_python(f"""
        import sys, torch, bpext
        sys.path.insert(0, {str(tmp_path)!r})
        try:
            import vendored._C
        except ImportError as e:
            print("ImportError:", e)
        torch.ops.load_library({str(package / os.path.basename(bpext._C.__file__))!r})
        print(bpext.functional.dense(torch.ones(1, 2), torch.ones(3, 2)).sum().item())
    """)
    assert result.returncode == 0, result.stderr
    assert "ImportError: bpext._C: another copy of bpext's kernels is already loaded" in result.stdout
    assert result.stdout.strip().endswith("6.0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("command", ["check", "bench", "demo"])
def test_cli_cuda_without_a_gpu_is_one_line_and_exit_2(command):
    result = run_python(f"import sys; from bpext.__main__ import main; sys.exit(main([{command!r}, '--device', 'cuda']))")
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("device", ["cuda:abc", "cuda:-1", "gpu"])
def test_cli_rejects_malformed_devices(device):
    result = run_python(f"import sys; from bpext.__main__ import main; sys.exit(main(['bench', '--device', {device!r}]))")
    assert result.returncode == 2 and "usage: bpext" in result.stderr and "Traceback" not in result.stderr
