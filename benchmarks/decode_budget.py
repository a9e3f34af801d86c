"""Fixed-size cache while generating (``decode_budget``): decode tokens/s against no eviction, in one process.

``decode_budget`` keeps every (row, KV head) at that many slots while generating: each step past it scores the cache
and evicts one slot per head in place (``CompressedLayer.evict_in_place``: the new token takes the evicted slot,
O(d) data movement per head, no compaction). Measured on the same prompt with the same manual greedy loop:

- ``full``: the dense transformers cache (grows to prompt + generated tokens);
- ``no eviction``: the compressed prompt (``budget``), growing as tokens come;
- ``decode_budget N``: the compressed prompt, then N slots per head at most while generating;
- ``decode_budget N, interval k`` (``--intervals``): the same, evicting k slots per head once every k steps
  (``decode_interval``: up to N + k - 1 slots between evictions).

    python benchmarks/decode_budget.py --prompt 512 --new 1024 --decode-budget 512 --scorer tova
    python benchmarks/decode_budget.py --intervals 1 16 --repeats 2

With ``--repeats R`` every setting runs R times, the settings in turn (a rotated order per repeat), and the table
gives each setting's median over its runs: this VM's speed drifts by ~15% over minutes, so settings run minutes
apart in one block each would not compare.

TOVA (the last query's attention) scores a cache on every step for free; SnapKV's window works too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _run(model, ids, cache, new_tokens):
    from gatekv.models import cache_kwarg

    kwarg = cache_kwarg(model)
    start = time.perf_counter()
    out = model(input_ids=ids, **{kwarg: cache}, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    steps = []
    begin = time.perf_counter()
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        out = model(input_ids=token, **{kwarg: cache}, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - start)
    total = time.perf_counter() - begin
    return prefill, steps, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (needle prompt)")
    parser.add_argument("--new", type=int, default=1024, help="generated tokens")
    parser.add_argument("--decode-budget", type=int, default=512)
    parser.add_argument("--budget", type=float, default=0.5, help="prompt budget (ratio)")
    parser.add_argument("--scorer", default="tova")
    parser.add_argument("--intervals", type=int, nargs="+", default=[1], help="decode_interval values to run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting, interleaved")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for name in ("prompt", "new", "decode_budget", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.intervals) < 1:
        parser.error("--intervals must be >= 1")

    import torch
    from transformers import DynamicCache

    from gatekv import compress
    from gatekv.bench import _cache_bytes
    from gatekv.eval.needle import needle_prompt
    from gatekv.smollm2 import load_smollm2

    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    ids = needle_prompt(tokenizer, args.prompt, 0).prompt_ids
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"SmolLM2-135M-Instruct fp32 CPU, {torch.get_num_threads()} threads, load {load}; prompt {ids.shape[1]} "
          f"tokens, {args.new} generated, scorer {args.scorer}, prompt budget {args.budget}")
    settings = [("full (dense cache)", None, None), ("no eviction", None, 1)]
    settings += [(f"decode_budget {args.decode_budget}" + (f", interval {k}" if k > 1 else ""), args.decode_budget, k)
                 for k in args.intervals]
    runs: dict[str, list] = {label: [] for label, _, _ in settings}
    with torch.no_grad():
        model(input_ids=ids[:, :64], use_cache=False)  # warm-up
        for repeat in range(args.repeats):
            shift = repeat % len(settings)
            for label, decode_budget, interval in settings[shift:] + settings[:shift]:
                if interval is None:
                    cache = DynamicCache(config=model.config)
                    prefill, steps, total = _run(model, ids, cache, args.new)
                    runs[label].append((prefill, steps, total, _cache_bytes(cache), None))
                    continue
                with compress(model, args.scorer, "uniform", budget=args.budget, decode_budget=decode_budget,
                              decode_interval=interval) as session:
                    cache = session.new_cache()
                    session.expect_new_tokens(args.new)
                    prefill, steps, total = _run(model, ids, cache, args.new)
                    kept = cache.kept_tokens()
                runs[label].append((prefill, steps, total, cache.kv_bytes(), float(kept.double().max())))
    rows = []
    for label, _, _ in settings:  # the run with the median total time
        ordered = sorted(runs[label], key=lambda run: run[2])
        rows.append((label, *ordered[(len(ordered) - 1) // 2]))
    print(f"median of {args.repeats} interleaved run(s) per setting")
    base = rows[1][3]
    print("| setting | tokens/s | x no eviction | median ms/token | last 128 steps ms/token | KV MiB at end | "
          "max kept/head at end |")
    print("|---|---|---|---|---|---|---|")
    for label, prefill, steps, total, kv, kept in rows:
        rate = len(steps) / total
        tail = statistics.median(steps[-128:]) * 1e3
        print(f"| {label} | {rate:.2f} | {base / total:.2f} | {statistics.median(steps) * 1e3:.1f} | {tail:.1f} | "
              f"{kv / 2**20:.1f} | {'-' if kept is None else f'{kept:.0f}'} |")


if __name__ == "__main__":
    main()
