#!/usr/bin/env python
"""Locret's regime: chunked prefill with a fixed token budget per KV head, next to one-shot at the same budget.

For each context length and setting (``one_shot:BUDGET`` or ``chunked:CHUNK:BUDGET``, BUDGET in tokens per KV head),
query-agnostic (the context is compressed before the question / continuation is seen):

- single-needle accuracy (``gatekv.eval.tasks`` niah_single, held-out haystack and seeds, answered greedily);
- real-text ``lm`` (the GNU Info manuals: held out from training): NLL of the next tokens, Δ vs the full cache and
  KL(full ‖ compressed), teacher-forced (``gatekv.eval.realtext``);
- with ``--swap`` (chunked settings): the same samples answered from a one-shot prefill's keys and values (computed
  over the whole uncompressed context) restricted to exactly the slots the chunked prefill kept per (layer, KV head):
  separates which tokens chunked prefill keeps from how it computed them (over an already compressed past);
- with ``--kept``, where the needle went: after the context's prefill, the share of the needle's value tokens held
  per (layer, KV head), averaged, and the share of (layer, head) pairs holding all of them (one more prefill each);
- the measured peak KV bytes of the prefill (``CompressionStats.peak_kv_bytes``: the largest allocation right before
  an eviction) in MiB and as a multiple of budget + one chunk (one-shot: the full prompt).

The full cache is run on the same samples. Prints a markdown table and writes it (and a JSON) under --out::

    python benchmarks/chunked_regime.py --lengths 8192 --settings one_shot:512 chunked:512:512 --needle 10 --lm 0
    python benchmarks/chunked_regime.py --lengths 4096 --settings one_shot:256 chunked:512:256 chunked:1024:256 \\
        one_shot:512 chunked:512:512 chunked:1024:512 --needle 10 --lm 6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def parse_setting(text: str) -> dict:
    parts = text.split(":")
    try:
        if parts[0] == "one_shot" and len(parts) == 2:
            return {"prefill": "one_shot", "chunk_size": None, "budget": int(parts[1])}
        if parts[0] == "chunked" and len(parts) == 3:
            return {"prefill": "chunked", "chunk_size": int(parts[1]), "budget": int(parts[2])}
    except ValueError:
        pass
    raise SystemExit(f"--settings: {text!r} is not one_shot:BUDGET or chunked:CHUNK:BUDGET")


def label(setting: dict) -> str:
    if setting["prefill"] == "one_shot":
        return f"one-shot, {setting['budget']} tok/head"
    return f"chunked {setting['chunk_size']}, {setting['budget']} tok/head"


def kv_bytes_per_token(model) -> int:
    """K + V bytes of one token in every layer and KV head (the model's dtype)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize


def prefill_options(setting: dict) -> dict:
    """compress() / GateKV keyword options of a setting's prefill beyond its mode (the chunk size when chunked)."""
    return {"chunk_size": setting["chunk_size"]} if setting["prefill"] == "chunked" else {}


def run_needle(kv_for, model, tokenizer, setting, samples) -> dict:
    from gatekv.eval.metrics import score_answer

    kv = kv_for(setting)
    scores, peaks, held = [], [], []
    for sample in samples:
        answer = kv.answer(sample.context, sample.question, query_aware=False, max_new_tokens=24)
        scores.append(score_answer(answer.text, sample.answers, sample.metric))
        if answer.stats is not None:
            peaks.append(answer.stats.peak_kv_bytes)
        held.append(answer.kv_bytes)
    return {"accuracy": sum(scores) / len(scores), "n": len(scores), "scores": scores,
            "peak_kv_bytes": max(peaks) if peaks else None, "held_kv_bytes": max(held)}


NEEDLE_OPENING = "The secret access code for"  # niah_single's statement: "The secret access code for {key} is {value}."


def needle_tokens(tokenizer, sample) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices of the needle's value (``sample.answers[0]``) and of its whole statement (key and value) in the
    context prompt that ``prompt_ids`` builds."""
    from gatekv.chat import chat_template_parts

    chat = bool(getattr(tokenizer, "chat_template", None))
    text = (chat_template_parts(tokenizer)[0] if chat else "") + sample.context
    encoded = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    begin = text.rfind(sample.answers[0])
    opening = text.rfind(NEEDLE_OPENING, 0, max(begin, 0))
    if begin < 0 or opening < 0:
        raise ValueError(f"needle statement with value {sample.answers[0]!r} not found in the context")
    end = begin + len(sample.answers[0])

    def overlapping(lo: int, hi: int) -> torch.Tensor:
        return torch.tensor([i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < hi and b > lo])

    return overlapping(begin, end), overlapping(opening, end)


def fixed_set_scorer(kept):
    """A scorer that marks given positions per (layer, KV head): score 1 if the slot's position is in the set, else
    0. With the ``threshold`` allocator (tau 0) the cache keeps exactly those slots plus the protected sinks and
    recent window. ``kept``: per layer, per KV head, the positions (batch 1)."""
    from gatekv.scorers.base import Scorer

    class FixedSet(Scorer):
        name = "fixed-set"

        def score(self, ctx):
            scores = torch.zeros(ctx.positions.shape, dtype=torch.float32, device=ctx.positions.device)
            for head, wanted in enumerate(kept[ctx.layer_idx]):
                scores[0, head] = torch.isin(ctx.positions[0, head], wanted.to(ctx.positions.device)).float()
            return scores

    return FixedSet()


def needle_kept(model, tokenizer, heads, setting, sample, allocator) -> dict:
    """Prefill the context prompt under ``setting`` and measure which needle tokens each (layer, KV head) holds."""
    from gatekv.compress import compress
    from gatekv.inference import prompt_ids
    from gatekv.models import cache_kwarg

    ids = prompt_ids(tokenizer, sample.context, sample.question)[0]
    value, statement = needle_tokens(tokenizer, sample)
    options = prefill_options(setting)
    with torch.no_grad(), compress(model, heads, allocator, setting["budget"], prefill=setting["prefill"],
                                   **options) as session:
        cache = session.new_cache()
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    shares, statement_shares, kept = [], [], []
    for layer in cache.layers:
        kept.append([])
        for start, length in zip(layer.starts.tolist(), layer.lengths.tolist()):
            held = layer.positions[start:start + length]
            kept[-1].append(held.clone())
            shares.append(float(torch.isin(value, held).float().mean()))
            statement_shares.append(float(torch.isin(statement, held).float().mean()))
    shares = torch.tensor(shares)
    return {"share": float(shares.mean()), "all": float((shares == 1).float().mean()),
            "statement": sum(statement_shares) / len(statement_shares), "kept": kept}


def answer_from_set(model, tokenizer, sample, kept) -> float:
    """Answer query-agnostically from a one-shot prefill that keeps exactly ``kept`` (per layer, per KV head)."""
    from gatekv.eval.metrics import score_answer
    from gatekv.inference import GateKV

    kv = GateKV(model, tokenizer, scorer=fixed_set_scorer(kept), allocator="threshold", budget=1.0, prefill="one_shot")
    answer = kv.answer(sample.context, sample.question, query_aware=False, max_new_tokens=24)
    return score_answer(answer.text, sample.answers, sample.metric)


def run_lm(model, tokenizer, heads, setting, samples, fulls, allocator) -> dict:
    from gatekv.compress import compress
    from gatekv.eval.realtext import score_target, target_logits
    from gatekv.models import cache_kwarg

    kwarg = cache_kwarg(model)
    records, peaks = [], []
    for sample, full in zip(samples, fulls):
        ids = torch.tensor([sample.context_ids])
        rest = sample.question_ids + sample.target_ids
        options = prefill_options(setting)
        with torch.no_grad(), compress(model, heads, allocator, setting["budget"], prefill=setting["prefill"],
                                       **options) as session:
            cache = session.new_cache()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kwarg: cache})
            logits = target_logits(model, cache, kwarg, out.logits[0, -1], rest, len(sample.target_ids))
            peaks.append(session.stats.peak_kv_bytes)
        records.append(score_target(logits, sample.target_ids, full, "lm"))
    mean = lambda key: sum(r[key] for r in records) / len(records)  # noqa: E731
    return {"nll": mean("nll"), "delta_nll": mean("delta_nll"), "kl": mean("kl"), "n": len(records),
            "peak_kv_bytes": max(peaks)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default="checkpoints/smollm2-135m-retaining-heads")
    parser.add_argument("--allocator", default="adakv")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--settings", nargs="+", default=["one_shot:512", "chunked:512:512"])
    parser.add_argument("--needle", type=int, default=10, help="needle samples per length (0 = skip)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="needle seeds first-seed .. first-seed + needle - 1 (runs over disjoint seeds combine)")
    parser.add_argument("--lm", type=int, default=0, help="lm samples per length (0 = skip)")
    parser.add_argument("--kept", action="store_true",
                        help="also measure how much of the needle each (layer, KV head) holds after the prefill")
    parser.add_argument("--swap", action="store_true",
                        help="chunked settings: also answer from one-shot keys/values restricted to the chunked keep set")
    parser.add_argument("--no-recency", action="store_true",
                        help="rank without the adapter's learned recency bias (set_recency(False))")
    parser.add_argument("--no-full", action="store_true",
                        help="skip the full-cache row (already measured on the same seeds)")
    parser.add_argument("--kept-only", action="store_true",
                        help="only that measurement: no answers, no full cache (join with an earlier run's "
                             "per-sample needle_scores of the same seeds)")
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/smollm2-chunked")
    args = parser.parse_args(argv)
    settings = [parse_setting(s) for s in args.settings]
    torch.set_num_threads(args.threads)
    from gatekv.corpus import load_corpus
    from gatekv.eval.realtext import full_logprobs, make_realtext_samples
    from gatekv.eval.tasks import make_task_samples
    from gatekv.heads.adapter import Adapter
    from gatekv.inference import GateKV, prompt_ids
    from gatekv.smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    adapter = Adapter.from_pretrained(args.adapter)
    heads = adapter.heads_for(model)
    if args.no_recency:
        if heads.config.recency_buckets == 0:
            raise SystemExit(f"--no-recency: {args.adapter} has no recency bias")
        heads.set_recency(False)
    per_token = kv_bytes_per_token(model)

    def kv_for(setting):
        if setting is None:
            return GateKV(model, tokenizer)
        options = prefill_options(setting)
        return GateKV(model, tokenizer, scorer=heads, allocator=args.allocator, budget=setting["budget"],
                      prefill=setting["prefill"], **options)

    rows = []
    head_tokens = prompt_ids(tokenizer, "", "")[0].shape[1]
    for length in args.lengths:
        needle = make_task_samples("niah_single", tokenizer, length, args.needle, args.first_seed, None,
                                   head_tokens) if args.needle else []
        lm = make_realtext_samples("lm", tokenizer, load_corpus("gnu-info"), length, args.lm, 0,
                                   args.continuation) if args.lm else []
        fulls = [full_logprobs(model, s) for s in lm]
        full_nll = [float(-f.gather(1, torch.tensor(s.target_ids)[:, None]).mean()) for s, f in zip(lm, fulls)]
        for setting in settings if args.kept_only or args.no_full else [None, *settings]:
            start = time.perf_counter()
            row = {"length": length, "setting": "full cache" if setting is None else label(setting)}
            if needle and not args.kept_only:
                result = run_needle(kv_for, model, tokenizer, setting, needle)
                row.update(needle=result["accuracy"], needle_n=result["n"], needle_scores=result["scores"],
                           peak_kv_bytes=result["peak_kv_bytes"])
            if needle and (args.kept or args.kept_only or args.swap) and setting is not None:
                kept = [needle_kept(model, tokenizer, heads, setting, s, args.allocator) for s in needle]
                row.update(needle_kept=[k["share"] for k in kept], needle_kept_all=[k["all"] for k in kept],
                           needle_statement_kept=[k["statement"] for k in kept])
                if args.swap and setting["prefill"] == "chunked":
                    row["swap_scores"] = [answer_from_set(model, tokenizer, s, k["kept"]) for s, k in zip(needle, kept)]
            if lm and setting is not None:
                result = run_lm(model, tokenizer, heads, setting, lm, fulls, args.allocator)
                row.update(lm_nll=result["nll"], lm_delta=result["delta_nll"], lm_kl=result["kl"], lm_n=result["n"])
                row["peak_kv_bytes"] = max(row.get("peak_kv_bytes") or 0, result["peak_kv_bytes"])
            elif lm:
                row.update(lm_nll=sum(full_nll) / len(full_nll), lm_n=len(lm))
            full_bytes = length * per_token
            if setting is None:
                row["peak_kv_bytes"] = full_bytes
                row["peak_bound_bytes"] = full_bytes
            else:
                room = setting["chunk_size"] if setting["prefill"] == "chunked" else length
                row["peak_bound_bytes"] = (setting["budget"] + room) * per_token
            row["full_kv_bytes"] = full_bytes
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Adapter {args.adapter}, allocator {args.allocator}, query-agnostic; needle: niah_single (held-out "
             f"haystack, seeds {args.first_seed}..{args.first_seed + args.needle - 1}); lm: gnu-info (held out), next "
             f"{args.continuation} tokens. Peak KV: "
             "largest allocation of the prefill (MiB); bound = (budget + chunk) tokens per head (one-shot: the prompt).",
             "Needle held: mean over samples of the share of the needle's value tokens each (layer, KV head) holds after "
             "the prefill (all: share of (layer, head) pairs holding every one of them; statement: share of the whole "
             "statement's tokens held); --kept. Swap: accuracy of one-shot keys/values kept at exactly the chunked "
             "prefill's slots; --swap.",
             "", "| context | setting | needle | needle held (all) | statement held | swap | lm NLL | Δ NLL | KL | "
             "peak KV MiB | peak / bound | peak / full |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for row in rows:
        peak = row.get("peak_kv_bytes")
        held = row.get("needle_kept")
        held = "-" if not held else (f"{sum(held) / len(held):.3f} ({sum(row['needle_kept_all']) / len(held):.3f})")
        mean = lambda key: None if not row.get(key) else sum(row[key]) / len(row[key])  # noqa: E731
        lines.append(
            f"| {row['length']} | {row['setting']} | {fmt(row.get('needle'), '.2f')} | {held} | "
            f"{fmt(mean('needle_statement_kept'), '.3f')} | {fmt(mean('swap_scores'), '.2f')} | "
            f"{fmt(row.get('lm_nll'), '.3f')} | "
            f"{fmt(row.get('lm_delta'), '+.3f')} | {fmt(row.get('lm_kl'), '.3f')} | {fmt(peak and peak / 2**20, '.1f')} | "
            f"{fmt(peak and peak / row['peak_bound_bytes'], '.2f')} | {fmt(peak and peak / row['full_kv_bytes'], '.3f')} |")
    name = "_".join(str(n) for n in args.lengths)
    (out / f"results-{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"results-{name}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
