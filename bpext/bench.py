"""`python -m bpext bench`: bpext against native eager PyTorch and torch.compile, in one process.

Cases: activations (forward, backward, both; GB/s next to a memory copy), single
dense layers (with their three GEMMs alone as the floor), and MLPs (the fused
bpext.nn.MLP, and per-layer Dense as "bpext-dense"). The variants of a case are timed in
interleaved rounds (each round times every variant once, in an order that turns each round):
each ratio (native/bpext, compiled/bpext, ...) is the median of one ratio per round, with its
quartiles, which hold where absolute times move by 30% between runs. Each case also reports the
bytes saved for backward, on CUDA the peak memory, and how near the machine's limit it runs
(GFLOP/s over a large sgemm's, GB/s over a copy's; the machine line). Writes results.json,
results.csv and results.png.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
import bpext

from . import functional
from .activations import ACTIVATIONS, resolve


@dataclass
class Row:
    suite: str  # "activation", "dense", "mlp", "transformer" or "loss"
    case: str
    variant: str  # "bpext", "native", "compiled", "gemm-floor", "copy", ...
    phase: str  # "fwd", "bwd" or "fwd+bwd"
    median_ms: float
    gbps: float | None = None  # activations: bytes moved per second
    tflops: float | None = None  # dense: GEMM FLOP per second
    saved_bytes: int | None = None
    peak_mb: float | None = None
    over_bpext: tuple | None = None  # this variant's time over bpext's: (median, first, third quartile) of rounds
    extra: dict = field(default_factory=dict)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rounds(variants: dict[str, Callable[[], object]], n_rounds: int, sample_s: float, device: str) -> dict[str, list[float]]:
    """Seconds per call of each variant, one sample per round, the variants interleaved (their order
    turns each round, so that none always runs after the same one). A sample repeats a variant's call
    for about ``sample_s`` (calibrated once), CUDA synchronised around it."""
    calls = {}
    for name, fn in variants.items():
        fn()  # warm up
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        calls[name] = max(1, math.ceil(sample_s / max(time.perf_counter() - start, 1e-9)))
    names, out = list(variants), {name: [] for name in variants}
    for r in range(n_rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order if r % 2 == 0 else order[::-1]:
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                variants[name]()
            _sync(device)
            out[name].append((time.perf_counter() - start) / calls[name])
    return out


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return statistics.median(values), q1, q3


def interleaved(native: Callable[[], object], bpext: Callable[[], object], pairs: int, device: str = "cpu") -> dict:
    """Two variants as the median of interleaved pairs: {"ratio": native/bpext, "iqr": (q1, q3),
    "native_s", "bpext_s": median seconds} (the benchmarks' scripts use it)."""
    times = rounds({"native": native, "bpext": bpext}, pairs, 0.0, device)
    ratio, q1, q3 = spread([a / b for a, b in zip(times["native"], times["bpext"])])
    return {"ratio": ratio, "iqr": (q1, q3), **{f"{k}_s": statistics.median(v) for k, v in times.items()}}


def saved_bytes(forward: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of tensors autograd saves during forward(), each storage once, excluding
    ``exclude`` (the parameters and the input, which exist without autograd)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


def peak_mb(step: Callable[[], object], device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _compile(fn):
    # Each case compiles the same Python code (a reference activation, a model's forward)
    # for new shapes and functions; start from a clean cache so no case hits the
    # recompile limit (a hard error under fullgraph=True).
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)


class Bench:
    def __init__(self, device: str, dtype: torch.dtype, quick: bool, compile_native: bool, progress=None):
        self.device, self.dtype, self.quick, self.compile_native = device, dtype, quick, compile_native
        self.n_rounds, self.sample_s = (5, 0.005) if quick else (15, 0.02)
        self.rows: list[Row] = []
        self.progress = progress

    def _tick(self, what: str) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(what)
            self.progress.update(1)

    def compare(self, variants: dict[str, Callable[[], object]]) -> dict[str, tuple[float, tuple | None]]:
        """{variant: (median ms, its time over bpext's per round as (median, q1, q3), None for bpext)}."""
        times = rounds(variants, self.n_rounds, self.sample_s, self.device)
        base = times.get("bpext") or times.get("bpext-dense")
        return {name: (statistics.median(t) * 1e3,
                       None if t is base or base is None else spread([a / b for a, b in zip(t, base)]))
                for name, t in times.items()}

    # -- activations -------------------------------------------------------------------

    def activation_names(self) -> tuple[str, ...]:
        return ("relu", "gelu", "silu") if self.quick else ACTIVATIONS[1:]

    def activations(self) -> None:
        n = 2**20 if self.quick else (2**26 if self.device.startswith("cuda") else 2**24)
        x = torch.randn(n, device=self.device, dtype=self.dtype)
        g = torch.randn_like(x)
        e = x.element_size()
        copy_out = torch.empty_like(x)
        copy_ms = self.compare({"copy": lambda: copy_out.copy_(x)})["copy"][0]
        self.rows.append(Row("activation", f"copy n={n}", "copy", "fwd", copy_ms, gbps=2 * n * e / copy_ms / 1e6))
        bytes_by_phase = {"fwd": 2 * n * e, "bwd": 3 * n * e, "fwd+bwd": 5 * n * e}
        for name in self.activation_names():
            ref = resolve(name).reference
            fns = {"bpext": lambda t, name=name: functional.activation(t, name), "native": ref}
            if self.compile_native:
                fns["compiled"] = _compile(ref)
            xr = {variant: x.clone().requires_grad_(True) for variant in fns}
            ys = {variant: fn(xr[variant]) for variant, fn in fns.items()}
            phases = {
                "fwd": {v: lambda fn=fn: fn(x) for v, fn in fns.items()},
                "bwd": {v: lambda v=v: torch.autograd.grad(ys[v], xr[v], g, retain_graph=True) for v in fns},
                "fwd+bwd": {v: lambda v=v, fn=fn: torch.autograd.grad(fn(xr[v]), xr[v], g) for v, fn in fns.items()},
            }
            for phase, variants in phases.items():
                for variant, (ms, over) in self.compare(variants).items():
                    self.rows.append(Row("activation", f"{name} n={n}", variant, phase, ms,
                                         gbps=bytes_by_phase[phase] / ms / 1e6, over_bpext=over))
            self._tick(name)

    # -- layers and models: native, torch.compile, bpext (converted), both compiled, the GEMM floor --

    def _model_case(self, suite: str, case: str, native: nn.Module, x: torch.Tensor, gemms: list[tuple],
                    input_grad: bool, extra: dict | None = None) -> None:
        """Times forward+backward of ``native`` and of bpext.convert of it (and of both compiled),
        next to the floor: ``gemms`` ((rows, in, out) per layer product) through ATen alone."""
        x = x.detach().requires_grad_(input_grad)
        ours = bpext.convert(copy.deepcopy(native))
        variants = {"bpext": ours, **(extra or {}), "native": native}
        if self.compile_native:
            variants["compiled"] = _compile(native)
            variants["bpext-compiled"] = _compile(ours)
        flop = sum(2 * rows * fin * fout for rows, fin, fout in gemms) * 3
        steps, params_of = {}, {}
        for variant, model in variants.items():
            params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else \
                list(native.parameters())
            inputs = [x, *params] if input_grad else params
            steps[variant] = lambda m=model, i=inputs: torch.autograd.grad(m(x).sum(), i)  # noqa: E731
            params_of[variant] = params
        steps["gemm-floor"] = self._gemm_floor(gemms, input_grad)
        for variant, (ms, over) in self.compare(steps).items():
            model = variants.get(variant)
            self.rows.append(Row(suite, case, variant, "fwd+bwd", ms, tflops=flop / ms / 1e9, over_bpext=over,
                                 saved_bytes=None if model is None else
                                 saved_bytes(lambda m=model: m(x), [x, *params_of[variant]]),
                                 peak_mb=None if model is None else peak_mb(steps[variant], self.device)))

    def _gemm_floor(self, gemms: list[tuple], input_grad: bool):
        """The matrix products of a stack's forward and backward, alone: per (rows, in, out), the
        forward product, the weight gradient, and the input gradient (not for the first product's
        input unless ``input_grad``)."""
        kw = {"device": self.device, "dtype": self.dtype}
        mats = [(torch.randn(rows, fin, **kw), torch.randn(fout, fin, **kw), torch.randn(rows, fout, **kw))
                for rows, fin, fout in gemms]

        def run():
            for i, (a, w, g) in enumerate(mats):
                torch.mm(a, w.t())
                torch.mm(g.t(), a)
                if i > 0 or input_grad:
                    torch.mm(g, w)
        return run

    def dense_shapes(self) -> list[tuple[int, int, int]]:
        if self.quick:
            return [(32, 128, 128), (2048, 256, 256)]
        if self.device.startswith("cuda"):
            return [(32, 128, 128), (8192, 512, 512), (8192, 4096, 4096)]
        return [(32, 128, 128), (8192, 512, 512), (2048, 2048, 2048)]

    def dense(self) -> None:
        kw = {"device": self.device, "dtype": self.dtype}
        for batch, fin, fout in self.dense_shapes():
            for name in ("relu", "gelu"):
                native = nn.Sequential(nn.Linear(fin, fout, **kw), nn.GELU() if name == "gelu" else nn.ReLU())
                self._model_case("dense", f"{batch}x{fin}x{fout} {name}", native, torch.randn(batch, fin, **kw),
                                 [(batch, fin, fout)], input_grad=True)
                self._tick(f"dense {batch}x{fin}x{fout} {name}")

    def mlp_shapes(self) -> list[tuple[str, int, list[int], int, int]]:
        cuda = self.device.startswith("cuda")
        shapes = [("narrow", 32, [64] * 4, 16, 2**18 if cuda and not self.quick else 4096)]
        if not self.quick:
            shapes += [("wide", 1024, [1024, 1024], 1024, 4096 if cuda else 1024)]
        return shapes

    def mlps(self) -> None:
        kw = {"device": self.device, "dtype": self.dtype}
        for label, fin, hidden, fout, batch in self.mlp_shapes():
            for name in ("relu", "gelu"):
                widths = [fin, *hidden, fout]
                layers: list[nn.Module] = []
                for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                    layers.append(nn.Linear(a, b, **kw))
                    if i < len(widths) - 2:
                        layers.append(nn.GELU() if name == "gelu" else nn.ReLU())
                native = nn.Sequential(*layers)
                extra = {"bpext-dense": bpext.convert(copy.deepcopy(native), fuse=False)}
                self._model_case("mlp", f"{label} {'-'.join(map(str, widths))} b={batch} {name}", native,
                                 torch.randn(batch, fin, **kw), [(batch, a, b) for a, b in zip(widths[:-1], widths[1:])],
                                 input_grad=False, extra=extra)
                self._tick(f"mlp {label} {name}")

    def transformer_shapes(self) -> list[tuple[str, int, int, int]]:
        """(kind, width, hidden, tokens): a BERT FFN and a LLaMA gated MLP, scaled on the CPU."""
        if self.quick:
            return [("bert-ffn", 256, 1024, 256), ("llama-mlp", 256, 688, 256)]
        if self.device.startswith("cuda"):
            return [("bert-ffn", 768, 3072, 16384), ("llama-mlp", 4096, 11008, 4096)]
        return [("bert-ffn", 768, 3072, 512), ("llama-mlp", 512, 1376, 2048)]

    def transformers(self) -> None:
        kw = {"device": self.device, "dtype": self.dtype}
        for kind, width, hidden, tokens in self.transformer_shapes():
            block = BertFFN(width, hidden, **kw) if kind == "bert-ffn" else LlamaMLP(width, hidden, **kw)
            products = [(tokens, width, hidden), (tokens, hidden, width)] if kind == "bert-ffn" else \
                [(tokens, width, hidden), (tokens, width, hidden), (tokens, hidden, width)]
            self._model_case("transformer", f"{kind} {width}-{hidden}-{width} t={tokens}", block,
                             torch.randn(tokens, width, **kw), products, input_grad=True)
            self._tick(f"transformer {kind}")


    # -- the loss step: LM head + cross-entropy -------------------------------------------------

    def loss_shapes(self) -> list[tuple[int, int, int]]:
        """(tokens, vocab, hidden)."""
        if self.quick:
            return [(512, 8192, 128)]
        if self.device.startswith("cuda"):
            return [(tokens, vocab, 4096) for tokens in (1024, 4096, 16384) for vocab in (32000, 128256)]
        return [(1024, 32000, 256), (4096, 32000, 256), (1024, 128256, 256)]

    def losses(self) -> None:
        """F.cross_entropy(F.linear(h, W), t) natively, compiled, and as bpext's linear_cross_entropy:
        forward and backward, what autograd keeps, and (CUDA) the peak memory of a step."""
        for tokens, vocab, hidden in self.loss_shapes():
            g = torch.Generator().manual_seed(0)
            h = torch.randn(tokens, hidden, generator=g).to(self.device, self.dtype).requires_grad_()
            w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(self.device, self.dtype).requires_grad_()
            t = torch.randint(0, vocab, (tokens,), generator=g).to(self.device)
            native = lambda h, w: torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w), t)  # noqa: E731
            variants = {"bpext": lambda h, w: functional.linear_cross_entropy(h, w, t), "native": native}
            if self.compile_native:
                variants["compiled"] = _compile(native)
            flop = 2 * tokens * hidden * vocab * 3
            steps = {variant: lambda fn=fn: torch.autograd.grad(fn(h, w), [h, w]) for variant, fn in variants.items()}
            for variant, (ms, over) in self.compare(steps).items():
                fn = variants[variant]
                self.rows.append(Row("loss", f"{tokens} tokens x vocab {vocab}, hidden {hidden}", variant, "fwd+bwd",
                                     ms, tflops=flop / ms / 1e9, saved_bytes=saved_bytes(lambda fn=fn: fn(h, w), [h, w]),
                                     peak_mb=peak_mb(steps[variant], self.device), over_bpext=over))
            self._tick(f"loss {tokens}x{vocab}")


