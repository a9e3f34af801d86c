"""One shared prefill for many compression settings vs one prefill per setting (measures; asserts nothing).

Every setting (scorer x allocator x budget) answers the same query-agnostic needle prompts twice in one process:
once through ``GateKV.answer`` (its own prefill each) and once through ``GateKV.answer_settings`` (one prefill of the
context, a compacted copy per setting). Prints both wall times, the ratio, and whether every answer is identical::

    python benchmarks/shared_prefill.py --samples 3 --tokens 2048
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# keep this folder off the import path (transformers probes for a top-level package named `kernels`)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from gatekv.eval.tasks import make_task_sample  # noqa: E402
from gatekv.inference import GateKV  # noqa: E402
from gatekv.models import load_base_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="base model (default: the embedded SmolLM2)")
    parser.add_argument("--samples", type=int, default=3, help="needle prompts (default 3)")
    parser.add_argument("--tokens", type=int, default=2048, help="context length (default 2048)")
    parser.add_argument("--scorers", nargs="+", default=["snapkv", "tova", "knorm"], help="training-free scorers")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--allocators", nargs="+", default=["uniform", "adakv"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_base_model(args.model)
    runner = GateKV(model, tokenizer)
    settings = [dict(scorer=s, allocator=a, budget=b) for s in args.scorers for a in args.allocators for b in args.budgets]
    scorers = {s: s for s in args.scorers}
    alone_seconds = shared_seconds = 0.0
    identical = 0
    for seed in range(args.samples):
        sample = make_task_sample("niah_single", tokenizer, args.tokens, seed)
        start = time.perf_counter()
        alone = [GateKV(model, tokenizer, scorer=s["scorer"], allocator=s["allocator"], budget=s["budget"])
                 .answer(sample.context, sample.question, query_aware=False, max_new_tokens=24) for s in settings]
        alone_seconds += time.perf_counter() - start
        start = time.perf_counter()
        shared = runner.answer_settings(sample.context, sample.question, settings, scorers=scorers, max_new_tokens=24)
        shared_seconds += time.perf_counter() - start
        identical += sum(a.text == b.text for a, b in zip(alone, shared))
    total = args.samples * len(settings)
    print(f"device: cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"model {args.model}, {args.tokens} tokens, {args.samples} prompts x {len(settings)} settings")
    print(f"one prefill per setting: {alone_seconds:8.1f} s  ({alone_seconds / total:.2f} s per answer)")
    print(f"one shared prefill:      {shared_seconds:8.1f} s  ({shared_seconds / total:.2f} s per answer)")
    print(f"speed-up {alone_seconds / shared_seconds:.2f}x; identical answers {identical}/{total}")


if __name__ == "__main__":
    main()
