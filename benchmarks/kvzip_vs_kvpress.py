"""KVzip through gatekv vs the peer library's (kvpress ``KVzipPress``) on the same single-needle samples (measures).

Query-agnostic: the context is compressed before the question is seen. Both sides use KVzip's defaults: repeat
prompt + chat tail, chunks of 2048, 4 sinks, one top-k over every layer and head jointly (gatekv: the ``global``
allocator with floor 0, window 0; kvpress: ``layerwise=False``). kvpress pins an older transformers, so it runs in
its own venv; the samples and the scoring are gatekv's::

    python benchmarks/kvzip_vs_kvpress.py samples out/                      # gatekv venv: 16 samples, 2K tokens
    python benchmarks/kvzip_vs_kvpress.py ours out/                         # gatekv venv: full cache + our KVzip
    /tmp/kvpress-venv/bin/python benchmarks/kvzip_vs_kvpress.py peer out/   # kvpress venv: full cache + KVzipPress
    python benchmarks/kvzip_vs_kvpress.py compare out/                      # gatekv venv: the table

The peer side loads the SmolLM2 weights gatekv converted from the GGUF (``~/.cache/gatekv/smollm2-*``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

BUDGETS = (0.1, 0.05)


def _samples(args) -> None:
    from gatekv.eval.tasks import make_task_samples
    from gatekv.smollm2 import load_smollm2

    _, tokenizer = load_smollm2()
    samples = make_task_samples("niah_single", tokenizer, args.tokens, args.num, args.seed)
    rows = [{"seed": s.seed, "context": s.context, "question": s.question, "answers": s.answers, "metric": s.metric}
            for s in samples]
    (args.out / "samples.json").write_text(json.dumps(rows, indent=1))
    print(f"{len(rows)} samples of niah_single at {args.tokens} tokens -> {args.out / 'samples.json'}")


def _ours(args) -> None:
    import torch

    from gatekv.allocators import get_allocator
    from gatekv.inference import GateKV
    from gatekv.scorers.kvzip import KVzipScorer
    from gatekv.smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    rows = json.loads((args.out / "samples.json").read_text())
    scorer = KVzipScorer(tokenizer=tokenizer)
    runner = GateKV(model, tokenizer, window=0, sinks=4)
    allocator = get_allocator("global", floor=0.0)
    out = []
    for i, row in enumerate(rows):
        full = runner.answer(row["context"], row["question"], max_new_tokens=args.max_new_tokens)
        began = time.perf_counter()
        answers = runner.answer_settings(row["context"], row["question"],
                                         [{"scorer": "kvzip", "allocator": allocator, "budget": b} for b in BUDGETS],
                                         scorers={"kvzip": scorer}, max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - began
        record = {"seed": row["seed"], "full": full.text, "full_seconds": full.seconds,
                  "kvzip_seconds_all_budgets": seconds}
        for b, answer in zip(BUDGETS, answers):
            record[f"kvzip@{b:g}"] = answer.text
            record[f"kept@{b:g}"] = float(answer.stats.kept_tokens.double().mean())
        out.append(record)
        print(f"[ours {i + 1}/{len(rows)}] {record}", flush=True)
    (args.out / "ours.json").write_text(json.dumps(out, indent=1))
    print(f"threads {torch.get_num_threads()}")


def _peer(args) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    import kvpress
    from kvpress import KVzipPress
    from kvpress.presses import kvzip_press

    converted = sorted(Path.home().glob(".cache/gatekv/smollm2-135m-instruct-*"))
    if not converted:
        raise SystemExit("no converted SmolLM2 under ~/.cache/gatekv: run the 'ours' step first")
    path = str(converted[-1])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    kvzip_press.AutoTokenizer.from_pretrained = lambda *a, **k: tokenizer  # the press reloads it by name_or_path
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    rows = json.loads((args.out / "samples.json").read_text())
    out = []
    for i, row in enumerate(rows):
        question = "\n\n" + row["question"]  # gatekv's prompt: context + "\n\n" + question + chat tail
        began = time.perf_counter()
        with torch.no_grad():
            full = pipe(row["context"], question=question, max_new_tokens=args.max_new_tokens)["answer"]
        record = {"seed": row["seed"], "full": full, "full_seconds": time.perf_counter() - began}
        for b in BUDGETS:
            began = time.perf_counter()
            with torch.no_grad():
                answer = pipe(row["context"], question=question, press=KVzipPress(compression_ratio=1 - b),
                              max_new_tokens=args.max_new_tokens)["answer"]
            record[f"kvzip@{b:g}"] = answer
            record[f"kvzip_seconds@{b:g}"] = time.perf_counter() - began
        out.append(record)
        print(f"[peer {i + 1}/{len(rows)}] {record}", flush=True)
    (args.out / "peer.json").write_text(json.dumps(out, indent=1))
    print(f"kvpress {getattr(kvpress, '__version__', '?')}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")


def _compare(args) -> None:
    from gatekv.eval.metrics import score_answer

    rows = {r["seed"]: r for r in json.loads((args.out / "samples.json").read_text())}
    print(f"single needle, {len(rows)} samples, SmolLM2-135M-Instruct fp32 CPU, query-agnostic")
    print(f"{'setting':<14} {'gatekv':>8} {'kvpress':>8} {'same answer':>12}")
    results = {side: json.loads((args.out / f"{side}.json").read_text()) for side in ("ours", "peer")}
    for key in ["full"] + [f"kvzip@{b:g}" for b in BUDGETS]:
        acc = {}
        for side, records in results.items():
            acc[side] = sum(score_answer(r[key], rows[r["seed"]]["answers"], rows[r["seed"]]["metric"])
                            for r in records) / len(records)
        same = sum(a[key].strip() == b[key].strip() for a, b in zip(results["ours"], results["peer"]))
        print(f"{key:<14} {acc['ours']:>8.2f} {acc['peer']:>8.2f} {same:>7}/{len(rows)}")
    ours, peer = results["ours"], results["peer"]
    full = sum(r["full_seconds"] for r in ours)
    print(f"gatekv: full cache {full:.1f}s total; KVzip prefill + replay + both budgets "
          f"{sum(r['kvzip_seconds_all_budgets'] for r in ours):.1f}s")
    print(f"kvpress: full cache {sum(r['full_seconds'] for r in peer):.1f}s; "
          + ", ".join(f"KVzip@{b:g} {sum(r[f'kvzip_seconds@{b:g}'] for r in peer):.1f}s" for b in BUDGETS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["samples", "ours", "peer", "compare"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--num", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    {"samples": _samples, "ours": _ours, "peer": _peer, "compare": _compare}[args.step](args)


if __name__ == "__main__":
    main()
