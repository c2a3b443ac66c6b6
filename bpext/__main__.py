"""Command line: `python -m bpext {check,bench,demo}` (also installed as `bpext`)."""

from __future__ import annotations

import argparse
import sys

import torch

SUITES = ("activation", "dense", "mlp", "transformer", "loss")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device(value: str) -> str:
    index = value.removeprefix("cuda:")
    if value not in ("cpu", "cuda") and not (value.startswith("cuda:") and index.isdigit()):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got '{value}'")
    return value


def _check_devices(p: argparse.ArgumentParser, devices: list[str]) -> None:
    """A CUDA device asked for where there is none: one line of usage error, exit 2."""
    for device in devices:
        if not device.startswith("cuda"):
            continue
        if not torch.cuda.is_available():
            p.error(f"--device {device}: no CUDA device on this machine (torch.cuda.is_available() is False)")
        index = int(device.removeprefix("cuda").removeprefix(":") or 0)
        if index >= torch.cuda.device_count():
            p.error(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bpext", description="bpext: hand-written backprop kernels for PyTorch")
    sub = p.add_subparsers(dest="command", required=True, metavar="{check,bench,demo}")

    check = sub.add_parser("check", help="gradient checks of every op, activation, dtype and device")
    check.add_argument("--device", type=_device, action="append", help="device to check (repeatable; default: all)")

    bench = sub.add_parser("bench", help="benchmark against native PyTorch and torch.compile")
    bench.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    bench.add_argument("--quick", action="store_true", help="small sizes, few cases (under a minute on a CPU)")
    bench.add_argument("--out", default="out/bench", help="folder for results.json, results.csv, results.png")
    bench.add_argument("--suite", choices=SUITES, action="append",
                       help="run only these suites (repeatable; default: all)")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")

    demo = sub.add_parser("demo", help="train an MLP natively and with bpext on the digits data set")
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--device", type=_device, default="cpu")
    demo.add_argument("--out", default="out/demo", help="folder for demo_loss.png")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    devices = args.device if isinstance(args.device, list) else [args.device] if args.device else []
    _check_devices(p, devices)
    if args.command == "check":
        from .check import main as check_main

        return check_main(args.device)
    if args.command == "bench":
        from .bench import run

        suites = args.suite or list(SUITES)
        return run(args.device, DTYPES[args.dtype], args.quick, args.out, suites, not args.no_compile)
    from .demo import main as demo_main

    if args.epochs < 1:
        p.error("demo: --epochs must be >= 1")
    return demo_main(args.epochs, args.device, args.out)


if __name__ == "__main__":
    sys.exit(main())
