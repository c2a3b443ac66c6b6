"""The command line: each subcommand in a quick mode produces its output; bad options fail with usage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bpext import __main__ as cli
from bpext import check, demo


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bpext", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_check_cpu_table_and_exit_code(capsys):
    assert cli.main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "gradcheck" in out and "vs native" in out and "FAIL" not in out
    assert out.strip().splitlines()[-1].endswith("passed, 0 failed")


def test_check_reports_failures():
    bad = check.CheckResult("cpu", "dense", "relu", torch.float32, "vs native", 1.0, False)
    assert check.format_table([bad]).splitlines()[-1] == "0 passed, 1 failed"


def test_bench_quick_writes_results(tmp_path):
    r = run_cli("bench", "--device", "cpu", "--quick", "--no-compile", "--suite", "activation", "--suite", "dense",
                "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "native/bpext" in r.stdout and "measured peak" in r.stdout
    for name in ("results.json", "results.csv", "results.png"):
        assert (tmp_path / name).stat().st_size > 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["threads"] >= 1
    variants = {row["variant"] for row in data["rows"]}
    assert {"bpext", "native", "gemm-floor", "copy"} <= variants
    assert all(row["median_ms"] > 0 for row in data["rows"])
    assert data["machine"]["sgemm_gflops"] > 0 and data["machine"]["copy_gbps"] > 0 and data["machine"]["simd"]
    for entry in data["ratios"]:  # every comparison: the median of per-round ratios, with its quartiles
        q1, q3 = entry["native/bpext"][1], entry["native/bpext"][2]
        assert q1 <= entry["native/bpext"][0] <= q3
        assert 0 < entry["of peak"]


def test_demo_trains_both_models_identically(tmp_path):
    result = demo.train(epochs=1, out_dir=str(tmp_path), quiet=True)
    assert result["max_loss_diff"] < 1e-4
    assert abs(result["accuracy"]["native"] - result["accuracy"]["bpext"]) <= 0.01
    assert result["accuracy"]["bpext"] > 0.6  # one epoch; the full demo reaches >= 95%
    assert (tmp_path / "demo_loss.png").stat().st_size > 0


@pytest.mark.parametrize("args", [
    ["bench", "--dtype", "int8"],
    ["bench", "--device", "tpu"],
    ["bench", "--device", "cuda:x"],
    ["demo", "--epochs", "0"],
    ["frobnicate"],
    [],
])
def test_bad_options_fail_with_usage(args):
    r = run_cli(*args)
    assert r.returncode == 2
    assert "usage: bpext" in r.stderr