class BertFFN(nn.Module):
    """BERT's feed-forward block as transformers writes it: an intermediate module (Linear, then
    an activation module) and an output Linear in another module."""

    def __init__(self, width, hidden, device=None, dtype=None):
        super().__init__()
        self.intermediate = nn.Sequential(nn.Linear(width, hidden, device=device, dtype=dtype), nn.GELU())
        self.output = nn.Linear(hidden, width, device=device, dtype=dtype)

    def forward(self, x):
        return self.output(self.intermediate(x))


class LlamaMLP(nn.Module):
    """LLaMA's gated MLP as transformers writes it: down(act(gate(x)) * up(x)), no biases."""

    def __init__(self, width, hidden, device=None, dtype=None):
        super().__init__()
        factory = {"bias": False, "device": device, "dtype": dtype}
        self.gate_proj, self.up_proj = nn.Linear(width, hidden, **factory), nn.Linear(width, hidden, **factory)
        self.down_proj = nn.Linear(hidden, width, **factory)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def ratios(rows: list[Row], machine: dict | None = None) -> list[dict]:
    """Per (suite, case, phase): each variant's time over bpext's ((median, q1, q3) of the rounds),
    the saved-bytes ratio, and bpext's fraction of the machine's limit (``machine``: its peaks)."""
    out = []
    keys = list(dict.fromkeys((r.suite, r.case, r.phase) for r in rows))  # in the order they ran
    for suite, case, phase in keys:
        group = {r.variant: r for r in rows if (r.suite, r.case, r.phase) == (suite, case, phase)}
        ours = group.get("bpext") or group.get("bpext-dense")
        if ours is None:
            continue
        entry = {"suite": suite, "case": case, "phase": phase, "bpext_ms": ours.median_ms}
        for other in ("native", "compiled", "gemm-floor", "bpext-dense"):
            if other in group and group[other].over_bpext is not None:
                entry[f"{other}/bpext"] = group[other].over_bpext
        if "compiled" in group and "bpext-compiled" in group:
            entry["compiled/bpext-compiled"] = group["compiled"].median_ms / group["bpext-compiled"].median_ms
        if ours.saved_bytes is not None and group.get("native") and group["native"].saved_bytes:
            entry["saved bpext/native"] = ours.saved_bytes / group["native"].saved_bytes
        if machine and ours.tflops is not None and machine.get("sgemm_gflops"):
            entry["of peak"] = ours.tflops * 1e3 / machine["sgemm_gflops"]
        elif machine and ours.gbps is not None and machine.get("copy_gbps"):
            entry["of peak"] = ours.gbps / machine["copy_gbps"]
        out.append(entry)
    return out


