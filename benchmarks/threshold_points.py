"""In-context eviction (Attention-Gate's mode): a trained gate keeps every token whose score is above ``tau``, per
KV head, with no fixed budget (the ``threshold`` allocator); this measures (achieved kept fraction, accuracy) points.

Single needle, query-agnostic (the context is compressed before the question is seen), SmolLM2-135M-Instruct fp32,
the samples of ``configs/eval/smollm2-needle-heads.yaml`` (niah_single, seeds 0..n-1). The taus come from the
score quantiles of a calibration prompt (seed 10_000, not evaluated), so the same taus apply to every sample and the
kept fraction follows each input: ``global`` one tau for every layer, ``per-layer`` one tau per layer (that layer's
quantile: a gate trained to rank has its own score scale in each layer). One shared prefill per sample serves every
setting; ``--full-from`` takes the full cache's per-sample scores from an eval results.json of the same samples::

    python benchmarks/threshold_points.py checkpoints/smollm2-135m-attention-gate --num 50 \
        --full-from benchmarks/results/smollm2-needle-gates/results.json --out benchmarks/results/smollm2-threshold
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SETTINGS = (("per-layer", 0.8), ("per-layer", 0.85), ("per-layer", 0.9), ("global", 0.85))
"""(tau kind, calibration quantile) pairs measured."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="+", type=Path, help="saved adapter directories")
    parser.add_argument("--num", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--full-from", type=Path, help="eval results.json holding the full cache's cell on these samples")
    args = parser.parse_args()

    import torch

    from gatekv.allocators import get_allocator
    from gatekv.eval.metrics import score_answer
    from gatekv.eval.tasks import make_task_samples
    from gatekv.heads.adapter import load_adapter
    from gatekv.inference import GateKV
    from gatekv.smollm2 import load_smollm2
    from gatekv.training.teacher import teacher_scores

    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    runner = GateKV(model, tokenizer)
    samples = make_task_samples("niah_single", tokenizer, args.tokens, args.num)
    calibration = make_task_samples("niah_single", tokenizer, args.tokens, 1, 10_000)[0]
    args.out.mkdir(parents=True, exist_ok=True)

    full = []
    if args.full_from is not None:
        cells = json.loads(args.full_from.read_text())["cells"]
        cell = next(c for k, c in cells.items() if k.startswith("full|") and f"|niah_single|{args.tokens}" in k)
        by_seed = {int(r["seed"]): float(r["score"]) for r in cell["samples"]}
        full = [by_seed[s.seed] for s in samples]
    else:
        for sample in samples:
            answer = runner.answer(sample.context, sample.question, max_new_tokens=args.max_new_tokens)
            full.append(score_answer(answer.text, sample.answers, sample.metric))
    report = {"task": "niah_single", "tokens": args.tokens, "n": len(samples), "mode": "query_agnostic",
              "full_accuracy": sum(full) / len(full), "adapters": {}}
    lines = [f"# In-context eviction (threshold allocator), single needle {args.tokens} tokens, n={len(samples)}, "
             "query-agnostic, SmolLM2-135M-Instruct fp32 CPU", "",
             f"full cache accuracy: {report['full_accuracy']:.2f}", "",
             "| adapter | tau | kept fraction (mean) | kept min-max | evicted | accuracy | x full |",
             "|---|---|---|---|---|---|---|"]
    for path in args.adapters:
        heads = load_adapter(path, model)
        ids = tokenizer(calibration.context, return_tensors="pt").input_ids[0]
        scores = teacher_scores(model, heads, ids, window=runner.config.window, sinks=runner.config.sinks)
        finite = torch.isfinite(scores)
        flat = scores[finite].flatten().float()
        per_layer = lambda q: [float(torch.quantile(layer[ok].float(), q)) for layer, ok in zip(scores, finite)]  # noqa: E731
        taus = [per_layer(q) if kind == "per-layer" else float(torch.quantile(flat, q)) for kind, q in SETTINGS]
        settings = [{"scorer": "gate", "allocator": get_allocator("threshold", tau=t), "budget": 0.99} for t in taus]  # threshold ignores the budget (cap off); 1.0 would skip compression
        correct = [[] for _ in taus]
        kept = [[] for _ in taus]
        began = time.perf_counter()
        for i, sample in enumerate(samples):
            answers = runner.answer_settings(sample.context, sample.question, settings, scorers={"gate": heads},
                                             max_new_tokens=args.max_new_tokens)
            context_tokens = len(tokenizer(sample.context).input_ids)
            for j, answer in enumerate(answers):
                correct[j].append(score_answer(answer.text, sample.answers, sample.metric))
                kept[j].append(float(answer.stats.kept_tokens.double().mean()) / context_tokens)
            print(f"[{path.name} {i + 1}/{len(samples)}] " + " ".join(
                f"{kind} q{q:g}: {c[-1]:.0f}/{k[-1]:.3f}" for (kind, q), c, k in zip(SETTINGS, correct, kept)), flush=True)
        points = []
        for (kind, q), t, c, k in zip(SETTINGS, taus, correct, kept):
            point = {"kind": kind, "quantile": q, "tau": t, "accuracy": sum(c) / len(c), "kept_mean": sum(k) / len(k),
                     "kept_min": min(k), "kept_max": max(k)}
            points.append(point)
            label = f"{kind}, quantile {q:g}" + (f" ({t:.3g})" if kind == "global" else "")
            lines.append(f"| {path.name} | {label} | {point['kept_mean']:.3f} | {point['kept_min']:.3f}-"
                         f"{point['kept_max']:.3f} | {1 - point['kept_mean']:.1%} | {point['accuracy']:.2f} | "
                         f"{point['accuracy'] / max(report['full_accuracy'], 1e-9):.2f} |")
        report["adapters"][path.name] = {"points": points, "seconds": time.perf_counter() - began}
    lines += ["", "kept fraction: kept tokens per (layer, KV head) / context tokens, sinks and the recent window "
              "included; `tau` is fixed per row, the kept fraction follows each input.",
              "command: `python benchmarks/threshold_points.py " + " ".join(str(p) for p in args.adapters)
              + f" --num {args.num}" + (f" --full-from {args.full_from}" if args.full_from else "") + f" --out {args.out}`"]
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
