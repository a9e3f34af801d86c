"""Needle retrieval with SnapKV, query-aware vs query-agnostic, next to the full cache (measures; asserts nothing).

- query-aware: the whole prompt (context + question) is prefilled and compressed; the question ends the prompt, so
  it lies inside SnapKV's observation window (the last ``window`` tokens).
- query-agnostic: only the context is prefilled and compressed; the question is appended to the compressed cache
  afterwards (the pattern of a cache reused for questions not known yet).

Every setting runs on the same prompts in the same process, with SmolLM2-135M-Instruct on CPU (float32)::

    python benchmarks/needle_snapkv.py --prompts 10 --tokens 2048

Budgets are shares of the compressed prompt kept per KV head (sinks and the recent window included).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as a script, this folder is sys.path[0], and transformers probes for a top-level package named `kernels`:
# a module named like a package (e.g. kernels.py) would shadow it. Keep this folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from gatekv import compress  # noqa: E402
from gatekv.models import cache_kwarg, output_cache  # noqa: E402
from gatekv.eval import needle_prompt  # noqa: E402
from gatekv.smollm2 import load_smollm2  # noqa: E402


def _dense_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10, help="number of needle prompts, seeds 0..N-1 (default 10)")
    parser.add_argument("--tokens", type=int, default=2048, help="context length in tokens (default 2048)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1], help="default 0.5 0.25 0.1")
    parser.add_argument("--allocator", default="uniform", help="allocator (default uniform)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    stop = model.generation_config.eos_token_id
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=stop)
    settings = [("full cache", None, None)]
    settings += [(f"snapkv query-aware {b:.0%}", "aware", b) for b in args.budgets]
    settings += [(f"snapkv query-agnostic {b:.0%}", "agnostic", b) for b in args.budgets]

    correct: dict[str, int] = defaultdict(int)
    seconds: dict[str, float] = defaultdict(float)
    kv_ratio: dict[str, float] = defaultdict(float)
    print(
        f"needle retrieval, SmolLM2-135M-Instruct fp32 on CPU ({torch.get_num_threads()} threads), "
        f"{args.prompts} prompts of ~{args.tokens} context tokens, allocator {args.allocator}",
        flush=True,
    )
    for seed in range(args.prompts):
        prompt = needle_prompt(tokenizer, args.tokens, seed)
        full_bytes = None
        marks = []
        for label, mode, budget in settings:
            began = time.perf_counter()
            with torch.no_grad():
                if mode is None:
                    out = model.generate(prompt.prompt_ids, return_dict_in_generate=True, **options)
                    sequences, held = out.sequences, _dense_cache_bytes(output_cache(out))
                    full_bytes = held
                else:
                    with compress(model, "snapkv", args.allocator, budget=budget) as session:
                        cache = session.new_cache()
                        if mode == "agnostic":
                            model(input_ids=prompt.context_ids, **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
                        sequences = model.generate(prompt.prompt_ids, **{cache_kwarg(model): cache}, **options)
                    held = cache.kv_bytes()
            seconds[label] += time.perf_counter() - began
            kv_ratio[label] += held / full_bytes
            answer = tokenizer.decode(sequences[0, prompt.prompt_ids.shape[1] :], skip_special_tokens=True)
            ok = prompt.is_correct(answer)
            correct[label] += ok
            marks.append("+" if ok else "-")
        print(f"  seed {seed:>2} depth {prompt.depth:.2f} answer {prompt.answer}: {''.join(marks)}", flush=True)

    n = args.prompts
    print(f"\n{'setting':<28} {'correct':>8} {'accuracy':>8} {'KV x full':>9} {'s/prompt':>8}")
    for label, _, _ in settings:
        print(
            f"{label:<28} {correct[label]:>4}/{n:<3} {correct[label] / n:>8.0%} {kv_ratio[label] / n:>9.3f} "
            f"{seconds[label] / n:>8.1f}"
        )
    print("KV x full: keys + values held after generation vs the full cache (compressed: incl. decode room).")


if __name__ == "__main__":
    main()
