"""The floor of a trained gate's scoring cost: what its own arithmetic costs, against the stock prefill, in one process.

Issue 15 asks a shipped gate to score for <= 5% of the prefill while matching the best training-free scorer on real
text; the attention gate does the latter only through ``defensive_budget``, whose per-head counts come from the
window attention. This script times, on the same prompt and machine, with no gatekv session around them:

- the stock prefill (the model's own forward over the prompt, ``logits_to_keep=1``);
- every layer's gate module on a hidden-state tensor of the prompt's shape (the gate's projection, its causal
  attention and its output map; for the attention gate also the projection and the attention alone);
- ``defensive_budget``'s observation: the window attention of the last ``window`` queries over the prompt's keys and
  DefensiveKV's pooling of it, for every layer.

The sum of the module forwards (and of the window terms, for ``defensive_budget``) is a lower bound of the scoring
cost the session can reach: ranking, allocation and compaction come on top. Medians of ``--repeats`` interleaved
rounds (one prefill on a shared 2-core VM moves by +-10%).

    python benchmarks/gate_cost_floor.py --length 2048 --repeats 5 \
        checkpoints/smollm2-135m-attention-gate checkpoints/smollm2-135m-linear-gate checkpoints/smollm2-135m-retaining-heads
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", nargs="+", help="adapter directories")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=int, default=32, help="observation window of defensive_budget")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from gatekv.bench import smollm2_needle
    from gatekv.heads import load_adapter
    from gatekv.kernels import dispatch
    from gatekv.window_scores import defensive_scores

    model, _, ids = smollm2_needle(args.length)
    cfg = model.config
    layers, hidden, t = cfg.num_hidden_layers, cfg.hidden_size, ids.shape[1]
    q_heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = hidden // q_heads
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(1, t, hidden, generator=gen)
    valid = torch.ones(1, t, dtype=torch.bool)
    pre_rope = {"pre_rope_queries": torch.randn(1, q_heads, t, head_dim, generator=gen),
                "pre_rope_keys": torch.randn(1, kv_heads, t, head_dim, generator=gen),
                "pre_rope_values": torch.randn(1, kv_heads, t, head_dim, generator=gen)}
    keys = torch.randn(1, kv_heads, t, head_dim, generator=gen)
    positions = torch.arange(t).expand(1, kv_heads, t)
    window_q = torch.randn(1, q_heads, args.window, head_dim, generator=gen)
    window_pos = torch.arange(t - args.window, t)[None]
    candidates = torch.ones(1, kv_heads, t, dtype=torch.bool)
    heads = {path: load_adapter(path) for path in args.adapters}

    def gate_forward(scorer) -> None:
        features = {"hidden_states": h, **pre_rope}
        for layer in range(layers):
            scorer.layer_scores(layer, features, valid)

    def gate_parts(scorer) -> tuple[float, float]:
        """The attention gate's projection and causal attention alone, summed over layers."""
        proj = attn = 0.0
        for module in scorer.layers:
            start = time.perf_counter()
            qkv = module.qkv(h).reshape(1, t, 3, module.gate_heads, module.gate_head_dim).permute(2, 0, 3, 1, 4)
            mid = time.perf_counter()
            F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
            proj, attn = proj + mid - start, attn + time.perf_counter() - mid
        return proj, attn

    def observation() -> None:
        for _ in range(layers):
            attention = dispatch.window_attention(window_q, window_pos, keys, positions, head_dim**-0.5)
            defensive_scores(attention, candidates)

    rows: dict[str, list[float]] = {"stock prefill": [], "defensive_budget window attention + pooling": []}
    with torch.no_grad():
        model(input_ids=ids[:, :64], use_cache=False)  # first-call costs
        for path, scorer in heads.items():
            gate_forward(scorer)
        for _ in range(args.repeats):
            rows["stock prefill"].append(_timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)))
            for path, scorer in heads.items():
                rows.setdefault(f"{path}: modules, {layers} layers", []).append(_timed(lambda: gate_forward(scorer)))
                if scorer.head_type == "attention_gate":
                    proj, attn = gate_parts(scorer)
                    rows.setdefault(f"{path}: projection only", []).append(proj)
                    rows.setdefault(f"{path}: causal attention only", []).append(attn)
            rows["defensive_budget window attention + pooling"].append(_timed(observation))
    medians = {name: statistics.median(values) for name, values in rows.items()}
    stock = medians["stock prefill"]
    print(f"SmolLM2-135M fp32, needle prompt of {t} tokens, CPU threads {torch.get_num_threads()}, torch "
          f"{torch.__version__}; medians of {args.repeats} interleaved rounds")
    print("| component | seconds | x stock prefill |")
    print("|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.4f} | {seconds / stock:.3f} |")
    window = medians["defensive_budget window attention + pooling"]
    for path in heads:
        own = medians[f"{path}: modules, {layers} layers"]
        print(f"floor of {path}: Ada-KV {own / stock:.3f}, defensive_budget {(own + window) / stock:.3f} of the stock prefill")


if __name__ == "__main__":
    main()