def _ratio(v) -> str:
    """A ratio of rounds as 'median (q1-q3)'."""
    if v is None:
        return "-"
    return f"{v[0]:.2f} ({v[1]:.2f}-{v[2]:.2f})"


def format_table(rows: list[Row], machine: dict | None = None) -> str:
    head = (f"{'suite':<11} {'case':<38} {'phase':<7} {'bpext ms':>9} {'native/bpext':>17} {'compiled/bpext':>17} "
            f"{'cmp/cmp':>7} {'floor/bpext':>17} {'Dense/':>7} {'of peak':>7} {'saved':>6}")
    lines = [head, "-" * len(head)]
    for e in ratios(rows, machine):
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        dense = e.get("bpext-dense/bpext")
        lines.append(
            f"{e['suite']:<11} {e['case']:<38} {e['phase']:<7} {e['bpext_ms']:>9.3f} "
            f"{_ratio(e.get('native/bpext')):>17} {_ratio(e.get('compiled/bpext')):>17} "
            f"{fmt(e.get('compiled/bpext-compiled'), '7.2f'):>7} {_ratio(e.get('gemm-floor/bpext')):>17} "
            f"{fmt(dense[0] if dense else None, '7.2f'):>7} {fmt(e.get('of peak'), '7.0%'):>7} "
            f"{fmt(e.get('saved bpext/native'), '6.2f'):>6}")
    lines.append("x/bpext: x's time over bpext's, the median of one ratio per interleaved round (quartiles); cmp/cmp: "
                 "torch.compile of the native model over torch.compile of the converted one; floor: the matrix "
                 "products alone; Dense/: per-layer Dense over the fused MLP; of peak: bpext's GFLOP/s over the "
                 "machine's sgemm (GB/s over its copy, for activations); saved: bytes kept for backward, bpext/native")
    return "\n".join(lines)


