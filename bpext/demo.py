"""`python -m bpext demo`: train one MLP twice from the same initial weights, natively and after
bpext.convert, on scikit-learn's handwritten digits (shipped inside the package, no download)."""

from __future__ import annotations

import copy
import os
import time

import torch
from torch import nn

import bpext


def load_digits(device: str, seed: int = 0):
    """The 8x8 digits, standardised, split 75/25 with a fixed seed."""
    from sklearn.datasets import load_digits as sk_load
    from sklearn.model_selection import train_test_split

    data = sk_load()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.25, random_state=seed, stratify=data.target)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    conv = lambda a, dt: torch.tensor(a, dtype=dt, device=device)  # noqa: E731
    return (conv((x_train - mean) / std, torch.float32), conv(y_train, torch.long),
            conv((x_test - mean) / std, torch.float32), conv(y_test, torch.long))


def make_mlp(device: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 128), nn.GELU(),
        nn.Linear(128, 128), nn.SiLU(),
        nn.Linear(128, 10),
    ).to(device)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(epochs: int = 8, batch: int = 64, lr: float = 2e-3, device: str = "cpu", out_dir: str = "out/demo",
          seed: int = 0, quiet: bool = False) -> dict:
    from tqdm import tqdm

    x_train, y_train, x_test, y_test = load_digits(device, seed)
    torch.manual_seed(seed)
    native = make_mlp(device)
    fused = bpext.convert(copy.deepcopy(native))
    models = {"native": native, "bpext": fused}
    optims = {k: torch.optim.Adam(m.parameters(), lr=lr) for k, m in models.items()}
    loss_fn = nn.CrossEntropyLoss()
    history = {k: [] for k in models}
    epoch_time = {k: [] for k in models}
    steps = (len(x_train) + batch - 1) // batch
    if not quiet:
        print(f"digits: {len(x_train)} train / {len(x_test)} test, MLP 64-128-128-10 (GELU, SiLU), "
              f"Adam lr={lr}, batch {batch}, {epochs} epochs, device {device}")
        print(fused)
        print("fused by bpext.convert:", bpext.fusions(fused))
    bar = tqdm(total=epochs * steps, desc="training native and bpext", unit="step", disable=quiet)
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed + epoch)).to(device)
        losses = {k: 0.0 for k in models}
        max_diff = 0.0
        for k, model in models.items():
            start = time.perf_counter()
            for s in range(steps):
                idx = order[s * batch:(s + 1) * batch]
                loss = loss_fn(model(x_train[idx]), y_train[idx])
                optims[k].zero_grad(set_to_none=True)
                loss.backward()
                optims[k].step()
                losses[k] += loss.item() / steps
                history[k].append(loss.item())
                if k == "native":
                    bar.update(1)
            epoch_time[k].append(time.perf_counter() - start)
        max_diff = max(abs(a - b) for a, b in zip(history["native"][-steps:], history["bpext"][-steps:]))
        if not quiet:
            tqdm.write(f"epoch {epoch + 1:>2}: loss native {losses['native']:.6f}  bpext {losses['bpext']:.6f}  "
                       f"max |diff| {max_diff:.2e}  time native {epoch_time['native'][-1] * 1e3:.0f} ms  "
                       f"bpext {epoch_time['bpext'][-1] * 1e3:.0f} ms")
    bar.close()
    result = {
        "accuracy": {k: accuracy(m, x_test, y_test) for k, m in models.items()},
        "max_loss_diff": max(abs(a - b) for a, b in zip(history["native"], history["bpext"])),
        "epoch_ms": {k: 1e3 * sum(v) / len(v) for k, v in epoch_time.items()},
        "history": history,
    }
    os.makedirs(out_dir, exist_ok=True)
    result["plot"] = _plot(history, steps, os.path.join(out_dir, "demo_loss.png"))
    if not quiet:
        acc = result["accuracy"]
        print(f"test accuracy: native {acc['native']:.4f}  bpext {acc['bpext']:.4f}")
        print(f"largest loss difference over all steps: {result['max_loss_diff']:.2e}")
        print(f"mean epoch time: native {result['epoch_ms']['native']:.0f} ms  bpext {result['epoch_ms']['bpext']:.0f} ms")
        print(f"wrote {result['plot']}")
    return result


def _plot(history: dict, steps: int, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, style in (("native", "-"), ("bpext", "--")):
        ax.plot([i / steps for i in range(len(history[k]))], history[k], style, label=k, lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (cross entropy)")
    ax.set_yscale("log")
    ax.set_title("digits MLP: native nn.Linear vs bpext.convert, same initial weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(epochs: int, device: str, out_dir: str) -> int:
    result = train(epochs=epochs, device=device, out_dir=out_dir)
    acc = result["accuracy"]
    ok = min(acc.values()) >= 0.95 and abs(acc["native"] - acc["bpext"]) <= 0.01 and result["max_loss_diff"] < 1e-3
    print("demo: OK" if ok else "demo: FAILED (accuracy below 95% or the two runs diverged)")
    return 0 if ok else 1
