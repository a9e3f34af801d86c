"""The CPU observation-window attention (what SnapKV, DefensiveKV, CAKE and ``defensive_budget`` read in every layer)
at one SmolLM2 layer's shape: the library path (``torch_ragged.window_attention_torch``), the formulation it replaced
on 2026-12-07 (one ``where`` over every logit, then a NaN pass), the reference, and the bare ``matmul`` + ``softmax``
floor, in interleaved rounds. Outputs are checked equal first.

    python benchmarks/window_attention_cost.py --length 2048 --window 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def where_everywhere(window_queries, window_positions, keys, key_positions, scale):
    """The previous CPU path: the whole (B, H_q, w, T) logits masked by one ``where``, then NaN rows zeroed."""
    batch, num_q_heads, w, d = window_queries.shape
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    q = (window_queries.float() * scale).reshape(batch, num_kv_heads, (num_q_heads // num_kv_heads) * w, d)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).view(batch, num_kv_heads, -1, w, num_keys)
    kpos = key_positions[:, :, None, None, :]
    allowed = (kpos >= 0) & (kpos <= window_positions[:, None, None, :, None])
    weights = torch.softmax(torch.where(allowed, logits, float("-inf")), dim=-1)
    return weights.nan_to_num_(nan=0.0).view(batch, num_q_heads, w, num_keys)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=30, help="calls per round and path")
    args = parser.parse_args(argv)

    from gatekv.kernels.reference import window_attention_reference
    from gatekv.kernels.torch_ragged import window_attention_torch

    q_heads, kv_heads, dim, t, w = 9, 3, 64, args.length, args.window
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(1, q_heads, w, dim, generator=gen)
    keys = torch.randn(1, kv_heads, t, dim, generator=gen)
    query_positions = torch.arange(t - w, t)[None]
    key_positions = torch.arange(t).expand(1, kv_heads, t).contiguous()
    grouped = (queries * dim**-0.5).reshape(1, kv_heads, -1, dim)
    inputs = (queries, query_positions, keys, key_positions, dim**-0.5)
    paths = {
        "library (window_attention_torch)": lambda: window_attention_torch(*inputs),
        "previous formulation (where + NaN pass)": lambda: where_everywhere(*inputs),
        "reference": lambda: window_attention_reference(*inputs),
        "floor: matmul + softmax, no mask": lambda: torch.softmax(torch.matmul(grouped, keys.transpose(-1, -2)), -1),
    }
    library = paths["library (window_attention_torch)"]()
    if not torch.equal(library, paths["previous formulation (where + NaN pass)"]()):
        raise AssertionError("the library path differs from the previous formulation")
    torch.testing.assert_close(library, paths["reference"](), atol=1e-6, rtol=1e-5)
    times = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                fn()
            times[name].append((time.perf_counter() - start) / args.calls * 1e3)
    print(f"window attention, one SmolLM2 layer ({q_heads} q / {kv_heads} KV heads, d {dim}), {t} keys, w = {w}, "
          f"CPU threads {torch.get_num_threads()}; median over {args.rounds} interleaved rounds of {args.calls} calls")
    print("| path | ms per call |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} |")


if __name__ == "__main__":
    main()
