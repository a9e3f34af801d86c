#!/usr/bin/env python
"""Scoring overhead of trained heads as a fraction of prefill time, measured in one process on the same prompt.

    python train/bench_overhead.py --adapter runs/smollm2-135m-retaining-head/adapter --length 2048
    python train/bench_overhead.py --head-type attention_gate --length 2048      # untrained heads: same cost

Reports, as medians over --repeats runs: the plain prefill forward (no compression), the heads alone on every
layer's captured inputs (what a trained scorer adds), and ``compress()`` one-shot prefills with the heads and with a
training-free reference scorer (knorm), so the end-to-end difference is visible too. Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", help="trained adapter directory (default: fresh heads of --head-type)")
    parser.add_argument("--head-type", default="retaining_head", choices=["retaining_head", "attention_gate", "linear_gate"])
    parser.add_argument("--model", default="smollm2", help="smollm2 or tiny:<family> (default smollm2)")
    parser.add_argument("--length", type=int, default=2048, help="prompt tokens (default 2048)")
    parser.add_argument("--budget", type=float, default=0.1, help="compress() budget ratio (default 0.1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from gatekv import compress
    from gatekv.heads import build_heads, load_adapter
    from gatekv.models import cache_kwarg, capture_layer_inputs, inspect_model
    from gatekv.training.config import ModelConfig
    from gatekv.training.runner import load_frozen_model

    model, _, model_id = load_frozen_model(ModelConfig(name=args.model))
    heads = load_adapter(args.adapter, model=model) if args.adapter else build_heads(args.head_type, model).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(10, vocab - 10, (1, args.length), generator=torch.Generator().manual_seed(0))

    def prefill():
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

    spec = inspect_model(model)
    sinks = [{} for _ in range(spec.num_layers)]
    handles = [h for l in range(spec.num_layers) for h in capture_layer_inputs(
        spec, l, sinks[l], "hidden_states" in heads.needs, "pre_rope" in heads.needs)]
    try:
        prefill()
    finally:
        for h in handles:
            h.remove()
    valid = torch.ones(1, args.length, dtype=torch.bool)

    def heads_only():
        with torch.no_grad():
            for layer, sink in enumerate(sinks):
                heads.layer_scores(layer, sink, valid)

    def compressed(scorer):
        def run():
            with torch.no_grad(), compress(model, scorer, "uniform", budget=args.budget) as session:
                model(input_ids=ids, **{cache_kwarg(model): session.new_cache()}, use_cache=True, logits_to_keep=1)
        return run

    prefill_s = _median_seconds(prefill, args.repeats)
    heads_s = _median_seconds(heads_only, args.repeats)
    with_heads_s = _median_seconds(compressed(heads), args.repeats)
    with_knorm_s = _median_seconds(compressed("knorm"), args.repeats)
    result = {
        "model": model_id,
        "head_type": heads.head_type,
        "head_parameters": sum(p.numel() for p in heads.parameters()),
        "length": args.length,
        "threads": torch.get_num_threads(),
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "prefill_s": prefill_s,
        "heads_s": heads_s,
        "heads_fraction_of_prefill": heads_s / prefill_s,
        "compress_prefill_with_heads_s": with_heads_s,
        "compress_prefill_with_knorm_s": with_knorm_s,
        "compress_heads_vs_knorm_fraction_of_prefill": (with_heads_s - with_knorm_s) / prefill_s,
    }
    print(f"prefill {prefill_s:.3f} s | heads {heads_s:.4f} s = {100 * heads_s / prefill_s:.2f}% of prefill | "
          f"compress(heads) {with_heads_s:.3f} s vs compress(knorm) {with_knorm_s:.3f} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
