#!/usr/bin/env python
"""Budgets from one scorer, ranking from another: how many tokens each (layer, KV head) keeps is what
Layer-DefensiveKV (DefensiveKV's window-attention scores + the global allocator) gives it, and which tokens fill that
count is decided by the shipped retaining heads. Real text (``gatekv.eval.realtext``), query-agnostic, one shared
prefill per sample scored by both, compared against each alone on the same samples.

Why: on the held-out real-text samples at 10% (n = 32), Layer-DefensiveKV disturbs the continuation less than the
heads (KL 0.207 vs 0.242). DefensiveKV's edge is its allocation across layers (with a uniform allocation it is at
0.332), which the heads' per-layer scores cannot drive: the global allocator on the heads' own scores gives 0.486.

    python benchmarks/guided_budget.py --task lm --num-samples 32 --out benchmarks/results/smollm2-guided-budget
    python benchmarks/guided_budget.py --task recall --num-samples 32 --out benchmarks/results/smollm2-guided-budget

``--decompose`` adds the oracle (the target's own CIS label, :mod:`gatekv.eval.oracle`; it sees the future) as a third
scorer of the same prefill, and splits the gap between the combination and the oracle into its two parts:
the oracle's ranking inside Layer-DefensiveKV's counts, and the heads' ranking inside the oracle's Ada-KV counts.
``--floors`` adds the combination (and each ``--rank-mix`` setting) at other floors of the global allocator,
``--mix W`` per-head counts ``W * Layer-DefensiveKV's + (1 - W) * the heads' Ada-KV counts`` (same total, largest
remainders), ranked by the heads.

    python benchmarks/guided_budget.py --task lm --num-samples 32 --decompose --floors 0 0.2 --mix 0.5 \
        --out benchmarks/results/smollm2-guided-budget/decompose

Writes ``results-<task>.json`` in the ``cells`` layout of ``gatekv eval`` (``benchmarks/paired.py`` reads it) and
prints the means.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default="checkpoints/smollm2-135m-retaining-heads")
    parser.add_argument("--task", choices=["lm", "recall"], default="lm")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--floor", type=float, default=0.1, help="the global allocator's per-head floor")
    parser.add_argument("--decompose", action="store_true", help="add the oracle and the two half-oracle settings")
    parser.add_argument("--floors", type=float, nargs="*", default=[], help="more floors for the combination")
    parser.add_argument("--mix", type=float, nargs="*", default=[], help="weights W of mixed per-head counts")
    parser.add_argument("--rank-mix", type=float, nargs="*", default=[],
                        help="weights W of the heads in a rank_mix with DefensiveKV, ranked inside "
                             "Layer-DefensiveKV's counts")
    parser.add_argument("--combine", choices=["sum", "max"], default="sum", help="how --rank-mix blends the ranks")
    parser.add_argument("--quota", type=float, nargs="+", default=[0.0],
                        help="--rank-mix: shares of every kept count that go to the heads' own top (one setting each)")
    parser.add_argument("--gate", default=None,
                        help="a second adapter (label 'gate'), scored on the same prefill, for --mix-spec")
    parser.add_argument("--mix-spec", action="append", default=[], metavar="JSON",
                        help='a rank_mix over the labels heads, dkv (DefensiveKV) and gate, ranked inside '
                             'Layer-DefensiveKV\'s counts, e.g. \'{"weights": {"heads": 0.5, "gate": 0.5}}\' '
                             '(long form of rank_mix: weights, quota, combine); repeatable')
    parser.add_argument("--seed-base", type=int, default=0,
                        help="first sample seed (0: the evaluation samples; e.g. 1000 for a disjoint tuning split)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from gatekv.allocators import Allocator, get_allocator
    from gatekv.allocators.global_topk import plan_exact_counts
    from gatekv.compress import shared_prefill
    from gatekv.corpus import load_corpus
    from gatekv.eval.realtext import full_logprobs, make_realtext_samples, score_target, target_logits
    from gatekv.heads.adapter import Adapter
    from gatekv.models import cache_kwarg
    from gatekv.scorers.rank_mix import RankMixScorer, split_mix_spec
    from gatekv.smollm2 import load_smollm2

    class FixedCounts(Allocator):
        """Keeps exactly ``counts[l][b, h]`` slots per head (another allocation's), ranked by the scores it gets."""

        def __init__(self, counts: list[torch.Tensor]):
            self.counts = counts

        def allocate(self, inputs):
            return plan_exact_counts(inputs, [c.to(inputs.scores[0].device) for c in self.counts])

    model, tokenizer = load_smollm2()
    heads = Adapter.from_pretrained(args.adapter).heads_for(model)
    documents = load_corpus("gnu-info")  # the samples depend on which GNU manuals are installed: recorded below
    samples = make_realtext_samples(args.task, tokenizer, documents, args.length, args.num_samples, args.seed_base)
    kwarg = cache_kwarg(model)
    # name -> (ranking scorer, where the counts come from): an allocator, or the name of an earlier fork whose
    # per-head counts are kept, or ("mix", W) of Layer-DefensiveKV's and the heads' Ada-KV counts
    settings = {"heads|adakv": ("heads", get_allocator("adakv")),
                "layer-defensivekv|global": ("dkv", get_allocator("global", floor=args.floor)),
                "heads-ranked|defensivekv-budgets": ("heads", "layer-defensivekv|global")}
    for floor in args.floors:
        settings[f"layer-defensivekv-floor{floor:g}|global"] = ("dkv", get_allocator("global", floor=floor))
        settings[f"heads-ranked|defensivekv-budgets-floor{floor:g}"] = ("heads", f"layer-defensivekv-floor{floor:g}|global")
    for weight in args.mix:
        settings[f"heads-ranked|mixed-budgets-{weight:g}"] = ("heads", ("mix", weight))
    scorers = {"heads": heads, "dkv": "defensivekv"}
    if args.gate:
        scorers["gate"] = Adapter.from_pretrained(args.gate).heads_for(model)
    members = dict(scorers)  # the labels a rank mix can weigh

    def add_rank_mix(label: str, name: str, weights: dict, combine: str, quota: dict | None, floors=()) -> None:
        """Score the prefill with a rank_mix of ``members`` (as ``label``) and rank inside Layer-DefensiveKV's
        counts, also at each of ``floors``; the settings are ``name|defensivekv-budgets[-floorF]``."""
        scorers[label] = RankMixScorer({k: members[k] for k in weights}, weights, combine, quota)
        settings[f"{name}|defensivekv-budgets"] = (label, "layer-defensivekv|global")
        for floor in floors:
            settings[f"{name}|defensivekv-budgets-floor{floor:g}"] = (label, f"layer-defensivekv-floor{floor:g}|global")

    for weight in args.rank_mix:
        for share in args.quota:
            add_rank_mix(f"mix{weight:g}-q{share:g}", f"rank-mix-{args.combine}-{weight:g}-q{share:g}",
                         {"heads": weight, "dkv": 1 - weight}, args.combine, {"heads": share} if share > 0 else None,
                         args.floors)
    for spec_text in args.mix_spec:
        weights, options = split_mix_spec(json.loads(spec_text))
        combine = options.get("combine", "sum")
        label = "mix-" + "-".join(f"{k}{v:g}" for k, v in weights.items()) + "".join(
            f"-q{k}{v:g}" for k, v in options.get("quota", {}).items()) + ("-max" if combine == "max" else "")
        add_rank_mix(label, label, weights, combine, options.get("quota"))
    if args.decompose:
        from gatekv.eval.oracle import OracleScorer, oracle_labels

        scorers["oracle"] = OracleScorer()
        settings.update({"oracle|adakv": ("oracle", get_allocator("adakv")),
                         "oracle-ranked|defensivekv-budgets": ("oracle", "layer-defensivekv|global"),
                         "heads-ranked|oracle-budgets": ("heads", "oracle|adakv")})
    records: dict[str, list[dict]] = {name: [] for name in settings}
    start = time.time()
    for index, sample in enumerate(samples):
        full = full_logprobs(model, sample)
        prefix = torch.tensor([sample.prefix_ids("query_agnostic")])
        rest = sample.rest_ids("query_agnostic")
        if args.decompose:
            scorers["oracle"].set_labels(oracle_labels(model, sample, "query_agnostic"))
        with torch.no_grad(), shared_prefill(model, scorers) as shared:
            last = shared.prefill(prefix)[0]
            counts: dict[str, list[torch.Tensor]] = {}
            for name, (scorer, source) in settings.items():
                if isinstance(source, str):
                    allocator = FixedCounts(counts[source])
                elif isinstance(source, tuple):
                    allocator = FixedCounts(mixed_counts(counts["layer-defensivekv|global"], counts["heads|adakv"],
                                                         source[1]))
                else:
                    allocator = source
                cache, _ = shared.fork(scorer, allocator, args.budget)
                counts[name] = list(cache.kept_tokens())
                logits = target_logits(model, cache, kwarg, last, rest, len(sample.target_ids))
                record = score_target(logits, sample.target_ids, full, args.task)
                record.update(seed=sample.seed, document=sample.document, kept=int(cache.kept_tokens().sum()))
                records[name].append(record)
        means = {n: round(sum(r["kl"] for r in rs) / len(rs), 3) for n, rs in records.items()}
        print(f"{index + 1}/{len(samples)} {time.time() - start:.0f}s mean KL {means}", flush=True)

    cells = {}
    for name, rs in records.items():
        method, allocator = name.split("|")
        cell = {"method": method, "allocator": allocator, "budget": args.budget, "mode": "query_agnostic",
                "task": args.task, "length": args.length}
        metrics = {k: sum(r[k] for r in rs) / len(rs) for k in ("nll", "delta_nll", "kl")}
        cells[f"{method}|{allocator}|{args.budget}|query_agnostic|{args.task}|{args.length}"] = {
            "cell": cell, "metrics": metrics, "n": len(rs), "samples": rs}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"results-{args.task}.json"
    path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                "corpus_documents": [d.name for d in documents], "cells": cells}, indent=1) + "\n")
    print(f"{args.task}, n = {len(samples)}, {args.budget:.0%} kept, corpus gnu-info (held out):")
    for name, rs in records.items():
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        print(f"  {name:36s} Δ NLL {mean('delta_nll'):+.3f}  KL {mean('kl'):.3f}  kept {mean('kept'):.0f}")
    print(f"wrote {path}")
    return 0


def mixed_counts(a: list[torch.Tensor], b: list[torch.Tensor], weight: float) -> list[torch.Tensor]:
    """Per-head counts ``weight * a + (1 - weight) * b`` over every layer and head, rounded by largest remainders
    so that each batch row keeps the same total as ``a``."""
    stacked = weight * torch.stack(a).double() + (1 - weight) * torch.stack(b).double()  # (L, B, H)
    whole = stacked.floor()
    total = torch.stack(a).sum(dim=(0, 2))  # (B,)
    out = whole.clone()
    for row in range(stacked.shape[1]):
        missing = int(total[row] - whole[:, row].sum())
        if missing > 0:
            remainder = (stacked[:, row] - whole[:, row]).flatten()
            flat = out[:, row].flatten()
            flat[remainder.topk(missing).indices] += 1
            out[:, row] = flat.reshape(out[:, row].shape)
    return [layer.long() for layer in out]


if __name__ == "__main__":
    raise SystemExit(main())
