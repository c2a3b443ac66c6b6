"""One training step of a small random-init transformers LLaMA (hidden 256, 4 layers, vocab 32000,
batch 4 x 256 tokens, float32), native against bpext.convert: what autograd keeps for backward
(unique storages, through saved-tensor hooks) and the step's time, as the median of interleaved pairs.

    python benchmarks/llama_step.py [--pairs 5]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
import transformers

import bpext
from pairs import interleaved


def saved_bytes(model, ids) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    native = transformers.LlamaForCausalLM(config).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = bpext.convert(copy.deepcopy(native))
    ids = torch.randint(0, 32000, (4, 256), generator=torch.Generator().manual_seed(0))
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (native, ours)}

    def step(model):
        opts[id(model)].zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opts[id(model)].step()

    saved = {"native": saved_bytes(native, ids), "bpext": saved_bytes(ours, ids)}
    step(native), step(ours)
    r = interleaved(lambda: step(native), lambda: step(ours), args.pairs)
    print(f"LLaMA step (hidden 256, 4 layers, vocab 32000, 4 x 256 tokens, float32, {torch.get_num_threads()} threads, "
          f"bpext {bpext.CPU_KERNELS}); fused: {sorted({f for fs in bpext.fusions(ours).values() for f in fs})}")
    print(f"saved for backward: native {saved['native'] / 2**20:.1f} MB, bpext {saved['bpext'] / 2**20:.1f} MB "
          f"({saved['bpext'] / saved['native']:.2f}x)")
    print(f"step time native/bpext: median {r['ratio']:.2f} (IQR {r['iqr'][0]:.2f}-{r['iqr'][1]:.2f}, "
          f"{args.pairs} interleaved pairs)")


if __name__ == "__main__":
    main()
