"""`python -m bpext bench --out DIR` runs as one markdown table: for one run, each ratio's median over
its interleaved rounds and their quartiles; for several, the median of the runs' medians and their
range. `python benchmarks/summarize.py out/run1 [out/run2 ...] [--phase fwd+bwd]`."""

import argparse
import json
import os
import statistics

COLUMNS = {  # results.json ratio key -> column heading
    "native/bpext": "native/",
    "compiled/bpext": "compiled/",
    "compiled/bpext-compiled": "cmp/cmp",
    "gemm-floor/bpext": "floor/",
    "bpext-dense/bpext": "Dense/",
    "of peak": "of peak",
    "saved bpext/native": "saved",
}


def summarize(runs: list[dict], phase: str) -> str:
    keys = [(e["suite"], e["case"]) for e in runs[0]["ratios"] if e["phase"] == phase]
    columns = [k for k in COLUMNS if any(k in e for run in runs for e in run["ratios"])]
    lines = ["| suite | case | " + " | ".join(COLUMNS[k] for k in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for suite, case in keys:
        cells = []
        for column in columns:
            found = [e[column] for run in runs for e in run["ratios"]
                     if (e["suite"], e["case"], e["phase"]) == (suite, case, phase) and column in e]
            values = [v[0] if isinstance(v, list) else v for v in found]  # a ratio of rounds: its median
            if not values:
                cells.append("-")
            elif column == "of peak":
                cells.append(f"{statistics.median(values):.0%}")
            elif len(found) == 1 and isinstance(found[0], list):  # one run: the quartiles of its rounds
                cells.append(f"{found[0][0]:.2f} ({found[0][1]:.2f}-{found[0][2]:.2f})")
            elif max(values) - min(values) < 0.005:
                cells.append(f"{statistics.median(values):.2f}")
            else:
                cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
        lines.append(f"| {suite} | {case} | " + " | ".join(cells) + " |")
    machine = runs[0]["machine"]
    lines.append("")
    spread = "median (quartiles) of the rounds of one run" if len(runs) == 1 else f"median (range) of {len(runs)} runs"
    lines.append(f"{phase}; {spread}; {machine.get('gpu', machine['cpu'])}, {machine.get('simd', '?')} kernels, "
                 f"peak {machine.get('sgemm_gflops', 0):.0f} GFLOP/s, copy {machine.get('copy_gbps', 0):.0f} GB/s, "
                 f"{machine['threads']} threads, {machine['dtype']}, torch {machine['torch']}, bpext {machine['bpext']}, "
                 f"{machine['date']}. Ratios are other/bpext: above 1, bpext is faster (saved: below 1, it keeps less).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="folders written by python -m bpext bench --out")
    parser.add_argument("--phase", default="fwd+bwd", choices=["fwd", "bwd", "fwd+bwd"])
    args = parser.parse_args()
    runs = []
    for folder in args.runs:
        with open(os.path.join(folder, "results.json")) as f:
            runs.append(json.load(f))
    print(summarize(runs, args.phase))


if __name__ == "__main__":
    main()
