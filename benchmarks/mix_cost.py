"""Prefill cost of the real-text settings of issue 14, against the stock prefill, in one process.

The settings are compression configs a CLI flag cannot spell (rank mixes with their own observation window), so they
are timed here with the same measurement as ``gatekv bench decode --prefill-rounds N``: the whole compressed prefill
(``logits_to_keep=1``; scoring, allocation and compaction included) and the session's scoring seconds, medians of
``--rounds`` interleaved rounds on fresh caches, next to the stock prefill (a dynamic cache) of the same prompt.

    python benchmarks/mix_cost.py --length 2048 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics

import torch

HEADS = "checkpoints/smollm2-135m-retaining-heads"
SETTINGS = {
    "heads, Ada-KV": dict(allocator="adakv"),
    "heads, defensive_budget": dict(allocator="defensive_budget"),
    "heads + DefensiveKV mix, defensive_budget": dict(
        allocator="defensive_budget",
        rank_mix={"weights": {"adapter": 0.5, "defensivekv": 0.5}, "quota": {"adapter": 0.5}}),
    "heads + DefensiveKV + H2O mix, defensive_budget, observe_window 64": dict(
        allocator="defensive_budget", observe_window=64,
        rank_mix={"weights": {"adapter": 0.5, "defensivekv": 0.25, "h2o": 0.25}, "quota": {"adapter": 0.5}}),
    "heads + DefensiveKV + TOVA mix, defensive_budget, observe_window 64": dict(
        allocator="defensive_budget", observe_window=64,
        rank_mix={"weights": {"adapter": 0.5, "defensivekv": 0.25, "tova": 0.25}, "quota": {"adapter": 0.5}}),
    "heads + DefensiveKV + TOVA mix, defensive_budget guided by the heads (guide_share 0.5), observe_window 64": dict(
        allocator="defensive_budget", allocator_options={"guide_share": 0.5}, observe_window=64,
        rank_mix={"weights": {"adapter": 0.5, "defensivekv": 0.25, "tova": 0.25}, "quota": {"adapter": 0.5},
                  "guide": "adapter"}),
    "heads + DefensiveKV + TOVA mix, guided, heads' quota bounded by 3% of the prompt (quota_prompt 0.03)": dict(
        allocator="defensive_budget", allocator_options={"guide_share": 0.5}, observe_window=64,
        rank_mix={"weights": {"adapter": 0.5, "defensivekv": 0.25, "tova": 0.25}, "quota": {"adapter": 0.5},
                  "quota_prompt": {"adapter": 0.03}, "guide": "adapter"}),
    "Layer-DefensiveKV (global)": dict(scorer="defensivekv", allocator="global"),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="time only the settings whose label contains one of these (the stock prefill always)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import DynamicCache

    from gatekv import get_allocator
    from gatekv.bench import _Run, smollm2_needle
    from gatekv.compress import CompressionSession
    from gatekv.inference import GateKV

    model, tokenizer, ids = smollm2_needle(args.length)
    configs = {}
    for label, options in SETTINGS.items():
        if args.only and not any(text in label for text in args.only):
            continue
        options = dict(options)
        source = {"scorer": options.pop("scorer")} if "scorer" in options else {"adapter": HEADS}
        if "allocator_options" in options:
            options["allocator"] = get_allocator(options["allocator"], **options.pop("allocator_options"))
        configs[label] = GateKV(model, tokenizer, budget=args.budget, **source, **options).config

    def run(label):
        if label == "stock":
            return _Run("stock", "full", None, DynamicCache(config=model.config))
        session = CompressionSession(model, configs[label])
        cache = session.new_cache()
        session.expect_new_tokens(1)
        return _Run(label, "one_shot", args.budget, cache, session)

    labels = ["stock", *configs]
    prefill = {label: [] for label in labels}
    scoring = {label: [] for label in labels}
    with torch.no_grad():
        model(input_ids=ids[:, :64], use_cache=False)  # first-call costs
        for _ in range(args.rounds):
            for label in labels:
                r = run(label)
                r.prefill(model, ids)
                prefill[label].append(r.prefill_seconds)
                if r.session is not None:
                    scoring[label].append(r.session.stats.score_seconds)
    stock = statistics.median(prefill["stock"])
    print(f"SmolLM2-135M fp32, needle prompt of {ids.shape[1]} tokens, budget {args.budget}, CPU threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}; medians of {args.rounds} interleaved rounds")
    print("| setting | prefill s | x stock prefill | scoring s | scoring x stock prefill |")
    print("|---|---|---|---|---|")
    for label in labels:
        seconds = statistics.median(prefill[label])
        score = f"{statistics.median(scoring[label]):.3f} | {statistics.median(scoring[label]) / stock:.3f}" \
            if scoring[label] else "- | -"
        print(f"| {label} | {seconds:.3f} | {seconds / stock:.3f} | {score} |")


if __name__ == "__main__":
    main()
