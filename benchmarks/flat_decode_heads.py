#!/usr/bin/env python
"""Where should the flat decode path stop? One layer's decode attention over uneven per-head lengths (a head-wise
allocation such as Ada-KV), at 2-16 KV heads per row: the flat path (``_decode_flat``: strided windows + a mask, three
ops), the per-segment path (one SDPA call per KV head) and the floor (one SDPA call over a dense cache of the mean
kept length, what a uniform allocation of the same bytes costs), timed alternately in one loop (median of
``--iters``), with the flat and per-segment outputs checked against each other.

``FLAT_MAX_HEADS`` (gatekv/kernels/torch_ragged.py) is the largest head count for which the flat path is taken::

    python benchmarks/flat_decode_heads.py                          # Llama-8B-like: d 128, 4 query heads per KV head
    python benchmarks/flat_decode_heads.py --mean 820 --group 3 --head-dim 64 --heads 3 4 8   # SmolLM2 at 8K/10%
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from gatekv.kernels.reference import layout_from_caps
from gatekv.kernels.torch_ragged import FlatDecodeMask, _decode_flat, ragged_decode_unmasked


def uneven_lengths(heads: int, mean: int, spread: float, generator: torch.Generator) -> list[int]:
    """Per-head lengths with mean ``mean``: log-normal factors (sigma ``spread``), at least 8 tokens."""
    factors = torch.exp(torch.randn(heads, generator=generator) * spread)
    lengths = (factors / factors.mean() * mean).round().clamp(min=8).long()
    return lengths.tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, nargs="+", default=[2, 4, 8, 16], help="KV heads per row")
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--mean", type=int, default=820, help="mean kept tokens per head")
    parser.add_argument("--spread", type=float, default=0.8, help="sigma of the log-normal length factors")
    parser.add_argument("--room", type=int, default=66, help="free slots after each segment (decode room)")
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if min(args.heads) < 1 or args.group < 1 or args.head_dim < 1 or args.mean < 8 or args.iters < 1:
        parser.error("--heads, --group, --head-dim, --iters must be >= 1 and --mean >= 8")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"one layer, batch 1, d {args.head_dim}, {args.group} query heads per KV head, mean {args.mean} kept tokens "
          f"per head (log-normal spread {args.spread}), float32, {torch.get_num_threads()} threads, load {load}; "
          f"median of {args.iters} alternated calls, torch {torch.__version__}")
    print("| KV heads | lengths (min-max) | flat us | per-segment us | floor us | flat x floor | per-segment x floor | "
          "faster |")
    print("|---|---|---|---|---|---|---|---|")
    for heads in args.heads:
        lengths = uneven_lengths(heads, args.mean, args.spread, generator)
        caps = torch.tensor(lengths) + args.room
        starts_t, rows = layout_from_caps(caps)
        keys = torch.randn(rows, args.head_dim, generator=generator)
        values = torch.randn(rows, args.head_dim, generator=generator)
        query = torch.randn(1, heads * args.group, 1, args.head_dim, generator=generator)
        starts = starts_t.tolist()
        mask = FlatDecodeMask.build(starts_t, caps, torch.tensor(lengths), 1, heads)
        scale = args.head_dim ** -0.5
        mean = round(sum(lengths) / heads)
        dense_k = torch.randn(1, heads, mean, args.head_dim, generator=generator)
        dense_v = torch.randn(1, heads, mean, args.head_dim, generator=generator)
        flat = _decode_flat(query, keys, values, starts, lengths, scale, mask)
        loop = ragged_decode_unmasked(query, keys, values, starts, lengths, scale)  # no mask: per segment
        torch.testing.assert_close(flat, loop, atol=1e-5, rtol=1e-5)
        calls = {
            "flat": lambda: _decode_flat(query, keys, values, starts, lengths, scale, mask),
            "loop": lambda: ragged_decode_unmasked(query, keys, values, starts, lengths, scale),
            "floor": lambda: F.scaled_dot_product_attention(query, dense_k, dense_v, scale=scale,
                                                            enable_gqa=args.group > 1),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(20):  # warm-up
            for call in calls.values():
                call()
        for _ in range(args.iters):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        flat_us, loop_us, floor_us = (statistics.median(times[n]) * 1e6 for n in ("flat", "loop", "floor"))
        faster = "flat" if flat_us < loop_us else "per-segment"
        print(f"| {heads} | {min(lengths)}-{max(lengths)} | {flat_us:.0f} | {loop_us:.0f} | {floor_us:.0f} | "
              f"{flat_us / floor_us:.2f} | {loop_us / floor_us:.2f} | {faster} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
