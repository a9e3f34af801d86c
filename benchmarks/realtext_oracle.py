#!/usr/bin/env python
"""How good is the CIS label itself on real prose? (issue 14: "measure the label's own NLL/KL before tuning the head")

For windows of real documents (context of --length tokens, then the next --continuation tokens), query-agnostic
(the context is compressed before the continuation is seen), every setting on one shared prefill per sample:

- ``full``: the full cache (the reference: its continuation log-probs, teacher-forced);
- ``oracle``: the Locret CIS label used as the eviction score, computed from the continuation's own queries (max
  pre-softmax logit over the continuation and the GQA group): it sees the future, so it bounds what a head trained
  on that label can reach;
- the shipped / given adapter's heads, SnapKV, StreamingLLM, TOVA.

Prints per setting the continuation's mean NLL per token, Δ vs full and the mean KL(full ‖ compressed) per token::

    python benchmarks/realtext_oracle.py --corpus gnu-info --samples 8 --budget 0.1
    python benchmarks/realtext_oracle.py --adapter runs/new/adapter --samples 8 --budget 0.1 --window 64
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from gatekv.compress import shared_prefill
from gatekv.corpus import load_corpus
from gatekv.models import cache_kwarg
from gatekv.eval.oracle import OracleScorer, cis_labels


def windows(tokenizer, corpus: str, length: int, continuation: int, samples: int, seed: int) -> list[torch.Tensor]:
    """``samples`` windows of ``length + continuation`` tokens, one per document (longest documents first drawn)."""
    need = length + continuation
    docs = [d for d in load_corpus(corpus) if len(d.text) > need * 3]
    rng = random.Random(seed)
    rng.shuffle(docs)
    out = []
    for doc in docs:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if len(ids) < need:
            continue
        start = rng.randrange(0, len(ids) - need + 1)
        out.append(torch.tensor(ids[start : start + need])[None])
        if len(out) == samples:
            break
    return out


def continuation_logprobs(model, cache, ids: torch.Tensor, length: int, first_logits: torch.Tensor) -> torch.Tensor:
    """(C, vocab) log-probs of the continuation ids[length:] given the (compressed) cache of ids[:length]."""
    rest = model(input_ids=ids[:, length:-1], use_cache=True, position_ids=torch.arange(length, ids.shape[1] - 1)[None],
                 **{cache_kwarg(model): cache}).logits[0]
    return F.log_softmax(torch.cat([first_logits, rest]).float(), -1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="gnu-info")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--budget", type=float, nargs="+", default=[0.1])
    parser.add_argument("--adapter", default="checkpoints/smollm2-135m-retaining-heads")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scorers", nargs="+", default=["oracle", "snapkv", "streaming_llm", "tova", "heads"],
                        help="settings to run (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from gatekv.heads.adapter import Adapter
    from gatekv.smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    heads = Adapter.from_pretrained(args.adapter).heads_for(model) if args.adapter else None
    oracle = OracleScorer()
    scorers = {"oracle": oracle, "snapkv": "snapkv", "streaming_llm": "streaming_llm", "tova": "tova"}
    if heads is not None:
        scorers["heads"] = heads
    scorers = {name: scorer for name, scorer in scorers.items() if name in args.scorers}
    settings = [(name, alloc) for name in scorers for alloc in (("uniform",) if name == "streaming_llm" else ("uniform", "adakv"))]
    nll: dict = {}
    kl: dict = {}
    start = time.perf_counter()
    samples = windows(tokenizer, args.corpus, args.length, args.continuation, args.samples, args.seed)
    for i, ids in enumerate(samples):
        target = ids[0, args.length :]
        with torch.no_grad():
            full = F.log_softmax(model(input_ids=ids).logits[0, args.length - 1 : -1].float(), -1)
            nll.setdefault("full", []).append(float(-full.gather(1, target[:, None]).mean()))
            if "oracle" in scorers:
                oracle.set_labels(cis_labels(model, ids[0].tolist(), args.length))
            with shared_prefill(model, scorers, window=args.window, sinks=args.sinks) as shared:
                first = shared.prefill(ids[:, : args.length])
                for budget in args.budget:
                    for name, alloc in settings:
                        cache, _ = shared.fork(name, alloc, budget)
                        logp = continuation_logprobs(model, cache, ids, args.length, first)
                        key = (name, alloc, budget)
                        nll.setdefault(key, []).append(float(-logp.gather(1, target[:, None]).mean()))
                        kl.setdefault(key, []).append(float((full.exp() * (full - logp)).sum(-1).mean()))
        print(f"sample {i + 1}/{len(samples)} done ({time.perf_counter() - start:.0f} s)", flush=True)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    base = mean(nll["full"])
    print(f"\n{args.corpus}, {len(samples)} samples, context {args.length}, continuation {args.continuation}, "
          f"query-agnostic, window {args.window}, sinks {args.sinks}, adapter {args.adapter}")
    print(f"| setting | allocator | budget | NLL | Δ vs full | KL(full‖compressed) |\n|---|---|---|---|---|---|")
    print(f"| full | - | - | {base:.3f} | - | - |")
    for key in kl:
        print(f"| {key[0]} | {key[1]} | {key[2]} | {mean(nll[key]):.3f} | {mean(nll[key]) - base:+.3f} | "
              f"{mean(kl[key]):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
