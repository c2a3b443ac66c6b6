"""How much of a Mixtral decoder layer's training step its experts take, and how far the experts'
per-expert loop is from the products it computes: what a grouped MoE op could win.

    python benchmarks/moe_share.py [--tokens 1024] [--pairs 9]

Times, as the median of interleaved pairs (benchmarks/pairs.py), the layer's forward+backward
against the experts module's alone (its share of the step), for transformers' per-expert loop
("eager") and its default (grouped_mm); and the experts against their FLOP floor (each routed
token's three products forward and six backward at this machine's 2048^3 sgemm rate): what a
grouped MoE op could win.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from pairs import interleaved


def _seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                                        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                                        num_hidden_layers=1, vocab_size=100)
    model = transformers.MixtralModel(config)
    layer, experts = model.layers[0], model.layers[0].mlp.experts
    x = torch.randn(1, args.tokens, config.hidden_size, requires_grad=True)
    position_embeddings = model.rotary_emb(x, torch.arange(args.tokens)[None])
    captured = {}
    hook = experts.register_forward_pre_hook(lambda m, a: captured.update(args=[t.detach() for t in a]))
    layer(x, position_embeddings=position_embeddings)
    hook.remove()
    hidden, index, weights = captured["args"]
    hidden.requires_grad_()

    def layer_step():
        out = layer(x, position_embeddings=position_embeddings)
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    def experts_step():
        experts(hidden, index, weights).sum().backward()

    # The FLOP floor: each routed token's three products forward and six backward, at this machine's sgemm rate
    flops = 3 * 2 * index.numel() * 3 * config.hidden_size * config.intermediate_size
    a = torch.randn(2048, 2048)
    rate = min(_seconds(lambda: a @ a) for _ in range(5))
    floor_ms = flops / (2 * 2048 ** 3 / rate) * 1e3

    print(f"Mixtral layer, hidden {config.hidden_size}, {config.num_local_experts} experts of {config.intermediate_size}, "
          f"top-{config.num_experts_per_tok}, {args.tokens} tokens, {torch.get_num_threads()} threads")
    for implementation in ("eager", config._experts_implementation):  # the per-expert loop, transformers' default
        config._experts_implementation = implementation
        share = interleaved(layer_step, experts_step, args.pairs)
        print(f"experts_implementation={implementation}: layer step {share['native_s'] * 1e3:.1f} ms, experts "
              f"{share['bpext_s'] * 1e3:.1f} ms = {1 / share['ratio']:.0%} of it (IQR {1 / share['iqr'][1]:.0%}-"
              f"{1 / share['iqr'][0]:.0%}), {share['bpext_s'] * 1e3 / floor_ms:.1f}x their FLOP floor "
              f"({floor_ms:.1f} ms)")


if __name__ == "__main__":
    main()
