"""Does a compressed prefill cost more while a full cache is held? One process, every cache kept alive: a full-cache
prefill, then compressed prefills (SnapKV, the given allocators in turn), each timed alone. This is why `gatekv bench
decode --prefill-rounds` runs the full cache's prefill last in every round.

    python benchmarks/prefill_order.py --length 8192 --order adakv uniform adakv uniform
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--order", nargs="+", default=["adakv", "uniform", "adakv", "uniform"],
                        help="allocators of the compressed prefills after the full one, in this order")
    args = parser.parse_args(argv)

    from transformers import DynamicCache

    from gatekv.bench import smollm2_needle
    from gatekv.compress import CompressionSession

    model, _, ids = smollm2_needle(args.length)
    held = []
    with torch.no_grad():
        model(input_ids=ids[:, :64], use_cache=False)
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        held.append(cache)
        print(f"{ids.shape[1]} tokens, CPU threads {torch.get_num_threads()}; every cache held to the end")
        print(f"full cache: {time.perf_counter() - start:.2f} s")
        for allocator in args.order:
            session = CompressionSession(model, scorer="snapkv", allocator=allocator, budget=args.budget)
            cache = session.new_cache()
            start = time.perf_counter()
            with session.entered():
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            held.append(cache)
            print(f"snapkv+{allocator}@{args.budget}: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
