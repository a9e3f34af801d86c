"""Decode of the shipped retaining heads through Ada-KV against SnapKV + uniform and the dense floor (a dense cache of
the kept size), in one process with interleaved rounds, and the flat decode path's window over the kept tokens.

    python benchmarks/heads_decode_floor.py --length 2048 --budget 0.1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--adapter", default="checkpoints/smollm2-135m-retaining-heads")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed decode steps per round and setting")
    args = parser.parse_args(argv)

    from transformers import DynamicCache

    from gatekv.bench import _resolve_scorers, smollm2_needle
    from gatekv.compress import CompressionSession

    model, _, ids = smollm2_needle(args.length)
    heads = _resolve_scorers([args.adapter], model)[0]
    heads = heads[1] if isinstance(heads, tuple) else heads
    runs = {}
    with torch.no_grad():
        for name, scorer, allocator in (("heads+adakv", heads, "adakv"), ("snapkv+uniform", "snapkv", "uniform")):
            session = CompressionSession(model, scorer=scorer, allocator=allocator, budget=args.budget)
            cache = session.new_cache()
            session.expect_new_tokens(args.rounds * args.steps + 1)
            with session.entered():
                out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            runs[name] = [session, cache, out.logits[:, -1:].argmax(-1)]
        kept = int(runs["heads+adakv"][0].stats.kept_tokens.double().mean())
        dense = DynamicCache(config=model.config)
        out = model(input_ids=ids[:, -kept:], past_key_values=dense, use_cache=True, logits_to_keep=1)
        runs["dense floor"] = [None, dense, out.logits[:, -1:].argmax(-1)]
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                session, cache, token = run
                with session.entered() if session is not None else contextlib.nullcontext():
                    for _ in range(args.steps):
                        start = time.perf_counter()
                        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                        times[name].append(time.perf_counter() - start)
                run[2] = token
    floor = statistics.median(times["dense floor"])
    print(f"SmolLM2-135M fp32, {ids.shape[1]} tokens, {args.budget} kept ({kept} per head), CPU threads "
          f"{torch.get_num_threads()}; median of {args.rounds} x {args.steps} decode steps, interleaved")
    print("| setting | decode ms | x dense floor |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.2f} | {statistics.median(values) / floor:.3f} |")
    windows = slots = 0
    for layer in runs["heads+adakv"][1].layers:
        mask = layer.flat_mask()
        if mask is None:
            continue
        starts, lengths = layer.host_layout()
        windows += mask.heads * mask.row_window(0, starts, lengths)[1]
        slots += sum(lengths)
    print(f"heads+adakv: flat windows {windows / max(slots, 1):.2f}x the kept tokens (layers on the flat path)")


if __name__ == "__main__":
    main()