def measured_peaks(device: str, dtype: torch.dtype) -> dict:
    """The machine's limits as bpext's cases meet them: a large matrix product's GFLOP/s (2048^3, in
    ``dtype``; 8192^3 on CUDA) and a large copy's GB/s, each the best of five."""
    n = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(2**25, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = lambda fn: min(rounds({"x": fn}, 5, 0.05, device)["x"])  # noqa: E731
    return {"sgemm_gflops": 2 * n**3 / best(lambda: a @ a) / 1e9,
            "copy_gbps": 2 * src.numel() * 4 / best(lambda: dst.copy_(src)) / 1e9}


def machine_info(device: str, dtype: torch.dtype) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "simd": bpext.CPU_KERNELS, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "bpext": bpext.__version__, "python": platform.python_version(), "device": device,
            "dtype": str(dtype).removeprefix("torch."), "date": time.strftime("%Y-%m-%d"),
            **measured_peaks(device, dtype)}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']}, bpext {info['simd']} kernels, {info['threads']} threads"
    return (f"machine: {where}; {info['dtype']}; measured peak {info['sgemm_gflops']:.0f} GFLOP/s "
            f"(matrix product), copy {info['copy_gbps']:.1f} GB/s; torch {info['torch']}")


def plot(rows: list[Row], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in ratios(rows) if e["phase"] == "fwd+bwd"]
    median = lambda e, key: e[key][0] if key in e else 0  # noqa: E731
    labels = [f"{e['suite']}: {e['case']}" for e in entries]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 0.32 * len(entries) + 2), sharey=True)
    ys = range(len(entries))
    for offset, key, color in ((-0.2, "native/bpext", "tab:blue"), (0.2, "compiled/bpext", "tab:orange")):
        ax1.barh([y + offset for y in ys], [median(e, key) for e in entries], height=0.4, label=key, color=color)
    ax1.axvline(1.0, color="k", lw=0.8)
    ax1.set_xlabel("speed-up of bpext (time ratio, > 1 is faster), forward+backward")
    ax1.set_yticks(list(ys), labels, fontsize=7)
    ax1.invert_yaxis()
    ax1.legend(loc="lower right")
    ax2.barh(list(ys), [e.get("saved bpext/native", 0) for e in entries], color="tab:green")
    ax2.axvline(1.0, color="k", lw=0.8)
    ax2.set_xlabel("bytes saved for backward, bpext / native (< 1 is leaner)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(device: str, dtype: torch.dtype, quick: bool, out_dir: str, suites: list[str], compile_native: bool) -> int:
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    bench = Bench(device, dtype, quick, compile_native)
    total = (len(bench.activation_names()) * ("activation" in suites)
             + 2 * len(bench.dense_shapes()) * ("dense" in suites) + 2 * len(bench.mlp_shapes()) * ("mlp" in suites)
             + len(bench.transformer_shapes()) * ("transformer" in suites) + len(bench.loss_shapes()) * ("loss" in suites))
    with tqdm(total=total, desc=f"bench {device} {str(dtype).removeprefix('torch.')}", unit="case") as bar:
        bench.progress = bar
        if "activation" in suites:
            bench.activations()
        if "dense" in suites:
            bench.dense()
        if "mlp" in suites:
            bench.mlps()
        if "transformer" in suites:
            bench.transformers()
        if "loss" in suites:
            bench.losses()
    info = machine_info(device, dtype)
    title = f"bpext vs native on {info.get('gpu', info['cpu'])} ({info['dtype']}, torch {info['torch']})"
    print(title)
    print(machine_line(info))
    print(format_table(bench.rows, info))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"machine": info, "rows": [asdict(r) for r in bench.rows], "ratios": ratios(bench.rows, info)}, f,
                  indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in asdict(bench.rows[0]) if k != "extra"])
        writer.writeheader()
        for r in bench.rows:
            writer.writerow({k: v for k, v in asdict(r).items() if k != "extra"})
    plot(bench.rows, os.path.join(out_dir, "results.png"), title)
    print(f"wrote {out_dir}/results.json, results.csv, results.png")
    return 0
