#!/usr/bin/env python
"""Where a compressed decode step spends its CPU time, per allocator: torch.profiler over ``--steps`` greedy decode
steps of SmolLM2-135M after a compressed needle prompt, split into the weight GEMMs (``aten::mm``, the same work for
every allocator and for a dense cache) and everything else (attention, cache writes, masks, norms, Python-side ops).

Timed benchmarks of a whole step (``gatekv bench decode``) move by several percent between runs on a shared VM; the
profiler's op-level split says whether an allocator's step does more non-GEMM work than another's, independent of how
fast the GEMMs happened to run::

    python benchmarks/decode_profile.py --length 400 --budget 0.2               # the small-context case of issue 16
    python benchmarks/decode_profile.py --length 8192 --budget 0.1 --steps 4
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile


def profile_steps(model, cache, token: torch.Tensor, steps: int) -> tuple[float, float, dict[str, float]]:
    """(GEMM ms, other ms, the other ops' self ms by name) per step over ``steps`` profiled decode steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    gemm, other, ops = 0.0, 0.0, {}
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / steps
        if event.key == "aten::mm":
            gemm += ms
        else:
            other += ms
            ops[event.key] = ms
    return gemm, other, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=400)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--scorer", default="snapkv")
    parser.add_argument("--allocators", nargs="+", default=["uniform", "adakv"])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=8, help="non-GEMM ops listed per allocator")
    args = parser.parse_args()

    from gatekv import compress
    from gatekv.eval.needle import needle_prompt
    from gatekv.smollm2 import load_smollm2

    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    ids = needle_prompt(tokenizer, args.length, 0).prompt_ids
    print(f"SmolLM2-135M fp32, needle prompt of {ids.shape[1]} tokens, {args.scorer} @ {args.budget}, "
          f"{args.steps} profiled steps after {args.warmup}, {args.threads} thread(s); ms per decode step")
    print("| allocator | kept per head (layer 0) | GEMM ms | other ms | total ms |")
    print("|---|---|---|---|---|")
    tops = {}
    for allocator in args.allocators:
        with compress(model, args.scorer, allocator, budget=args.budget) as session, torch.no_grad():
            cache = session.new_cache()
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(args.warmup):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            gemm, other, ops = profile_steps(model, cache, token, args.steps)
        kept = cache.layers[0].lengths.tolist()
        print(f"| {allocator} | {kept} | {gemm:.2f} | {other:.2f} | {gemm + other:.2f} |")
        tops[allocator] = sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]
    for allocator, top in tops.items():
        print(f"\n{allocator}, largest non-GEMM ops (self ms per step): "
              + ", ".join(f"{name} {ms:.2f}" for name, ms in top))


if __name__ == "__main__":
    main()
