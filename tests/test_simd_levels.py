"""One build runs on any x86-64 CPU: the CPU kernels are built per SIMD level and bpext loads the
best one this CPU runs; every level computes the same functions; a level the CPU lacks, or an
unknown one, is refused or clamped, never an illegal instruction."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import bpext
from conftest import run_python

HERE = os.path.dirname(bpext.__file__)
BUILT = [level for level in bpext.SIMD_LEVELS if any(f.startswith(f"_cpu_{level}.") for f in os.listdir(HERE))]
UNRUNNABLE = [level for level in bpext.SIMD_LEVELS if level not in bpext.RUNNABLE_SIMD_LEVELS]


def _env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "BPEXT_CPU_CAPABILITY"}
    return {**env, **overrides}


def _runs_here(level: str):
    """Skips a level this CPU lacks, or that was not built (a working copy builds the levels its CPU runs)."""
    missing = torch.ops.bpext._cpu_missing_features(level)
    if missing:
        return pytest.mark.skip(reason=f"this CPU lacks {', '.join(missing)}, which {level} needs")
    return pytest.mark.skipif(level not in BUILT, reason=f"the {level} kernels were not built (BPEXT_SIMD_LEVELS)")


def test_levels_fastest_first_and_default_runs_everywhere():
    assert bpext.SIMD_LEVELS[-1] == "default" and "default" in bpext.RUNNABLE_SIMD_LEVELS
    assert list(bpext.RUNNABLE_SIMD_LEVELS) == [level for level in bpext.SIMD_LEVELS if level in bpext.RUNNABLE_SIMD_LEVELS]
    with pytest.raises(RuntimeError, match="no CPU level avx3"):
        torch.ops.bpext._cpu_missing_features("avx3")


def test_loads_the_best_built_level_this_cpu_runs():
    torch_level = torch.backends.cpu.get_cpu_capability().lower()
    wanted = os.environ.get("BPEXT_CPU_CAPABILITY", "").strip().lower() or (
        torch_level if torch_level in bpext.SIMD_LEVELS else "default")
    if wanted not in bpext.RUNNABLE_SIMD_LEVELS:
        wanted = bpext.RUNNABLE_SIMD_LEVELS[0]
    expected = next(level for level in bpext.SIMD_LEVELS[bpext.SIMD_LEVELS.index(wanted):]
                    if level in BUILT and level in bpext.RUNNABLE_SIMD_LEVELS)
    assert bpext.CPU_KERNELS == expected
    assert os.path.basename(torch.ops.bpext._cpu_kernels()).startswith(f"_cpu_{expected}.")


@pytest.mark.parametrize("level", [pytest.param(level, marks=_runs_here(level)) for level in bpext.SIMD_LEVELS])
def test_every_level_computes_the_same_functions(level):
    """In a child process that loads that level: every activation, a dense layer and a fused MLP
    against native, forward and backward."""
    result = run_python(f"""
        import torch, bpext
        assert bpext.CPU_KERNELS == {level!r}, bpext.CPU_KERNELS
        torch.manual_seed(0)
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
            x = (torch.randn(257, 48, dtype=torch.float64) * 3).to(dtype)
            w = (torch.randn(40, 48, dtype=torch.float64) / 7).to(dtype)
            for name in bpext.ACTIVATIONS:
                act = bpext.resolve(name)
                for ours_fn, native_fn in ((lambda t: bpext.functional.activation(t, act), act.reference),
                                           (lambda t: bpext.functional.dense(t, w, None, act),
                                            lambda t: act.reference(torch.nn.functional.linear(t, w)))):
                    results = []
                    for fn in (ours_fn, native_fn):
                        xi = x.clone().requires_grad_(True)
                        y = fn(xi)
                        results.append((y, torch.autograd.grad(y.sum(), xi)[0]))
                    torch.testing.assert_close(results[0], results[1], **tol)
            mlp = bpext.nn.MLP(48, [32, 32], 8, activation="gelu", dtype=dtype)
            torch.testing.assert_close(mlp(x), mlp.to_sequential()(x), **tol)
        print("ok")
    """, env=_env(BPEXT_CPU_CAPABILITY=level.upper()))
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.parametrize("value", ["avx2", " AVX2 ", "Default", "AVX512", ""])
def test_documented_levels_in_any_case_and_spacing(value):
    """A documented name loads that level, or (one this CPU lacks) the best it runs, with a warning."""
    wanted = value.strip().lower()
    result = run_python("""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import bpext
        print(bpext.CPU_KERNELS, [str(w.message) for w in caught if "BPEXT_CPU_CAPABILITY" in str(w.message)])
    """, env=_env(BPEXT_CPU_CAPABILITY=value))
    assert result.returncode == 0, result.stderr[-3000:]
    loaded, warned = result.stdout.split(" ", 1)
    if not wanted:
        assert loaded == bpext.CPU_KERNELS and warned.strip() == "[]"
    elif wanted in bpext.RUNNABLE_SIMD_LEVELS:
        assert loaded == next(level for level in bpext.SIMD_LEVELS[bpext.SIMD_LEVELS.index(wanted):] if level in BUILT)
        assert warned.strip() == "[]"
    else:
        assert loaded == next(level for level in bpext.RUNNABLE_SIMD_LEVELS if level in BUILT)
        assert "this CPU lacks" in warned and f"best level it runs ({bpext.RUNNABLE_SIMD_LEVELS[0]})" in warned


@pytest.mark.parametrize("value", ["foo", "avx3", "avx-512", "AVX 2"])
def test_unknown_levels_raise_naming_the_valid_ones(value):
    result = run_python("import bpext", env=_env(BPEXT_CPU_CAPABILITY=value))
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "ValueError" in result.stderr and f"BPEXT_CPU_CAPABILITY={value!r}" in result.stderr
    assert "expected one of AVX512, AVX2, DEFAULT (any case)" in result.stderr


@pytest.mark.skipif(not UNRUNNABLE, reason="this CPU runs every SIMD level bpext has")
@pytest.mark.parametrize("level", UNRUNNABLE)
def test_loading_a_level_the_cpu_lacks_raises_before_opening_it(level, tmp_path):
    """Asked directly for a library of a level this CPU lacks, the loader refuses by the library's
    name, before any of its code runs (the file here is a copy of the default build: a signal
    would mean it had been opened and checked too late)."""
    default = next(f for f in os.listdir(HERE) if f.startswith("_cpu_default."))
    fake = tmp_path / default.replace("_cpu_default.", f"_cpu_{level}.")
    shutil.copy(os.path.join(HERE, default), fake)
    missing = ", ".join(torch.ops.bpext._cpu_missing_features(level))
    result = run_python(f"""
        import os, torch, bpext
        try:
            torch.ops.bpext._load_cpu_kernels({str(fake)!r})
        except RuntimeError as e:
            print("refused:", e)
        print("still", os.path.basename(torch.ops.bpext._cpu_kernels()))
    """, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"this CPU cannot run the {level} kernels" in result.stdout and f"it lacks {missing}" in result.stdout
    assert f"still _cpu_{bpext.CPU_KERNELS}." in result.stdout


def test_a_library_of_no_known_level_is_refused(tmp_path):
    default = next(f for f in os.listdir(HERE) if f.startswith("_cpu_default."))
    for name in ("_cpu_avx1024.so", "libsomething.so"):
        shutil.copy(os.path.join(HERE, default), tmp_path / name)
        with pytest.raises(RuntimeError, match="is not a CPU kernel library"):
            torch.ops.bpext._load_cpu_kernels(str(tmp_path / name))
    assert torch.ops.bpext._cpu_kernels().startswith(HERE)
