"""Several `python -m bpext bench --out DIR` runs as one markdown table: each ratio's median over
the runs and its range. `python benchmarks/summarize.py out/run1 out/run2 out/run3 [--phase fwd+bwd]`."""

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
            values = [e[column][0] if isinstance(e[column], list) else e[column]  # a ratio of rounds: its median
                      for run in runs for e in run["ratios"]
                      if (e["suite"], e["case"], e["phase"]) == (suite, case, phase) and column in e]
            if not values:
                cells.append("-")
            elif max(values) - min(values) < 0.005:
                cells.append(f"{statistics.median(values):.2f}")
            else:
                cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
        lines.append(f"| {suite} | {case} | " + " | ".join(cells) + " |")
    machine = runs[0]["machine"]
    lines.append("")
    lines.append(f"{phase}; median (range) of {len(runs)} runs; {machine.get('gpu', machine['cpu'])}, "
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
